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


def test_cache_writes_in_openrouters_and_anthropics_words():
    # OpenRouter: a detail of the prompt's, beside the cached tokens.
    openrouter = read_usage({"prompt_tokens": 1200, "completion_tokens": 40,
                             "prompt_tokens_details": {"cached_tokens": 800, "cache_write_tokens": 300}})
    assert openrouter == ReportedUsage(1200, 40, 800, None, 300)
    # LiteLLM and others pass Anthropic's field on at the top of the usage.
    litellm = read_usage({"prompt_tokens": 1200, "completion_tokens": 40, "cache_creation_input_tokens": 300,
                          "cache_read_input_tokens": 800, "prompt_tokens_details": {"cached_tokens": 800}})
    assert litellm == ReportedUsage(1200, 40, 800, None, 300)
    # Both at once are the same count, not two parts.
    both = {"prompt_tokens": 9, "cache_creation_input_tokens": 4, "prompt_tokens_details": {"cache_write_tokens": 4}}
    assert read_usage(both).cache_write_tokens == 4
    assert read_usage({"prompt_tokens": 9, "completion_tokens": 1}).cache_write_tokens is None


def test_cache_writes_in_the_responses_api():
    usage = read_usage({"input_tokens": 30, "output_tokens": 9,
                        "input_tokens_details": {"cached_tokens": 10, "cache_write_tokens": 15}})
    assert usage == ReportedUsage(30, 9, 10, None, 15)
    # Beside `input_tokens`, Anthropic's name is its own usage (whose input tokens leave the writes out): not read.
    assert read_usage({"input_tokens": 30, "output_tokens": 9, "cache_creation_input_tokens": 15}) \
        == ReportedUsage(30, 9, None, None, None)
    assert read_usage({"input_tokens": 1, "input_tokens_details": {"cache_write_tokens": 10**12}}) \
        .cache_write_tokens == 2**31 - 1
