"""The response a stream's events are written through."""

from django.http import StreamingHttpResponse


class EventStreamResponse(StreamingHttpResponse):
    """A server-sent-event stream whose parts are bytes already (the relay's writes).

    Django's ASGI handler sends `aiter(response)`: here the parts' own generator, not StreamingHttpResponse's two
    wrapping generators with `make_bytes` on every part — per token of a paced stream (docs/performance.md, "Paced
    tokens"). A middleware that replaces `streaming_content` gets Django's own iteration back.
    """

    def __init__(self, parts, **kwargs):
        super().__init__(parts, **kwargs)
        self._parts = parts

    @StreamingHttpResponse.streaming_content.setter
    def streaming_content(self, value):
        self._parts = None  # someone else's content now: iterate it Django's way
        StreamingHttpResponse.streaming_content.fset(self, value)

    def __aiter__(self):
        return super().__aiter__() if self._parts is None else self._parts
