"""The streams running in this process, for the admin's live panel and the metrics.

The stream's lifecycle registers each stream when its response starts and unregisters it when it settles
(streaming/streams/completion.py); readers take `snapshot()`.
"""

import time
from dataclasses import dataclass
from typing import Callable

active: dict[str, "Running"] = {}
# Called after a stream registers: the admin's live panel starts this process's publisher
# (streaming/gateway/live_panel.py), so streams show up whichever process a dashboard is connected to.
listeners: list = []


@dataclass(frozen=True)
class Running:
    user_id: int
    username: str
    model: str
    figures: object  # streaming.streams.buffer.StreamFigures, updated as the stream runs
    is_paused: Callable[[], bool]
    started: float  # monotonic


def register(request_id, user_id, username, model, figures, is_paused):
    active[request_id] = Running(user_id, username, model, figures, is_paused, time.monotonic())
    for listener in listeners:
        listener()


def unregister(request_id):
    active.pop(request_id, None)


def snapshot():
    """One dict per running stream: who, which model, tokens so far and their rate, paused or not."""
    now = time.monotonic()
    rows = []
    for request_id, running in list(active.items()):
        elapsed = max(1e-6, now - running.started)
        tokens = running.figures.completion_tokens
        rows.append({
            "request_id": request_id,
            "user_id": running.user_id,
            "username": running.username,
            "model": running.model,
            "tokens": tokens,
            "tokens_per_second": round(tokens / elapsed, 1),
            "paused": running.is_paused(),
            "pauses": running.figures.pauses,
            "seconds": round(elapsed, 1),
        })
    return rows
