"""What the other endpoints send as their prompt, counted for admission: the Responses API's instructions and input
items, and the `prompt` of a legacy completion or the `input` of an embedding (a string, strings, or token ids).

Estimates, like chat's (quotas/domain/policy.py): settlement charges the provider's own count. Long prompts are counted
in a thread, as chat's are (completion.PROMPT_COUNT_IN_THREAD_CHARS).
"""

import asyncio
import json

from quotas.domain.policy import estimate_tokens

from .completion import PROMPT_COUNT_IN_THREAD_CHARS, count_messages

# Content parts whose text the model reads as text; other parts (images, files, audio) are reserved at the price of the
# largest image, as chat's are.
TEXT_PARTS = {"input_text": "text", "output_text": "text", "text": "text", "summary_text": "text",
              "reasoning_text": "text", "refusal": "refusal"}


async def count_input(value) -> int:
    """A prompt or an embedding's input: a string, an array of strings, an array of token ids, or an array of such
    arrays (gateway/bodies.py checked which). Token ids count one each; no framing, as providers count these."""
    if _chars(value) > PROMPT_COUNT_IN_THREAD_CHARS:
        return await asyncio.to_thread(_count_input, value)
    return _count_input(value)


def _count_input(value) -> int:
    if isinstance(value, str):
        return estimate_tokens(value)
    if isinstance(value, int):
        return 1
    return sum(_count_input(item) for item in value)


def _chars(value) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(item) for item in value if isinstance(item, str))
    return 0


async def count_responses_input(instructions, items) -> int:
    """The Responses API's instructions and input, counted as the chat messages they amount to."""
    return await count_messages(responses_messages(instructions, items))


def responses_messages(instructions, items) -> list[dict]:
    """The instructions (a system message) and the input (a user message, or one message per item) in chat's format,
    for quotas' estimate: the items' text is counted, a function call's name and arguments, a tool's output. An item
    of a kind this does not know is counted as its JSON text (more than the provider counts, never less)."""
    messages = []
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        messages.extend(_message(item) for item in items)
    return messages


def _message(item) -> dict:
    if not isinstance(item, dict):
        return {"content": json.dumps(item)}
    message = {"role": item["role"]} if isinstance(item.get("role"), str) else {}
    kind, content = item.get("type"), item.get("content")
    if isinstance(content, str):
        message["content"] = content
    elif isinstance(content, list):
        message["content"] = [_part(part) for part in content]
    elif kind == "function_call":
        message["tool_calls"] = [{"function": {"name": item.get("name"), "arguments": item.get("arguments")}}]
    elif kind in ("function_call_output", "custom_tool_call_output"):
        output = item.get("output")
        message["content"] = output if isinstance(output, str) else json.dumps(output)
    elif kind == "reasoning" and isinstance(item.get("summary"), list):
        message["content"] = [_part(part) for part in item["summary"]]
    else:
        message["content"] = json.dumps(item)
    return message


def _part(part):
    kind = part.get("type") if isinstance(part, dict) else None
    if isinstance(kind, str) and (field := TEXT_PARTS.get(kind)):
        text = part.get(field)
        return {"type": "text", "text": text if isinstance(text, str) else ""}
    return part  # not text: reserved as the largest image
