"""A tiny openbotstack tool registry on loopback (`POST /invoke`), for the tools' and the
daemon's tests: its behaviour is picked by the tool name."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Registry(BaseHTTPRequestHandler):
    """A tiny openbotstack tool registry: behaviour picked by the tool name."""

    received: list[tuple[str, dict[str, Any]]]

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.received.append((self.path, body))  # type: ignore[attr-defined]
        tool, arguments = body["tool"], body["arguments"]
        if tool == "http500":
            self._send(500, b"registry exploded")
        elif tool == "garbage":
            self._send(200, b"<html>not json</html>")
        elif tool == "slow":
            time.sleep(1.5)
            self._send(200, b'{"output": "late"}')
        elif tool == "huge":
            self._send(200, json.dumps({"output": "x" * 5000}).encode())
        elif tool == "broken":
            self._send(200, json.dumps({"output": None, "error": "quota exceeded"}).encode())
        else:
            self._send(200, json.dumps({"output": {"tool": tool, "echo": arguments,
                                                   "meta": body["meta"]}}).encode())

    def _send(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_registry() -> Iterator[ThreadingHTTPServer]:
    """The registry on 127.0.0.1 at a free port; `server.received` lists (path, body)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    server.daemon_threads = True
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
