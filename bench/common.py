"""Shared pieces of the benchmarks: processes, a bench database, sampling, a light load generator, tables.

Everything under test runs in its own process (the simulated upstream under Uvicorn, the gateway under Daphne
with backpressure, stock Daphne or Uvicorn); this process only generates load, with raw non-blocking sockets on
one asyncio loop (the openai SDK would cost more CPU than the gateway it measures), and samples the others with
psutil.
"""

import asyncio
import ctypes
import json
import os
import platform
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx2
import psutil

from bench.servers import start_server

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"  # git-ignored: raw profiles and JSON of the last runs
HOST = "127.0.0.1"
PY = sys.executable
APP = "config.asgi:application"
DEFAULT_SECRET = "bench-only-secret-key-not-for-production-0123456789"
MODEL = "sim-small"
# One streamed content token as the simulator writes it (the gateway relays the upstream's bytes verbatim).
TOKEN_MARK = b'"delta":{"content":'
DONE_MARK = b"data: [DONE]"
ERROR_MARK = b'data: {"error"'
# Bytes kept between reads so a mark split across two reads is found, too short to hold a whole token mark.
CARRY = len(TOKEN_MARK) - 1

SERVERS = {
    # Sluice's production entry point: Daphne with HTTP backpressure.
    "serve": [PY, "-m", "streaming.server", "-b", HOST, "-p", "{port}", APP],
    "daphne": [PY, "-m", "daphne", "-b", HOST, "-p", "{port}", APP],
    # asyncio's loop, as docs/backpressure.md recommends (Uvicorn would pick uvloop, installed for Daphne).
    "uvicorn": [PY, "-m", "uvicorn", APP, "--host", HOST, "--port", "{port}", "--no-access-log",
                "--log-level", "warning", "--loop", "asyncio"],
}
SERVER_LABELS = {"serve": "streaming.server (Daphne + backpressure)", "daphne": "stock Daphne",
                 "uvicorn": "Uvicorn"}


# The process ------------------------------------------------------------------------------------------------

