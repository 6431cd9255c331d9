"""The ORM from async code, on a few long-lived threads that keep their database connections.

Django's async ORM methods (`afirst`, `acreate`, …) and `sync_to_async` run on the request's own thread under
the ASGI handler (`ThreadSensitiveContext`): a new thread per request, hence a new database connection per request
(a connect plus the PRAGMAs on SQLite, a TCP and authentication handshake on PostgreSQL) and a hop to a cold thread
before every query. The gateway's hot path (API key, ledger) runs its queries here instead, on `DB_THREADS`
threads (1 on SQLite: a single writer never meets "database is locked") whose connections stay open.

A connection that saw an error is checked before the next job and replaced if it is no longer usable, as
Django's own `close_if_unusable_or_obsolete` does at the start of a request.
"""

import asyncio
import contextvars
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connections

_executor = None
_workers = 0  # the executor's thread count, as created
_lock = threading.Lock()


def executor() -> ThreadPoolExecutor:
    global _executor, _workers
    if _executor is None:
        with _lock:
            if _executor is None:
                _workers = settings.DB_THREADS
                _executor = ThreadPoolExecutor(max_workers=_workers, thread_name_prefix="sluice-db")
    return _executor


def _heal_connections():
    for conn in connections.all(initialized_only=True):
        if conn.connection is not None and conn.errors_occurred:
            if conn.is_usable() and conn.get_autocommit():
                conn.errors_occurred = False
            else:
                conn.close()


def _job(fn, args, kwargs):
    _heal_connections()
    return fn(*args, **kwargs)


async def run(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` (sync, may use the ORM) on a database thread, in a copy of the caller's context (a trace's
    span, for one); what it sets there is not brought back."""
    return await asyncio.get_running_loop().run_in_executor(
        executor(), contextvars.copy_context().run, _job, fn, args, kwargs)


def database(fn):
    """Decorator: an async version of a sync ORM function, run with `run`."""

    async def wrapper(*args, **kwargs):
        return await run(fn, *args, **kwargs)

    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    wrapper.sync = fn
    return wrapper


def close_connections():
    """Close the database threads' connections and stop the threads (tests, before the test database goes)."""
    global _executor
    with _lock:
        pool, _executor = _executor, None
    if pool is None:
        return
    # Each worker closes its own connection (connections are per thread): the barrier holds every worker until
    # all of them took one job. Then the threads exit.
    workers = _workers
    barrier = threading.Barrier(workers)

    def close():
        connections.close_all()
        barrier.wait(timeout=5)

    for future in [pool.submit(close) for _ in range(workers)]:
        future.result()
    pool.shutdown(wait=True)


class PreparedQuery:
    """A query the ORM compiles once per database and then runs with new parameters: for the hot path.

    Compiling a queryset (joins, select list, WHERE) costs ~10 times more CPU than running it on SQLite, on every
    request; the API key look-up runs on every request (docs/performance.md). `build(*placeholders)` returns the
    queryset; it is compiled with the placeholders, and `rows(*params)` runs the compiled SQL with `params` in their
    place, through the same compiler, so each column gets Django's own conversion (dates, JSON, booleans) for the
    database in use. The placeholders must be distinct values that compile to one SQL parameter each, in order.
    Call on a database thread (`run`, `database`).
    """

    def __init__(self, build, *placeholders):
        self._build = build
        self._placeholders = placeholders
        self._local = threading.local()  # per thread (a compiler holds its thread's connection): alias -> compiled

    def rows(self, *params, using=DEFAULT_DB_ALIAS):
        cache = self._local.__dict__
        compiled = cache.get(using)
        if compiled is None:
            compiler = self._build(*self._placeholders).query.get_compiler(using)
            sql, compiled_params = compiler.as_sql()
            if list(compiled_params) != list(self._placeholders):
                raise ValueError("the query's parameters are not exactly its placeholders: it cannot be prepared")
            # Each column's conversions, found once too (`results_iter` looks them up again on every call: a third
            # of the key look-up's CPU, docs/performance.md).
            converters = compiler.get_converters([s[0] for s in compiler.select[:compiler.col_count]])
            compiled = cache[using] = (compiler, sql, converters)
        compiler, sql, converters = compiled
        with connections[using].cursor() as cursor:
            cursor.execute(sql, params)
            fetched = cursor.fetchall()
        return list(compiler.apply_converters(fetched, converters)) if converters else fetched
