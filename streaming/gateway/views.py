"""The OpenAI-compatible API: thin async views over a completion's lifecycle (streaming/streams/completion.py, and the
other endpoints' subclasses of it)."""

import functools
import time
from pathlib import Path

from django.conf import settings
from django.http import HttpResponse, JsonResponse

from quotas.domain import admission
from quotas.domain.exceptions import ModelNotAllowed
from quotas.domain.leases import quota_status
from streaming import budgets
from streaming.catalogue import registry
from streaming.catalogue.routing import sticky_key
from streaming.errors import MAPPED, ApiError, api_error, not_found
from streaming.provider.client import provider_url
from streaming.streams.completion import Completion
from streaming.streams.embeddings import Embeddings
from streaming.streams.event_stream import EventStreamResponse, body_writer
from streaming.streams.responses import ResponsesCompletion
from streaming.streams.text_completions import TextCompletion

from .bodies import parse_embeddings_request, parse_responses_request, parse_text_completion_request
from .validation import field_rules, parse_body, parse_chat_request


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
                response = await view(request, *args, **kwargs)
            except MAPPED as error:
                return api_error(error).response()
            if isinstance(response, EventStreamResponse):
                response.writer = body_writer(request.scope)  # Sluice's server's, if it serves this request
            return response

        wrapped.__name__ = view.__name__
        wrapped.csrf_exempt = csrf_exempt
        # What the OpenAPI document must list for the route (tests/streaming/gateway/test_fuzz.py checks it).
        wrapped.allowed_methods = tuple(methods)
        return wrapped

    return decorate


async def route_for(request, body):
    """(the body with the model's field rules applied, the request's route): which deployments to try, in order
    (streaming/catalogue/). An unknown model still gets a route, with no name: admission refuses it with its ledger
    row (model_not_found)."""
    catalogue = await registry.current()
    model = catalogue.model(body.get("model"))
    if model is not None and model.field_rules:
        body = field_rules(body, {"*": model.field_rules})
    return body, catalogue.route(body.get("model"), provider_url(request.scope), sticky_key(body))


async def chat_completion_response(request, body: dict):
    """Shared by /v1/chat/completions and the demo's /api/chat."""
    body, route = await route_for(request, body)
    chat = parse_chat_request(body)
    return await Completion(request.sluice, chat, route).respond()


@api_view(["POST"])
async def chat_completions(request):
    return await chat_completion_response(request, parse_body(request))


@api_view(["POST"])
async def responses(request):
    body, route = await route_for(request, parse_body(request))
    return await ResponsesCompletion(request.sluice, parse_responses_request(body), route).respond()


@api_view(["POST"])
async def text_completions(request):
    body, route = await route_for(request, parse_body(request))
    return await TextCompletion(request.sluice, parse_text_completion_request(body), route).respond()


@api_view(["POST"])
async def embeddings(request):
    body, route = await route_for(request, parse_body(request))
    return await Embeddings(request.sluice, parse_embeddings_request(body), route).respond()


def _model_entry(model):
    return {"id": model.name, "object": "model", "created": 0, "owned_by": "sluice"}


async def allowed_models(limits):
    """The catalogue's models the key's plan allows, in its order."""
    catalogue = await registry.current()
    return [catalogue.models[name] for name in catalogue.names if limits.allows_model(name, catalogue.names)]


@api_view(["GET"])
async def models(request):
    return JsonResponse({"object": "list", "data": [_model_entry(m) for m in await allowed_models(
        request.sluice.limits)]})


@api_view(["GET"])
async def model(request, model):
    """One of the key's models (by its name or an alias: the answer names the model); any other name is 404
    model_not_found, as for an unknown model."""
    catalogue = await registry.current()
    found = catalogue.model(model)
    if found is None or not request.sluice.limits.allows_model(found.name, catalogue.names):
        raise ModelNotAllowed(model)
    return JsonResponse(_model_entry(found))