def raise_nofile(wanted=65536):
    """Raise this process's open-file limit (soft up to the hard limit); the servers it starts inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# The load generator's own scheduling -------------------------------------------------------------------------
#
# On a 2-core machine this process shares the cores with what it measures. Linux's scheduler (EEVDF, kernel
# 6.6+) lets a running task keep its core for its whole time slice (1.4 ms by default on 2 cores) before a task
# that just woke up gets it: while the gateway relays a stream and the simulator generates it, the load
# generator, woken by the first token, waited ~1.3 ms per request for a core before it could read the token
# (/proc run-queue delay; direct to the simulator, one core stays free and it waits ~0). That wait is the
# instrument's, not the gateway's: the load generator asks for a 0.1 ms slice, which lets it run as soon as it
# wakes (kernel 6.12+: a shorter slice preempts at wake-up). The servers keep the default (reset on fork).
LOAD_GENERATOR_SLICE_NS = 100_000
_SCHED_ATTR = struct.Struct("IIQiIQQQII")  # struct sched_attr (linux/sched/types.h): 56 bytes
_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274}  # sched_getattr is the next number on both
SCHED_FLAG_RESET_ON_FORK = 0x01


def _sched_attr_call(number, tid, buffer, *extra):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, tid, buffer, *extra) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def time_slice_ns(tid=0):
    """The time slice the kernel gives thread `tid` (0: this one), in ns; None where it cannot be read."""
    number = _SCHED_SETATTR.get(platform.machine())
    if sys.platform != "linux" or number is None:
        return None
    buffer = ctypes.create_string_buffer(_SCHED_ATTR.size)
    try:
        _sched_attr_call(number + 1, tid, buffer, ctypes.c_uint(_SCHED_ATTR.size), ctypes.c_uint(0))
    except OSError:
        return None
    return _SCHED_ATTR.unpack(buffer.raw)[5] or None


def shorten_time_slice(ns=LOAD_GENERATOR_SLICE_NS):
    """Ask for a short time slice for this thread, not inherited by the processes or threads it starts.

    Returns the slice now in force (ns), or None where the kernel has no such setting (then nothing changed).
    """
    number = _SCHED_SETATTR.get(platform.machine())
    if sys.platform != "linux" or number is None:
        return None
    attr = _SCHED_ATTR.pack(_SCHED_ATTR.size, os.SCHED_OTHER, SCHED_FLAG_RESET_ON_FORK, os.getpriority(
        os.PRIO_PROCESS, 0), 0, ns, 0, 0, 0, 0)
    try:
        _sched_attr_call(number, 0, ctypes.create_string_buffer(attr), ctypes.c_uint(0))
    except OSError:
        return None
    return time_slice_ns()


def run_queue_wait():
    """Seconds this thread has spent runnable but waiting for a core (/proc schedstat), or None."""
    try:
        with open("/proc/thread-self/schedstat") as stats:
            return int(stats.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


def describe_interpreter():
    """How this CPython was compiled, as sysconfig records it: profile-guided optimisation (-fprofile-use) and
    link-time optimisation (-flto), libpython shared or linked in. A paced token costs ~9 % more CPU on a build
    without PGO and LTO (docs/performance.md, "Session 18"). Some distributions do not record their build's PGO or
    LTO there, so the absence is reported as "not recorded", not as absent."""
    flags = " ".join(sysconfig.get_config_var(name) or "" for name in ("PY_CFLAGS_NODIST", "CONFIG_ARGS"))
    found = [name for name, marks in (("PGO", ("-fprofile-use", "--enable-optimizations")),
                                      ("LTO", ("-flto", "--with-lto"))) if any(mark in flags for mark in marks)]
    optimised = f"built with {' and '.join(found)}" if found else "no PGO or LTO recorded"
    shared = "libpython shared" if sysconfig.get_config_var("Py_ENABLE_SHARED") else "libpython linked in"
    return f"{optimised}, {shared}"


def describe_scheduling(servers=()):
    """One line for the reports: the load generator's slice and the servers' (pids)."""
    mine = time_slice_ns()
    if mine is None:
        return "Load generator: the kernel's default scheduling (no time-slice setting on this system)."
    theirs = sorted({ns for ns in (time_slice_ns(pid) for pid in servers) if ns})
    return (f"Load generator: {mine / 1e6:g} ms time slice (LOAD_GENERATOR_SLICE_NS, bench/common.py)"
            + (f"; servers: {', '.join(f'{ns / 1e6:g}' for ns in theirs)} ms, the kernel's default" if theirs else "")
            + ".")


def secret_key():
    return os.environ.get("DJANGO_SECRET_KEY") or DEFAULT_SECRET


def say(message):
    print(f"  .. {message}", file=sys.stderr, flush=True)


# The bench database: a temporary SQLite file, migrated, with one user on a generous plan ------------------

SETUP_SCRIPT = r"""
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from django.contrib.auth import get_user_model
from quotas.models import ApiKey, Plan, UserQuota
user = get_user_model().objects.create_user("bench", password="bench-password-not-used")
plan = Plan.objects.create(name="bench", tokens_per_day=10**12, tokens_per_month=10**13,
                           requests_per_minute=1_000_000, concurrent_streams=10_000,
                           max_tokens_per_request=1_000_000)
