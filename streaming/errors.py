"""Errors in OpenAI's wire format, turned into HTTP in one place.

Every refusal under /v1/ is an `ApiError` (or a subclass raised by the quota layer) and becomes
``{"error": {"message", "type", "param", "code"}}`` with the right status; after an SSE body has
started, the same error becomes a final ``data: {"error": ...}`` event instead.
"""

import json
from dataclasses import dataclass, field

from django.http import JsonResponse


@dataclass
class ApiError(Exception):
    message: str
    status: int = 400
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after_seconds: float | None = None
    headers: dict = field(default_factory=dict)

    def __str__(self):
        return self.message

    def payload(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        response = JsonResponse(self.payload(), status=self.status)
        if self.retry_after_seconds is not None:
            response["Retry-After"] = str(max(1, round(self.retry_after_seconds + 0.499)))
        for name, value in self.headers.items():
            response[name] = value
        return response

    def sse_event(self) -> bytes:
        return b"data: " + json.dumps(self.payload()).encode() + b"\n\n"


def invalid(message, param=None, code=None):
    return ApiError(message, status=400, param=param, code=code)


def not_found(message, code="not_found"):
    return ApiError(message, status=404, code=code)
