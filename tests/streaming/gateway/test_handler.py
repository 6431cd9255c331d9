"""streaming/gateway/handler.py: the handler for /v1/ runs Django's request cycle with the API's middleware chain, and
sends the request signals from the event loop's thread (no worker-thread hop)."""

import asyncio
import hashlib
import inspect
import json
import threading

from django.core import signals
from django.core.handlers.asgi import ASGIHandler

from config import asgi
from streaming.gateway import handler


def test_the_mirrored_django_handle_is_the_installed_one():
    # APIHandler.handle is Django's ASGIHandler.handle without its thread hops: an upgraded Django that changed
    # the original must be read against the copy (then record the new digest in streaming/gateway/handler.py).
    source = inspect.getsource(ASGIHandler.handle)
    assert hashlib.sha256(source.encode()).hexdigest() == handler.DJANGO_HANDLE_SHA256


async def call(app, path, headers=()):
    messages = []
    requests = iter([{"type": "http.request", "body": b"", "more_body": False}])

    async def receive():
        try:
            return next(requests)
        except StopIteration:  # then the client stays connected until the response is complete
            await asyncio.Event().wait()

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), *headers], "client": ("127.0.0.1", 50000),
             "server": ("testserver", 80)}
    await app(scope, receive, send)
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], body




def test_the_api_sends_request_started_and_finished_from_the_loop_thread():
    """On an event loop of a thread of its own, which holds no database connection — as a server's loop thread
    holds none (the API's queries run on quotas/domain/db.py's threads) — the receivers run on that thread."""
    seen, outcome = [], {}

    def started(sender, **kwargs):
        seen.append(("started", sender, threading.get_ident(), kwargs.get("scope", {}).get("path")))

    def finished(sender, **kwargs):
        seen.append(("finished", sender, threading.get_ident(), None))

    def serve():
        outcome["thread"] = threading.get_ident()
        outcome["response"] = asyncio.run(call(asgi.api_application, "/v1/models"))

    signals.request_started.connect(started)
    signals.request_finished.connect(finished)
    try:
        loop_thread = threading.Thread(target=serve)
        loop_thread.start()
        loop_thread.join(timeout=30)
    finally:
        signals.request_started.disconnect(started)
        signals.request_finished.disconnect(finished)
    status, body = outcome["response"]
    # The request went through the API's chain (no key: OpenAI's 401) ...
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    # ... and every receiver was called once each, in order, on the event loop's thread: no worker thread.
    assert seen == [("started", handler.APIHandler, outcome["thread"], "/v1/models"),
                    ("finished", handler.APIHandler, outcome["thread"], None)]
