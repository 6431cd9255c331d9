"""One completion's whole life, top to bottom: admit → open the provider's stream → relay → settle.

    admit     take a concurrent-stream slot, check the model, lease the prompt and a first block of tokens (a
              refusal is settled at once, as a `rejected` row), then start inserting the ledger row (status
              `streaming`) while the provider is asked;
    open      ask the provider, with retries before the first byte (streaming/provider/retries.py); before its
              answer goes out, the row is in and the lease confirmed (`_confirm_admission`);
    relay     provider → client with backpressure (relay.py), metering through `_cover`;
    settle    `_settle`, exactly once whatever happened: the ledger row (the truth), the token lease (charged what
              was delivered, the rest returned), the slot — the only place that releases it.

A counter store rebuilt from the ledger counts every admitted request whose row is in (docs/quotas.md). The row's
insert runs while the provider is asked (off the first token's path); a rebuild between the lease and the row's
commit would miss the request, so once the row is in the lease is confirmed, and taken again (or refused) where a
window lost it — before anything is delivered, so no window is exceeded. While a stream runs, its row records
progress (the completion tokens sent) at each lease and each renewal: if this process dies, another settles the row
from it (quotas/domain/recovery.py).

`Completion` is a chat completion's; the other endpoints' (responses.py, text_completions.py, embeddings.py) subclass
it and override what differs: the provider's endpoint, the prompt's count, the provider's body, the relay's wire
format, and for embeddings what is reserved.
"""

import asyncio
import json
import logging
import time

from django.conf import settings
from django.http import HttpResponse
from django.utils import timezone

from quotas.domain import admission, ledger
from quotas.domain.exceptions import CounterStoreDown, ModelNotAllowed, QuotaRefusal
from quotas.domain.leases import TokenLease
from quotas.domain.money import cost_nanos
from quotas.domain.policy import estimate_prompt_tokens
from quotas.domain.recovery import reaper
from quotas.models import Usage
from streaming import budgets
from streaming.catalogue.routing import Route
from streaming.errors import duration
from streaming.provider import retries
from streaming.provider.endpoints import CHAT
from streaming.provider.errors import UpstreamError
from streaming.telemetry import live, metrics, otel

from .event_stream import EventStreamResponse
from .relay import Relay
from .usage import read_usage

logger = logging.getLogger(__name__)

# A prompt longer than this is counted in a thread: tiktoken takes 30 ms for 1 MB of English, 170 ms for 1 MB of
# Chinese, over a second for 1 MB without a space (docs/quotas.md, "Counting tokens"), and releases the GIL meanwhile,
# so the process's streams go on.
PROMPT_COUNT_IN_THREAD_CHARS = 32_768
STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    # Ask nginx and friends not to buffer the stream (which would defeat backpressure).
    "X-Accel-Buffering": "no",
}


