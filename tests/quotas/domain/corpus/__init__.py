"""A recorded corpus of streamed completions — English prose, Python code, Chinese, Japanese, tool-call arguments —
each with the provider's own token count: for OpenAI's current models, o200k_base over the text.

recorded.json is written by `python -m tests.quotas.domain.corpus.record` from the sources beside it, with quicktok's
o200k_base, an implementation that is not the gateway's (tiktoken): the tests read the counts, they do not recount
them with the meter under test.

A sample's `deltas` are what an OpenAI stream carries: one token per delta, except that a token ending inside a UTF-8
character is held back until the character is whole (CJK), as providers do. `chunks()` turns them into the payloads of
chat.completion.chunk events, one delta each or regrouped in bursts.
"""

import json
from pathlib import Path

RECORDING = Path(__file__).parent / "recorded.json"
MODES = ("token", "burst")
# How many deltas a server that flushes several tokens at once puts in one (vLLM's stream interval, a proxy that
# coalesces): 2, 3, ... 8, in turn.
BURST_SIZES = tuple(range(2, 9))


def load() -> dict:
    return json.loads(RECORDING.read_text("utf-8"))


def samples() -> dict:
    """name -> sample."""
    return {sample["name"]: sample for sample in load()["samples"]}


def regroup(deltas, mode):
    if mode == "token":
        return list(deltas)
    groups, start, turn = [], 0, 0
    while start < len(deltas):
        size = BURST_SIZES[turn % len(BURST_SIZES)]
        groups.append("".join(deltas[start:start + size]))
        start, turn = start + size, turn + 1
    return groups


def chunks(sample, mode="token", field="content", model="gpt-4o-2024-08-06") -> list[bytes]:
    """The sample streamed as an OpenAI chat.completion.chunk payload per delta: its text in `field` (content,
    reasoning, reasoning_content, refusal), or, for tool calls, each call opened with its id and name, then its
    arguments."""
    if "calls" in sample:
        deltas = []
        for index, call in enumerate(sample["calls"]):
            deltas.append({"tool_calls": [{"index": index, "id": f"call_{index}", "type": "function",
                                           "function": {"name": call["name"], "arguments": ""}}]})
            deltas += [{"tool_calls": [{"index": index, "function": {"arguments": piece}}]}
                       for piece in regroup(call["deltas"], mode)]
    else:
        deltas = [{field: piece} for piece in regroup(sample["deltas"], mode)]
    return [json.dumps({"id": "chatcmpl-corpus", "object": "chat.completion.chunk", "created": 1767225600,
                        "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                     "finish_reason": None}]},
                       ensure_ascii=False).encode() for delta in deltas]
