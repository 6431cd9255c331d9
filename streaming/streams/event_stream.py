"""The response a stream's events are written through."""

from django.http import StreamingHttpResponse
from django.http.response import ResponseHeaders

# The ASGI extension of Sluice's server (streaming/server/backpressure.py) that lets an application write a streaming
# response's body chunks itself: scope["extensions"][BODY_WRITER]["writer"].
BODY_WRITER = "sluice.body_writer"


def body_writer(scope):
    """The server's body writer for this request, or None (another server: Uvicorn, Django's test client)."""
    extension = (scope or {}).get("extensions", {}).get(BODY_WRITER)
    return extension.get("writer") if isinstance(extension, dict) else None


class EventStreamResponse(StreamingHttpResponse):
    """A server-sent-event stream whose parts are bytes already (the relay's writes).

    Django's ASGI handler sends `aiter(response)`: here the parts' own generator, not StreamingHttpResponse's two
    wrapping generators with `make_bytes` on every part — per token of a paced stream (docs/performance.md, "Paced
    tokens"). A middleware that replaces `streaming_content` gets Django's own iteration back.

    When the parts go to the server as they are (no middleware replaced them) and the server gave the request a body
    writer (`writer`, set by the view from the request's scope), `on_direct(writer)` is called as Django starts
    iterating: the relay may then write its parts through it itself (docs/backpressure.md, "Direct writes").
    """

    def __init__(self, parts, *, on_direct=None, **kwargs):
        super().__init__(parts, **kwargs)
        self._parts = parts
        self._on_direct = on_direct
        self.writer = None

    @StreamingHttpResponse.streaming_content.setter
    def streaming_content(self, value):
        self._parts = None  # someone else's content now: iterate it Django's way
        StreamingHttpResponse.streaming_content.fset(self, value)

    def __aiter__(self):
        if self._parts is None:
            return super().__aiter__()
        if self.writer is not None and self._on_direct is not None:
            self._on_direct(self.writer)
            # Django's handler asks for the parts once the response's head is sent, and on Sluice's server (the
            # body writer's) nothing reads the header mapping after it: let it go rather than hold it for the
            # stream's life (~1.3 KB a stream, issue 20 item 2).
            self.headers = ResponseHeaders({})
        return self._parts
