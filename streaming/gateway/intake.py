"""Before a request's body is read: its request id, its API key (under /v1/) and its size (issue 15, finding 5).

An ASGI wrapper around the applications config/asgi.py routes to. The application reads the body only through
`receive`, and Uvicorn reads it from the socket only as `receive` asks (h11's flow control), so what is decided
here is decided before the body leaves the client's socket:

- the request id (`x-request-id`) is made here, so that every answer, refusals included, carries the same one
  (`scope["sluice.request_id"]`, which the throttle middleware uses);
- under /v1/ the API key is authenticated here, before anything is read: a missing, wrong or revoked key gets its
  401 at once, and the key's holder goes on in `scope["sluice.key_holder"]` (one lookup per request, not two);
- a body declared larger than the limit gets 413 at once; one sent without a length (chunked) is counted as it
  arrives and gets 413 as soon as it passes the limit. Django never sees more than the limit, so it never spools
  more than that to a temporary file. The limit is SLUICE_MAX_BODY_BYTES under /v1/ and /api/ (OpenAI error
  JSON), DATA_UPLOAD_MAX_MEMORY_SIZE elsewhere.

The Daphne server reads a body before it starts the application: streaming/server/intake.py refuses an oversized
one, or one without a key under /v1/, before reading it.
"""

import asyncio
import json
import uuid

from django.conf import settings

from quotas.domain import keys
from quotas.domain.exceptions import QuotaRefusal
from streaming.errors import ApiError, api_error

API_PREFIX = "/v1/"
JSON_PREFIXES = ("/v1/", "/api/")
REQUEST_ID = "sluice.request_id"
KEY_HOLDER = "sluice.key_holder"


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex}"


class Intake:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        path = scope["path"]
        json_errors = path.startswith(JSON_PREFIXES)
        request_id = new_request_id()
        scope = dict(scope)
        scope[REQUEST_ID] = request_id
        if path.startswith(API_PREFIX):
            try:
                scope[KEY_HOLDER] = await keys.authenticate(_bearer(scope))
            except QuotaRefusal as refusal:
                return await _send_error(send, api_error(refusal), request_id)
        elif not json_errors:
            # The throttle middleware names the responses under /v1/ and /api/; the rest (pages, probes) here. Not
            # under those: a stream's every chunk would pass through one more call.
            send = _Named(send, request_id).send
        limit = settings.SLUICE_MAX_BODY_BYTES if json_errors else settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is None:
            return await self.app(scope, receive, send)
        too_large = _too_large(limit, json_errors)
        if _declared_length(scope) > limit:
            return await _send_error(send, too_large, request_id)
        return await self.app(scope, _BodyLimit(receive, send, limit, too_large, request_id).receive, send)


class _BodyLimit:
    """Counts the body as the application receives it; past the limit, answers 413 and tells the application the
    client has gone (Django then stops quietly, RequestAborted: it reads the whole body before it answers). A body
    that has not arrived within SERVER_BODY_TIMEOUT gets 408 the same way (under Uvicorn; the Daphne server has the
    whole body before the application starts, and its own deadline)."""

    def __init__(self, receive, send, limit, error, request_id):
        self._receive, self._send = receive, send
        self.limit, self.error, self.request_id = limit, error, request_id
        self.received = 0
        self.refused = False
        self.complete = False
        self.deadline = None

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        if self.complete:  # Django listens for the client's disconnect while it answers: no deadline on that
            return await self._receive()
        if self.deadline is None:
            self.deadline = asyncio.get_running_loop().time() + settings.SERVER_BODY_TIMEOUT
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self._receive()
        except TimeoutError:
            return await self._refuse(ApiError(
                f"The request body did not arrive within {settings.SERVER_BODY_TIMEOUT:g} s.", status=408,
                code="request_timeout"))
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                return await self._refuse(self.error)
            self.complete = not message.get("more_body", False)
        return message

    async def _refuse(self, error):
        self.refused = True
        await _send_error(self._send, error, self.request_id)
        return {"type": "http.disconnect"}


class _Named:
    """Adds the request's x-request-id to a response that has none."""

    def __init__(self, send, request_id):
        self._send, self.header = send, (b"x-request-id", request_id.encode())

    async def send(self, message):
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", ()))
            if not any(name.lower() == b"x-request-id" for name, _ in headers):
                message = dict(message, headers=[*headers, self.header])
        await self._send(message)


def _bearer(scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, raw = value.decode("latin-1").partition(" ")
            return raw.strip() if scheme.lower() == "bearer" else ""
    return ""


def _declared_length(scope) -> int:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the server refuses a malformed length itself
                return 0
    return 0


def _too_large(limit, json_errors):
    if json_errors:
        return ApiError(f"Request body is larger than {limit} bytes.", status=413, code="request_too_large")
    return None  # a plain-text answer: see _send_error


async def _send_error(send, error: ApiError | None, request_id: str):
    if error is None:
        status, body, content_type = 413, b"Request body too large.", b"text/plain; charset=utf-8"
        headers = []
    else:
        status, body, content_type = error.status, json.dumps(error.payload()).encode(), b"application/json"
        headers = [(name.lower().encode("latin-1"), str(value).encode("latin-1")) for name, value in
                   error.response().items() if name.lower() not in ("content-type", "content-length")]
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", request_id.encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
