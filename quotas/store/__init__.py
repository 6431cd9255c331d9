"""The counter store: one dotted path in settings (SLUICE_COUNTER_STORE), resolved here."""

import asyncio
import weakref

from django.conf import settings
from django.utils.module_loading import import_string

from .base import CounterStore, LeaseResult, RateResult, SlotResult, StoreUnavailable, WindowSpec

__all__ = ["get_store", "CounterStore", "LeaseResult", "RateResult", "SlotResult", "StoreUnavailable", "WindowSpec"]

# Async Redis connections belong to one event loop, so there is one store per loop.
_stores: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, CounterStore]" = weakref.WeakKeyDictionary()
_by_path = {}
_classes = {}  # dotted path -> class: get_store() is called several times a request, import_string costs a lookup


def get_store() -> CounterStore:
    path = settings.SLUICE_COUNTER_STORE
    cls = _classes.get(path)
    if cls is None:
        cls = _classes[path] = import_string(path)
    if not cls.per_event_loop:
        if path not in _by_path:
            _by_path[path] = cls()
        return _by_path[path]
    loop = asyncio.get_running_loop()
    store = _stores.get(loop)
    if store is None or type(store) is not cls:
        store = _stores[loop] = cls()
    return store


def reset_stores():
    """Forget every store instance (tests switch backends with override_settings)."""
    _stores.clear()
    _by_path.clear()
