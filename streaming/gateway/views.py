"""The OpenAI-compatible API: thin async views over a completion's lifecycle (streaming/streams/completion.py)."""

import time

from django.conf import settings
from django.http import JsonResponse

from quotas.domain import admission
from quotas.domain.leases import quota_status
from streaming.errors import MAPPED, ApiError, api_error, not_found
from streaming.provider.client import provider_url
from streaming.streams.completion import Completion

from .validation import parse_body, parse_chat_request


def api_view(methods, csrf_exempt=True):
    """Method check and every mapped error → OpenAI error JSON, for every /v1/ view.

    Bearer-token endpoints need no CSRF protection; the demo's session endpoints pass False.
    """

    def decorate(view):
        async def wrapped(request, *args, **kwargs):
            if request.method not in methods:
                error = ApiError(f"Method {request.method} is not allowed on {request.path}; use {', '.join(methods)}.",
                                 status=405, code="method_not_allowed")
                response = error.response()
                response["Allow"] = ", ".join(methods)
                return response
            try:
                return await view(request, *args, **kwargs)
            except MAPPED as error:
                return api_error(error).response()

        wrapped.__name__ = view.__name__
        wrapped.csrf_exempt = csrf_exempt
        return wrapped

    return decorate


async def chat_completion_response(request, body: dict):
    """Shared by /v1/chat/completions and the demo's /api/chat."""
    chat = parse_chat_request(body)
    return await Completion(request.sluice, chat, provider_url(request.scope)).respond()


@api_view(["POST"])
async def chat_completions(request):
    return await chat_completion_response(request, parse_body(request))


@api_view(["GET"])
async def models(request):
    limits = request.sluice.limits
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "sluice"}
            for m in settings.SLUICE_MODELS if limits.allows_model(m, settings.SLUICE_MODELS)]
    return JsonResponse({"object": "list", "data": data})


@api_view(["GET"])
async def quota(request):
    caller = request.sluice
    limits = caller.limits
    windows = await quota_status(caller.user_id, limits)
    rate = await admission.peek_rate(caller.user_id, limits, time.time())
    return JsonResponse({
        "object": "quota",
        "suspended": limits.suspended,
        "timezone": limits.timezone,
        "tokens": windows,
        "requests": {"limit_per_minute": limits.requests_per_minute,
                     "remaining": rate.remaining if rate else None,
                     "reset_seconds": round(rate.reset_seconds, 3) if rate else None},
        "concurrent_streams": limits.concurrent_streams,
        "max_tokens_per_request": limits.max_tokens_per_request,
        "models": [m for m in settings.SLUICE_MODELS if limits.allows_model(m, settings.SLUICE_MODELS)],
    })


def csrf_failure(request, reason=""):
    """CSRF_FAILURE_VIEW: JSON for the demo's /api/ endpoints, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return ApiError("Your session expired or the page is stale: reload the page.", status=403,
                        type="invalid_request_error", code="csrf_failed").response()
    from django.views.csrf import csrf_failure as default

    return default(request, reason)


def server_error(request):
    """handler500: OpenAI error JSON under /v1/, Django's plain page elsewhere."""
    if request.path.startswith("/v1/"):
        return ApiError("The server had an error while processing your request.", status=500,
                        type="server_error", code="internal_error").response()
    from django.views.defaults import server_error as default

    return default(request)


@api_view(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def unknown(request, path=""):
    return not_found(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url").response()