UserQuota.objects.create(user=user, plan=plan)
print(ApiKey.issue(user, name="bench")[1])
"""


@dataclass
class BenchDatabase:
    path: Path
    api_key: str

    @property
    def url(self):
        return f"sqlite:///{self.path}"


@contextmanager
def bench_database():
    """A migrated SQLite file with a user whose plan allows 10,000 concurrent streams and 1M requests/min."""
    with tempfile.TemporaryDirectory(prefix="sluice-bench-") as tmp:
        path = Path(tmp, "bench.sqlite3")
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DATABASE_URL": f"sqlite:///{path}",
               "DJANGO_SECRET_KEY": secret_key(), "REDIS_URL": "", "LOG_LEVEL": "WARNING"}
        done = subprocess.run([PY, "-c", SETUP_SCRIPT], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"bench database setup failed:\n{done.stderr}")
        yield BenchDatabase(path, done.stdout.strip().splitlines()[-1])


def gateway_env(db: BenchDatabase, sim_port: int, redis_url: str = "", **overrides):
    env = {
        "DATABASE_URL": db.url,
        "DJANGO_SECRET_KEY": secret_key(),
        "REDIS_URL": redis_url,
        "OPENAI_BASE_URL": f"http://{HOST}:{sim_port}/v1",
        "OPENAI_API_KEY": "sk-bench",
        "LOG_LEVEL": "WARNING",
        # The shared upstream limit defaults to 64 concurrent requests per upstream; these benchmarks run up
        # to 500 streams on purpose, so it is lifted (0 = no limit; permits are still taken and given back).
        "UPSTREAM_CONCURRENCY_MAX": "0",
    }
    env.update({k: str(v) for k, v in overrides.items()})
    return env


# Processes --------------------------------------------------------------------------------------------------

class Simulator:
    """The simulated upstream in its own process (Uvicorn), with its /control and /stats."""

    def __init__(self, server, **startup):
        self.startup = startup  # the switches given on the command line, which /control/reset forgets
        self.server = server
        self.port = server.port
        self.pid = server.process.pid
        # A connection per call: a kept-alive one idle past Uvicorn's keep-alive timeout (5 s) may be closed by the
        # simulator just as the next call is sent on it, and that call fails with a connection reset (the backpressure
        # bench's /stats after a 30 s phase did, 2026-12-06 23:23 UTC). These calls are few; a connect is cheap.
        self.http = httpx2.Client(base_url=server.base_url, timeout=30, trust_env=False,
                                  limits=httpx2.Limits(max_keepalive_connections=0))

    def control(self, **switches):
        response = self.http.post("/control", json=switches)
        response.raise_for_status()
        return response.json()

    def reset(self, **switches):
        """Forget the records and restore the start-up switches, then apply `switches`."""
        self.http.post("/control/reset").raise_for_status()
        return self.control(**{**self.startup, **switches})

    def stats(self):
        return self.http.get("/stats").json()


@contextmanager
def simulator(tokens_per_second=0.0, default_tokens=1_000_000):
    argv = [PY, "-m", "streaming.simulator", "--port", "{port}", "--tokens-per-second", str(tokens_per_second),
            "--default-tokens", str(default_tokens)]
    with start_server(argv) as server:
        sim = Simulator(server, tokens_per_second=tokens_per_second, default_tokens=default_tokens)
        try:
            yield sim
        finally:
            sim.http.close()


@contextmanager
def gateway(kind, env):
    """A gateway process (`kind` in SERVERS) serving config.asgi:application."""
    with start_server(SERVERS[kind], env=env, ready_timeout_seconds=60) as server:
        yield server


@contextmanager
def private_redis():
    """A throwaway redis-server on a free port (its INFO commandstats count only this benchmark's commands).

    Yields its URL, or None when no redis-server binary is installed.
    """
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="sluice-bench-redis-") as tmp:
        argv = [binary, "--bind", HOST, "--port", "{port}", "--save", "", "--appendonly", "no", "--dir", tmp]
        with start_server(argv) as server:
            yield f"redis://{HOST}:{server.port}/0"


class ProcessMonitor:
    """RSS sampled every `interval` s in a thread (peak and a time series), CPU seconds on demand."""

    def __init__(self, pid, interval=0.1):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.samples = []  # (monotonic, rss bytes)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self):
        return self.process.memory_info().rss

    def cpu(self):
        times = self.process.cpu_times()
        return times.user + times.system

    def reset_peak(self):
        self.peak = self.rss()

    def _run(self):
        while not self._stop.is_set():
            try:
                rss = self.rss()
            except psutil.Error:
                return
            self.samples.append((time.monotonic(), rss))
            self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self.peak = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# Figures ----------------------------------------------------------------------------------------------------

def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence; None for an empty one."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-p * len(ordered) // 100))))
    return ordered[rank - 1]


def mb(nbytes):
    return nbytes / 1e6


def fmt(value, spec=".1f", missing="-"):
    return missing if value is None else format(value, spec)


def table(headers, rows, aligns=None):
    """A plain-text table (also valid Markdown)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)

    def line(row):
        return "| " + " | ".join(format(c, f"{a}{w}") for c, a, w in zip(row, aligns, widths)) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":" if a == ">" else "-" * (w + 2)) for a, w in zip(aligns, widths)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def log_exceptions(stderr, name=None):
    """A one-line summary of the exceptions in a server's log (and the log saved under bench/results/)."""
    if name:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / f"{name}.log").write_text(stderr)
    found = Counter(line.strip()[:160] for line in stderr.splitlines()
                    if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Timeout)\b", line))
    return "; ".join(f"{n}x {line}" for line, n in found.most_common(4))


