"""Token leases: a request's hold on its user's day and month windows, from admission to settlement.

Every token the client receives is covered by the lease first, so the windows' limits hold mid-stream across
concurrent streams and processes; `settle` turns the lease into the tokens actually charged and returns the rest.
docs/quotas.md explains the arithmetic.
"""

import asyncio
import dataclasses
import logging
import time

from django.conf import settings
from django.utils import timezone

from ..store import StoreUnavailable, WindowSpec, get_store
from . import alerts
from .exceptions import CounterStoreDown, QuotaExceeded
from .money import Price
from .policy import Limits, clamp_max_tokens, exhausted_window, first_lease, tokens_left, window_limit
from .selectors import ledger_states, limits_of
from .windows import RATED_MAX, rated_specs, template

logger = logging.getLogger("quotas")

# A lease re-reads the user's limits at most this often, so an operator's change reaches running streams at their
# next lease without a query per lease.
LIMITS_REFRESH_SECONDS = 5.0


async def seed_windows(user_id, windows, specs, missing, now):
    """Rebuild the missing windows from one snapshot of the ledger (selectors.ledger_states)."""
    rebuilt = [(window, spec) for window, spec in zip(windows, specs) if spec.key in missing]
    if not rebuilt:
        return
    states = await ledger_states(user_id, [window for window, _ in rebuilt], timezone.now())
    for (window, spec), (used, leases) in zip(rebuilt, states):
        logger.info("rebuilt quota window %s from the ledger: %d used, %d running", spec.key, used, len(leases))
        await get_store().seed(spec, used, leases, now, settings.QUOTA_SLOT_TTL)


