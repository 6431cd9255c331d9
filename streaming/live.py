"""The streams running in this process, for the admin's live panel and the metrics."""

import time

active: dict[str, tuple] = {}
# Called after a stream registers: the admin's live panel starts this process's publisher
# (quotas.consumers), so streams show up whichever process a dashboard is connected to.
listeners: list = []


def register(exchange, figures):
    active[exchange.request_id] = (exchange, figures, time.monotonic())
    for listener in listeners:
        listener()


def unregister(exchange):
    active.pop(exchange.request_id, None)


def snapshot():
    """One dict per running stream: who, which model, tokens so far and their rate, paused or not."""
    now = time.monotonic()
    rows = []
    for request_id, (exchange, figures, started) in list(active.items()):
        elapsed = max(1e-6, now - started)
        rows.append({
            "request_id": request_id,
            "user_id": exchange.caller.user_id,
            "username": exchange.username,
            "model": exchange.chat.model,
            "tokens": figures.completion_tokens,
            "tokens_per_second": round(figures.completion_tokens / elapsed, 1),
            "paused": exchange.relay_paused(),
            "pauses": figures.pauses,
            "seconds": round(elapsed, 1),
        })
    return rows
