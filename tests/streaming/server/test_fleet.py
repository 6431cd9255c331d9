"""streaming/server/fleet.py: several real gateway processes on one port, sharing Redis and the test database.

The fleet runs with --pid-header, so every response names the process that served it (x-sluice-server-pid); each
probe below is a new connection, which the kernel hands to one of the SO_REUSEPORT sockets by a hash of its
addresses. The provider is the simulator in a process of its own (one for the module), as every child must reach
the same one.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from types import SimpleNamespace

import psutil
import pytest

from bench.common import simulator
from bench.servers import PROJECT_ROOT, start_server
from tests.support.gateways import eventually, open_stream, server_env, settled_row

pytestmark = pytest.mark.django_db(transaction=True)

FLEET = [sys.executable, "-m", "streaming.server.fleet", "--processes", "2", "--pid-header", "-b", "127.0.0.1",
         "-p", "{port}", "config.asgi:application"]
# The stream that is in flight on the first process a roll replaces: 15 s, longer than its replacement's start-up.
STREAM_TOKENS, TOKENS_PER_SECOND = 300, 20


@pytest.fixture(scope="module")
def provider():
    with simulator() as sim:
        yield sim


@contextmanager
def fleet(provider, redis_url, *options, **env):
    """The fleet of two gateway processes, once both answer /healthz; `options`: the fleet's own, added."""
    env = server_env(REDIS_URL=redis_url, OPENAI_BASE_URL=f"http://127.0.0.1:{provider.port}/v1",
                     OPENAI_API_KEY="sk-test-upstream", **env)
    with start_server([*FLEET[:3], *options, *FLEET[3:]], env=env, ready_timeout_seconds=60) as server:
        eventually(lambda: "fleet ready" in server.stderr_text(), timeout=120)
        yield server


def children(server):
    return {child.pid for child in psutil.Process(server.process.pid).children()}


def started_pid(server, slot):
    return int(re.search(rf"slot {slot}: started pid (\d+)", server.stderr_text()).group(1))


def served_by(port) -> int:
    """GET /healthz on a new connection: the pid that answered (an error if refused, reset, or not a 200)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    return _pid_of(response)


def _pid_of(response: bytes) -> int:
    head = response.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 200"), response[:300]
    return int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                    if line.lower().startswith(b"x-sluice-server-pid:")))


def pids_seen(port, expected, timeout=60):
    """Probe until every pid in `expected` has answered; return every pid seen."""
    seen = set()

    def all_seen():
        seen.add(served_by(port))
        return seen >= expected

    eventually(all_seen, timeout=timeout, interval=0)
    return seen


class Prober(threading.Thread):
    """New connections one after another until stopped: the pids that answered, and every failure."""

    def __init__(self, port):
        super().__init__(daemon=True)
        self.port, self.pids, self.errors = port, [], []
        self._stop_event = threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            try:
                self.pids.append(served_by(self.port))
            except (OSError, AssertionError) as error:
                self.errors.append(repr(error))
            self._stop_event.wait(0.01)  # the probing rate, not a synchronisation

    def stop(self):
        self._stop_event.set()
        self.join(timeout=120)


class Reader(threading.Thread):
    """Reads a streamed response to its end (the terminating chunk, or the connection's close)."""

    def __init__(self, sock, head):
        super().__init__(daemon=True)
        self.sock, self.received = sock, head

    def run(self):
        while not self.received.endswith(b"\r\n0\r\n\r\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                return
            self.received += chunk


def stream_on(server, key, pid, max_tokens):
    """A streamed completion served by `pid`: new connections until the kernel gives one to its socket."""
    for _ in range(60):
        sock, request_id, head = open_stream(SimpleNamespace(server=server), key, max_tokens=max_tokens)
        if _pid_of(head) == pid:
            return sock, request_id, head
        sock.close()  # another process's: that stream is cancelled
    raise AssertionError(f"no connection reached pid {pid} in 60")


@pytest.mark.redis
def test_two_processes_answer_on_one_port_and_stop_together(provider, redis_url):
    with fleet(provider, redis_url) as server:
        pids = children(server)
        assert len(pids) == 2
        assert pids_seen(server.port, pids) == pids
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.stderr_text()[-3000:]
        assert not any(psutil.pid_exists(pid) for pid in pids)
        assert "fleet: stopped" in server.stderr_text()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.port), timeout=5)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two CPUs to pin two processes to")
def test_pin_gives_each_process_a_cpu_of_its_own_and_a_replacement_keeps_its_slots(provider, redis_url):
    """--pin (SLUICE_CPUS per slot, streaming/server/affinity.py): the two processes on two different CPUs, every
    thread of each; after a rolling restart the replacements are pinned as their slots were."""
    usable = sorted(os.sched_getaffinity(0))
    with fleet(provider, redis_url, "--pin") as server:
        def pinned():
            return {pid: {frozenset(os.sched_getaffinity(int(task))) for task in os.listdir(f"/proc/{pid}/task")}
                    for pid in children(server)}

        def cpus_of(found):  # each process's threads on one CPU set, the two processes on different CPUs
            return sorted(sorted(cpus) for each in found.values() for cpus in each)

        first = pinned()
        assert cpus_of(first) == [[usable[0]], [usable[1]]], first
        server.process.send_signal(signal.SIGHUP)
        eventually(lambda: "rolling restart done" in server.stderr_text(), timeout=180)
        second = pinned()
        assert set(second).isdisjoint(first), (first, second)
        assert cpus_of(second) == [[usable[0]], [usable[1]]], second