def verdict(ok):
    return "MET" if ok else "NOT MET"


# The load generator: HTTP/1.1 over raw non-blocking sockets --------------------------------------------------

def chat_body(max_tokens, **extra):
    return json.dumps({"model": MODEL, "stream": True, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Say something."}], **extra}).encode()


def http_request(port, path, body, api_key=None):
    headers = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}", "Content-Type: application/json",
               f"Content-Length: {len(body)}", "Connection: close"]
    if api_key:
        headers.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


class ChunkedDecoder:
    """Incremental decoder of HTTP/1.1 chunked transfer coding."""

    def __init__(self):
        self.buf = b""
        self.left = 0  # bytes left in the current chunk
        self.state = "size"

    @property
    def done(self):
        return self.state == "done"

    def feed(self, data):
        buf = self.buf + data if self.buf else data
        pos, out = 0, []
        while True:
            if self.state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.state = "done"
                    break
                self.left, self.state = size, "data"
            elif self.state == "data":
                take = min(self.left, len(buf) - pos)
                if take <= 0:
                    break
                out.append(buf[pos:pos + take])
                pos += take
                self.left -= take
                if self.left == 0:
                    self.state = "crlf"
            elif self.state == "crlf":
                if len(buf) - pos < 2:
                    break
                pos += 2
                self.state = "size"
            else:
                break
        self.buf = buf[pos:]
        return b"".join(out)


@dataclass
class StreamResult:
    status: int = 0
    request_id: str = ""
    sent_at: float = 0.0
    first_token_at: float | None = None
    ended_at: float = 0.0
    tokens: int = 0
    body_bytes: int = 0
    done: bool = False
    error: str = ""
    body_head: bytes = b""  # the first bytes of the body, for error messages
    server: str = ""  # the x-sluice-server-pid header: which process of a fleet answered (bench/fleet.py)
    token_times: list = field(default_factory=list)  # only when asked for

    @property
    def ttft(self):
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def ok(self):
        return not self.error and self.status == 200 and self.done


