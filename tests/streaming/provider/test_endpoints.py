"""streaming/provider/endpoints.py: the legacy text completions' chunks, classified as chat's are."""

import pytest

from streaming.provider.endpoints import classify_text
from streaming.provider.events import CHUNK, DONE, ERROR, INVALID


@pytest.mark.parametrize("data, kind, tokens, begins, finished, has_choices", [
    (b'{"object": "text_completion", "choices": [{"text": " three more words", "index": 0}]}', CHUNK, 3, True, False,
     True),
    (b'{"choices": [{"text": " a", "index": 0}, {"text": " b", "index": 1}]}', CHUNK, 2, True, False, True),
    (b'{"choices": [{"text": "", "index": 0, "finish_reason": "length"}]}', CHUNK, 0, True, True, True),
    (b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}', CHUNK, 0, True, False, False),
    (b'{"choices": ["x", {"text": ["not", "text"]}]}', CHUNK, 1, True, False, True),
    (b'{"error": {"message": "boom"}}', ERROR, 0, True, False, False),
    (b"[DONE]", DONE, 0, True, False, False),
    (b"[1]", INVALID, 0, True, False, False),
])
def test_classify_text(data, kind, tokens, begins, finished, has_choices):
    event = classify_text(data)
    assert (event.kind, event.tokens, event.begins_answer, event.finished, event.has_choices) == (
        kind, tokens, begins, finished, has_choices)
    assert event.data == data
