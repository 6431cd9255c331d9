"""Run a real server process on loopback for a test: free port, readiness by TCP connect, clean termination.

    with start_server([sys.executable, "-m", "streaming.server", "-b", "127.0.0.1", "-p", "{port}",
                       "tests.support.asgi_apps:app"]) as server:
        ... server.port, server.base_url, server.stderr_text() ...

"{port}" in any argument is replaced by the chosen port.
"""

import os
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port(host=HOST):
    """A port the OS just reported free (another process could still take it before the server binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class RunningServer:
    host: str
    port: int
    process: subprocess.Popen
    stdout_path: Path
    stderr_path: Path

    @property
    def base_url(self):
        return f"http://{self.host}:{self.port}"

    def stdout_text(self):
        return self.stdout_path.read_text(errors="replace")

    def stderr_text(self):
        return self.stderr_path.read_text(errors="replace")


def _accepts_connections(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextmanager
def start_server(argv, *, env=None, cwd=PROJECT_ROOT, host=HOST, port=None, ready_timeout_seconds=20.0,
                 stop_timeout_seconds=5.0):
    """Start ``argv`` (with "{port}" filled in), yield a RunningServer once it accepts TCP connections.

    Output goes to temporary files (never a pipe, which a chatty server could fill and block on). On exit the
    process gets SIGTERM, then SIGKILL if it has not exited within ``stop_timeout_seconds``.
    """
    port = free_port(host) if port is None else port
    argv = [arg.replace("{port}", str(port)) for arg in argv]
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="sluice-server-") as tmp:
        stdout_path, stderr_path = Path(tmp, "stdout.log"), Path(tmp, "stderr.log")
        with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
            process = subprocess.Popen(argv, cwd=cwd, env=environment, stdout=stdout, stderr=stderr)
        server = RunningServer(host, port, process, stdout_path, stderr_path)
        try:
            deadline = time.monotonic() + ready_timeout_seconds
            while not _accepts_connections(host, port):
                if process.poll() is not None:
                    raise RuntimeError(
                        f"{argv} exited with {process.returncode} before listening:\n{server.stderr_text()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"{argv} not accepting connections after {ready_timeout_seconds}s:\n"
                        f"{server.stderr_text()}")
                time.sleep(0.05)
            yield server
        finally:
            _stop(process, stop_timeout_seconds)


def _stop(process, timeout_seconds):
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
