"""streaming/telemetry/otel.py: OpenTelemetry spans and metrics after the GenAI semantic conventions, off by default.

Requests go through the whole ASGI application in this process (config/asgi.py: intake, the API's middleware, the
views, the completion) to a real simulator process reached over loopback, with the catalogue's records in the test
database; the SDK's in-memory span exporter and metric reader are installed through `otel.configure` (a gateway in a
process of its own could not share them). The OTLP/HTTP exporter itself is checked against a receiver in this test,
from a process of its own.
"""

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx2
import pytest
from django.test import override_settings
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bench.servers import PROJECT_ROOT, start_server
from streaming.catalogue.models import Deployment, Provider, ServedModel
from streaming.provider import client as provider_client
from streaming.telemetry import otel
from tests.support.gateways import settled_row

pytestmark = pytest.mark.django_db(transaction=True)

SECRET_PROMPT = "the-prompt-that-must-never-be-exported-7f3a"
FAST = {"UPSTREAM_BACKOFF_BASE": 0.01, "UPSTREAM_BACKOFF_MAX": 0.02, "UPSTREAM_RETRY_DEADLINE": 2,
        "UPSTREAM_RETRY_MAX_ATTEMPTS": 1}


@pytest.fixture(scope="module")
def simulator_process():
    with start_server([sys.executable, "-m", "streaming.simulator", "--port", "{port}"]) as server:
        yield server


@pytest.fixture
def simulator(simulator_process):
    """The simulator's switches, reset around each test."""
    http = httpx2.Client(base_url=simulator_process.base_url, timeout=10)
    http.post("/control/reset").raise_for_status()
    http.port = simulator_process.port
    yield http
    http.post("/control/reset").raise_for_status()
    http.close()


@pytest.fixture
def catalogue(simulator):
    """The public model "alpha", served by provider "local-sim" (the simulator) under its own name "sim-alpha-v2"."""
    provider = Provider.objects.create(name="local-sim", base_url=str(simulator.base_url) + "/v1")
    model = ServedModel.objects.create(name="alpha")
    Deployment.objects.create(model=model, provider=provider, upstream_model="sim-alpha-v2")


@pytest.fixture
def exported():
    """The SDK's in-memory exporter and reader, installed as the process's telemetry for the test."""
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    otel.configure(tracer_provider=tracer_provider, meter_provider=meter_provider)
    yield spans, reader
    otel.reset()
    tracer_provider.shutdown()
    meter_provider.shutdown()


def request(path, body, key):
    """POST `body` to `path` through the ASGI application, in a loop of its own: (status, headers, body)."""
    from config import asgi

    payload = json.dumps(body).encode()

    async def run():
        messages = []
        pending = [{"type": "http.request", "body": payload, "more_body": False}]

        async def receive():
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # the client stays until the response is complete

        async def send(message):
            messages.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
                 "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                             (b"content-length", str(len(payload)).encode()),
                             (b"authorization", f"Bearer {key}".encode())],
                 "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
        try:
            await asgi.application(scope, receive, send)
        finally:
            await provider_client.close_clients()
        start = next(m for m in messages if m["type"] == "http.response.start")
        headers = {name.decode().lower(): value.decode() for name, value in start["headers"]}
        return start["status"], headers, b"".join(m.get("body", b"") for m in messages
                                                  if m["type"] == "http.response.body")

    return asyncio.run(run())


def chat(key, stream=True, **fields):
    body = {"model": "alpha", "messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 6,
            "stream": stream, **fields}
    return request("/v1/chat/completions", body, key)


def points(reader, name):
    """The data points of metric `name` (histograms: count, sum, attributes)."""
    data = reader.get_metrics_data()
    found = []
    for resource_metrics in (data.resource_metrics if data else ()):
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name == name:
                    found.extend(metric.data.data_points)
    return found


def everything_exported(spans, reader):
    """Every attribute value and name exported, as text."""
    texts = []
    for span in spans.get_finished_spans():
        texts += [span.name, repr(dict(span.attributes)), repr(dict(span.resource.attributes))]
        texts += [repr(dict(event.attributes or {})) + event.name for event in span.events]
    data = reader.get_metrics_data()
    if data:
        texts.append(data.to_json())
    return "\n".join(texts)


