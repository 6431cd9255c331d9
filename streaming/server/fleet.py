"""Several server processes on one port, restarted one at a time: a small supervisor (standard library only).

    python -m streaming.server.fleet --processes 2 -b 0.0.0.0 -p 8000 [daphne args…] config.asgi:application

Each child is `python -m streaming.server` (Daphne with backpressure) with every argument given here except the
fleet's own (`--processes`, `-b`, `-p`, `--backlog`, `--ready-timeout`, `--health-path`, `--pin`, `--pid-header`).
With `--pin`, each slot's processes run on a CPU of their own (SLUICE_CPUS), the usable CPUs in turn.

- SIGTERM or SIGINT: every child drains (streaming/server/shutdown.py) and the fleet exits once they all have; a
  second signal kills what is still draining.
- SIGHUP: a rolling restart. For each process in turn: start its replacement, wait until the replacement answers
  `--health-path` (/healthz) on a private UNIX socket of its own, then SIGTERM the old process and wait for its drain
  to end before the next. A replacement that is not ready in `--ready-timeout` is stopped, and the roll stops there
  (the old processes keep serving). A SIGHUP during a roll asks for one more roll after it.
- A child that dies otherwise is restarted after a back-off: 0.5 s, doubling while its successors die within
  STABLE_SECONDS of starting, up to 30 s.
- Every event is one line on stderr.

How the processes share the port. The fleet binds one listening socket per *slot* (one slot per process), each
with SO_REUSEPORT, before any child starts, and hands a slot's socket to its process with Daphne's `--fd`. The
choice, against the alternatives:

- One socket inherited by every child (what a pre-fork server does) spreads connections by which process wakes up
  first: every child's event loop polls the same socket, all of them wake for each connection (no EPOLLEXCLUSIVE
  in asyncio) and whichever calls accept() first wins, so the split follows scheduling, not load, and on two cores
  one process can take most of the connections. With SO_REUSEPORT the kernel gives each socket its own accept queue
  and picks the queue by a hash of the connection's addresses: an even split of connections, whichever process is
  busier.
- The price of SO_REUSEPORT is what happens when a socket closes: the connections already queued on it (completed
  handshakes not yet accepted, and half-open ones) are reset, not moved to the group's other sockets (unless the
  host sets net.ipv4.tcp_migrate_req=1, Linux 5.14+; it is 0 by default). A process that drains closes its
  listening socket, so a socket per *process* would reset whatever arrived in its queue between the drain's last
  accept() and the close. Hence a socket per *slot*, kept open by this supervisor across its processes: during a
  roll the replacement adopts the same socket before the old process stops accepting from it, and the old one's
  close only drops its own copy of the descriptor, so its queue lives on for the replacement and nothing is reset.
  Twisted never shutdown()s an adopted socket (that would cut it for every holder), and closes the descriptor it
  was handed once it has adopted a duplicate, so a drained child holds no copy.
- For the same reason, connections the kernel hashes to a slot whose process died wait in that slot's queue
  (up to `--backlog`) for the restarted process, rather than being refused. On SIGTERM the fleet closes its copies
  first, so the port refuses connections once every child has stopped accepting.
- A socket created here, before the children start, turns a busy port into one error at start-up (and the fleet
  first checks that nothing else listens there: SO_REUSEPORT would otherwise share the port with any other
  process of the same user that asks for it).

Limits across the processes are global because every quota lives in the counter store and the ledger, not in a
process: run the fleet with REDIS_URL and PostgreSQL (docs/operations.md, "Several processes on one port").

Linux only (SO_REUSEPORT's load-spreading, PR_SET_PDEATHSIG), IPv4 addresses only (Twisted's `fd:` endpoint adopts
AF_INET sockets).
"""

import argparse
import asyncio
import ctypes
import errno
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field

from streaming.server import affinity
from streaming.server.shutdown import HOOKS_GRACE_SECONDS, drain_seconds

logger = logging.getLogger("streaming.server.fleet")

# Set in the children's environment by --pid-header: BackpressureServer then adds PID_HEADER (the serving process's
# pid) to every response, so that a client (the tests, the benchmark) sees which process answered.
PID_HEADER_VARIABLE = "SLUICE_SERVER_PID_HEADER"
PID_HEADER = b"x-sluice-server-pid"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
DEFAULT_BACKLOG = 1024
READY_TIMEOUT_SECONDS = 60.0
HEALTH_PATH = "/healthz"
PROBE_INTERVAL_SECONDS = 0.1
PROBE_TIMEOUT_SECONDS = 2.0
BACKOFF_FIRST_SECONDS = 0.5
BACKOFF_MAX_SECONDS = 30.0
# A child that lived this long before dying was not crash-looping: its slot's back-off starts again at the first.
STABLE_SECONDS = 30.0
# Beyond a child's drain (SHUTDOWN_DRAIN_SECONDS plus its hooks' grace), how long to wait before SIGKILL.
STOP_MARGIN_SECONDS = 10.0
# The children listen on these: the fleet owns every listening socket.
FORBIDDEN_OPTIONS = ("-u", "--unix-socket", "--fd", "-e", "--endpoint")


