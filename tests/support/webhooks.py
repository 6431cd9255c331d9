"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 in a thread, and the signature check a receiver
makes, exactly as docs/operations.md ("Alerts") documents it."""

import hashlib
import hmac
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def verify(secret: str, header: str, body: bytes, tolerance: int = 300, now: float | None = None) -> bool:
    """True if the X-Sluice-Signature `header` signs `body` with `secret`, sent within `tolerance` seconds."""
    fields = [part.strip().split("=", 1) for part in header.split(",") if "=" in part]
    timestamps = [value for key, value in fields if key == "t"]
    signatures = [value for key, value in fields if key == "v1"]
    if len(timestamps) != 1 or not timestamps[0].isdigit():
        return False
    t = int(timestamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False  # too old (a replay) or from a clock far off
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


class Receiver:
    """Records each POST (path, headers with lower-case names, body); answers with the next of `statuses` (200 once
    they run out)."""

    def __init__(self, statuses=()):
        self.statuses = list(statuses)
        self.requests = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    headers = {name.lower(): value for name, value in self.headers.items()}
                    receiver.requests.append((self.path, headers, body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
