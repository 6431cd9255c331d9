"""Money: a model's price per million tokens, and what a request costs (issue 18; docs/quotas.md, "Money").

Amounts are integers of NANOS (10⁻⁹ of the currency, SLUICE_CURRENCY): a price of 0.15 per million tokens is 150
nanos a token, exact; the counter store's Lua numbers hold integers exactly up to 2⁵³ nanos (9 million currency
units), far above any window's budget. A price's fraction of a nano is rounded up, never down: a cost is never
under-counted.

Pure: the price comes from the caller (the catalogue's, for the model that served the request).
"""

import dataclasses
import math
from decimal import Decimal

NANOS = 10**9
PER_MILLION = 10**6
# The rates a price may leave empty, in the order a ledger row's record lists them.
OPTIONAL = ("cached_input", "reasoning", "cache_write")


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens, in the currency. None: that kind of token is billed at the next rate (cached input and
    cache writes at the input rate, reasoning at the output rate, as OpenAI bills them; a provider that bills cache
    writes apart, as Anthropic does, has its own rate for them)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None
    cache_write: Decimal | None = None
    id: int | None = None  # the price record's, for the ledger

    def per_token(self, kind: str) -> int:
        """Nanos per token of `kind` ("input", "cached_input", "cache_write", "output", "reasoning"), rounded up."""
        rate = getattr(self, kind)
        if rate is None:
            rate = self.output if kind == "reasoning" else self.input
        return math.ceil(Decimal(rate) * NANOS / PER_MILLION)

    def as_record(self) -> dict:
        """The price as the ledger row keeps it (strings: exact decimals in JSON)."""
        return {"id": self.id, "input": str(self.input), "output": str(self.output),
                **{name: None if getattr(self, name) is None else str(getattr(self, name)) for name in OPTIONAL}}


def cost_nanos(price: Price | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
               reasoning_tokens: int | None = None, cache_write_tokens: int | None = None) -> int | None:
    """What a request costs: cached prompt tokens at the cached rate, prompt tokens written to the provider's cache at
    the cache-write rate, reasoning tokens at the reasoning rate, the rest at the input and output rates. None without
    a price.

    Cached and cache-write tokens are part of the prompt's count, reasoning tokens of the completion's, as
    OpenAI-format usage reports them (LiteLLM and OpenRouter report Anthropic's cache writes so too). A provider
    reporting more of them than the totals is capped at the totals, cached tokens first: a token is billed once."""
    if price is None:
        return None
    cached = min(cached_tokens or 0, prompt_tokens)
    written = min(cache_write_tokens or 0, prompt_tokens - cached)
    reasoning = min(reasoning_tokens or 0, completion_tokens)
    return ((prompt_tokens - cached - written) * price.per_token("input") + cached * price.per_token("cached_input")
            + written * price.per_token("cache_write")
            + (completion_tokens - reasoning) * price.per_token("output") + reasoning * price.per_token("reasoning"))


def as_nanos(amount) -> int | None:
    """An amount of the currency (a Decimal field's value) in nanos, rounded down (a budget is never widened)."""
    if amount is None:
        return None
    return math.floor(Decimal(amount) * NANOS)


def price_from_record(record) -> Price | None:
    """The Price a ledger row's `price` (Price.as_record) describes; None for an unpriced row. A rate the record
    lacks (a row priced before that rate existed, such as cache_write) is empty: billed as it was then."""
    if not record:
        return None
    optional = {name: None if record.get(name) is None else Decimal(record[name]) for name in OPTIONAL}
    return Price(input=Decimal(record["input"]), output=Decimal(record["output"]), id=record.get("id"), **optional)


def as_currency(nanos: int | None) -> Decimal | None:
    return None if nanos is None else Decimal(nanos) / NANOS
