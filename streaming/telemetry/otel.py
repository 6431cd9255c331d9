"""Optional OpenTelemetry traces and metrics, after the GenAI semantic conventions (docs/operations.md,
"OpenTelemetry"). Off by default (SLUICE_OTEL): the completion then checks that one setting and calls nothing here.

On, each request a completion admits is one CLIENT span, "{gen_ai.operation.name} {gen_ai.request.model}", from
the moment it is admitted to its settlement (the provider's queue, retries and fallbacks included; a refusal has
none), and three histograms: gen_ai.client.token.usage, gen_ai.client.operation.duration and
gen_ai.server.time_to_first_token. The tracer and meter providers are made once per process, at its first request,
with the OTLP/HTTP exporters (which read the standard OTEL_EXPORTER_OTLP_* variables) and a resource whose
service.name is "sluice" unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) names another.
`configure(tracer_provider=…, meter_provider=…)` installs others (the tests' in-memory ones).

What goes in: the operation, the catalogue's names (public model, provider, deployment, the provider's model), the
provider's host and port, the clamped token limit, token counts, finish reasons, the outcome, the request id and the
numeric user id. Never a prompt, a completion, a key or any other identity of the user: nothing here is given one.
"""

import json
import logging
import os
import threading
import time
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

SERVICE_NAME = "sluice"

# gen_ai.operation.name for each provider endpoint a completion relays to (streaming/provider/endpoints.py; the
# Responses API is a chat).
OPERATIONS = {
    "/chat/completions": "chat",
    "/responses": "chat",
    "/completions": "text_completion",
    "/embeddings": "embeddings",
}

# The conventions' advisory bucket boundaries.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)

COMPLETED = "completed"


class _Telemetry:
    """The process's tracer and instruments."""

    def __init__(self, tracer_provider, meter_provider):
        from opentelemetry.trace import SpanKind, Status, StatusCode

        self.tracer_provider, self.meter_provider = tracer_provider, meter_provider
        self.tracer = tracer_provider.get_tracer(SERVICE_NAME)
        meter = meter_provider.get_meter(SERVICE_NAME)
        self.client_kind, self.status_error, self.status_class = SpanKind.CLIENT, StatusCode.ERROR, Status
        self.token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS)
        self.time_to_first_token = meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s",
            description="Time to generate first token for successful responses.",
            explicit_bucket_boundaries_advisory=TTFT_BUCKETS)


_telemetry: _Telemetry | None = None
_failed = False  # the exporters could not be set up: said once, then off for this process
_lock = threading.Lock()


def configure(tracer_provider=None, meter_provider=None) -> _Telemetry:
    """Install the providers spans and metrics go to; with none given, the OTLP/HTTP exporters' (what the first
    request does when SLUICE_OTEL is on; once per process: later calls without providers keep them). The tests pass
    in-memory ones."""
    global _telemetry, _failed
    with _lock:
        if tracer_provider is None and meter_provider is None and _telemetry is not None:
            return _telemetry  # the exporters are set up once per process
        if tracer_provider is None or meter_provider is None:
            default_tracer, default_meter = _otlp_providers()
            tracer_provider = tracer_provider or default_tracer
            meter_provider = meter_provider or default_meter
        _telemetry = _Telemetry(tracer_provider, meter_provider)
        _failed = False
        return _telemetry


def reset():
    """Forget the installed providers (tests): the next span configures them afresh."""
    global _telemetry, _failed
    with _lock:
        _telemetry, _failed = None, False


def _otlp_providers():
    from opentelemetry import metrics, trace
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = service_resource()
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    meter_provider = MeterProvider(resource=resource,
                                   metric_readers=[PeriodicExportingMetricReader(OTLPMetricExporter())])
    # Also the process's global providers, for any instrumentation an operator adds (set once; a second is ignored).
    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    return tracer_provider, meter_provider