def test_a_streamed_chat_is_one_client_span_with_the_ledgers_token_counts(exported, catalogue, simulator, make_user):
    spans, reader = exported
    caller = make_user()
    with override_settings(SLUICE_OTEL=True):
        status, headers, body = chat(caller.key, stream_options={"include_usage": True})
    assert status == 200 and body.rstrip().endswith(b"data: [DONE]")
    row = settled_row(headers["x-request-id"])
    assert (row.status, row.completion_tokens, row.deployment) == ("completed", 6, "local-sim/sim-alpha-v2")

    [span] = spans.get_finished_spans()
    assert (span.name, span.kind, span.status.status_code) == ("chat alpha", SpanKind.CLIENT, StatusCode.UNSET)
    attributes = dict(span.attributes)
    assert attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": "local-sim",
        "gen_ai.system": "local-sim",
        "gen_ai.request.model": "alpha",
        "gen_ai.response.model": "sim-alpha-v2",
        "gen_ai.request.max_tokens": 6,
        "gen_ai.usage.input_tokens": row.prompt_tokens,
        "gen_ai.usage.output_tokens": row.completion_tokens,
        "server.address": "127.0.0.1",
        "server.port": simulator.port,
        "sluice.request_id": headers["x-request-id"],
        "sluice.deployment": "local-sim/sim-alpha-v2",
        "sluice.status": "completed",
        "sluice.user_id": caller.user.pk,
    }
    assert row.prompt_tokens > 0
    [first_token] = span.events
    assert first_token.name == "gen_ai.first_token" and span.start_time <= first_token.timestamp <= span.end_time

    common = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": "local-sim", "gen_ai.system": "local-sim",
              "gen_ai.request.model": "alpha", "gen_ai.response.model": "sim-alpha-v2",
              "server.address": "127.0.0.1", "server.port": simulator.port}
    tokens = {p.attributes["gen_ai.token.type"]: p for p in points(reader, "gen_ai.client.token.usage")}
    assert tokens.keys() == {"input", "output"}
    assert (tokens["input"].count, tokens["input"].sum) == (1, row.prompt_tokens)
    assert (tokens["output"].count, tokens["output"].sum) == (1, row.completion_tokens)
    assert dict(tokens["output"].attributes) == {**common, "gen_ai.token.type": "output"}
    [duration] = points(reader, "gen_ai.client.operation.duration")
    assert duration.count == 1 and dict(duration.attributes) == common  # no error.type
    assert 0 < duration.sum <= (span.end_time - span.start_time) / 1e9 + 0.5
    [ttft] = points(reader, "gen_ai.server.time_to_first_token")
    assert ttft.count == 1 and abs(ttft.sum - row.time_to_first_token_ms / 1000) < 0.002

    # Nothing of what the user sent, their key or their name.
    text = everything_exported(spans, reader)
    assert SECRET_PROMPT not in text and caller.key not in text and caller.user.username not in text
    assert " the quick" not in text  # nor of the answer (the simulator's words)


def test_a_provider_failure_sets_error_type(exported, catalogue, simulator, make_user):
    spans, reader = exported
    simulator.post("/control", json={"fail_500_rate": 1.0}).raise_for_status()
    caller = make_user()
    with override_settings(SLUICE_OTEL=True, **FAST):
        status, headers, body = chat(caller.key)
    assert status >= 500, body
    row = settled_row(headers["x-request-id"])
    assert row.status == "upstream_error" and row.reason
    [span] = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes["error.type"] == row.reason
    assert (span.attributes["sluice.status"], span.attributes["gen_ai.request.model"]) == ("upstream_error", "alpha")
    assert "gen_ai.usage.output_tokens" not in span.attributes and not span.events  # nothing was answered
    [duration] = points(reader, "gen_ai.client.operation.duration")
    assert duration.attributes["error.type"] == row.reason
    assert points(reader, "gen_ai.client.token.usage") == []
    assert points(reader, "gen_ai.server.time_to_first_token") == []
    assert SECRET_PROMPT not in everything_exported(spans, reader)


