"""A loopback HTTP server and the operator-side fetcher tool that host-call tests use."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Pages:
    """A loopback HTTP server answering every GET with status 203 and `body`."""

    def __init__(self, body: bytes) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(203)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/page"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def urllib_fetcher(calls: list[dict[str, Any]]) -> Callable[[dict[str, Any]], Any]:
    """The operator's fetcher: `{"url", "method", "body"}` → `{"status", "body"}`."""
    import urllib.request

    def fetch(arguments: dict[str, Any]) -> dict[str, Any]:
        calls.append(arguments)
        request = urllib.request.Request(arguments["url"], method=arguments["method"])
        with urllib.request.urlopen(request, timeout=5) as response:
            return {"status": response.status, "body": response.read()}

    return fetch
