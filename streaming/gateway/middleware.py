"""Throttle middleware (async only): who is calling, may they, and how much is left.

For /v1/ the caller is the API key's user; for the demo's /api/ endpoints, the session's user. Completion
endpoints count against the per-minute request limit here (a concurrent-stream slot is the completion's own:
streaming/streams/completion.py); every metered response carries OpenAI's `x-ratelimit-*` headers.
"""

import time
from dataclasses import dataclass

from asgiref.sync import markcoroutinefunction
from django.middleware.csrf import CsrfViewMiddleware

from quotas.domain import admission, keys, ledger
from quotas.domain.exceptions import CounterStoreDown, QuotaRefusal, Suspended
from quotas.domain.leases import quota_status
from quotas.domain.policy import Limits
from quotas.domain.selectors import limits_of
from streaming import budgets
from streaming.errors import api_error, duration
from streaming.gateway.intake import KEY_HOLDER, REQUEST_ID, new_request_id
from streaming.telemetry import metrics

API_PREFIX = "/v1/"
DEMO_PREFIX = "/api/"
COMPLETION_PATHS = {"/v1/chat/completions", "/v1/responses", "/v1/completions", "/v1/embeddings", "/api/chat"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}


@dataclass
class Caller:
    """What the middleware learnt about the request, for the view (`request.sluice`)."""

    request_id: str
    user_id: int
    api_key_id: int | None
    limits: Limits
    username: str = ""
    rate: object = None  # this request's RateResult, for the headers


class ThrottleMiddleware:
    sync_capable = False
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        # The demo's session endpoints are checked for CSRF before anything is counted (Django's own check runs
        # later, once the view is resolved): a forged cross-site POST must not spend its victim's request rate.
        self._csrf = CsrfViewMiddleware(get_response)
        markcoroutinefunction(self)

    async def __call__(self, request):
        path = request.path
        api = path.startswith(API_PREFIX)
        if not api and not path.startswith(DEMO_PREFIX):
            return await self.get_response(request)
        # Made by the intake (config/asgi.py), which may have answered already with it; a fresh one otherwise.
        scope = getattr(request, "scope", {})  # an ASGI request's (Django's test client makes WSGI ones)
        request_id = scope.get(REQUEST_ID) or new_request_id()
        if not api and request.method not in SAFE_METHODS:
            # process_view with no view: the demo's endpoints are never csrf_exempt. Cookie-based tokens
            # (CSRF_USE_SESSIONS is off), so no query; a pass marks the request checked for Django's own.
            rejected = self._csrf.process_view(request, None, (), {})
            if rejected is not None:
                return _identified(rejected, request_id)
        try:
            caller = await self._identify(request, api, request_id)
        except QuotaRefusal as refusal:  # no key, or a bad one: nobody to meter, only the request to name
            return _identified(api_error(refusal).response(), request_id)
        if caller is None:  # not signed in on the demo: the view answers
            return _identified(await self.get_response(request), request_id)
        request.sluice = caller
        try:
            if path in COMPLETION_PATHS:
                await self._count(caller)
        except QuotaRefusal as refusal:
            response = api_error(refusal).response()
        else:
            response = await self.get_response(request)
        # Refusals too: the caller is known, so are their limits (docs/api.md promises them on every response).
        _identified(response, caller.request_id)
        await self._add_headers(response, caller)
        return response

    async def _identify(self, request, api: bool, request_id: str):
        """The caller (an API key's user, or the session's), with their limits; None when not signed in."""
        if api:
            holder = getattr(request, "scope", {}).get(KEY_HOLDER)  # authenticated before the body was read
            if holder is None:
                scheme, _, raw = request.headers.get("Authorization", "").partition(" ")
                holder = await keys.authenticate(raw.strip() if scheme.lower() == "bearer" else "")
            user_id, key_id, username, limits = holder.user_id, holder.key_id, holder.username, holder.limits
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return None
            user_id, key_id, username = user.pk, None, user.get_username()
            limits = await limits_of(user_id)
        return Caller(request_id=request_id, user_id=user_id, api_key_id=key_id, limits=limits, username=username)

    async def _count(self, caller):
        """A completion: refused if the user is suspended or over the request rate (with its ledger row)."""
        limits = caller.limits
        try:
            if limits.suspended:
                raise Suspended()
            caller.rate = await admission.hit_rate(caller.user_id, limits, time.time())
        except QuotaRefusal as refusal:
            metrics.REFUSALS.labels(refusal.code).inc()
            await ledger.record_refusal(request_id=caller.request_id, user_id=caller.user_id,
                                        api_key_id=caller.api_key_id, model="", code=refusal.code, limits=limits)
            raise

    async def _add_headers(self, response, caller):
        limits = caller.limits
        response["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        rate = caller.rate
        if rate is None:
            rate = await admission.peek_rate(caller.user_id, limits, time.time())
        if rate is not None:
            response["x-ratelimit-remaining-requests"] = str(rate.remaining)
            response["x-ratelimit-reset-requests"] = duration(rate.reset_seconds)
        response["x-ratelimit-limit-tokens"] = str(limits.tokens_per_day)
        if "x-ratelimit-remaining-tokens" in response:  # set by the completion, from its lease
            return
        try:
            status = await quota_status(caller.user_id, limits, money=_has_money(limits))
        except CounterStoreDown:
            return
        day = status["day"]
        response["x-ratelimit-remaining-tokens"] = str(day["remaining"])
        response["x-ratelimit-reset-tokens"] = duration(day["reset_seconds"])
        budgets.set_headers(response, budgets.tightest(budgets.status_entries(status)))


def _has_money(limits) -> bool:
    """Whether the caller has a money window (a budget of the user's or a pool's): only then are they read."""
    return (limits.budget_per_day is not None or limits.budget_per_month is not None
            or any(p.budget_per_day is not None or p.budget_per_month is not None for p in limits.pools))


def _identified(response, request_id):
    response["x-request-id"] = request_id
    return response