@pytest.mark.parametrize(("path", "body", "operation"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": SECRET_PROMPT}], "max_tokens": 3}, "chat"),
    ("/v1/completions", {"prompt": SECRET_PROMPT, "max_tokens": 3}, "text_completion"),
    ("/v1/responses", {"input": SECRET_PROMPT, "max_output_tokens": 16}, "chat"),
    ("/v1/embeddings", {"input": SECRET_PROMPT}, "embeddings"),
])
def test_each_endpoint_names_its_operation(exported, catalogue, simulator, make_user, path, body, operation):
    spans, reader = exported
    caller = make_user()
    with override_settings(SLUICE_OTEL=True):
        status, headers, answer = request(path, {"model": "alpha", **body}, caller.key)
    assert status == 200, answer
    row = settled_row(headers["x-request-id"])
    [span] = spans.get_finished_spans()
    assert span.name == f"{operation} alpha" and span.attributes["gen_ai.operation.name"] == operation
    assert span.attributes["gen_ai.usage.input_tokens"] == row.prompt_tokens > 0
    if operation == "embeddings":
        assert "gen_ai.usage.output_tokens" not in span.attributes
        assert "gen_ai.request.max_tokens" not in span.attributes
        assert [p.attributes["gen_ai.token.type"] for p in points(reader, "gen_ai.client.token.usage")] == ["input"]
    else:
        assert span.attributes["gen_ai.usage.output_tokens"] == row.completion_tokens > 0
    if path == "/v1/chat/completions":  # a non-streamed answer's finish reasons and id
        assert span.attributes["gen_ai.response.finish_reasons"] == ("length",)
        assert span.attributes["gen_ai.response.id"] == json.loads(answer)["id"]
    assert SECRET_PROMPT not in everything_exported(spans, reader)


def test_with_sluice_otel_off_nothing_is_recorded(exported, catalogue, simulator, make_user):
    spans, reader = exported
    caller = make_user()
    for stream in (True, False):
        status, headers, _ = chat(caller.key, stream=stream)  # SLUICE_OTEL: the default, off
        assert status == 200 and settled_row(headers["x-request-id"]).status == "completed"
    assert spans.get_finished_spans() == ()
    assert reader.get_metrics_data() is None or points(reader, "gen_ai.client.operation.duration") == []
    assert points(reader, "gen_ai.client.token.usage") == []


def test_the_service_is_named_sluice_unless_the_environment_names_it(monkeypatch):
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    assert otel.service_resource().attributes["service.name"] == "sluice"
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attributes,deployment.environment=test")
    assert otel.service_resource().attributes["service.name"] == "from-attributes"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "sluice-eu")
    assert otel.service_resource().attributes["service.name"] == "sluice-eu"


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):
        self.server.received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_the_otlp_http_exporters_send_where_the_standard_variables_say():
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    script = ("from streaming.telemetry import otel\n"
              "span = otel.start('/chat/completions', 'alpha', 'req_otlp', 7)\n"
              "span.end('completed', 11, 5)\n"
              "otel._telemetry.tracer_provider.force_flush()\n"
              "otel._telemetry.meter_provider.force_flush()\n")
    environment = {"PATH": "/usr/bin:/bin", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_port}"}
    try:
        done = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, env=environment, timeout=60,
                              capture_output=True, text=True)
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 0, done.stderr
    received = dict(server.received)
    traces = ExportTraceServiceRequest.FromString(received["/v1/traces"])
    [resource_spans] = traces.resource_spans
    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert resource["service.name"] == "sluice"
    [span] = [s for scope in resource_spans.scope_spans for s in scope.spans]
    assert span.name == "chat alpha"
    metrics = ExportMetricsServiceRequest.FromString(received["/v1/metrics"])
    names = {m.name for rm in metrics.resource_metrics for sm in rm.scope_metrics for m in sm.metrics}
    assert names == {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"}
