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


@dataclasses.dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens, in the currency. None: that kind of token is billed at the next rate (cached input at the
    input rate, reasoning at the output rate, as OpenAI bills them)."""

    input: Decimal
    output: Decimal
    cached_input: Decimal | None = None
    reasoning: Decimal | None = None
    id: int | None = None  # the price record's, for the ledger

    def per_token(self, kind: str) -> int:
        """Nanos per token of `kind` ("input", "cached_input", "output", "reasoning"), rounded up."""
        rate = getattr(self, kind)
        if rate is None:
            rate = self.input if kind == "cached_input" else self.output
        return math.ceil(Decimal(rate) * NANOS / PER_MILLION)

    def as_record(self) -> dict:
        """The price as the ledger row keeps it (strings: exact decimals in JSON)."""
        return {"id": self.id, "input": str(self.input), "output": str(self.output),
                "cached_input": None if self.cached_input is None else str(self.cached_input),
                "reasoning": None if self.reasoning is None else str(self.reasoning)}


def cost_nanos(price: Price | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None,
               reasoning_tokens: int | None = None) -> int | None:
    """What a request costs: cached prompt tokens at the cached rate, reasoning tokens (part of the completion's, as
    providers report them) at the reasoning rate, the rest at the input and output rates. None without a price."""
    if price is None:
        return None
    cached = min(cached_tokens or 0, prompt_tokens)
    reasoning = min(reasoning_tokens or 0, completion_tokens)
    return ((prompt_tokens - cached) * price.per_token("input") + cached * price.per_token("cached_input")
            + (completion_tokens - reasoning) * price.per_token("output") + reasoning * price.per_token("reasoning"))


def as_nanos(amount) -> int | None:
    """An amount of the currency (a Decimal field's value) in nanos, rounded down (a budget is never widened)."""
    if amount is None:
        return None
    return math.floor(Decimal(amount) * NANOS)


def price_from_record(record) -> Price | None:
    """The Price a ledger row's `price` (Price.as_record) describes; None for an unpriced row."""
    if not record:
        return None
    optional = {name: None if record.get(name) is None else Decimal(record[name]) for name in ("cached_input",
                                                                                                 "reasoning")}
    return Price(input=Decimal(record["input"]), output=Decimal(record["output"]), id=record.get("id"), **optional)


def as_currency(nanos: int | None) -> Decimal | None:
    return None if nanos is None else Decimal(nanos) / NANOS