@dataclass(eq=False)
class Child:
    slot: int
    process: asyncio.subprocess.Process
    probe_path: str
    started: float = field(default_factory=time.monotonic)
    retiring: bool = False  # sent SIGTERM by the fleet: its exit is expected

    @property
    def pid(self):
        return self.process.pid

    @property
    def running(self):
        return self.process.returncode is None


@dataclass(eq=False)
class Slot:
    index: int
    sock: socket.socket
    current: Child | None = None
    quick_deaths: int = 0  # children of this slot that died within STABLE_SECONDS, in a row
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one replacement at a time: a roll, or a restart


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as os.process_cpu_count() of Python 3.13 counts them)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def parse_arguments(argv):
    """(the fleet's options, the arguments passed on to every child)."""
    parser = argparse.ArgumentParser(
        prog="python -m streaming.server.fleet", allow_abbrev=False,
        description="Run N streaming.server processes on one port; SIGHUP restarts them one at a time.",
        epilog="Every other argument (the application path included) is passed to each `python -m streaming.server`.")
    parser.add_argument("--processes", type=int, default=usable_cpus(),
                        help="how many server processes (default: the CPUs this process may use)")
    parser.add_argument("-b", "--bind", default=DEFAULT_HOST, help=f"IPv4 address (default {DEFAULT_HOST})")
    parser.add_argument("-p", "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    parser.add_argument("--backlog", type=int, default=DEFAULT_BACKLOG,
                        help=f"each socket's accept queue (default {DEFAULT_BACKLOG}, capped by net.core.somaxconn)")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_SECONDS,
                        help=f"seconds a new process has to become ready (default {READY_TIMEOUT_SECONDS:g})")
    parser.add_argument("--health-path", default=HEALTH_PATH,
                        help=f"a new process is ready when this path answers 200 (default {HEALTH_PATH}); "
                             "'' = as soon as it accepts connections")
    parser.add_argument("--pin", action="store_true",
                        help="pin each process to a CPU of its own, in turn (SLUICE_CPUS; streaming/server/affinity.py)")
    parser.add_argument("--pid-header", action="store_true",
                        help=f"add `{PID_HEADER.decode()}: <pid>` to every response (which process answered)")
    options, passed_on = parser.parse_known_args(argv)
    forbidden = [arg for arg in passed_on if arg.split("=", 1)[0] in FORBIDDEN_OPTIONS]
    if forbidden:
        parser.error(f"{', '.join(forbidden)}: the fleet listens for its processes; give -b and -p only")
    if options.processes < 1:
        parser.error("--processes must be at least 1")
    if ":" in options.bind:
        parser.error("-b must be an IPv4 address (Twisted's fd: endpoint adopts AF_INET sockets only)")
    try:  # a list no child could run on: one error here, not children dying at start-up and restarted forever
        affinity.wanted()
    except affinity.AffinityError as exc:
        parser.error(str(exc))
    return options, passed_on


def cpu_of(slot_index: int) -> str:
    """--pin: the CPU of a slot's processes (its replacements keep it): the CPUs SLUICE_CPUS names (else every CPU
    the fleet may use), in turn."""
    cpus = sorted(affinity.wanted() or affinity.allowed())
    return str(cpus[slot_index % len(cpus)])


def check_port_free(host, port):
    """Fail unless no other socket listens on host:port: SO_REUSEPORT would quietly share it with any process of this
    user that asked for SO_REUSEPORT too (an old fleet still draining, another server)."""
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise SystemExit(f"fleet: {host}:{port} is in use by another process") from None
            raise


