"""Prometheus metrics, served at /metrics (docs/operations.md). Updated per stream, never per token.

The `model` and `provider` labels take the catalogue's names only (a model a client named that the catalogue does
not have is "unknown"): their cardinality is the catalogue's size, never the clients' input."""

from prometheus_client import Counter, Gauge, Histogram

STREAMS_FINISHED = Counter("sluice_streams_total", "Completions finished, by status, model and provider.",
                           ["status", "model", "provider"])
TOKENS_STREAMED = Counter("sluice_completion_tokens_total", "Completion tokens delivered (metered).",
                          ["model", "provider"])
BACKPRESSURE_PAUSES = Counter("sluice_backpressure_pauses_total", "Times a client's socket paused a stream.")
REFUSALS = Counter("sluice_refusals_total", "Requests refused, by reason.", ["reason"])
UPSTREAM_ERRORS = Counter("sluice_upstream_errors_total", "Upstream failures, by code and provider.",
                          ["code", "provider"])
UPSTREAM_RETRIES = Counter("sluice_upstream_retries_total", "Upstream attempts retried.")
UPSTREAM_FALLBACKS = Counter("sluice_upstream_fallbacks_total",
                             "Attempts passed to a model's next deployment before the first byte, by the provider "
                             "passed over.", ["provider"])
ACTIVE_STREAMS = Gauge("sluice_active_streams", "Streams running in this process.")
SETTLING = Gauge("sluice_requests_unsettled", "Completions admitted whose ledger row and counters are not settled yet.")
QUEUE_LENGTH = Gauge("sluice_upstream_queue_length", "Requests waiting for an upstream slot in this process.")
TTFT = Histogram("sluice_time_to_first_token_seconds", "Time to first token, by model and provider.",
                 ["model", "provider"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def stream_finished(status, completion_tokens, figures, ttft_seconds=None, model=None, provider=None):
    model, provider = model or "unknown", provider or "none"
    STREAMS_FINISHED.labels(status, model, provider).inc()
    if ttft_seconds is not None:
        TTFT.labels(model, provider).observe(ttft_seconds)
    if completion_tokens:
        TOKENS_STREAMED.labels(model, provider).inc(completion_tokens)
    if figures is not None and figures.pauses:
        BACKPRESSURE_PAUSES.inc(figures.pauses)


# The admin's live panel (streaming/gateway/live_panel.py).
LIVE_PANEL_CLIENTS = Gauge("sluice_live_panel_clients", "Admin live-panel WebSockets open in this process.")
LIVE_PANEL_DROPPED = Counter("sluice_live_panel_dropped_total",
                             "Live-panel WebSockets closed because the browser stopped acknowledging snapshots.")

# The loop gate (streaming/gateway/loop_gate.py): /v1/ requests held at the door while the event loop ran late.
LOOP_GATE_WAITING = Gauge("sluice_loop_gate_waiting", "Requests waiting at the loop gate in this process now.")
LOOP_GATE_WAITED = Counter("sluice_loop_gate_waited_total",
                           "Requests that waited at the loop gate (the event loop ran late when they arrived).")
LOOP_GATE_WAIT_SECONDS = Counter("sluice_loop_gate_wait_seconds_total", "Time requests spent waiting at the loop gate.")
