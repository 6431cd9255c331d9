"""A provider's reported usage, read the same way whichever endpoint reported it.

Chat and legacy completions report `prompt_tokens` and `completion_tokens` (with `prompt_tokens_details.cached_tokens`
and `completion_tokens_details.reasoning_tokens`), embeddings `prompt_tokens` alone, the Responses API `input_tokens`
and `output_tokens` (with `input_tokens_details` and `output_tokens_details`). Reasoning tokens are part of the
completion's count, cached tokens of the prompt's: the details say how many, for the ledger.

Prompt tokens written to the provider's cache (billed apart by Anthropic, through OpenRouter or LiteLLM) are part of
the prompt's count too, as OpenAI-format usage reports them: OpenRouter says how many in
`prompt_tokens_details.cache_write_tokens`, LiteLLM and others pass Anthropic's `cache_creation_input_tokens` on at the
top of the usage; in the Responses API's usage, `input_tokens_details.cache_write_tokens`.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ReportedUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None  # None: the provider did not say
    reasoning_tokens: int | None
    cache_write_tokens: int | None = None


def read_usage(usage: dict) -> ReportedUsage:
    if "input_tokens" in usage or "output_tokens" in usage:  # the Responses API's names
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
        prompt_details, completion_details = usage.get("input_tokens_details"), usage.get("output_tokens_details")
        # Not Anthropic's `cache_creation_input_tokens` here: beside `input_tokens` it is Anthropic's own usage, whose
        # input_tokens leave the cache writes out: taking them out of that count again would under-bill the prompt.
        written = _detail(prompt_details, "cache_write_tokens")
    else:
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt_details, completion_details = usage.get("prompt_tokens_details"), usage.get("completion_tokens_details")
        written = _cache_writes(usage, prompt_details)
    return ReportedUsage(count(prompt), count(completion), _detail(prompt_details, "cached_tokens"),
                         _detail(completion_details, "reasoning_tokens"), written)


def _cache_writes(usage, prompt_details) -> int | None:
    """Chat's cache writes in either dialect: OpenRouter's detail first, else Anthropic's name for them (a provider
    sending both sends the same count twice, never two parts to add)."""
    written = _detail(prompt_details, "cache_write_tokens")
    return written if written is not None else _detail(usage, "cache_creation_input_tokens")


def count(value) -> int:
    """A token count from a provider's usage: a non-negative integer, whatever it sent."""
    try:
        return max(0, int(value or 0))
    except (TypeError, ValueError, OverflowError):
        return 0


# The ledger's columns are 32-bit (PositiveIntegerField): a provider reporting more is recorded at that.
MAX_DETAIL = 2**31 - 1


def _detail(details, name) -> int | None:
    if not isinstance(details, dict) or details.get(name) is None:
        return None
    return min(count(details[name]), MAX_DETAIL)
