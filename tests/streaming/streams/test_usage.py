"""streaming/streams/usage.py: a provider's usage, whichever endpoint reported it."""

from streaming.streams.usage import ReportedUsage, read_usage


def test_chat_and_legacy_completions():
    assert read_usage({"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30,
                       "prompt_tokens_details": {"cached_tokens": 4},
                       "completion_tokens_details": {"reasoning_tokens": 6}}) == ReportedUsage(10, 20, 4, 6)
    assert read_usage({"prompt_tokens": 10, "completion_tokens": 20}) == ReportedUsage(10, 20, None, None)


def test_embeddings():
    assert read_usage({"prompt_tokens": 8, "total_tokens": 8}) == ReportedUsage(8, 0, None, None)


def test_the_responses_api():
    assert read_usage({"input_tokens": 3, "output_tokens": 9, "input_tokens_details": {"cached_tokens": 0},
                       "output_tokens_details": {"reasoning_tokens": 5}}) == ReportedUsage(3, 9, 0, 5)


def test_whatever_a_provider_sends_is_a_count():
    assert read_usage({"prompt_tokens": "x", "completion_tokens": -3, "prompt_tokens_details": {"cached_tokens": 1e309},
                       "completion_tokens_details": "none"}) == ReportedUsage(0, 0, 0, None)
    assert read_usage({"input_tokens": 1, "output_tokens_details": {"reasoning_tokens": 10**12}}).reasoning_tokens \
        == 2**31 - 1