class Completion:
    """`await Completion(caller, chat, route).respond()` → the HTTP response (streaming or not).

    `route`: the catalogue's plan for the model the client named (streaming/catalogue/routing.py): its public name
    and the deployments to try, in order; or a provider URL (tests, benchmarks)."""

    endpoint = CHAT  # the provider's endpoint: its path, and how its stream's events are classified
    _otel = None  # its OpenTelemetry span once admitted, while SLUICE_OTEL is on (streaming/telemetry/otel.py)

    def __init__(self, caller, chat, route):
        self.caller = caller  # streaming.gateway.middleware.Caller: who, with which limits
        self.chat = chat  # streaming.gateway.validation.ChatRequest
        self.route = route if isinstance(route, Route) else Route.for_url(chat.model, route)
        self.served_by = None  # the target that answered (streaming/provider/targets.py)
        self.request_id = caller.request_id
        self.started = time.monotonic()
        # With the model's price, the user's money budgets are leased too (docs/quotas.md, "Money").
        self.lease = TokenLease(caller.user_id, caller.limits, self.request_id, timezone.now(), self.route.price,
                                key_id=caller.api_key_id)
        self.slot_key = None
        self.row = None  # the ledger row, inserted at admission (or, for a refusal before that, at settlement)
        self._row_insert = None  # the row's insert, a task running while the provider is asked
        self.relay = None
        self._progress = set()  # progress writes in flight (kept referenced until done)
        self._renewed_at = self.started
        self._finishing = None
        self._settled = False

    # The life of a completion ------------------------------------------------------------------------------------

    async def respond(self):
        await self._admit()
        if settings.SLUICE_OTEL:
            self._otel = otel.start(self.endpoint.path, self.route.name, self.request_id, self.caller.user_id,
                                    self.started)
        # Until a relay's watchdog takes over (or a non-streaming answer arrives), the lease, the slot and the row's
        # heartbeat are kept alive from here: waiting for a slow provider is not dying.
        keep_alive = asyncio.ensure_future(self._keep_alive())
        try:
            if not self.chat.stream:
                raw, self.served_by = await retries.complete(
                    self.route.targets, self._body_for, self.request_id, self.caller.user_id, self.endpoint)
                await self._confirm_admission()
                if self._otel is not None:
                    self._otel.answer(raw)
                await self._settle("completed", reported_usage=_usage_of(raw))
                return self._with_token_headers(HttpResponse(raw, content_type="application/json"))
            events = await retries.open_stream(self.route.targets, self._body_for, self.request_id,
                                               self.caller.user_id, self.endpoint)
            self.served_by = events.target
            try:
                await self._confirm_admission()
            except BaseException:
                await asyncio.shield(events.aclose())
                raise
            self._prompt_sent()
        except QuotaRefusal as refusal:  # the lease lost to a store rebuild, and no room left for it
            metrics.REFUSALS.labels(refusal.code).inc()
            await self._settle("rejected", reason=refusal.code, charge_prompt=False)
            raise
        except UpstreamError as error:
            self.served_by = error.target  # the deployment that failed or refused last (the dashboard's error rate)
            await self._settle("upstream_error", reason=error.code, charge_prompt=False)
            raise
        except BaseException:  # cancelled: the client went away while the provider was being asked
            await self._settle("client_disconnected")
            raise
        finally:
            keep_alive.cancel()
        relay = self.relay = self._relay(
            events, request_id=self.request_id, include_usage=self.chat.include_usage, meter=self._cover,
            heartbeat=self._heartbeat, on_stall=lambda: self._finish(relay, "client_stalled"), started=self.started,
            settings=settings, prompt_tokens=self.lease.prompt_tokens, max_tokens=self.lease.max_tokens,
            choices=self.chat.choices)
        response = EventStreamResponse(self._stream(relay), on_direct=relay.offer_writer,
                                       content_type="text/event-stream", headers=STREAM_HEADERS)
        return self._with_token_headers(response)

    async def _admit(self):
        caller, chat, limits = self.caller, self.chat, self.caller.limits
        prompt_tokens = await self._count_prompt()
        plan_max = limits.max_tokens_per_request
        completion_budget = self._completion_budget(plan_max)
        self.row = ledger.ledger_row(
            request_id=self.request_id, user_id=caller.user_id, api_key_id=caller.api_key_id,
            model=self.route.name or chat.model,
            stream=chat.stream, reserved_tokens=prompt_tokens + completion_budget,
            reserved_nanos=self.lease.reserved_nanos(prompt_tokens, completion_budget), price=self.route.price,
            windows=self.lease.windows, team_id=team.id if (team := limits.pool("team")) else None,
            started_at=self.lease.started_at)
        self.row.prompt_tokens = prompt_tokens
        metrics.SETTLING.inc()
        reaper.ensure_running()
        try:
            self.slot_key = await admission.acquire_slot(caller.user_id, limits, self.request_id, time.time())
            if not self.route.allows(limits):
                raise ModelNotAllowed(chat.model)
            await self._lease_admission(prompt_tokens)
        except QuotaRefusal as refusal:
            metrics.REFUSALS.labels(refusal.code).inc()
            await self._settle("rejected", reason=refusal.code, charge_prompt=False)
            # Refused before any provider was asked: the request does not spend the rate (docs/api.md), and the
            # response's x-ratelimit-remaining-requests says so (the middleware reads the window afresh).
            if await admission.refund_rate(caller.user_id, caller.rate):
                caller.rate = None
            raise
        except BaseException:
            await self._settle("client_disconnected", charge_prompt=False)
            raise
        # Off the first token's path: the provider is asked meanwhile (`_confirm_admission` waits for it). A task of
        # its own, so that a cancelled request still finds the row's fate at settlement.
        self._row_insert = asyncio.ensure_future(ledger.open_ledger(self.row))

    async def _confirm_admission(self):
        """Before the provider's answer goes out: the ledger row is in (its insert's error raised here), and every
        window still holds the admission's lease. One that lost it (dropped and rebuilt from the ledger between the
        lease and the row's commit: the rebuild could not count the request) gets the admission's lease again, as
        far as it now has room — else the request is refused (QuotaRefusal), having delivered nothing."""
        await self._row_insert
        self._row_insert = None  # in: nothing for settlement to wait for (and the task is not kept for the stream)
        lease = self.lease
        if await lease.holds():
            return
        logger.warning("request %s: its lease was lost to a counter store rebuild before its ledger row was in; "
                       "admitting it again", self.request_id)
        max_tokens = lease.max_tokens
        lease.forget()
        await self._lease_admission(lease.prompt_tokens)
        if not self.chat.stream and lease.max_tokens < max_tokens:
            # The whole answer is here already, generated for the first clamp: it is delivered in full or not at all.
            refusal = lease.exhausted()
            await lease.release()
            raise refusal

    async def _stream(self, relay):
        """The response's content; its `finally` settles however the stream ends."""
        live.register(self.request_id, self.caller.user_id, self.caller.username, self.chat.model, relay.figures,
                      relay.is_paused)
        outcome = "client_disconnected"  # unless the stream's end reaches the client, or the watchdog cut it off
        try:
            async for part in relay.parts():
                yield part
            outcome = None  # the relay's own: how the stream ended
        finally:
            if relay.outcome == "client_stalled":
                outcome = "client_stalled"
            await self._finish(relay, outcome)

    async def _finish(self, relay, outcome):
        """Close the provider's stream, then settle: once, whoever asks first (the response's `finally`, or the
        watchdog cutting off a stalled client), in a task a second cancellation cannot interrupt."""
        if self._finishing is None:
            self._finishing = asyncio.ensure_future(self._close_and_settle(relay, outcome))
        await asyncio.shield(self._finishing)

    async def _close_and_settle(self, relay, outcome):
        live.unregister(self.request_id)
        ending = await relay.close(outcome)
        await self._settle(ending.outcome, ending.figures, ending.reported_usage, reason=ending.reason)

    async def _settle(self, status, figures=None, reported_usage=None, reason="", charge_prompt=True):
        """The ledger row first (the truth), then the counters, then the slot. Once."""
        if self._settled:
            return
        self._settled = True
        # A second cancellation (server shutdown) must not leave the lease unsettled.
        await asyncio.shield(self._settle_now(status, figures, reported_usage, reason, charge_prompt))

    async def _settle_now(self, status, figures, reported_usage, reason, charge_prompt):
        lease = self.lease
        reported = bool(reported_usage) and status == "completed"
        details = {}
        if reported:
            usage = read_usage(reported_usage)
            prompt_tokens, completion_tokens = usage.prompt_tokens, usage.completion_tokens
            details = {"cached_tokens": usage.cached_tokens, "reasoning_tokens": usage.reasoning_tokens,
                       "cache_write_tokens": usage.cache_write_tokens}
        else:
            # Interrupted: the prompt as estimated, the completion as metered — never the maximum.
            prompt_tokens = lease.prompt_tokens if charge_prompt else 0
            completion_tokens = figures.completion_tokens if figures else 0
        charged = await self._chargeable(prompt_tokens + completion_tokens)
        cost = None
        fields = {"status": status, "reason": reason, "prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens, "usage_reported": reported, "charged_tokens": charged,
                  "deployment": self.served_by.name if self.served_by else "", **details}
        if (price := self.route.price) is not None:
            cost = cost_nanos(price, prompt_tokens, completion_tokens, details.get("cached_tokens"),
                              details.get("reasoning_tokens"), details.get("cache_write_tokens"))
            # The money windows are charged the cost as far as the lease holds it: never past a budget.
            fields.update(cost_nanos=cost, price=price.as_record(), charged_nanos=lease.charges(charged, cost)[1])
        ttft = None
        if figures is not None:
            if figures.first_token_at:
                ttft = figures.first_token_at - self.started
            fields.update(
                bytes_sent=figures.bytes_sent, backpressure_pauses=figures.pauses,
                paused_ms=int(figures.paused_seconds * 1000), peak_buffered_bytes=figures.peak_buffered_bytes,
                time_to_first_token_ms=int(ttft * 1000) if ttft is not None else None)
        if self._otel is not None:
            self._otel.end(status, prompt_tokens, completion_tokens, self.served_by, reason=reason, ttft=ttft,
                           max_tokens=lease.max_tokens)
        settled_here = False
        if self._row_insert is not None:
            # Whatever became of the insert (an error: the row goes in now, with its ending: close_ledger).
            await asyncio.wait([self._row_insert])
            if not self._row_insert.cancelled():
                self._row_insert.exception()
        try:
            settled_here = await ledger.close_ledger(self.row, **fields)
        finally:
            # If another process settled the row meanwhile (it took this one for dead), it charged the windows.
            await lease.settle(charged if settled_here else 0, cost if settled_here else 0)
            await admission.release_slot(self.slot_key, self.request_id)
            metrics.SETTLING.dec()
        if status != Usage.Status.REJECTED:
            metrics.stream_finished(status, completion_tokens, figures, ttft, self.route.name,
                                    self.served_by.provider if self.served_by else None)

    # What the relay is given -------------------------------------------------------------------------------------

    async def _chargeable(self, tokens) -> int:
        """What the user's windows are charged for `tokens`: all of it while the lease covers it; beyond that (a
        provider reporting tokens it did not stream: hidden reasoning, a larger prompt than estimated) only as much
        as the windows still allow, so that no window is ever exceeded. The ledger keeps the provider's figures."""
        lease = self.lease
        if tokens > lease.held:
            try:
                await lease.top_up(tokens - lease.held)
            except CounterStoreDown:
                pass
        return min(tokens, lease.held)

    async def _cover(self, total_tokens) -> int:
        """The relay's meter: lease enough for `total_tokens` completion tokens, or raise the window that ran out.

        Each new lease also records the stream's progress in its ledger row (off the stream's path): what is
        charged if this process dies, so at most one lease block of what was sent goes unbilled."""
        lease = self.lease
        if total_tokens > lease.completion_leased:
            if not await lease.need(total_tokens - lease.completion_leased):
                raise lease.exhausted()
            self._record_progress(total_tokens)
        return lease.completion_leased

    def _record_progress(self, completion_tokens):
        task = asyncio.ensure_future(ledger.record_progress(self.row.pk, completion_tokens))
        self._progress.add(task)
        task.add_done_callback(self._progress.discard)

    async def _keep_alive(self):
        while True:
            await asyncio.sleep(settings.QUOTA_SLOT_TTL / 6)
            renewal = self._heartbeat()
            if renewal is not None:
                await renewal

    def _heartbeat(self):
        """Each watchdog tick: every third of their time to live, the lease and slot kept alive, and the row's
        heartbeat and progress — returned as the coroutine to await when due (None otherwise: most ticks cost the
        watchdog's shared ticker one comparison)."""
        now = time.monotonic()
        if now - self._renewed_at > settings.QUOTA_SLOT_TTL / 3:
            self._renewed_at = now
            return self._renew()
        return None

    async def _renew(self):
        await self.lease.renew(self.slot_key)
        if not self._settled:
            self._record_progress(self.relay.figures.completion_tokens if self.relay is not None else 0)

    # What the other endpoints override ---------------------------------------------------------------------------

    def _prompt_sent(self):
        """The provider has the request and streams its answer: nothing reads the prompt's parsed messages again
        (they were counted at admission, and no other deployment will be asked), so the stream does not hold them
        for its whole life — a long conversation's messages are several times its JSON's size."""
        self.chat.messages = None

    async def _count_prompt(self) -> int:
        """The prompt's tokens, as the provider will count them (estimated: settlement charges the provider's own)."""
        return await count_messages(self.chat.messages)

    def _completion_budget(self, plan_max) -> int:
        """The most completion tokens the request may use, reserved in its ledger row at admission."""
        chat = self.chat
        return min(chat.max_tokens or plan_max, plan_max) * chat.choices

    async def _lease_admission(self, prompt_tokens):
        """Lease the prompt and the completion's first block, clamping max_tokens; raises QuotaExceeded."""
        chat = self.chat
        await self.lease.admit(prompt_tokens, chat.max_tokens, chat.stream, chat.choices)

    def _relay(self, events, **options) -> Relay:
        return Relay(events, **options)

    # Helpers -----------------------------------------------------------------------------------------------------

    def _body_for(self, target):
        """The provider's body for one deployment: its own name for the model (routing.py)."""
        body = self._provider_body(target)
        if target.model is not None and body.get("model") != target.model:
            body = {**body, "model": target.model}
        return body

    def _provider_body(self, target):
        """The client's body as it sent it (issue 16: fields Sluice does not read pass untouched), with the clamped
        token limit and Sluice's own stream options."""
        chat = self.chat
        body = {"model": chat.model, "messages": chat.messages, **chat.options}
        # The clamped budget in the field(s) the client used; if none, in the one the provider expects.
        for name in chat.limit_fields or (target.limit_field(),):
            body[name] = self.lease.max_tokens
        if chat.stream:
            # Always ask for usage, to charge exactly; the relay strips it unless the client asked. The client's
            # other stream options are kept.
            body["stream"] = True
            body["stream_options"] = {**(chat.stream_options or {}), "include_usage": True}
        return body

    def _with_token_headers(self, response):
        """OpenAI's token headers, from the lease taken at admission (the gateway adds the request headers)."""
        lease = self.lease
        if lease.remaining is not None:
            now = timezone.now()
            response["x-ratelimit-remaining-tokens"] = str(lease.remaining)
            response["x-ratelimit-reset-tokens"] = duration(lease.windows[0].seconds_left(now))
            # The money window with the least left after the admission's lease (docs/api.md, "Budgets").
            budgets.set_headers(response, budgets.tightest(
                (f"{w.owner}:{w.period}", spec.limit, units, w.seconds_left(now))
                for w, spec, units in zip(lease.windows, lease.specs, lease.remaining_units) if w.is_money))
        return response


async def count_messages(messages) -> int:
    """The tokens of a prompt in chat's format (policy.estimate_prompt_tokens), counted in a thread when long."""
    if _prompt_chars(messages) > PROMPT_COUNT_IN_THREAD_CHARS:
        return await asyncio.to_thread(estimate_prompt_tokens, messages)
    return estimate_prompt_tokens(messages)


def _prompt_chars(messages) -> int:
    """The characters of a prompt's text (content strings and text parts): what counting its tokens costs."""
    total = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(part["text"]) for part in content
                         if isinstance(part, dict) and isinstance(part.get("text"), str))
    return total


def _usage_of(raw: bytes):
    try:
        usage = json.loads(raw).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
