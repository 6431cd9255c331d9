"""A finished request's objects are freed when their last reference goes, not left to the cyclic collector: on a real
gateway process (Daphne with Sluice's server), after streams through the API, none of the request's objects — the
Twisted channel and request, the server's gate and mailbox, the lifecycle, the relay and its watchdog, the provider
stream, its permit and its wire body — is part of a reference cycle.

Each of them used to be (docs/performance.md, "Session 13"): a dead stream's whole graph, ~40 KB, waited in the
oldest generation for a full collection, and a server under churn grew by ~15 MB over four rounds of 500 streams
that a cycle-free one did not. The gateway runs with a `sitecustomize` (on its PYTHONPATH) that, on SIGUSR2, collects
with `gc.DEBUG_SAVEALL` and writes the types of the objects that form cycles (the strongly connected components of
what the collector found) to a file. Django's own per-request cycles (the exception class its ASGI handler defines
per request, the task group's exception and traceback, which held the handler's frame and with it the request and
the response) are gone too, since the /v1/ handler's `handle` is Sluice's (session 15).
"""

import json
import os
import signal

import pytest

from tests.support.gateways import counted_stream, eventually, gateway_server

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CYCLES = r'''
import collections, gc, json, os, signal

_armed = []


def _in_cycles(objects):
    ids = {id(o): i for i, o in enumerate(objects)}
    edges = [[ids[id(r)] for r in gc.get_referents(o) if id(r) in ids] for o in objects]
    index, low, on, stack, found, counter = {}, {}, set(), [], collections.Counter(), [0]
    for root in range(len(objects)):  # Tarjan's strongly connected components, without recursion
        if root in index:
            continue
        work = [(root, 0)]
        while work:
            v, at = work.pop()
            if at == 0:
                index[v] = low[v] = counter[0]
                counter[0] += 1
                stack.append(v)
                on.add(v)
            for j in range(at, len(edges[v])):
                w = edges[v][j]
                if w not in index:
                    work.append((v, j + 1))
                    work.append((w, 0))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in edges[v]:
                        found.update(type(objects[i]).__qualname__ for i in component)
                if work:
                    u = work[-1][0]
                    low[u] = min(low[u], low[v])
    return found


class _CycleProbe:
    pass


def _report(signum, frame):
    path = os.environ["SLUICE_TEST_CYCLES"]
    if not _armed:  # the first signal: what the process made before it is not counted, and from now on the
        gc.collect()  # collector waits for the second (every cycle made meanwhile is still there then)
        gc.disable()
        _armed.append(True)
        probe = _CycleProbe()  # a cycle made on purpose once armed: what the instrument must find
        probe.itself = probe
        with open(path + ".tmp", "w") as f:  # whole or absent: the test reads it meanwhile (an empty file once)
            json.dump({"armed": True}, f)
        os.replace(path + ".tmp", path)
        return
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        garbage = list(gc.garbage)
        gc.garbage.clear()
    finally:
        gc.set_debug(0)
        gc.enable()
    with open(path + ".tmp", "w") as f:
        json.dump({"garbage": len(garbage), "in_cycles": _in_cycles(garbage)}, f)
    os.replace(path + ".tmp", path)


signal.signal(signal.SIGUSR2, _report)
'''

# The objects of a request that are Sluice's, or its server's, to keep out of cycles.
REQUEST_OBJECTS = {"HTTPChannel", "BoundedRequest", "ResponseGate", "Mailbox", "BodyWriter", "Completion", "Relay",
                   "Watchdog", "PrefetchBuffer", "EventStream", "GuardedStream", "Permit", "WireBody", "WireResponse",
                   "HttpResponseParser", "EventStreamResponse",
                   # The /v1/ handler's (streaming/gateway/handler.py): Django's handle defines an exception class per
                   # request and ends a task group with an exception, whose group and traceback hold its frame.
                   "type", "ExceptionGroup", "frame", "traceback"}


def test_no_object_of_a_finished_request_is_in_a_reference_cycle(tmp_path, make_user):
    (tmp_path / "sitecustomize.py").write_text(CYCLES)
    report = tmp_path / "cycles.json"
    with gateway_server(PYTHONPATH=str(tmp_path), SLUICE_TEST_CYCLES=str(report)) as gateway:
        caller = make_user()
        counted_stream(gateway, caller.key, 20)  # the process's first request: its caches, its connections
        pid = gateway.server.process.pid
        os.kill(pid, signal.SIGUSR2)
        eventually(lambda: report.exists() and json.loads(report.read_text()).get("armed"), timeout=10)
        for _ in range(5):
            counted_stream(gateway, caller.key, 50)
        os.kill(pid, signal.SIGUSR2)
        found = eventually(lambda: "in_cycles" in (data := json.loads(report.read_text())) and data, timeout=30)
    in_cycles = found["in_cycles"]
    # The instrument works: the cycle its sitecustomize made on purpose, once armed, is found.
    assert in_cycles.get("_CycleProbe") == 1, in_cycles
    assert not {name: n for name, n in in_cycles.items() if name in REQUEST_OBJECTS}, in_cycles