@api_view(["GET"])
async def quota(request):
    caller = request.sluice
    limits = caller.limits
    status = await quota_status(caller.user_id, limits, money=True)
    rate = await admission.peek_rate(caller.user_id, limits, time.time())
    tokens = {name: {k: v for k, v in entry.items() if k not in ("owner", "owner_name", "money")}
              for name, entry in status.items() if name in ("day", "month")}
    return JsonResponse({
        "object": "quota",
        "suspended": limits.suspended,
        "timezone": limits.timezone,
        "tokens": tokens,
        **budgets.quota_document(status),
        "requests": {"limit_per_minute": limits.requests_per_minute,
                     "remaining": rate.remaining if rate else None,
                     "reset_seconds": round(rate.reset_seconds, 3) if rate else None},
        "concurrent_streams": limits.concurrent_streams,
        "max_tokens_per_request": limits.max_tokens_per_request,
        "models": [m.name for m in await allowed_models(limits)],
    })


OPENAPI_DOCUMENT = Path(__file__).with_name("openapi.json")


@functools.cache
def _openapi_bytes() -> bytes:
    return OPENAPI_DOCUMENT.read_bytes()


@api_view(["GET", "HEAD"])
async def openapi_document(request):
    """GET /openapi.json: the API's OpenAPI 3.1 document, without a key (other teams generate clients from it).

    Outside /v1/, where every path needs a key (middleware.py); written by hand, and tests/streaming/gateway/
    test_fuzz.py checks it lists every /v1/ route with its methods and fuzzes the gateway against it."""
    return HttpResponse(_openapi_bytes(), content_type="application/json")


def csrf_failure(request, reason=""):
    """CSRF_FAILURE_VIEW: JSON for the demo's /api/ endpoints, Django's page elsewhere."""
    if request.path.startswith("/api/"):
        return ApiError("Your session expired or the page is stale: reload the page.", status=403,
                        type="invalid_request_error", code="csrf_failed").response()
    from django.views.csrf import csrf_failure as default

    return default(request, reason)


# Where every answer is OpenAI's error JSON, even Django's own refusals (the handlers below).
JSON_PREFIXES = ("/v1/", "/api/")


def _answers_json(request):
    return request.path.startswith(JSON_PREFIXES)


def bad_request(request, exception=None):
    """handler400: what Django refuses before a view can (a body over DATA_UPLOAD_MAX_MEMORY_SIZE, a form it cannot
    parse, a Host not in ALLOWED_HOSTS): OpenAI error JSON under /v1/ and /api/, Django's page elsewhere."""
    from django.core.exceptions import RequestDataTooBig

    if not _answers_json(request):
        from django.views.defaults import bad_request as default

        return default(request, exception)
    if isinstance(exception, RequestDataTooBig):
        return ApiError(f"Request body is larger than {settings.SLUICE_MAX_BODY_BYTES} bytes.", status=413,
                        code="request_too_large").response()
    return ApiError("The request could not be read (a malformed body or header).", status=400,
                    code="bad_request").response()


def permission_denied(request, exception=None):
    """handler403: OpenAI error JSON under /v1/ and /api/, Django's page elsewhere."""
    if not _answers_json(request):
        from django.views.defaults import permission_denied as default

        return default(request, exception)
    return ApiError("You do not have permission to do this.", status=403, type="permission_error",
                    code="permission_denied").response()


def page_not_found(request, exception=None):
    """handler404: an unknown URL under /api/ (under /v1/ the `unknown` view answers first), as under /v1/."""
    if not _answers_json(request):
        from django.views.defaults import page_not_found as default

        return default(request, exception)
    return not_found(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url").response()


def server_error(request):
    """handler500: OpenAI error JSON under /v1/ and /api/, Django's plain page elsewhere."""
    if _answers_json(request):
        return ApiError("The server had an error while processing your request.", status=500,
                        type="server_error", code="internal_error").response()
    from django.views.defaults import server_error as default

    return default(request)


@api_view(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
async def unknown(request, path=""):
    return not_found(f"Unknown request URL: {request.method} {request.path}.", code="unknown_url").response()
