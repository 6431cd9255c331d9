"""The provider's endpoints Sluice relays to: where each one is (its path under the provider's base URL) and how its
stream's events are classified.

Chat completions are classified by events.classify; the legacy text completions by `classify_text` below (the same
stream, with `choices[].text` where chat has `choices[].delta`); the Responses API by a classifier of its own, one per
stream (response_events.py). Embeddings never stream.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass

from quotas.domain.policy import chunk_tokens

from .events import CHUNK, DONE, DONE_PAYLOAD, ERROR, INVALID, Event, classify


@dataclass(frozen=True)
class Endpoint:
    path: str  # under the provider's base URL, e.g. "/chat/completions"
    classify: Callable[[bytes], Event] = classify  # one `data` payload of its stream → an Event


def classify_text(data: bytes) -> Event:
    """A legacy text completion chunk (`object: text_completion`): its tokens are those of `choices[].text`."""
    if data == DONE_PAYLOAD:
        return Event(data, DONE)
    try:
        chunk = json.loads(data)
    except ValueError:
        return Event(data, INVALID)
    if not isinstance(chunk, dict):
        return Event(data, INVALID)
    if "error" in chunk:
        return Event(data, ERROR)
    usage = chunk.get("usage") or None
    if not isinstance(usage, dict):
        usage = None
    choices = chunk.get("choices")
    if not choices or not isinstance(choices, list):
        return Event(data, CHUNK, 0, usage, False, usage is not None)
    tokens = 0
    finished = False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if text:
            tokens += chunk_tokens(text) if isinstance(text, str) else 1
        if choice.get("finish_reason"):
            finished = True
    return Event(data, CHUNK, tokens, usage, True, finished or usage is not None or tokens > 0, finished)


CHAT = Endpoint("/chat/completions")
TEXT_COMPLETIONS = Endpoint("/completions", classify_text)
EMBEDDINGS = Endpoint("/embeddings")
