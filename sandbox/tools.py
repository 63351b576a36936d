"""Tools: trusted in-process callables and openbotstack's HTTP tool registry, for `tool` steps.

Skills are untrusted and run in workers; tools are the operator's own code (or a service the
operator runs), so they run in the supervisor. A tool is any callable taking the step's
arguments (and, if it accepts a second positional parameter, a `ToolContext`), sync or async,
or a `ToolRunner` such as `HttpToolRunner`.

Every call is bounded by the plan's time left. A plain sync callable cannot be interrupted, so
it runs in a helper thread and the step fails at the deadline while the thread finishes on its
own; tools should honour `ctx.timeout` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from sandbox.errors import ExecutionTimeout, ToolError, ToolTimeout

if TYPE_CHECKING:  # httpx is imported when an HttpToolRunner is made, not with this module
    import httpx

__all__ = ["CallableTool", "HttpToolRunner", "ToolContext", "ToolError", "ToolRegistry",
           "ToolRunner", "ToolTimeout"]


@dataclass(frozen=True)
class ToolContext:
    """Who is calling a tool and how long it may take (`timeout`: seconds, None = unbounded)."""

    tool: str
    request_id: str = ""
    assistant_id: str = ""
    session_id: str = ""
    tenant_id: str = ""
    user_id: str = ""
    step_index: int = 0
    timeout: float | None = None


@runtime_checkable
class ToolRunner(Protocol):
    """A tool that bounds its own calls by `ctx.timeout` (e.g. by a request timeout)."""

    def run(self, arguments: dict[str, Any], ctx: ToolContext) -> Any: ...

    async def arun(self, arguments: dict[str, Any], ctx: ToolContext) -> Any: ...


def _wants_context(fn: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in parameters)


class CallableTool:
    """Adapts a plain callable (sync or async) to `ToolRunner`, enforcing the timeout."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError(f"a tool must be callable, got {type(fn).__name__}")
        self.fn = fn
        self.is_async = inspect.iscoroutinefunction(fn) or (
            not inspect.isfunction(fn) and inspect.iscoroutinefunction(type(fn).__call__))
        self.with_context = _wants_context(fn)

    def _args(self, arguments: dict[str, Any], ctx: ToolContext) -> tuple[Any, ...]:
        return (arguments, ctx) if self.with_context else (arguments,)

    def run(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        if self.is_async:
            return _run_in_thread(
                lambda: asyncio.run(_bounded(self.fn(*self._args(arguments, ctx)), ctx)), None,
                ctx)
        if ctx.timeout is None:
            return self.fn(*self._args(arguments, ctx))
        return _run_in_thread(lambda: self.fn(*self._args(arguments, ctx)), ctx.timeout, ctx)

    async def arun(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        if self.is_async:
            return await _bounded(self.fn(*self._args(arguments, ctx)), ctx)
        future = _start_thread(lambda: self.fn(*self._args(arguments, ctx)), ctx)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), ctx.timeout)
        except TimeoutError:
            raise _timeout(ctx) from None


async def _bounded(awaitable: Any, ctx: ToolContext) -> Any:
    try:
        return await asyncio.wait_for(awaitable, ctx.timeout)
    except TimeoutError:
        raise _timeout(ctx) from None


def _timeout(ctx: ToolContext) -> ToolTimeout:
    return ToolTimeout(f"{ExecutionTimeout.message}: tool {ctx.tool!r} did not finish within "
                       f"{ctx.timeout:g}s")


def _start_thread(call: Callable[[], Any], ctx: ToolContext) -> Future[Any]:
    """Run `call` in its own daemon thread: a tool that never returns is abandoned at the
    deadline without holding a pool worker or an event loop's shutdown."""
    future: Future[Any] = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(call())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
            future.set_exception(exc)

    threading.Thread(target=target, name=f"tool-{ctx.tool}", daemon=True).start()
    return future


def _run_in_thread(call: Callable[[], Any], timeout: float | None, ctx: ToolContext) -> Any:
    future = _start_thread(call, ctx)
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        raise _timeout(ctx) from None