def listening_sockets(host, port, count, backlog):
    """`count` sockets listening on host:port with SO_REUSEPORT (port 0: the port the first one got), non-blocking
    as Twisted adopts them."""
    check_port_free(host, port)
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def probe(path, health_path) -> bool:
    """Whether a child answers on its private UNIX socket: `health_path` with 200, or any connection if ''."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), PROBE_TIMEOUT_SECONDS)
        if not health_path:
            return True
        writer.write(f"GET {health_path} HTTP/1.0\r\nHost: localhost\r\n\r\n".encode("ascii"))
        status_line = await asyncio.wait_for(reader.readline(), PROBE_TIMEOUT_SECONDS)
        return status_line.split()[1:2] == [b"200"]
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()


def describe_exit(returncode):
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def _die_with_parent():
    """In a child before exec: SIGTERM (a drain) when the fleet dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Fleet:
    def __init__(self, options, passed_on):
        self.options = options
        self.passed_on = passed_on
        self.slots = []
        self.children = set()  # every child not yet reaped
        self.tasks = set()
        self.run_dir = None
        self.generation = itertools.count()
        self.started = False  # every first child was ready: from then on a death is restarted
        self.stopping = None
        self.roll_wanted = None
        self.exit_status = 0

    # The whole life -------------------------------------------------------------------------------------------

    async def run(self) -> int:
        self.stopping, self.roll_wanted = asyncio.Event(), asyncio.Event()
        options = self.options
        sockets = listening_sockets(options.bind, options.port, options.processes, options.backlog)
        self.slots = [Slot(index, sock) for index, sock in enumerate(sockets)]
        port = sockets[0].getsockname()[1]
        logger.info("listening on %s:%d: %d socket(s) with SO_REUSEPORT, one per process", options.bind, port,
                    len(sockets))
        self.run_dir = tempfile.mkdtemp(prefix="sluice-fleet-")
        self._handle_signals()
        try:
            if await self._start_all():
                self.started = True
                logger.info("fleet ready: %d process(es) on %s:%d (pids %s)", len(self.slots), options.bind, port,
                            self._pids())
                await self._serve()
        finally:
            await self._stop_all()
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return self.exit_status

    async def _start_all(self) -> bool:
        for slot in self.slots:
            slot.current = await self._spawn(slot)
        ready = await asyncio.gather(*(self._until_ready(slot.current) for slot in self.slots))
        if all(ready) or self.stopping.is_set():
            return all(ready)
        logger.error("not every process became ready: stopping")
        self.exit_status = 1
        return False

    async def _serve(self):
        """Wait for signals; run one rolling restart at a time."""
        while not self.stopping.is_set():
            await self._first(self.stopping.wait(), self.roll_wanted.wait())
            if self.stopping.is_set():
                return
            self.roll_wanted.clear()
            roll = asyncio.ensure_future(self._roll())
            await self._first(self.stopping.wait(), roll)
            if not roll.done():
                roll.cancel()
                await asyncio.gather(roll, return_exceptions=True)

    # Signals --------------------------------------------------------------------------------------------------

    def _handle_signals(self):
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

    def _on_stop_signal(self, signum):
        name = signal.Signals(signum).name
        if not self.stopping.is_set():
            logger.info("%s: stopping", name)
            self.stopping.set()
            return
        logger.warning("%s again: killing the processes still running (pids %s)", name,
                       self._pids(self.children))
        for child in list(self.children):
            self._signal(child, signal.SIGKILL)

    def _on_sighup(self):
        if self.stopping.is_set():
            return
        queued = self.roll_wanted.is_set() or not self.started
        logger.info("SIGHUP: rolling restart%s", " queued" if queued else "")
        self.roll_wanted.set()

    # Children -------------------------------------------------------------------------------------------------

    async def _spawn(self, slot) -> Child:
        fd = slot.sock.fileno()
        probe_path = os.path.join(self.run_dir, f"slot{slot.index}-{next(self.generation)}.sock")
        argv = [sys.executable, "-m", "streaming.server", "--fd", str(fd), "-u", probe_path, *self.passed_on]
        env = dict(os.environ)
        if self.options.pid_header:
            env[PID_HEADER_VARIABLE] = "1"
        if self.options.pin:
            env[affinity.VARIABLE] = cpu_of(slot.index)
        # A session of its own: a terminal's Ctrl-C reaches the fleet only, which then stops every child once.
        process = await asyncio.create_subprocess_exec(
            *argv, pass_fds=(fd,), env=env, stdin=asyncio.subprocess.DEVNULL, start_new_session=True,
            preexec_fn=_die_with_parent)
        child = Child(slot.index, process, probe_path)
        self.children.add(child)
        logger.info("slot %d: started pid %d", slot.index, child.pid)
        self._spawn_task(self._watch(child))
        return child

    async def _until_ready(self, child) -> bool:
        """Poll the child's private socket until it is ready, it exits, the fleet stops or the timeout passes."""
        deadline = time.monotonic() + self.options.ready_timeout
        while child.running and not self.stopping.is_set():
            if await probe(child.probe_path, self.options.health_path):
                logger.info("slot %d: pid %d ready after %.1f s", child.slot, child.pid,
                            time.monotonic() - child.started)
                return True
            if time.monotonic() > deadline:
                logger.error("slot %d: pid %d not ready after %.0f s", child.slot, child.pid,
                             self.options.ready_timeout)
                return False
            await self._stopped_within(PROBE_INTERVAL_SECONDS)
        return False

    async def _watch(self, child):
        returncode = await child.process.wait()
        self.children.discard(child)
        try:
            os.unlink(child.probe_path)  # Twisted removes it on a clean stop, not when killed
        except OSError:
            pass
        if child.retiring or self.stopping.is_set():
            logger.info("slot %d: pid %d exited (%s)", child.slot, child.pid, describe_exit(returncode))
            return
        logger.error("slot %d: pid %d died (%s)", child.slot, child.pid, describe_exit(returncode))
        if self.started:
            await self._restart(self.slots[child.slot], child)

    async def _restart(self, slot, dead):
        async with slot.lock:
            if slot.current is not dead or self.stopping.is_set():
                return  # a roll replaced it meanwhile
            lived = time.monotonic() - dead.started
            slot.quick_deaths = slot.quick_deaths + 1 if lived < STABLE_SECONDS else 0
            delay = min(BACKOFF_MAX_SECONDS, BACKOFF_FIRST_SECONDS * 2 ** max(0, slot.quick_deaths - 1))
            logger.info("slot %d: restarting in %.1f s", slot.index, delay)
            if await self._stopped_within(delay):
                return
            slot.current = await self._spawn(slot)
            if not await self._until_ready(slot.current) and slot.current.running and not self.stopping.is_set():
                self._signal(slot.current, signal.SIGTERM)  # its exit is a death: restarted after a longer wait

    def _signal(self, child, signum):
        try:
            child.process.send_signal(signum)
        except ProcessLookupError:
            pass

    async def _retire(self, child):
        """SIGTERM: the child drains; wait for its exit (SIGKILL past the drain's longest)."""
        child.retiring = True
        timeout = drain_seconds() + HOOKS_GRACE_SECONDS + STOP_MARGIN_SECONDS
        logger.info("slot %d: SIGTERM to pid %d: draining (up to %.0f s)", child.slot, child.pid, drain_seconds())
        self._signal(child, signal.SIGTERM)
        await self._reap(child, timeout)

    async def _reap(self, child, timeout):
        try:
            await asyncio.wait_for(asyncio.shield(child.process.wait()), timeout)
        except TimeoutError:
            logger.warning("slot %d: pid %d still running after %.0f s: SIGKILL", child.slot, child.pid, timeout)
            self._signal(child, signal.SIGKILL)
            await child.process.wait()

    # The rolling restart --------------------------------------------------------------------------------------

    async def _roll(self):
        logger.info("rolling restart: %d processes, one at a time", len(self.slots))
        for slot in self.slots:
            if not await self._roll_slot(slot):
                logger.error("rolling restart stopped at slot %d: the other slots keep their processes", slot.index)
                return
        logger.info("rolling restart done: pids %s", self._pids())

    async def _roll_slot(self, slot) -> bool:
        async with slot.lock:
            old = slot.current
            new = await self._spawn(slot)
            if not await self._until_ready(new):
                new.retiring = True
                self._signal(new, signal.SIGTERM)
                return False
            slot.current = new
        if old is not None and old.running:
            await self._retire(old)
        return True

    # Stopping -------------------------------------------------------------------------------------------------

    async def _stop_all(self):
        self.stopping.set()
        for slot in self.slots:
            slot.sock.close()  # once each child stops accepting, the port refuses connections
        living = [child for child in self.children if child.running]
        if living:
            logger.info("stopping: SIGTERM to pids %s, each draining up to %.0f s", self._pids(living),
                        drain_seconds())
        for child in living:
            child.retiring = True
            self._signal(child, signal.SIGTERM)
        timeout = drain_seconds() + HOOKS_GRACE_SECONDS + STOP_MARGIN_SECONDS
        await asyncio.gather(*(self._reap(child, timeout) for child in living))
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        logger.info("stopped")

    # Plumbing -------------------------------------------------------------------------------------------------

    def _spawn_task(self, coroutine):
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _stopped_within(self, seconds) -> bool:
        """Wait `seconds`, or less if the fleet stops; whether it is stopping."""
        try:
            await asyncio.wait_for(asyncio.shield(self.stopping.wait()), seconds)
        except TimeoutError:
            pass
        return self.stopping.is_set()

    @staticmethod
    async def _first(*awaitables):
        """Until one is done. The waits made here for coroutines are cancelled; a task given goes on."""
        futures = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
        await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        for awaitable, future in zip(awaitables, futures):
            if future is not awaitable:
                future.cancel()

    def _pids(self, children=None):
        children = [slot.current for slot in self.slots if slot.current] if children is None else children
        return ", ".join(str(child.pid) for child in sorted(children, key=lambda child: child.slot))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet: %(message)s", stream=sys.stderr)
    options, passed_on = parse_arguments(sys.argv[1:] if argv is None else argv)
    return asyncio.run(Fleet(options, passed_on).run())


if __name__ == "__main__":
    sys.exit(main())
