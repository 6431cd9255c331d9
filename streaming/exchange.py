"""One chat completion from admission to settlement: quota lease, upstream call, ledger row."""

import asyncio
import logging
import time

from django.conf import settings
from django.utils import timezone

from quotas import services
from quotas.models import Usage
from quotas.policy import estimate_prompt_tokens

from . import metrics, resilience, upstream
from .errors import ApiError

logger = logging.getLogger(__name__)


class Exchange:
    def __init__(self, request, chat):
        self.caller = request.sluice
        self.chat = chat
        self.request_id = self.caller.request_id
        self.username = self.caller.username
        self.url = upstream.base_url(request.scope)
        self.lease = services.TokenLease(self.caller.user_id, self.caller.limits, self.request_id, timezone.now())
        self.row = None  # the ledger row: unsaved until record_start() or the settlement writes it
        self._opening = None  # the task inserting it
        self.relay = None
        self.started = time.monotonic()
        self._finished = False

    async def admit(self):
        """Check the model, write the ledger row, and lease the prompt and a first block."""
        chat, limits = self.chat, self.caller.limits
        if not limits.allows_model(chat.model, settings.SLUICE_MODELS):
            raise ApiError(f"The model '{chat.model}' does not exist or you do not have access to it.",
                           status=404, param="model", code="model_not_found")
        prompt_tokens = estimate_prompt_tokens(chat.messages)
        plan_max = limits.max_tokens_per_request
        metrics.SETTLING.inc()
        self.row = services.ledger_row(
            request_id=self.request_id, user_id=self.caller.user_id, api_key_id=self.caller.api_key_id,
            model=chat.model, stream=chat.stream,
            reserved_tokens=prompt_tokens + min(chat.max_tokens or plan_max, plan_max),
            windows=self.lease.windows)
        try:
            await self.lease.admit(prompt_tokens, chat.max_tokens, chat.stream)
        except ApiError as error:
            self._finished = True
            try:
                await services.close_ledger(self.row, status=Usage.Status.REJECTED, reason=error.code or "")
            finally:
                metrics.SETTLING.dec()
            raise
        self.caller.lease = self.lease

    def record_start(self):
        """Write the ledger row of a running stream (status `streaming`, holding its reservation).

        The relay calls this at its watchdog's first tick (within a second), never on the first token's path; a
        request that ends before (refused, failed, short or non-streaming) is written once, when it settles.
        """
        if self._opening is None and not self._finished:
            self._opening = asyncio.ensure_future(services.open_ledger(self.row))

    def upstream_body(self):
        chat = self.chat
        body = {"model": chat.model, "messages": chat.messages, **chat.options}
        # The clamped budget, under the name the client used (max_tokens when it gave none).
        name = "max_completion_tokens" if "max_completion_tokens" in chat.raw_fields else "max_tokens"
        body[name] = self.lease.max_tokens
        if chat.stream:
            # Always ask for usage, to charge exactly; the relay strips it unless the client asked.
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def open_stream(self):
        try:
            return await resilience.open_stream(self.url, self.upstream_body(), self.request_id, self.caller.user_id)
        except BaseException as exc:
            await self.fail_before_first_byte(exc)
            raise

    async def complete(self) -> bytes:
        try:
            return await resilience.complete(self.url, self.upstream_body(), self.request_id, self.caller.user_id)
        except BaseException as exc:
            await self.fail_before_first_byte(exc)
            raise

    async def fail_before_first_byte(self, exc):
        if isinstance(exc, upstream.UpstreamError):
            await self.finish("upstream_error", reason=exc.code, charge_prompt=False)
        else:  # cancelled: the client went away while the provider was being asked
            await self.finish("client_disconnected")

    def relay_paused(self):
        return self.relay is not None and self.relay.is_paused()

    async def renew(self):
        await self.lease.renew(self.caller.slot_key)

    async def finish(self, status, figures=None, reported_usage=None, reason="", charge_prompt=True):
        """Settle once: the ledger row first (the truth), then the counters."""
        if self._finished:
            return
        self._finished = True
        # A second cancellation (server shutdown) must not leave the lease unsettled.
        await asyncio.shield(self._settle(status, figures, reported_usage, reason, charge_prompt))

    async def _settle(self, status, figures, reported_usage, reason, charge_prompt):
        lease = self.lease
        reported = bool(reported_usage) and status in ("completed",)
        if reported:
            prompt_tokens = int(reported_usage.get("prompt_tokens") or 0)
            completion_tokens = int(reported_usage.get("completion_tokens") or 0)
        else:
            # Interrupted: the prompt as estimated, the completion as metered — never the maximum.
            prompt_tokens = lease.prompt_tokens if charge_prompt else 0
            completion_tokens = figures.completion_tokens if figures else 0
        fields = {"status": status, "reason": reason, "prompt_tokens": prompt_tokens,
                  "completion_tokens": completion_tokens, "usage_reported": reported}
        if figures is not None:
            fields.update(
                bytes_sent=figures.bytes_sent, backpressure_pauses=figures.pauses,
                paused_ms=int(figures.paused_seconds * 1000), peak_buffered_bytes=figures.peak_buffered_bytes,
                time_to_first_token_ms=(int((figures.first_token_at - self.started) * 1000)
                                        if figures.first_token_at else None))
        if self._opening is not None:
            try:
                await self._opening
            except Exception:  # the settlement below inserts the row instead
                logger.exception("could not write the ledger row of %s when it started", self.request_id)
        try:
            await services.close_ledger(self.row, **fields)
        finally:
            await lease.settle(prompt_tokens + completion_tokens)
            # The middleware releases the slot too, once the response is collected; releasing is idempotent.
            await services.release_slot(self.caller.slot_key, self.request_id)
            metrics.SETTLING.dec()
        ttft = figures.first_token_at - self.started if figures is not None and figures.first_token_at else None
        metrics.stream_finished(status, completion_tokens, figures, ttft)
