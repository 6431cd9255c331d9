"""SLUICE_CPUS: a server process pinned to CPUs (streaming/server/affinity.py; docs/operations.md, "Pinning a
process to a CPU"). On real gateway processes — Sluice's server and Uvicorn — every thread, the database thread started
by the first request included, runs only on the CPUs named; a list the process cannot run on stops it at start."""

import os
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.servers import PROJECT_ROOT
from streaming.server import affinity
from tests.support.gateways import SERVERS, counted_stream, gateway_server, server_env

ALLOWED = sorted(os.sched_getaffinity(0))
needs_two_cpus = pytest.mark.skipif(len(ALLOWED) < 2, reason="pinning is only visible with two CPUs or more")


@pytest.mark.parametrize("text, cpus", [
    ("1", {1}), ("0-2,5", {0, 1, 2, 5}), (" 3 , 1 ", {1, 3}), ("2-2", {2}), ("0,0", {0}),
])
def test_a_cpu_list_reads_as_taskset_reads_it(text, cpus):
    assert affinity.parse(text) == cpus


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 8)), min_size=1, max_size=8), st.booleans())
def test_any_list_of_cpus_and_ranges_reads_back_as_its_cpus(parts, spaced):
    text = (", " if spaced else ",").join(f"{low}-{low + extra}" if extra else str(low) for low, extra in parts)
    assert affinity.parse(text) == {cpu for low, extra in parts for cpu in range(low, low + extra + 1)}
    assert affinity.parse(affinity.format_list(affinity.parse(text))) == affinity.parse(text)


@pytest.mark.parametrize("text", ["", "a", "1-", "-1", "3-1", "1,,2", "1.5", "0x1"])
def test_a_malformed_cpu_list_is_refused_with_the_variable_named(text):
    with pytest.raises(affinity.AffinityError, match="SLUICE_CPUS"):
        affinity.parse(text)


def test_a_cpu_the_process_may_not_use_is_refused_and_named():
    outside = max(ALLOWED) + 1000
    with pytest.raises(affinity.AffinityError, match=f"CPU\\(s\\) {outside}"):
        affinity.wanted({"SLUICE_CPUS": f"{ALLOWED[0]},{outside}"})
    assert affinity.wanted({"SLUICE_CPUS": " "}) is None  # unset or blank: no pinning
    assert affinity.wanted({}) is None


def thread_affinities(pid):
    return {int(task): set(os.sched_getaffinity(int(task))) for task in os.listdir(f"/proc/{pid}/task")}


@needs_two_cpus
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_every_thread_of_a_pinned_server_runs_on_its_cpu(make_user, server):
    cpu = ALLOWED[-1]
    with gateway_server(server, SLUICE_CPUS=str(cpu)) as gateway:
        counted_stream(gateway, make_user().key, 20)  # the database thread exists once a request has run
        threads = thread_affinities(gateway.server.process.pid)
    assert len(threads) >= 2, threads
    assert all(cpus == {cpu} for cpus in threads.values()), threads


@needs_two_cpus
@pytest.mark.django_db(transaction=True)
def test_without_sluice_cpus_a_server_goes_where_the_scheduler_sends_it(make_user):
    with gateway_server("daphne") as gateway:
        counted_stream(gateway, make_user().key, 5)
        threads = thread_affinities(gateway.server.process.pid)
    assert all(cpus == set(ALLOWED) for cpus in threads.values()), threads


@pytest.mark.parametrize("server", ["daphne", "uvicorn"])
def test_a_server_asked_for_a_cpu_it_cannot_use_stops_at_start_and_says_why(server):
    outside = max(ALLOWED) + 1000
    argv = [part.replace("{port}", "0") for part in SERVERS[server]]
    done = subprocess.run(argv, cwd=PROJECT_ROOT, env={**server_env(), "SLUICE_CPUS": str(outside)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "SLUICE_CPUS" in done.stderr and str(outside) in done.stderr, done.stderr[-2000:]


def test_the_system_check_names_a_bad_cpu_list():
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=PROJECT_ROOT,
                          env={**server_env(), "SLUICE_CPUS": "0-"}, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "sluice.E013" in done.stderr and "SLUICE_CPUS" in done.stderr and "HINT" in done.stderr


def test_a_fleet_refuses_a_cpu_list_no_process_could_run_on_before_starting_any():
    done = subprocess.run([sys.executable, "-m", "streaming.server.fleet", "--processes", "1", "-b", "127.0.0.1",
                           "-p", "0", "config.asgi:application"], cwd=PROJECT_ROOT,
                          env={**server_env(), "SLUICE_CPUS": "0-"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]  # argparse's usage error: no child was started
    assert "SLUICE_CPUS" in done.stderr and "started pid" not in done.stderr