class TokenLease:
    """`price`: the request's model's (quotas.domain.money.Price), or None; with a price, the money budgets are leased
    too, in nanos: prompt tokens at the input rate, completion tokens at the output rate. `limits.pools` (the API
    key's: its spend limits, its team's pool, the member's cap) add their windows to the user's: every lease takes
    from all of them at once, in one counter-store operation. `key_id`: the key whose pools a refresh reads again.
    `now_dt` fixes the windows (and is the ledger row's start: a rebuild finds the row in the same windows)."""

    def __init__(self, user_id, limits, holder, now_dt, price: Price | None = None, key_id=None,
                 money: bool = False):
        self.user_id = user_id
        self.key_id = key_id
        self.limits = limits
        self.holder = holder
        self.price = price
        self.started_at = now_dt
        found = template(user_id, limits, now_dt, money or price is not None)
        self.windows, self.specs = found.windows, list(found.specs)
        self.money = found.money  # per window: is it a money window (Window.is_money, read once)
        self.has_money = any(self.money)
        self._rates = {}  # kind -> nanos per token (rate)
        # rate -> (specs at that rate, rates) (_rated): the template's, shared by the leases of its windows, until a
        # refresh changes this lease's limits.
        self._rated_specs = found.rated
        self.held = 0  # tokens leased so far: prompt + completion
        self.held_units = [0] * len(self.specs)  # per window, in its units (tokens; nanos for money)
        self.prompt_tokens = 0
        self.max_tokens = 0  # per choice
        self.choices = 1  # n: the completion may use max_tokens for each
        self.limits_read_at = time.monotonic()
        self.settled = False
        self.remaining = None  # tokens (at the output rate) in the tightest window, after the last lease
        self.remaining_by_window = ()  # per window, in tokens at the last lease's rate, after the last lease
        self.remaining_units = ()  # per window, in its units (tokens; nanos for money), after the last lease
        self.block = settings.QUOTA_LEASE_BLOCK_TOKENS

    @property
    def held_nanos(self) -> int:
        """The money the lease holds (the same in every money window: each grant takes the same tokens at the same
        rate from all of them); 0 without money windows."""
        return min((units for money, units in zip(self.money, self.held_units) if money), default=0)

    def rate(self, kind: str) -> int:
        """Nanos per token of `kind` ("input" or "output") for the money windows: at least 1, so that the store's
        arithmetic holds for a free kind of token (its cost is still charged exactly: `charges`). Computed once per
        lease (Decimal arithmetic)."""
        if self.price is None:
            return 1
        rate = self._rates.get(kind)
        if rate is None:
            rate = self._rates[kind] = max(1, self.price.per_token(kind))
        return rate

    def _rated(self, kind):
        """The specs at `kind`'s rate in the money windows, and the rates: built once per rate and per set of limits
        (a lease per block, and the next request with the same windows, reuse them)."""
        if not self.has_money:
            return self.specs, (1,) * len(self.specs)
        rate = self.rate(kind)
        rated = self._rated_specs.get(rate)
        if rated is None:
            rated = rated_specs(self.money, self.specs, rate)
            if len(self._rated_specs) < RATED_MAX:
                self._rated_specs[rate] = rated
        return rated

    @property
    def completion_leased(self):
        return self.held - self.prompt_tokens

    @property
    def completion_budget(self):
        """The most the completion may use: max_tokens for each choice."""
        return self.max_tokens * self.choices

    async def _lease(self, want, kind="output"):
        """Lease up to `want` more tokens in every window, at `kind`'s rate in the money windows."""
        specs, rates = self._rated(kind)
        result = await self._store_lease(specs, want)
        self._granted(result, result.granted, [result.granted * r for r in rates], rates)
        return result.granted

    async def _lease_bundle(self, prompt_tokens, completion_tokens) -> int:
        """Admission's prompt (at the input rate) and first completion block (at the output rate) in one store call,
        all or nothing: one "unit" whose weight in each window is the pair's — in a money window prompt × input rate +
        block × output rate, in a token window prompt + block (the store's weighted windows, WindowSpec.rate).
        Returns the tokens granted: both, or 0 (then nothing is held and the caller leases them one by one)."""
        inp, out = self.rate("input"), self.rate("output")
        units = [prompt_tokens * inp + completion_tokens * out if money else prompt_tokens + completion_tokens
                 for money in self.money]
        if not all(units):
            return 0  # nothing to weigh a unit by: one by one
        weighed = [WindowSpec(s.key, s.limit, s.expire_at, u) for s, u in zip(self.specs, units)]
        result = await self._store_lease(weighed, 1)
        if not result.granted:
            return 0
        self._granted(result, prompt_tokens + completion_tokens, units, self._rated("output")[1])
        return prompt_tokens + completion_tokens

    async def _store_lease(self, specs, want):
        """The store's `lease` of `want` (in the specs' rates), the missing windows rebuilt from the ledger first."""
        store = get_store()
        now = time.time()
        try:
            for _ in range(3):
                result = await store.lease(specs, self.holder, tuple(self.held_units), want, now,
                                           settings.QUOTA_SLOT_TTL)
                if not result.missing:
                    return result
                await seed_windows(self.user_id, self.windows, self.specs, result.missing, now)
        except StoreUnavailable:
            logger.warning("counter store unavailable: token quota fails closed")
            alerts.counter_store_down()
            raise CounterStoreDown("quota") from None
        raise CounterStoreDown("quota")

    def _granted(self, result, tokens, units, rates):
        """Record a grant: `tokens` more held, `units` more in each window; what is left, in each window's units and
        in tokens at `rates` (the last lease's)."""
        self.held += tokens
        self.held_units = [held + more for held, more in zip(self.held_units, units)]
        self.remaining_by_window = tuple(left // r for left, r in zip(result.remaining, rates))
        self.remaining_units = tuple(result.remaining)
        self.remaining = tokens_left(result.remaining, self._rated("output")[1])

    def exhausted(self) -> QuotaExceeded:
        """The refusal for the window that ran out at the last lease, with that window's own reset and owner."""
        window = exhausted_window(self.windows, self.remaining_by_window)
        return QuotaExceeded(window.scope, window.seconds_left(timezone.now()), window.end, window.owner,
                             window.owner_name)

    async def admit(self, prompt_tokens, requested_max, stream: bool, choices: int = 1):
        """Reserve the prompt (once) and the first block, or for a non-streaming request `choices` (n) times the
        whole budget; clamp max_tokens (per choice). Raises QuotaExceeded.

        With money windows the prompt is leased at the input rate and the completion's first block (or whole budget)
        at the output rate: both in one store call when both fit (`_lease_bundle`), else one after the other (the
        prompt, then as much of the block as is left)."""
        self.prompt_tokens = prompt_tokens
        self.choices = choices
        plan_max = self.limits.max_tokens_per_request
        wanted_completion = min(requested_max or plan_max, plan_max) * choices
        block = settings.QUOTA_LEASE_BLOCK_TOKENS if stream else wanted_completion
        if self.has_money:
            first = min(block, wanted_completion)
            granted = await self._lease_bundle(prompt_tokens, first)
            if not granted:
                granted = await self._lease(prompt_tokens, "input")
                if granted >= prompt_tokens:
                    granted += await self._lease(first, "output")
        else:
            granted = await self._lease(first_lease(prompt_tokens, wanted_completion, block))
        # What the completion may use: its first block plus whatever is left in every window.
        available = granted - prompt_tokens + (self.remaining if stream else 0)
        self.max_tokens = clamp_max_tokens(requested_max, plan_max, max(0, available), choices)
        if self.max_tokens < 1:  # not one token for each choice
            refusal = self.exhausted()
            await self.release()
            raise refusal
        return self.max_tokens

    def reserved_nanos(self, prompt_tokens, completion_budget) -> int | None:
        """What a request of a priced model may cost at most: its ledger row's reservation in money."""
        if self.price is None:
            return None
        return prompt_tokens * self.rate("input") + completion_budget * self.rate("output")

    def charges(self, tokens, cost_nanos):
        """What settlement charges each window (in its units): `tokens` in the token windows; in the money windows
        the cost, but never more than the lease holds there (never past a budget). Also the money charged (None
        without money windows: the cost itself, uncapped)."""
        if not self.has_money:
            return tokens, cost_nanos
        nanos = min(cost_nanos or 0, self.held_nanos)
        return [nanos if money else tokens for money in self.money], nanos

    async def need(self, tokens) -> bool:
        """Make sure `tokens` more completion tokens are covered; False when the quota is spent (`exhausted()`
        then names the window)."""
        if time.monotonic() - self.limits_read_at > LIMITS_REFRESH_SECONDS:
            await self._refresh_limits()
        # A block at a time, doubling as the stream proves long (one store round trip per block), never more than
        # the stream may still use: a long stream makes few round trips, and a short one holds little that other
        # streams of the user cannot have.
        self.block = min(self.block * 2, settings.QUOTA_LEASE_MAX_BLOCK_TOKENS)
        want = max(tokens, min(self.block, self.completion_budget - self.completion_leased))
        granted = await self._lease(want)
        return granted >= tokens

    async def top_up(self, tokens, kind="output") -> int:
        """Lease up to `tokens` more, as far as every window allows (no more than what is left); returns how many.

        For a charge the stream could not meter as it went (usage a provider reports beyond what it streamed): it can
        never take a window past its limit.
        """
        if tokens <= 0:
            return 0
        return await self._lease(tokens, kind)

    async def _refresh_limits(self):
        self.limits_read_at = time.monotonic()
        limits = await limits_of(self.user_id, self.key_id)
        if limits != self.limits:
            self.limits = limits
            # Same windows (keys), new limits; a suspension stops the stream at its next lease.
            self.specs = [dataclasses.replace(s, limit=window_limit(w, limits))
                          for w, s in zip(self.windows, self.specs)]
            self._rated_specs = {}  # no longer the template's

    async def holds(self) -> bool:
        """Whether every window still holds this lease (its expiry pushed back as well): False when a window's record
        was dropped (Redis restarted, flushed, evicted) and rebuilt from a ledger that did not show this request's
        row yet — admission's check once the row is in (streaming/streams/completion.py, `_confirm_admission`)."""
        try:
            return await get_store().renew(self.specs, None, self.holder, time.time(), settings.QUOTA_SLOT_TTL)
        except StoreUnavailable:
            logger.warning("counter store unavailable: token quota fails closed")
            alerts.counter_store_down()
            raise CounterStoreDown("quota") from None

    def forget(self):
        """Hold nothing again, the block back to its first size: before admitting again a lease the store lost."""
        self.held = 0
        self.held_units = [0] * len(self.specs)
        self.block = settings.QUOTA_LEASE_BLOCK_TOKENS

    async def renew(self, slot_key):
        try:
            await get_store().renew(self.specs, slot_key, self.holder, time.time(), settings.QUOTA_SLOT_TTL)
        except StoreUnavailable:
            logger.warning("could not renew a lease; it expires within QUOTA_SLOT_TTL")

    async def release(self):
        await self.settle(0)

    async def settle(self, charged, cost_nanos=None):
        """Charge `charged` tokens (and in the money windows `cost_nanos`, as far as the lease holds: `charges`) and
        return the rest of the lease. Idempotent."""
        if self.settled:
            return
        self.settled = True
        units = self.charges(charged, cost_nanos)[0]  # per window (a number alone: the same in every window)
        for attempt in range(3):
            try:
                await get_store().settle(self.specs, self.holder, units)
                await alerts.settled(self, units)
                return
            except StoreUnavailable:
                await asyncio.sleep(0.05 * (attempt + 1))
        logger.error("could not settle %s in the counter store; the ledger row is correct", self.holder)

    async def status(self):
        """Per window: limit, used (settled + leased), remaining, reset time. The user's windows by their scope
        ("day", "budget_month"), a pool's by its owner and scope ("team:budget_month"); money in nanos."""
        store, now = get_store(), time.time()
        out = {}
        for window, spec in zip(self.windows, self.specs):
            state = await store.usage(spec.key, now)
            if state is None:
                await seed_windows(self.user_id, [window], [spec], {spec.key}, now)
                state = await store.usage(spec.key, now) or (0, 0)
            used = state[0] + state[1]
            name = window.scope if window.owner == "user" else f"{window.owner}:{window.scope}"
            out[name] = {
                "limit": spec.limit, "used": used, "remaining": max(0, spec.limit - used),
                "resets_at": window.end.isoformat(), "reset_seconds": window.seconds_left(timezone.now()),
                "owner": window.owner, "owner_name": window.owner_name, "money": window.is_money,
            }
        return out


async def quota_status(user_id, limits: Limits, money: bool = False):
    """Limits, usage, remaining and reset times of the user's token windows, and with `money` of every window that
    applies to the caller (budgets, the key's, the team's, the member's: `TokenLease.status`)."""
    try:
        return await TokenLease(user_id, limits, holder="", now_dt=timezone.now(), money=money).status()
    except StoreUnavailable:
        raise CounterStoreDown("quota") from None