class ToolRegistry:
    """Tools by name. Thread-safe; registering a name again replaces the tool."""

    def __init__(self) -> None:
        self._tools: dict[str, ToolRunner] = {}
        self._lock = threading.Lock()

    def register(self, name: str, tool: Callable[..., Any] | ToolRunner) -> None:
        if not isinstance(name, str) or not name or any(ch.isspace() for ch in name):
            raise ValueError(f"a tool name must be a non-empty string without whitespace, "
                             f"got {name!r}")
        if any(ch in name for ch in "{}#"):
            raise ValueError(f"tool name {name!r} may not contain '{{', '}}' or '#' "
                             "(they are template syntax)")
        runner = tool if isinstance(tool, ToolRunner) else CallableTool(tool)
        with self._lock:
            self._tools[name] = runner

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._tools.pop(name, None) is None:
                raise KeyError(f"tool {name!r} is not registered")

    def __contains__(self, name: object) -> bool:
        with self._lock:
            return name in self._tools

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._tools)

    def get(self, name: str) -> ToolRunner:
        with self._lock:
            runner = self._tools.get(name)
        if runner is None:
            raise ToolError(f"tool {name!r} is not registered")
        return runner

    def call(self, name: str, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        return self.get(name).run(arguments, ctx)

    async def acall(self, name: str, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        return await self.get(name).arun(arguments, ctx)

    def close(self) -> None:
        """Close every tool that holds resources (e.g. an `HttpToolRunner`'s connections)."""
        with self._lock:
            runners = list(self._tools.values())
        for runner in runners:
            close = getattr(runner, "close", None)
            if callable(close):
                close()


class HttpToolRunner:
    """openbotstack's tool registry client: `POST {base_url}/invoke`.

    Sends `{"tool", "arguments", "meta": {"tenant_id", "user_id", "request_id"}}` and reads
    `{"output", "error"}`; a non-200 answer, an `error`, a body that is not that JSON object,
    or one larger than `max_response_bytes` fails the step. Register one runner under every
    tool name the registry serves: `sandbox.register_tool("web.search", runner)`.
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0,
                 max_response_bytes: int = 1 << 20, headers: dict[str, str] | None = None,
                 transport: httpx.BaseTransport | None = None,
                 async_transport: httpx.AsyncBaseTransport | None = None) -> None:
        import httpx

        parsed = httpx.URL(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base_url!r}")
        self.url = base_url.rstrip("/") + "/invoke"
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self.headers = {"content-type": "application/json", **(headers or {})}
        self._transport = transport
        self._async_transport = async_transport
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def _body(self, arguments: dict[str, Any], ctx: ToolContext) -> bytes:
        return msgspec.json.encode({
            "tool": ctx.tool, "arguments": arguments,
            "meta": {"tenant_id": ctx.tenant_id, "user_id": ctx.user_id,
                     "request_id": ctx.request_id},
        })

    def _timeout_for(self, ctx: ToolContext) -> float:
        return self.timeout if ctx.timeout is None else min(self.timeout, ctx.timeout)

    def _sync_client(self) -> httpx.Client:
        import httpx

        with self._lock:
            if self._client is None:
                self._client = httpx.Client(transport=self._transport, follow_redirects=False)
            return self._client

    def _post(self, arguments: dict[str, Any], ctx: ToolContext, timeout: float) -> dict[str, Any]:
        """The arguments of the POST both `run` and `arun` stream."""
        return {"method": "POST", "url": self.url, "content": self._body(arguments, ctx),
                "headers": self.headers, "timeout": timeout}

    @contextlib.contextmanager
    def _mapped_errors(self, ctx: ToolContext, timeout: float) -> Iterator[None]:
        """httpx's exceptions become `ToolError`s here, at the boundary (httpcore's
        `map_exceptions`): a timeout is a `ToolTimeout`, anything else cannot reach."""
        import httpx

        try:
            yield
        except httpx.TimeoutException:
            raise ToolTimeout(f"{ExecutionTimeout.message}: tool {ctx.tool!r} did not answer "
                              f"within {timeout:g}s ({self.url})") from None
        except httpx.HTTPError as exc:
            raise ToolError(f"tool {ctx.tool!r}: cannot reach {self.url}: {exc}") from None

    def _add(self, body: bytearray, chunk: bytes, ctx: ToolContext) -> None:
        body += chunk
        if len(body) > self.max_response_bytes:
            raise ToolError(f"tool {ctx.tool!r}: the response from {self.url} is larger than "
                            f"{self.max_response_bytes} bytes")

    def run(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        timeout, body = self._timeout_for(ctx), bytearray()
        with self._mapped_errors(ctx, timeout), \
                self._sync_client().stream(**self._post(arguments, ctx, timeout)) as response:
            for chunk in response.iter_bytes():
                self._add(body, chunk, ctx)
        return self._answer(response.status_code, bytes(body), ctx)

    async def arun(self, arguments: dict[str, Any], ctx: ToolContext) -> Any:
        import httpx

        timeout, body = self._timeout_for(ctx), bytearray()
        with self._mapped_errors(ctx, timeout):
            async with httpx.AsyncClient(transport=self._async_transport,
                                         follow_redirects=False) as client, \
                    client.stream(**self._post(arguments, ctx, timeout)) as response:
                async for chunk in response.aiter_bytes():
                    self._add(body, chunk, ctx)
        return self._answer(response.status_code, bytes(body), ctx)

    def _answer(self, status: int, body: bytes, ctx: ToolContext) -> Any:
        if status != 200:
            text = body[:200].decode("utf-8", errors="replace")
            raise ToolError(f"tool {ctx.tool!r}: the tool registry answered HTTP {status}"
                            + (f": {text}" if text else ""))
        try:
            answer = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ToolError(f"tool {ctx.tool!r}: the response is not JSON: {exc}") from None
        if not isinstance(answer, dict):
            raise ToolError(f"tool {ctx.tool!r}: the response must be a JSON object with "
                            "'output' and 'error'")
        error = answer.get("error")
        if error:
            raise ToolError(f"tool {ctx.tool!r}: {error}")
        return answer.get("output")

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
