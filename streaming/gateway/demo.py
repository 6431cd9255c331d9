"""The browser demo: a chat page and its session-authenticated JSON/SSE endpoints.

The page's endpoints are thin wrappers over the API's own code (`chat_completion_response` and the
`quota` view), so the browser shares the API's quotas, streaming and error format. ThrottleMiddleware
has already identified the session's user (`request.sluice`) and applied the rate and concurrency limits.
"""

from functools import wraps

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from streaming.errors import ApiError

from . import views
from .validation import parse_body


def session_api(methods):
    """`api_view` for the page's endpoints: a signed-in session or 401, and Django's CSRF check kept."""

    def decorate(view):
        @wraps(view)
        async def signed_in(request, *args, **kwargs):
            if getattr(request, "sluice", None) is None:  # the middleware found no signed-in user
                raise ApiError("Sign in to use the chat.", status=401, code="not_authenticated")
            return await view(request, *args, **kwargs)

        # The session cookie authenticates these endpoints, so unlike /v1/ they need CSRF protection.
        return views.api_view(methods, csrf_exempt=False)(signed_in)

    return decorate


@session_api(["POST"])
async def chat(request):
    body = parse_body(request)
    body["stream"] = True  # the page reads the answer as it streams
    return await views.chat_completion_response(request, body)


@session_api(["GET"])
async def quota(request):
    return await views.quota(request)


@login_required
def chat_page(request):
    # The plan (models, max tokens, the meter) comes from /api/quota, the same source the meter refreshes from. The
    # body limit lets the page suggest a new chat before a long one no longer fits in a request.
    return render(request, "demo/chat.html", {"max_body_bytes": settings.SLUICE_MAX_BODY_BYTES})
