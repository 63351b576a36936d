"""Host calls: a skill's `llm_generate` / `http_fetch`, answered in the supervisor.

The LLM provider (and its key) and the operator's HTTP fetcher live in this process only. An
execution child granted `llm:generate` or `http:fetch` (`permissions.host`) writes a
`HostCall` frame on its result pipe and blocks reading the `HostReply` on its request pipe;
`Execution` hands each call to a `HostChannel`, which answers it in a helper thread so the
execution's poll loop keeps its deadline, cancellation and limits running meanwhile.

Nothing in a frame is trusted: the kind must be a known one, the permission is checked here
again (the child's own gate is not relied on), the prompt, URL and body sizes are checked
again, one call may be pending at a time and `MAX_HOST_CALLS` per execution (a child that asks
past either is killed by `Execution`). Every call runs under the execution's own deadline;
tokens are counted here, from the provider's usage, never from the child's word, a call the
child left behind by exiting included (`settle`).

The fetcher is the tool registered as `http_fetch` (`Sandbox.register_tool`): the same tool
plans can call, given `{"url", "method", "body"}` (body as text) and answering
`{"status": int, "body": str | bytes}` or `(status, body)`.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandbox.llm import Generation
from sandbox.skilltext import printable
from sandbox.tools import ToolContext, ToolRegistry
from worker.protocol import (
    HOST_CALL_PERMISSIONS,
    MAX_FETCH_REQUEST_BYTES,
    MAX_HOST_REPLY_BYTES,
    MAX_PROMPT_BYTES,
    MAX_TOKENS,
    MAX_URL_BYTES,
    HostCall,
    HostReply,
)

#: The tool name the operator registers an HTTP fetcher under.
FETCH_TOOL = "http_fetch"
_MAX_ERROR = 500


@dataclass(frozen=True)
class HostServices:
    """What the `Sandbox` offers host calls: its `generate` (the configured provider, bounded
    by a deadline and a cancel check) and its tool registry (for `FETCH_TOOL`)."""

    generate: Callable[..., Generation]
    tools: ToolRegistry


def granted(permissions: frozenset[str]) -> frozenset[str]:
    """The host-call kinds (`llm_generate`, `http_fetch`) a manifest's permissions grant."""
    return frozenset(kind for kind, permission in HOST_CALL_PERMISSIONS.items()
                     if permission in permissions)