async def open_socket(port, rcvbuf=None):
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window scale
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, (HOST, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _read_head(loop, sock, result, read_size=65536):
    data = b""
    while b"\r\n\r\n" not in data:
        piece = await loop.sock_recv(sock, read_size)
        if not piece:
            raise ConnectionError("closed before the response head")
        data += piece
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    result.status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    result.request_id = headers.get("x-request-id", "")
    result.server = headers.get("x-sluice-server-pid", "")
    return headers, rest


async def stream_chat(port, path, body, api_key=None, record_times=False, read_size=65536):
    """One streamed chat completion, read as fast as it comes: TTFT, content tokens, [DONE], errors."""
    loop = asyncio.get_running_loop()
    result = StreamResult()
    sock = None
    try:
        sock = await open_socket(port)
        result.sent_at = time.perf_counter()
        await loop.sock_sendall(sock, http_request(port, path, body, api_key))
        headers, rest = await _read_head(loop, sock, result, read_size)
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        decoder = ChunkedDecoder() if chunked else None
        carry = b""
        error_seen = False
        times = result.token_times
        data = rest
        while True:
            if data:
                now = time.perf_counter()
                body_part = decoder.feed(data) if decoder else data
                result.body_bytes += len(body_part)
                if len(result.body_head) < 300:
                    result.body_head += body_part[:300]
                scan = carry + body_part
                found = scan.count(TOKEN_MARK)
                if found:
                    if result.first_token_at is None:
                        result.first_token_at = now
                    result.tokens += found
                    if record_times:
                        times.extend([now] * found)
                if not result.done and DONE_MARK in scan:
                    result.done = True
                if ERROR_MARK in scan and not error_seen:
                    error_seen = True
                    start = scan.find(ERROR_MARK)
                    result.error = scan[start:start + 200].decode("utf-8", "replace")
                carry = scan[-CARRY:]
                if decoder is not None and decoder.done:
                    break
            data = await loop.sock_recv(sock, read_size)
            if not data:
                break
        if result.status != 200:
            result.error = f"HTTP {result.status}: {result.body_head[:200].decode('utf-8', 'replace')}"
        elif not result.done and not result.error:
            result.error = "ended without [DONE]"
    except (OSError, ConnectionError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.ended_at = time.perf_counter()
        if sock is not None:
            sock.close()
    return result


@dataclass
class SlowReader:
    """A client that reads `read_size` bytes every `interval` seconds through a small receive window."""

    port: int
    path: str
    body: bytes
    api_key: str | None = None
    rcvbuf: int = 4096
    read_size: int = 256
    interval: float = 0.1
    status: int = 0
    request_id: str = ""
    bytes_read: int = 0
    closed_by_server: bool = False
    error: str = ""
    last_read_at: float = 0.0

    async def run(self):
        loop = asyncio.get_running_loop()
        sock = None
        try:
            sock = await open_socket(self.port, self.rcvbuf)
            await loop.sock_sendall(sock, http_request(self.port, self.path, self.body, self.api_key))
            result = StreamResult()
            _, rest = await _read_head(loop, sock, result, self.read_size)
            self.status, self.request_id = result.status, result.request_id
            self.bytes_read = len(rest)
            while True:
                await asyncio.sleep(self.interval)
                data = await loop.sock_recv(sock, self.read_size)
                if not data:
                    self.closed_by_server = True
                    return
                self.bytes_read += len(data)
                self.last_read_at = time.monotonic()
        except (OSError, ConnectionError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            self.closed_by_server = True
        finally:
            if sock is not None:
                sock.close()


async def closed_loop(concurrency, total, make):
    """`concurrency` workers run `await make()` until `total` calls are done; returns (results, wall seconds)."""
    remaining = iter(range(total))
    results = []

    async def worker():
        for _ in remaining:
            results.append(await make())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - started


def summarize_errors(results, limit=3):
    counts = Counter(r.error.split(":", 1)[0] if r.error.startswith("HTTP") else r.error[:80]
                     for r in results if not r.ok)
    return "; ".join(f"{n}x {e}" for e, n in counts.most_common(limit))


# Profiling --------------------------------------------------------------------------------------------------

def py_spy_binary():
    candidate = Path(PY).parent / "py-spy"
    return str(candidate) if candidate.exists() else shutil.which("py-spy")


def start_profile(pid, seconds, name, rate=250):
    """Start `py-spy record` on `pid` for `seconds` (raw collapsed stacks into bench/results/); None if absent."""
    binary = py_spy_binary()
    if binary is None:
        return None
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.txt"
    process = subprocess.Popen([binary, "record", "--pid", str(pid), "--duration", str(int(seconds)),
                                "--rate", str(rate), "--format", "raw", "--output", str(out), "--nonblocking", "--gil"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return process, out


def _frame_name(frame):
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, where = frame.rpartition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in where:
            where = where.split(marker, 1)[1]
            break
    else:
        where = where.replace(str(PROJECT_ROOT) + "/", "")
    return f"{where}:{name or frame}"


def summarize_profile(path, top=15):
    """(total samples, [(self share, frame)], [(inclusive share, frame) of Sluice's own code])."""
    self_counts, incl_counts, total = Counter(), Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        total += n
        if frames:
            self_counts[frames[-1]] += n
        for frame in set(frames):
            if frame.startswith(("streaming/", "quotas/", "config/")):
                incl_counts[frame] += n
    if not total:
        return 0, [], []
    return (total, [(n / total, f) for f, n in self_counts.most_common(top)],
            [(n / total, f) for f, n in incl_counts.most_common(top)])


# Areas of the gateway, for a coarse breakdown of profile samples: each sample goes to the area of the deepest
# frame (leaf first) that matches one of these patterns.
AREAS = [
    ("upstream connection set-up (anyio connect_tcp, getaddrinfo)", ("connect_tcp", "getaddrinfo")),
    ("ledger writes (open_ledger, close_ledger; SQLite)", ("open_ledger", "close_ledger", "record_refusal")),
    ("API key + limits look-ups (authenticate, caller_limits)", ("authenticate (quotas", "caller_limits",
                                                                    "_touch (quotas")),
    ("counter store (rate, slot, lease, settle, permits)", ("quotas/store/",)),
    ("relay: JSON parse + metering per chunk (classify, Relay._pump)", ("Relay._pump", "chunk_tokens", "classify")),
    ("upstream read: httpx2/httpcore/h11 + SSE split (EventStream)", ("EventStream.read_batch",
                                                                     "GuardedStream.read_batch")),
    ("openai client: building + sending the request", ("streaming/provider/client.py", "openai/")),
    ("Django's sync middleware (Session, Auth, Csrf, Messages, ...)", ("django/middleware/",
                                                                       "django/contrib/sessions/",
                                                                       "django/contrib/auth/middleware",
                                                                       "django/contrib/messages/",
                                                                       "django/utils/deprecation.py")),
    ("sync_to_async thread hops (executor, threads, context)", ("asgiref/", "concurrent/futures/", "threading.py")),
    ("Django ASGI handler + response", ("django/core/handlers/", "django/http/")),
    ("Daphne/Twisted HTTP + write path", ("daphne/", "twisted/", "streaming/server/")),
    ("asyncio event loop", ("asyncio/", "selectors.py")),
]


def profile_areas(path):
    counts, total = Counter(), 0
    for line in Path(path).read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        for frame in reversed(stack.split(";")):
            area = next((name for name, patterns in AREAS if any(p in frame for p in patterns)), None)
            if area:
                counts[area] += n
                break
        else:
            counts["other"] += n
    return total, [(n / total, area) for area, n in counts.most_common()]


def print_profile(path, title):
    total, by_self, by_own = summarize_profile(path)
    if not total:
        print(f"\n{title}: no samples (py-spy could not attach?)")
        return
    print(f"\n{title}: {total} samples (raw stacks: {path.relative_to(PROJECT_ROOT)})")
    print("\nTop frames by self time:")
    print(table(["self %", "frame"], [(f"{share * 100:.1f}", frame) for share, frame in by_self], ["<", "<"]))
    print("\nSluice's own functions by inclusive time:")
    print(table(["incl %", "function"], [(f"{share * 100:.1f}", frame) for share, frame in by_own], ["<", "<"]))
    print("\nBy area (each sample counted once, in the area of its deepest matching frame):")
    print(table(["%", "area"], [(f"{share * 100:.1f}", area) for share, area in profile_areas(path)[1]], ["<", "<"]))


