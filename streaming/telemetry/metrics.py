"""Prometheus metrics, served at /metrics (docs/operations.md). Updated per stream, never per token."""

from prometheus_client import Counter, Gauge, Histogram

STREAMS_FINISHED = Counter("sluice_streams_total", "Completions finished, by status.", ["status"])
TOKENS_STREAMED = Counter("sluice_completion_tokens_total", "Completion tokens delivered (metered).")
BACKPRESSURE_PAUSES = Counter("sluice_backpressure_pauses_total", "Times a client's socket paused a stream.")
REFUSALS = Counter("sluice_refusals_total", "Requests refused, by reason.", ["reason"])
UPSTREAM_ERRORS = Counter("sluice_upstream_errors_total", "Upstream failures, by code.", ["code"])
UPSTREAM_RETRIES = Counter("sluice_upstream_retries_total", "Upstream attempts retried.")
ACTIVE_STREAMS = Gauge("sluice_active_streams", "Streams running in this process.")
SETTLING = Gauge("sluice_requests_unsettled", "Completions admitted whose ledger row and counters are not settled yet.")
QUEUE_LENGTH = Gauge("sluice_upstream_queue_length", "Requests waiting for an upstream slot in this process.")
TTFT = Histogram("sluice_time_to_first_token_seconds", "Time to first token.",
                 buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))


def stream_finished(status, completion_tokens, figures, ttft_seconds=None):
    STREAMS_FINISHED.labels(status).inc()
    if ttft_seconds is not None:
        TTFT.observe(ttft_seconds)
    if completion_tokens:
        TOKENS_STREAMED.inc(completion_tokens)
    if figures is not None and figures.pauses:
        BACKPRESSURE_PAUSES.inc(figures.pauses)


# The admin's live panel (streaming/gateway/live_panel.py).
LIVE_PANEL_CLIENTS = Gauge("sluice_live_panel_clients", "Admin live-panel WebSockets open in this process.")
LIVE_PANEL_DROPPED = Counter("sluice_live_panel_dropped_total",
                             "Live-panel WebSockets closed because the browser stopped acknowledging snapshots.")