def service_resource():
    """The resource the environment describes (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME), named "sluice" unless
    it names the service itself."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create()
    if not os.environ.get("OTEL_SERVICE_NAME") and str(
            resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": SERVICE_NAME}))
    return resource


def _current() -> _Telemetry | None:
    global _failed
    telemetry = _telemetry
    if telemetry is not None or _failed:
        return telemetry
    try:
        return configure()
    except Exception:
        _failed = True
        logger.exception("OpenTelemetry could not be set up (SLUICE_OTEL): this process exports nothing")
        return None


def start(endpoint_path, model, request_id, user_id=None, started=None) -> "Span | None":
    """A completion's span, begun (call only when SLUICE_OTEL is on). `endpoint_path`: the provider endpoint's path
    (its operation); `model`: the public model name; `started`: the request's monotonic start, which its time to first
    token counts from. None if telemetry could not be set up."""
    telemetry = _current()
    if telemetry is None:
        return None
    try:
        return Span(telemetry, OPERATIONS.get(endpoint_path, "chat"), model, request_id, user_id, started)
    except Exception:
        logger.warning("OpenTelemetry: the span of %s could not start", request_id, exc_info=True)
        return None


class Span:
    """One completion's span and measurements. `end` once, at settlement; nothing here raises into the request."""

    def __init__(self, telemetry, operation, model, request_id, user_id, started):
        self.telemetry = telemetry
        self.operation, self.model = operation, model
        self.started = time.monotonic() if started is None else started
        self.began = time.monotonic()
        self.finish_reasons = None
        self.response_id = None
        attributes = {"gen_ai.operation.name": operation, "gen_ai.request.model": model,
                      "sluice.request_id": request_id}
        if user_id is not None:
            attributes["sluice.user_id"] = int(user_id)
        self.span = telemetry.tracer.start_span(f"{operation} {model}", kind=telemetry.client_kind,
                                                attributes=attributes)
        self.ended = False

    def answer(self, raw: bytes):
        """A non-streamed answer's finish reasons and id (its JSON read again: only while telemetry is on)."""
        try:
            body = json.loads(raw)
            reasons = [choice.get("finish_reason") for choice in body.get("choices") or ()
                       if isinstance(choice, dict) and isinstance(choice.get("finish_reason"), str)]
            self.finish_reasons = reasons or None
            if isinstance(body.get("id"), str):
                self.response_id = body["id"]
        except (ValueError, AttributeError, TypeError):
            pass

    def end(self, status, input_tokens, output_tokens, target=None, *, reason="", ttft=None, max_tokens=None):
        """The outcome (a ledger status, and its reason if it failed), the tokens the ledger row records, the target
        that served (streaming/provider/targets.py; None: none answered), the seconds to the first token from the
        request's start, the token limit the provider was sent."""
        if self.ended:
            return
        self.ended = True
        try:
            self._end(status, input_tokens, output_tokens, target, reason, ttft, max_tokens)
        except Exception:
            logger.warning("OpenTelemetry: the span of a completion could not end", exc_info=True)

    def _end(self, status, input_tokens, output_tokens, target, reason, ttft, max_tokens):
        telemetry, span = self.telemetry, self.span
        common = {"gen_ai.operation.name": self.operation, "gen_ai.request.model": self.model}
        if target is not None:
            common["gen_ai.provider.name"] = target.provider
            common["gen_ai.system"] = target.provider  # the older name of the provider attribute
            if target.model:
                common["gen_ai.response.model"] = target.model
            address, port = _server(target.url)
            if address:
                common["server.address"] = address
                if port:
                    common["server.port"] = port
        error_type = None if status == COMPLETED else (reason or status)
        attributes = dict(common, **{"sluice.status": status})
        if target is not None:
            attributes["sluice.deployment"] = target.name
        if max_tokens and self.operation != "embeddings":
            attributes["gen_ai.request.max_tokens"] = int(max_tokens)
        counted = status == COMPLETED or input_tokens or output_tokens
        if counted:
            attributes["gen_ai.usage.input_tokens"] = int(input_tokens)
            if self.operation != "embeddings":
                attributes["gen_ai.usage.output_tokens"] = int(output_tokens)
        if self.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = self.finish_reasons
        if self.response_id:
            attributes["gen_ai.response.id"] = self.response_id
        if error_type:
            attributes["error.type"] = error_type
            span.set_status(telemetry.status_class(telemetry.status_error, error_type))
        span.set_attributes(attributes)
        if ttft is not None:
            self._first_token(ttft, common)
        span.end()

        measured = dict(common, **({"error.type": error_type} if error_type else {}))
        telemetry.duration.record(max(0.0, time.monotonic() - self.began), measured)
        if counted:
            telemetry.token_usage.record(int(input_tokens), dict(common, **{"gen_ai.token.type": "input"}))
            if self.operation != "embeddings":
                telemetry.token_usage.record(int(output_tokens), dict(common, **{"gen_ai.token.type": "output"}))

    def _first_token(self, ttft, common):
        """The first token: an event on the span at its moment, and the time-to-first-token histogram."""
        at = self.started + ttft  # monotonic
        when = time.time_ns() - int((time.monotonic() - at) * 1e9)
        self.span.add_event("gen_ai.first_token", {"sluice.time_to_first_token": ttft}, timestamp=when)
        self.telemetry.time_to_first_token.record(ttft, common)


def _server(url):
    try:
        parts = urlsplit(url)
        port = parts.port or {"https": 443, "http": 80}.get(parts.scheme)
        return parts.hostname, port
    except ValueError:
        return None, None
