"""Just enough raw HTTP/1.1 to stall mid-body, pipeline and reuse a connection, against tests/support/asgi_apps.py."""

import json
import socket
import time

import pytest

from bench.servers import HOST
from tests.support.asgi_apps import chunk_bytes

CHUNK_BYTES = 16 * 1024
SMALL_RCVBUF = 4096
SOCKET_TIMEOUT_SECONDS = 10


class RawHTTPConnection:
    """Just enough of an HTTP/1.1 client to stall mid-body, pipeline and reuse a connection."""

    def __init__(self, port, rcvbuf=None):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            # Before connect(): the window scale is fixed in the handshake.
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(SOCKET_TIMEOUT_SECONDS)
        self.sock.connect((HOST, port))
        self._buffer = bytearray()
        self._chunk_left = 0
        self._body_done = True

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def send_get(self, *paths, close=False):
        """Send one GET per path in a single write (several paths = pipelining)."""
        connection = b"Connection: close\r\n" if close else b""
        self.sock.sendall(b"".join(
            b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), HOST.encode(), connection)
            for path in paths))

    def _fill(self):
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("server closed the connection")
        self._buffer += data

    def read_until(self, delimiter):
        while (end := self._buffer.find(delimiter)) < 0:
            self._fill()
        data = bytes(self._buffer[:end + len(delimiter)])
        del self._buffer[:end + len(delimiter)]
        return data

    def read_exactly(self, size):
        while len(self._buffer) < size:
            self._fill()
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def read_head(self):
        """Status code and lower-cased headers; the body is then read with read_body()."""
        lines = self.read_until(b"\r\n\r\n").decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.lower().split(": ", 1) for line in lines[1:] if line)
        if "content-length" in headers:
            self._chunk_left, self._chunked = int(headers["content-length"]), False
        else:
            assert headers.get("transfer-encoding") == "chunked", headers
            self._chunk_left, self._chunked = 0, True
        self._body_done = False
        return status, headers

    def read_body(self, max_bytes=None):
        """The decoded body, up to ``max_bytes`` of it (then call again for the rest)."""
        out = bytearray()
        while not self._body_done and (max_bytes is None or len(out) < max_bytes):
            if self._chunk_left == 0:
                if not self._chunked:
                    self._body_done = True
                    break
                size = int(self.read_until(b"\r\n").split(b";")[0], 16)
                if size == 0:
                    assert self.read_until(b"\r\n") == b"\r\n"  # no trailers
                    self._body_done = True
                    break
                self._chunk_left = size
            wanted = self._chunk_left if max_bytes is None else min(self._chunk_left, max_bytes - len(out))
            out += self.read_exactly(wanted)
            self._chunk_left -= wanted
            if self._chunked and self._chunk_left == 0:
                assert self.read_exactly(2) == b"\r\n"
        return bytes(out)

    def read_response(self):
        status, headers = self.read_head()
        return status, headers, self.read_body()


def stream_path(stream_id, chunks, size=CHUNK_BYTES):
    return f"/stream?id={stream_id}&chunks={chunks}&size={size}"


def get_stats(port, stream_id):
    """The app's counters for one stream, or None before it exists (read on a connection of its own)."""
    with RawHTTPConnection(port) as connection:
        connection.send_get(f"/stats?id={stream_id}", close=True)
        status, _, body = connection.read_response()
    return json.loads(body) if status == 200 else None


def wait_for(condition, description, timeout_seconds=15.0, interval_seconds=0.05):
    deadline = time.monotonic() + timeout_seconds
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_seconds}s waiting for {description}")
        time.sleep(interval_seconds)
    return result


def wait_for_plateau(port, stream_id, timeout_seconds=20.0, interval_seconds=0.3, steady_reads=3):
    """Poll /stats until the stream is done or its produced bytes stop changing; return its stats."""
    deadline = time.monotonic() + timeout_seconds
    readings = []
    while time.monotonic() < deadline:
        stats = get_stats(port, stream_id)
        if stats is not None:
            if stats["state"] == "done":
                return stats
            readings = [*readings, stats["produced_bytes"]][-steady_reads:]
            if len(readings) == steady_reads and len(set(readings)) == 1 and readings[0] > 0:
                return stats
        time.sleep(interval_seconds)
    raise AssertionError(f"stream {stream_id} still growing after {timeout_seconds}s: {readings}")


def assert_stream_body(body, stream_id, chunks, size=CHUNK_BYTES):
    """Every chunk present once, in order (each carries its stream id and sequence number)."""
    for seq in range(min(chunks, len(body) // size)):
        piece = body[seq * size:(seq + 1) * size]
        if piece != chunk_bytes(stream_id, seq, size):
            pytest.fail(f"stream {stream_id}: chunk {seq} is {piece[:24]!r}..., expected {stream_id}:{seq:08d}")
    assert len(body) == chunks * size, f"stream {stream_id}: {len(body)} bytes, expected {chunks * size}"
