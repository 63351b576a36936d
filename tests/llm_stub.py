"""A stand-in for an OpenAI-compatible chat-completions server, on loopback, for the tests.

It speaks the wire format (`POST /v1/chat/completions`, a JSON body with `model` and
`messages`, a `choices[0].message.content` reply with `usage`) and answers what the test sets
in `reply`: a status, a body, or a delay (a wait on an event released at teardown, so a slow
answer never outlives its test).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def completion(content: str, total_tokens: int = 0) -> dict[str, Any]:
    """A chat-completions reply carrying `content`, as OpenAI sends it."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "stub-model",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": max(0, total_tokens - 1),
                      "completion_tokens": min(1, total_tokens),
                      "total_tokens": total_tokens}}


@dataclass
class Reply:
    """What the stub answers next: `body` (JSON-encoded unless bytes) with `status`, after
    waiting `delay` seconds (or until the stub is stopped)."""

    body: Any = field(default_factory=lambda: completion("{}"))
    status: int = 200
    delay: float = 0.0
    #: Put the request's Authorization header into the error message (as some providers
    #: echo a masked key): the sandbox must not pass it on.
    echo_authorization: bool = False


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any


class StubLLMServer:
    """Start with `start()`, stop with `stop()` (a fixture does both)."""

    def __init__(self) -> None:
        self.reply = Reply()
        self.received: list[Received] = []
        self.stopping = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(min(length, 1 << 20))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw
                stub.received.append(Received(self.path, dict(self.headers.items()), body))
                reply = stub.reply
                if reply.delay:
                    stub.stopping.wait(reply.delay)
                payload = reply.body
                if reply.echo_authorization:
                    payload = {"error": {"message": "Incorrect API key provided: "
                                         f"{self.headers.get('Authorization')}",
                                         "type": "invalid_request_error"}}
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up (its deadline): nothing to answer
                    pass

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def start(self) -> StubLLMServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def running_stub() -> Iterator[StubLLMServer]:
    stub = StubLLMServer().start()
    try:
        yield stub
    finally:
        stub.stop()
