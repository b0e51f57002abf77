"""A webhook receiver: a real HTTP server on loopback that records every delivery, for the webhook
tests and the drills that count deliveries."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A real HTTP server on loopback that records every delivery and answers `fail_first` of them
    (per webhook-id) with 500, or every one while `failing` is set."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.failing = threading.Event()
        self.deliveries: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    seen = sum(
                        1 for h, _, _ in receiver.deliveries if h["webhook-id"] == headers["webhook-id"]
                    )
                    status = 500 if receiver.failing.is_set() or seen < receiver.fail_first else 204
                    receiver.deliveries.append((headers, body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?src=strokes"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def ok(self) -> list[tuple[dict[str, str], bytes, int]]:
        with self.lock:
            return [d for d in self.deliveries if d[2] == 204]

    def count(self) -> int:
        with self.lock:
            return len(self.deliveries)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