@pytest.mark.redis
def test_sighup_rolls_one_process_at_a_time_and_loses_no_stream_and_no_connection(make_user, provider, redis_url):
    caller = make_user(concurrent_streams=20, max_tokens_per_request=STREAM_TOKENS)
    provider.reset(tokens_per_second=TOKENS_PER_SECOND)
    with fleet(provider, redis_url, SHUTDOWN_DRAIN_SECONDS=60) as server:
        old = children(server)
        first = started_pid(server, 0)  # the roll replaces slot 0's process first
        sock, request_id, head = stream_on(server, caller.key, first, STREAM_TOKENS)
        reader, prober = Reader(sock, head), Prober(server.port)
        reader.start()
        prober.start()
        server.process.send_signal(signal.SIGHUP)
        eventually(lambda: f"SIGTERM to pid {first}: draining" in server.stderr_text(), timeout=120)
        assert reader.is_alive(), "the stream ended before its process was told to drain"
        eventually(lambda: "rolling restart done" in server.stderr_text(), timeout=180)
        prober.stop()
        reader.join(timeout=60)
        sock.close()
        new = children(server)
        log = server.stderr_text()
        # Every new connection during the roll was served: none refused, none reset, none closed unanswered.
        assert prober.errors == [], (prober.errors[:5], log[-3000:])
        assert len(prober.pids) > 20 and set(prober.pids) & new, log[-3000:]
        # The stream on the drained process ran to its end.
        assert b"data: [DONE]" in reader.received and reader.received.count(b'"content":" ') == STREAM_TOKENS
        # Two new processes, and only they serve.
        assert len(new) == 2 and not new & old
        assert pids_seen(server.port, new) == new
        # One at a time: slot 0's replacement was ready before its old process was told to drain, and that one had
        # exited before slot 1's replacement started.
        second = started_pid(server, 1)
        assert log.index(f"SIGTERM to pid {first}") > log.index("slot 0: pid", log.index("rolling restart:"))
        assert log.index(f"slot 0: pid {first} exited") < log.rindex("slot 1: started pid")
        assert log.index(f"SIGTERM to pid {second}") > log.index(f"slot 0: pid {first} exited")
    assert settled_row(request_id).status == "completed"


@pytest.mark.redis
def test_a_process_killed_is_replaced_and_its_connections_wait_for_the_replacement(provider, redis_url):
    with fleet(provider, redis_url) as server:
        old = children(server)
        victim = started_pid(server, 0)
        os.kill(victim, signal.SIGKILL)
        # Connections the kernel gives to the dead process's socket wait in its queue for the replacement.
        served = [served_by(server.port) for _ in range(20)]
        assert victim not in served

        def replaced():
            pids = children(server)
            return pids if len(pids) == 2 and victim not in pids else None

        new = eventually(replaced, timeout=60)
        assert len(new & old) == 1
        replacement = (new - old).pop()
        eventually(lambda: f"pid {replacement} ready" in server.stderr_text(), timeout=120)
        assert pids_seen(server.port, new) == new
        log = server.stderr_text()
        assert f"slot 0: pid {victim} died (killed by SIGKILL)" in log and "slot 0: restarting in 0.5 s" in log


def test_a_connection_accepted_just_before_the_drain_gets_its_answer():
    """The drain (shutdown.py) waits ACCEPT_GRACE_SECONDS for a just-accepted connection's request: without that, the
    last connections an old process of a roll accepted were closed unanswered (1 in ~24,000 during rolls)."""
    argv = [sys.executable, "-m", "streaming.server", "-b", "127.0.0.1", "-p", "{port}", "tests.support.asgi_apps:app"]
    with start_server(argv) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            client_port = sock.getsockname()[1]
            process = psutil.Process(server.process.pid)
            eventually(lambda: any(c.raddr and c.raddr.port == client_port for c in process.net_connections("tcp")))
            server.process.send_signal(signal.SIGTERM)
            eventually(lambda: "draining:" in server.stderr_text())
            sock.sendall(b"GET /stats?id=none HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 404"), (response[:200], server.stderr_text()[-2000:])
        assert server.process.wait(timeout=30) == 0


def test_the_fleet_refuses_listening_options_and_a_port_in_use():
    run = [sys.executable, "-m", "streaming.server.fleet"]
    refused = subprocess.run([*run, "-u", "/tmp/x.sock", "config.asgi:application"], cwd=PROJECT_ROOT,
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode == 2 and "-u: the fleet listens for its processes" in refused.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = subprocess.run([*run, "-p", str(port), "config.asgi:application"], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, timeout=30)
    assert busy.returncode == 1 and f"127.0.0.1:{port} is in use by another process" in busy.stderr
