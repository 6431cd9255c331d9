"""Throttle middleware (async only): who is calling, may they, and how much is left.

For /v1/ the caller is the API key's user; for the demo's /api/ endpoints, the session's user.
Completion endpoints count against the per-minute request limit and hold a concurrent-stream
slot until the response's last byte (or the client's disconnect); every metered response carries
OpenAI's `x-ratelimit-*` headers.
"""

import time
import uuid
from dataclasses import dataclass, field

from asgiref.sync import markcoroutinefunction
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone

from streaming.errors import ApiError

from . import exceptions, keys, services
from .policy import Limits

API_PREFIX = "/v1/"
DEMO_PREFIX = "/api/"
COMPLETION_PATHS = {"/v1/chat/completions", "/api/chat"}
SAFE_METHODS = {"GET", "HEAD", "OPTIONS", "TRACE"}


@dataclass
class Caller:
    """What the middleware learnt about the request, for the view (`request.sluice`)."""

    request_id: str
    user_id: int
    api_key_id: int | None
    limits: Limits
    username: str = ""
    rate: object = None  # RateResult of this request, for the headers
    slot_key: str | None = None
    lease: object = None  # the view's TokenLease, for the token headers
    extra: dict = field(default_factory=dict)


def duration(seconds: float) -> str:
    """OpenAI's reset format: 1s, 6m0s, 1h2m3s."""
    seconds = max(0, int(seconds + 0.999))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


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
        if path.startswith(API_PREFIX):
            api = True
        elif path.startswith(DEMO_PREFIX):
            api = False
            if request.method not in SAFE_METHODS:
                # process_view with no view: the demo's endpoints are never csrf_exempt. Cookie-based tokens
                # (CSRF_USE_SESSIONS is off), so no query; a pass marks the request checked for Django's own.
                rejected = self._csrf.process_view(request, None, (), {})
                if rejected is not None:
                    return rejected
        else:
            return await self.get_response(request)
        try:
            caller = await self._admit(request, api, path in COMPLETION_PATHS)
        except ApiError as error:
            return error.response()
        if caller is None:  # not signed in on the demo: the view answers
            return await self.get_response(request)
        request.sluice = caller
        try:
            response = await self.get_response(request)
        except BaseException:
            await services.release_slot(caller.slot_key, caller.request_id)
            raise
        response["x-request-id"] = caller.request_id
        await self._add_headers(response, caller)
        # A stream gives its slot back when it settles (streaming/exchange.py), however it ends.
        if not response.streaming:
            await services.release_slot(caller.slot_key, caller.request_id)
        return response

    async def _admit(self, request, api: bool, completion: bool):
        if api:
            who, limits = await keys.authenticate(request)
            user_id, key_id, username = who.user_id, who.key_id, who.username
        else:
            user = await request.auser()
            if not user.is_authenticated:
                return None
            user_id, key_id, username = user.pk, None, user.get_username()
            limits = await services.effective_limits(user_id)
        caller = Caller(request_id=f"req_{uuid.uuid4().hex}", user_id=user_id, api_key_id=key_id, limits=limits,
                        username=username)
        if not completion:
            return caller
        now = time.time()
        try:
            if limits.suspended:
                raise exceptions.suspended()
            caller.rate = await services.hit_rate(user_id, limits, now)
            caller.slot_key = await services.acquire_slot(user_id, limits, caller.request_id, now)
        except ApiError as error:
            await services.record_refusal(request_id=caller.request_id, user_id=user_id, api_key_id=key_id,
                                          model="", code=error.code, limits=limits)
            raise
        return caller

    async def _add_headers(self, response, caller):
        limits = caller.limits
        response["x-ratelimit-limit-requests"] = str(limits.requests_per_minute)
        rate = caller.rate
        if rate is None:
            rate = await services.peek_rate(caller.user_id, limits)
        if rate is not None:
            response["x-ratelimit-remaining-requests"] = str(rate.remaining)
            response["x-ratelimit-reset-requests"] = duration(rate.reset_seconds)
        lease = caller.lease
        response["x-ratelimit-limit-tokens"] = str(limits.tokens_per_day)
        if lease is not None and lease.remaining is not None:
            response["x-ratelimit-remaining-tokens"] = str(lease.remaining)
            response["x-ratelimit-reset-tokens"] = duration(lease.windows[0].seconds_left(timezone.now()))
        else:
            try:
                status = await services.quota_status(caller.user_id, limits)
            except ApiError:
                return
            day = status["day"]
            response["x-ratelimit-remaining-tokens"] = str(day["remaining"])
            response["x-ratelimit-reset-tokens"] = duration(day["reset_seconds"])