class HostChannel:
    """One execution's host calls: at most one pending, each answered in a helper thread.

    `wake_fd` turns readable when an answer is ready (`take`). `pending` holds from `start`
    until the answer is all in the child's request pipe, so the supervisor never buffers more
    than one answer for a child that does not read them. After `close` a late answer is
    dropped and the helper thread touches no fd (the numbers may be reused by then).
    """

    def __init__(self, services: HostServices, kinds: frozenset[str], *, skill_id: str,
                 request_id: str, tenant_id: str, user_id: str, deadline: float) -> None:
        self.services = services
        self.kinds = kinds
        self.skill_id = skill_id
        self.request_id = request_id
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.deadline = deadline
        self.calls = 0
        self.tokens = 0
        self.pending = False
        self._thread: threading.Thread | None = None
        self._reply: HostReply | None = None
        self._closed = False
        self._lock = threading.Lock()
        self.wake_fd, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def start(self, call: HostCall) -> None:
        """Answer `call` in a helper thread (the caller checked `pending` and the count)."""
        self.calls += 1
        self.pending = True
        self._thread = threading.Thread(target=self._run, args=(call,), name="sandbox-hostcall",
                                        daemon=True)
        self._thread.start()

    def settle(self, deadline: float, cancel_fd: int) -> None:
        """Once the child is gone: wait for the call still being answered, if any, until
        `deadline` or until `cancel_fd` turns readable (the caller cancelled).

        A child that asks and then exits (or trips a limit on purpose) does not stop the
        provider: it generates, and bills, all the same. Abandoned at once, the call's tokens
        were never counted and its work went on outside the execution's slot (so past the
        concurrency cap): one uncounted generation per execution. Its answer is dropped."""
        thread = self._thread
        if thread is None or not thread.is_alive() or self._closed:
            return
        poller = select.poll()
        poller.register(self.wake_fd, select.POLLIN)  # `_run` writes it once it has counted
        poller.register(cancel_fd, select.POLLIN)
        left = deadline - time.monotonic()
        if left > 0:
            poller.poll(left * 1000)

    def take(self) -> HostReply | None:
        """The answer, once `wake_fd` is readable; None if not there yet."""
        with self._lock:
            with contextlib.suppress(BlockingIOError):
                os.read(self.wake_fd, 64)
            reply, self._reply = self._reply, None
        return reply  # `pending` stays until Execution has written it all to the pipe

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self.wake_fd)
            os.close(self._wake_w)

    @property
    def closed(self) -> bool:
        return self._closed

    def _run(self, call: HostCall) -> None:
        try:
            reply = self.answer(call)
        except Exception as exc:  # noqa: BLE001 - a bug here is the call's failure, named
            reply = HostReply(ok=False, error=f"{call.kind} failed in the supervisor: "
                                              f"{type(exc).__name__}")
        with self._lock:
            if self._closed:
                return
            self._reply = reply
            os.write(self._wake_w, b"!")

    # -- the calls ----------------------------------------------------------------------

    def answer(self, call: HostCall) -> HostReply:
        """The reply to one call from the child, whatever the frame held."""
        permission = HOST_CALL_PERMISSIONS.get(call.kind)
        if permission is None:  # Execution refuses unknown kinds before this
            return HostReply(ok=False, error=f"unknown host call {printable(call.kind)[:40]!r}")
        if call.kind not in self.kinds:
            return HostReply(ok=False, error=f"refused: the manifest does not grant permission "
                                             f"{permission!r} (permissions.host)")
        if call.kind == "llm_generate":
            return self._llm(call)
        return self._fetch(call)

    def _llm(self, call: HostCall) -> HostReply:
        from sandbox.llm import LLMError

        size = len(call.prompt.encode("utf-8", "surrogatepass"))
        if size > MAX_PROMPT_BYTES:
            return HostReply(ok=False, error=f"refused: the prompt is {size} bytes, more than "
                                             f"{MAX_PROMPT_BYTES}")
        try:
            generation = self.services.generate(call.prompt, deadline=self.deadline,
                                                canceled=lambda: self._closed)
        except LLMError as exc:
            return HostReply(ok=False, error=printable(str(exc))[:_MAX_ERROR])
        with self._lock:
            self.tokens = min(self.tokens + max(0, generation.tokens), MAX_TOKENS)
        text = generation.text.encode("utf-8", "replace")
        if len(text) > MAX_HOST_REPLY_BYTES:
            return HostReply(ok=False, error=f"the provider's answer is {len(text)} bytes, "
                                             f"more than {MAX_HOST_REPLY_BYTES}")
        return HostReply(ok=True, data=text)

    def _fetch(self, call: HostCall) -> HostReply:
        if len(call.url.encode("utf-8", "surrogatepass")) > MAX_URL_BYTES \
                or len(call.method) > 16 or len(call.body) > MAX_FETCH_REQUEST_BYTES:
            return HostReply(ok=False, error=f"refused: the URL (at most {MAX_URL_BYTES} "
                                             "bytes), method or body is too long")
        tools = self.services.tools
        if FETCH_TOOL not in tools:
            return HostReply(ok=False, error=f"no HTTP fetcher is configured (register a tool "
                                             f"named {FETCH_TOOL!r}: Sandbox.register_tool)")
        left = self.deadline - time.monotonic()
        if left <= 0:
            return HostReply(ok=False, error="no time left for the call")
        ctx = ToolContext(tool=FETCH_TOOL, request_id=self.request_id,
                          tenant_id=self.tenant_id, user_id=self.user_id, timeout=left)
        arguments = {"url": call.url, "method": call.method,
                     "body": call.body.decode("utf-8", "replace")}
        try:
            answer = tools.call(FETCH_TOOL, arguments, ctx)
        except Exception as exc:  # noqa: BLE001 - the fetcher's failure is the call's
            return HostReply(ok=False, error=f"{type(exc).__name__}: "
                                             f"{printable(str(exc))[:_MAX_ERROR]}")
        status, body = _fetched(answer)
        if status is None:
            return HostReply(ok=False, error=f"the {FETCH_TOOL!r} tool answered "
                                             f"{type(answer).__name__}, not {{'status': int, "
                                             "'body': str | bytes} or (status, body)")
        return HostReply(ok=True, status=status, data=body[:MAX_HOST_REPLY_BYTES])


def _fetched(answer: Any) -> tuple[int | None, bytes]:
    """(status, body) from the fetcher's answer; (None, b"") when it has another shape."""
    if isinstance(answer, dict):
        status, body = answer.get("status"), answer.get("body", b"")
    elif isinstance(answer, (tuple, list)) and len(answer) == 2:
        status, body = answer
    else:
        return None, b""
    if isinstance(body, str):
        body = body.encode()
    if not isinstance(status, int) or isinstance(status, bool) or not 0 <= status <= 0xFFFF \
            or not isinstance(body, (bytes, bytearray)):
        return None, b""
    return status, bytes(body)
