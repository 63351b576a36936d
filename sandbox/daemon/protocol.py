"""uvicorn's h11 protocol with the deadlines and bounds uvicorn does not have.

uvicorn (0.54) has an idle keep-alive timeout between requests (`timeout_keep_alive`, used), a
cap on the size of the request head (`h11_max_incomplete_event_size`, used) and a listen
backlog (`backlog`, used). It has no deadline for a request's head or body (its issue #157 has
them as open items) and `limit_concurrency` only answers 503 once a connection has sent its
whole head, so idle and trickling sockets are never counted. This subclass adds, per listener:

- a **header deadline**: from the moment a connection opens (or its previous response ended)
  until the request head is complete. A connection that sent part of a head is answered 408
  JSON; one that sent nothing is closed silently (the keep-alive race with a client that just
  sent a request is the same as uvicorn's own).
- a **body deadline**: from the end of the head until the whole body is in; then 408 JSON and
  close (the handler sees a hang-up).
- a **connection bound**: a connection beyond `max_connections` open on this listener is
  answered 503 JSON and closed at once, so it holds its fd for microseconds; the bound is set
  below the process's fd limit (see `server.connection_limits`), so accept() never runs out.
- malformed HTTP answered with a JSON 400, like every other refusal.

Refusals and timeouts are counted in /metrics and logged at most once per interval per kind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from sandbox.daemon import jsonlog

log = jsonlog.get_logger("connections")


@dataclass
class Listener:
    """One listener's limits and the hooks that count what happens on it."""

    name: str  # "unix" or "tcp"
    max_connections: int
    header_timeout: float
    body_timeout: float
    on_refused: Callable[[str], None] = lambda listener: None
    on_timeout: Callable[[str, str], None] = lambda listener, phase: None
    limiter: jsonlog.RateLimited = field(default_factory=jsonlog.RateLimited)
    open_connections: Callable[[], int] = lambda: 0


def _raw_response(status: int, reason: bytes, code: str, message: str) -> bytes:
    body = json.dumps({"code": code, "error": message}).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n" % (status, reason, len(body))) + body


def _log_limited(listener: Listener, name: str, **fields: Any) -> None:
    key = f"{listener.name}:{name}:{fields.get('phase', '')}"
    skipped = listener.limiter.allow(key)
    if skipped is None:
        return
    jsonlog.event(log, logging.INFO, name, listener=listener.name,
                  **fields, **({"similar_events_not_logged": skipped} if skipped else {}))


class BoundedH11Protocol(H11Protocol):
    """See the module docstring. `listener` is set on a subclass per listener
    (`protocol_for`), since uvicorn builds protocols from a class and its config."""

    listener: Listener

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase = "headers"  # headers → body → app → (response done) → headers …
        self._seen_cycle: object | None = None
        self._partial = False  # bytes of a request head arrived in this header phase
        self._refused = False

    # -- connection bound ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        listener = self.listener
        if len(self.connections) >= listener.max_connections:
            self._refused = True
            self.transport = transport
            listener.on_refused(listener.name)
            _log_limited(listener, "connection refused: too many connections",
                         max_connections=listener.max_connections)
            transport.write(_raw_response(
                503, b"Service Unavailable", "too_many_connections",
                f"this listener has {listener.max_connections} connections open "
                "(its max_connections); retry later"))
            transport.close()
            return
        super().connection_made(transport)
        self._arm("headers", listener.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            return
        super().connection_lost(exc)

    # -- deadlines -------------------------------------------------------------------------

    def _arm(self, phase: str, seconds: float) -> None:
        self._disarm()
        self._phase = phase
        self._deadline = self.loop.call_later(seconds, self._expire, phase)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._phase == "headers" and data:
            self._partial = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and cycle is not self._seen_cycle:  # a new request's head is in
            self._seen_cycle = cycle
            self._partial = False
            if cycle.more_body:
                self._arm("body", self.listener.body_timeout)
            else:
                self._disarm()
                self._phase = "app"
        elif self._phase == "body" and cycle is not None and not cycle.more_body:
            self._disarm()
            self._phase = "app"

    def on_response_complete(self) -> None:
        if not self.transport.is_closing():
            self._partial = False
            self._arm("headers", self.listener.header_timeout)
        super().on_response_complete()

    def _expire(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        listener = self.listener
        listener.on_timeout(listener.name, phase)
        seconds = listener.header_timeout if phase == "headers" else listener.body_timeout
        _log_limited(listener, "connection timed out", phase=phase, seconds=seconds,
                     peer=_peer(self.client))
        answered = self.cycle is not None and self.cycle.response_started and \
            not self.cycle.response_complete
        if phase == "body" and not answered:
            self.transport.write(_raw_response(
                408, b"Request Timeout", "body_timeout",
                f"the request body did not arrive within {seconds:g}s (body_timeout)"))
        elif phase == "headers" and self._partial:
            self.transport.write(_raw_response(
                408, b"Request Timeout", "header_timeout",
                f"the request head did not arrive within {seconds:g}s (header_timeout)"))
        self.transport.close()

    # -- malformed HTTP --------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        """A request h11 cannot parse: JSON like every other refusal, then close."""
        self._disarm()
        self.transport.write(_raw_response(
            400, b"Bad Request", "malformed_http", f"malformed HTTP request: {msg}"))
        self.transport.close()


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unix"


def protocol_for(listener: Listener) -> type[BoundedH11Protocol]:
    """A protocol class bound to `listener` (uvicorn's `http=` takes a class)."""
    return type(f"BoundedH11Protocol_{listener.name}", (BoundedH11Protocol,),
                {"listener": listener})
