"""A serving process's full collections walk what its requests made, not what its start-up made (the server's
collector policy, streaming/server/collector.py; docs/performance.md, "The collector's pauses").

A full collection stops the event loop for as long as it walks every container object the process holds. Start-up
makes ~170,000 of them (modules, classes, functions, the URL resolver, the SDK's types), none of them ever garbage,
and at 1,000 streams a full collection paused the loop for 75–200 ms, three times in a 12 s burst: every stream's
next token waited that long. On a real gateway process (Daphne with Sluice's server) that has served streams, a
`sitecustomize` on its PYTHONPATH writes, on SIGUSR2, how many objects a collection may walk and how many are frozen.
"""

import json
import os
import signal

import pytest

from tests.support.gateways import counted_stream, eventually, gateway_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

REPORT = r'''
import gc, json, os, signal


def _report(signum, frame):
    gc.collect()  # what is left is what a full collection walks
    report = {"walked": len(gc.get_objects()), "frozen": gc.get_freeze_count(), "threshold": gc.get_threshold(),
              "cpython_threshold": _DEFAULT}
    path = os.environ["SLUICE_TEST_COLLECTOR"]
    with open(path + ".tmp", "w") as f:
        json.dump(report, f)
    os.replace(path + ".tmp", path)


_DEFAULT = gc.get_threshold()
signal.signal(signal.SIGUSR2, _report)
'''


def serve_and_report(tmp_path, make_user, server="daphne", **env):
    (tmp_path / "sitecustomize.py").write_text(REPORT)
    report = tmp_path / "collector.json"
    with gateway_server(server, PYTHONPATH=str(tmp_path), SLUICE_TEST_COLLECTOR=str(report), **env) as gateway:
        caller = make_user()
        for _ in range(3):
            counted_stream(gateway, caller.key, 20)
        os.kill(gateway.server.process.pid, signal.SIGUSR2)
        return eventually(lambda: report.exists() and json.loads(report.read_text()), timeout=10)


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])  # Sluice's server; Uvicorn through ASGI lifespan
def test_start_up_objects_are_out_of_every_collection_and_full_ones_are_rarer(tmp_path, make_user, server):
    found = serve_and_report(tmp_path, make_user, server)
    # Start-up's objects are frozen (the permanent generation, which no collection walks) ...
    assert found["frozen"] > 50_000, found
    # ... so what a full collection walks is what came after: the first requests' caches and connections.
    assert found["walked"] < found["frozen"] / 4, found
    young, middle, full = found["threshold"]
    assert [young, middle] == found["cpython_threshold"][:2], found  # the young generations keep CPython's figures
    assert full >= 10 * found["cpython_threshold"][2], found


def test_sluice_gc_cpython_leaves_the_collector_as_cpython_has_it(tmp_path, make_user):
    """The switch the benchmarks' A/B runs use (and an operator's way back)."""
    found = serve_and_report(tmp_path, make_user, SLUICE_GC="cpython")
    assert found["frozen"] == 0, found
    assert found["threshold"] == found["cpython_threshold"], found
    assert found["walked"] > 50_000, found  # the instrument sees start-up's objects when they are not frozen
