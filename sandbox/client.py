"""Clients for the daemon's HTTP API, shaped like `Sandbox` so code can switch between running
skills in-process and through the daemon by changing one line:

    sandbox = Sandbox(skills)                  # in-process
    sandbox = SandboxClient()                  # the local daemon, over its Unix socket
    sandbox = SandboxClient(url="http://10.0.0.5:8700", token=token)   # a remote one

    result = sandbox.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"x": 1}'))

Every outcome of an execution is an `ExecutionResult`, as in-process; problems of the transport
or of the request itself raise the `SandboxError` family (`DaemonUnavailable`, `Unauthorized`,
`BadRequest`, `DaemonBusy`, `SkillNotLoaded`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar
from urllib.parse import quote

import httpcore
import httpx
import msgspec
from httpcore._backends.sync import SyncStream  # the stream type the sync backend returns

from sandbox.errors import (
    BadRequest,
    DaemonBusy,
    DaemonError,
    DaemonUnavailable,
    InvalidInput,
    InvalidPlan,
    PlanFailed,
    SandboxError,
    SkillNotLoaded,
    Unauthorized,
)
from sandbox.plans import ExecutionContext, ExecutionPlan, StepResult
from worker.protocol import (
    ErrorKind,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ResourceUsage,
)

__all__ = ["DEFAULT_TIMEOUT", "AsyncSandboxClient", "BadRequest", "DaemonBusy", "DaemonError",
           "DaemonUnavailable", "SandboxClient", "Unauthorized", "result_from_json"]

DEFAULT_TIMEOUT = 300.0
#: Time the daemon may take beyond an execution's own timeout (queueing, starting, answering).
_TIMEOUT_MARGIN = 30.0
_UNIX_BASE_URL = "http://skill-sandbox"


class _UnixBackend(httpcore.SyncBackend):
    """httpcore's sync backend leaves the socket of a failed Unix-socket connect to the garbage
    collector (a ResourceWarning and an fd held meanwhile); this one closes it at once."""

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> Any:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return SyncStream(sock)


def _unix_transport(path: Path) -> httpx.HTTPTransport:
    transport = httpx.HTTPTransport(uds=str(path))
    transport._pool = httpcore.ConnectionPool(uds=str(path), network_backend=_UnixBackend(),
                                              max_connections=100, max_keepalive_connections=20,
                                              keepalive_expiry=5.0)
    return transport


def _env_token(env: Mapping[str, str]) -> str | None:
    if env.get("SKILL_SANDBOX_TOKEN"):
        return env["SKILL_SANDBOX_TOKEN"]
    token_file = env.get("SKILL_SANDBOX_TOKEN_FILE")
    if token_file:
        try:
            return Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise DaemonUnavailable(f"cannot read token file {token_file}: "
                                    f"{exc.strerror}") from None
    return None


class _Target:
    """Where the daemon is and how to authenticate; defaults from the environment."""

    def __init__(self, socket: str | os.PathLike[str] | None, url: str | None,
                 token: str | None, env: Mapping[str, str] | None) -> None:
        env = os.environ if env is None else env
        url = url or (None if socket else env.get("SKILL_SANDBOX_URL")) or None
        if url:
            self.url, self.socket = url.rstrip("/"), None
            self.token = token or _env_token(env)
            if not self.token:
                raise Unauthorized("a TCP daemon needs a bearer token: pass token= or set "
                                   "SKILL_SANDBOX_TOKEN / SKILL_SANDBOX_TOKEN_FILE")
        else:
            from sandbox.daemon.config import default_socket_path

            self.socket = Path(socket or env.get("SKILL_SANDBOX_SOCKET")
                               or default_socket_path())
            self.url, self.token = _UNIX_BASE_URL, token

    @property
    def where(self) -> str:
        return f"unix socket {self.socket}" if self.socket else self.url

    def headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "skill-sandbox-client"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers


# -- encoding and decoding, shared by the sync and async clients -------------------------------


def _input_problem(request: ExecutionRequest) -> ExecutionResult | None:
    """The answer `Sandbox` gives for input that is not JSON or a timeout that is not
    positive, without a round trip (the daemon would refuse the body with a 4xx instead)."""
    problem = ""
    if request.timeout is not None and not request.timeout > 0:
        problem = f"timeout must be positive, got {request.timeout}"
    else:
        try:
            msgspec.json.decode(request.input)
        except msgspec.DecodeError as exc:
            problem = f"input is not JSON: {exc}"
    if not problem:
        return None
    return ExecutionResult(status=ExecutionStatus.REJECTED, error_kind=ErrorKind.INVALID_INPUT,
                           error=f"{InvalidInput.message}: {problem}",
                           request_id=request.request_id, skill_id=request.skill_id)


def _execute_body(request: ExecutionRequest) -> bytes:
    body: dict[str, Any] = {"skill_id": request.skill_id,
                            "input": msgspec.Raw(request.input or b"{}"),
                            "tenant_id": request.tenant_id, "user_id": request.user_id,
                            "request_id": request.request_id}
    if request.timeout is not None:
        body["timeout"] = request.timeout
    return msgspec.json.encode(body)


def result_from_json(data: Mapping[str, Any]) -> ExecutionResult:
    """An `ExecutionResult` from the API's JSON (output as a JSON value)."""
    output = data.get("output")
    usage = data.get("resource_usage") or {}
    return ExecutionResult(
        status=ExecutionStatus(data["status"]),
        output=b"" if output is None else msgspec.json.encode(output),
        error=data.get("error", ""), duration=float(data.get("duration", 0.0)),
        resource_usage=ResourceUsage(cpu_time_ms=int(usage.get("cpu_time_ms", 0)),
                                     memory_mb=int(usage.get("memory_mb", 0)),
                                     tokens_used=int(usage.get("tokens_used", 0))),
        stdout=data.get("stdout", ""), stderr=data.get("stderr", ""),
        request_id=data.get("request_id", ""), skill_id=data.get("skill_id", ""),
        error_kind=_error_kind(data.get("error_kind")), node=str(data.get("node") or ""),
    )


def _error_kind(value: Any) -> ErrorKind:
    """The daemon's `error_kind`; one this client does not know (a newer daemon) counts as
    none, so the result maps by its status."""
    try:
        return ErrorKind(value or "")
    except ValueError:
        return ErrorKind.NONE


def _plan_body(plan: ExecutionPlan, ec: ExecutionContext) -> bytes:
    context: dict[str, Any] = {"request_id": ec.request_id, "assistant_id": ec.assistant_id,
                               "session_id": ec.session_id, "tenant_id": ec.tenant_id,
                               "user_id": ec.user_id}
    left = ec.time_left()
    if left is not None:
        context["timeout"] = max(left, 0.001)
    body: dict[str, Any] = {"plan": plan.to_dict(), "context": context}
    if plan.dialect != "native":
        body["dialect"] = plan.dialect
    if plan.retry is not None:
        body["retry"] = dataclasses.asdict(plan.retry)
    if plan.step_retry:
        body["step_retry"] = {name: dataclasses.asdict(policy)
                              for name, policy in plan.step_retry.items()}
    return msgspec.json.encode(body)


def _plan_outcome(data: Mapping[str, Any], ec: ExecutionContext) -> list[StepResult]:
    """The plan's step results, added to `ec` as in-process; `PlanFailed` if a step failed."""
    steps = []
    for item in data.get("steps", []):
        execution = item.get("execution")
        step = StepResult(step_name=item["step_name"], type=item["type"],
                          output=item.get("output"), error=item.get("error", ""),
                          duration=float(item.get("duration", 0.0)),
                          index=int(item.get("index", 0)),
                          status=item.get("status", "success"),
                          step_id=item.get("step_id", ""), retries=int(item.get("retries", 0)),
                          fallback=bool(item.get("fallback", False)),
                          execution=None if execution is None else result_from_json(execution))
        ec.add_result(step)
        steps.append(step)
    if data.get("error"):
        if not steps:
            raise DaemonError(f"plan failed without a step result: {data['error']}")
        raise PlanFailed(steps[-1], steps)
    return steps


def _plan_timeout(ec: ExecutionContext, default: float) -> float:
    left = ec.time_left()
    return left + _TIMEOUT_MARGIN if left is not None else default


def _read_timeout(request: ExecutionRequest, default: float) -> float:
    return request.timeout + _TIMEOUT_MARGIN if request.timeout is not None else default


def _error_for(response: httpx.Response, target: _Target) -> SandboxError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    code = str(body.get("code", ""))
    text = str(body.get("error") or response.reason_phrase or "")
    status = response.status_code
    where = f"{target.where}: HTTP {status}: {text}"
    if status == 401:
        return Unauthorized(where, status, code)
    if code == "skill_not_loaded":
        return SkillNotLoaded(text)
    if code == "invalid_plan":
        return InvalidPlan(text)
    if status == 429:
        return DaemonBusy(where, status, code)
    if status == 503:
        return DaemonUnavailable(where, status, code)
    if 400 <= status < 500:
        return BadRequest(where, status, code, body.get("problems"))
    return DaemonError(where, status, code)


@contextlib.contextmanager
def _transport_errors(target: _Target) -> Iterator[None]:
    """httpx's transport exceptions become `DaemonUnavailable` here, at the boundary (as
    httpcore's `map_exceptions` does)."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise DaemonUnavailable(f"{target.where}: no answer in time "
                                f"({type(exc).__name__})") from None
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        hint = " (is `skill-sandbox serve` running?)" if isinstance(exc, httpx.ConnectError) \
            else ""
        raise DaemonUnavailable(f"cannot reach the daemon at {target.where}: "
                                f"{reason}{hint}") from None


def _json(response: httpx.Response, target: _Target) -> Any:
    if response.status_code >= 400:
        raise _error_for(response, target)
    try:
        return response.json()
    except ValueError:
        raise DaemonError(f"{target.where}: answer is not JSON", response.status_code) \
            from None


T = TypeVar("T")


def _read_found(response: httpx.Response, target: _Target) -> bool:
    """True for an answer, False for a 404 (no such skill or execution)."""
    if response.status_code == 404:
        return False
    _json(response, target)
    return True


def _read_text(response: httpx.Response, target: _Target) -> str:
    if response.status_code >= 400:
        raise _error_for(response, target)
    return response.text


def _reading(convert: Callable[[Any], T]) -> Callable[[httpx.Response, _Target], T]:
    """A reader of a JSON answer that hands the decoded body to `convert`."""
    return lambda response, target: convert(_json(response, target))


_JSON_BODY = {"Content-Type": "application/json"}


# -- the calls, described once; each client below only sends them -----------------------------


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One call of the daemon's API, described without making it: the sync and the async
    client each send it their own way and hand the response to `read` (the sans-IO shape:
    one core, two thin shells). `answer` is set when no round trip is needed."""

    method: str
    path: str
    read: Callable[[httpx.Response, _Target], T]
    options: dict[str, Any] = field(default_factory=dict)
    answer: T | None = None


class _Calls:
    """Every call of the API, for a client whose default timeout is `timeout`."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def execute(self, request: ExecutionRequest) -> _Call[ExecutionResult]:
        timeout = httpx.Timeout(_read_timeout(request, self.timeout), connect=5.0)
        return _Call("POST", "/v1/execute", _reading(result_from_json),
                     {"content": _execute_body(request), "headers": _JSON_BODY,
                      "timeout": timeout}, answer=_input_problem(request))

    def execute_plan(self, plan: ExecutionPlan,
                     ec: ExecutionContext) -> _Call[list[StepResult]]:
        timeout = httpx.Timeout(_plan_timeout(ec, self.timeout), connect=5.0)
        return _Call("POST", "/v1/plans", _reading(lambda data: _plan_outcome(data, ec)),
                     {"content": _plan_body(plan, ec), "headers": _JSON_BODY,
                      "timeout": timeout})

    def can_execute(self, skill_id: str) -> _Call[bool]:
        return _Call("GET", f"/v1/skills/{quote(skill_id, safe='/')}", _read_found)

    def cancel(self, request_id: str) -> _Call[bool]:
        return _Call("POST", f"/v1/executions/{quote(request_id, safe='')}/cancel",
                     _read_found)

    def skills(self) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/v1/skills", _reading(lambda data: list(data["skills"])))

    def skills_report(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/v1/skills", _reading(dict))

    def skill(self, skill_id: str) -> _Call[dict[str, Any]]:
        return _Call("GET", f"/v1/skills/{quote(skill_id, safe='/')}", _reading(dict))

    def reload(self, force: bool) -> _Call[dict[str, Any]]:
        return _Call("POST", "/v1/skills/reload", _reading(dict),
                     {"params": {"force": "1"} if force else None})

    def status(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/v1/status", _reading(dict))

    def health(self) -> _Call[dict[str, Any]]:
        return _Call("GET", "/healthz", _reading(dict))

    def ready(self) -> _Call[bool]:
        return _Call("GET", "/readyz", lambda response, _: response.status_code == 200)

    def metrics(self) -> _Call[str]:
        return _Call("GET", "/metrics", _read_text)

    def executions(self, filters: dict[str, Any]) -> _Call[list[dict[str, Any]]]:
        params = {key: str(value) for key, value in filters.items() if value is not None}
        return _Call("GET", "/v1/executions", _reading(lambda data: list(data["records"])),
                     {"params": params})

    def execution(self, request_id: str) -> _Call[list[dict[str, Any]]]:
        return _Call("GET", f"/v1/executions/{quote(request_id, safe='')}",
                     _reading(lambda data: list(data["records"])))


H = TypeVar("H", httpx.Client, httpx.AsyncClient)


class _Client(Generic[H]):
    """Where the daemon is, how to reach it, and the calls; the subclasses send them."""

    def __init__(self, socket: str | os.PathLike[str] | None = None, *, url: str | None = None,
                 token: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 env: Mapping[str, str] | None = None) -> None:
        self.target = _Target(socket, url, token, env)
        self.timeout = timeout
        self._calls = _Calls(timeout)
        self._http: H = self._open(base_url=self.target.url, headers=self.target.headers(),
                                timeout=httpx.Timeout(timeout, connect=5.0))

    def _open(self, **options: Any) -> H:
        raise NotImplementedError


# -- synchronous ---------------------------------------------------------------------------------


class SandboxClient(_Client[httpx.Client]):
    """Blocking client. Thread-safe (httpx connection pool); close it or use `with`."""

    def _open(self, **options: Any) -> httpx.Client:
        socket = self.target.socket
        return httpx.Client(transport=_unix_transport(socket) if socket else None, **options)

    def _send(self, call: _Call[T]) -> T:
        if call.answer is not None:
            return call.answer
        with _transport_errors(self.target):
            response = self._http.request(call.method, call.path, **call.options)
        return call.read(response, self.target)

    # -- the `Sandbox` shape --

    def execute(self, request: ExecutionRequest) -> ExecutionResult:
        """Run one execution on the daemon; every outcome is a result, as in-process."""
        return self._send(self._calls.execute(request))

    def execute_plan(self, plan: ExecutionPlan,
                     ec: ExecutionContext | None = None) -> list[StepResult]:
        """Run a plan on the daemon: the step results, or `InvalidPlan` / `PlanFailed`."""
        ec = ec or ExecutionContext(assistant_id=plan.assistant_id)
        return self._send(self._calls.execute_plan(plan, ec))

    def can_execute(self, skill_id: str) -> bool:
        return self._send(self._calls.can_execute(skill_id))

    def cancel(self, request_id: str) -> bool:
        return self._send(self._calls.cancel(request_id))

    # -- operating --

    def skills(self) -> list[dict[str, Any]]:
        return self._send(self._calls.skills())

    def skills_report(self) -> dict[str, Any]:
        """`skills` (the loaded ones) and `errors` (skill directories that failed to load)."""
        return self._send(self._calls.skills_report())

    def skill(self, skill_id: str) -> dict[str, Any]:
        return self._send(self._calls.skill(skill_id))

    def reload(self, *, force: bool = False) -> dict[str, Any]:
        return self._send(self._calls.reload(force))

    def status(self) -> dict[str, Any]:
        return self._send(self._calls.status())

    def health(self) -> dict[str, Any]:
        return self._send(self._calls.health())

    def ready(self) -> bool:
        return self._send(self._calls.ready())

    def metrics(self) -> str:
        return self._send(self._calls.metrics())

    def executions(self, **filters: Any) -> list[dict[str, Any]]:
        """Execution-log records: request_id, tenant_id, skill_id, status, since, limit."""
        return self._send(self._calls.executions(filters))

    def execution(self, request_id: str) -> list[dict[str, Any]]:
        return self._send(self._calls.execution(request_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


# -- asynchronous ------------------------------------------------------------------------------


class AsyncSandboxClient(_Client[httpx.AsyncClient]):
    """asyncio client: every call of `SandboxClient`, as a coroutine (`execute` and
    `execute_plan` also as `aexecute` and `aexecute_plan`, as on `Sandbox`). Cancelling an
    awaiting task closes its connection, and the daemon cancels that execution."""

    def _open(self, **options: Any) -> httpx.AsyncClient:
        socket = self.target.socket
        transport = httpx.AsyncHTTPTransport(uds=str(socket)) if socket else None
        return httpx.AsyncClient(transport=transport, **options)

    async def _send(self, call: _Call[T]) -> T:
        if call.answer is not None:
            return call.answer
        with _transport_errors(self.target):
            response = await self._http.request(call.method, call.path, **call.options)
        return call.read(response, self.target)

    async def execute(self, request: ExecutionRequest) -> ExecutionResult:
        return await self._send(self._calls.execute(request))

    aexecute = execute

    async def execute_plan(self, plan: ExecutionPlan,
                           ec: ExecutionContext | None = None) -> list[StepResult]:
        ec = ec or ExecutionContext(assistant_id=plan.assistant_id)
        return await self._send(self._calls.execute_plan(plan, ec))

    aexecute_plan = execute_plan

    async def can_execute(self, skill_id: str) -> bool:
        return await self._send(self._calls.can_execute(skill_id))

    async def cancel(self, request_id: str) -> bool:
        return await self._send(self._calls.cancel(request_id))

    async def skills(self) -> list[dict[str, Any]]:
        return await self._send(self._calls.skills())

    async def skills_report(self) -> dict[str, Any]:
        return await self._send(self._calls.skills_report())

    async def skill(self, skill_id: str) -> dict[str, Any]:
        return await self._send(self._calls.skill(skill_id))

    async def reload(self, *, force: bool = False) -> dict[str, Any]:
        return await self._send(self._calls.reload(force))

    async def status(self) -> dict[str, Any]:
        return await self._send(self._calls.status())

    async def health(self) -> dict[str, Any]:
        return await self._send(self._calls.health())

    async def ready(self) -> bool:
        return await self._send(self._calls.ready())

    async def metrics(self) -> str:
        return await self._send(self._calls.metrics())

    async def executions(self, **filters: Any) -> list[dict[str, Any]]:
        return await self._send(self._calls.executions(filters))

    async def execution(self, request_id: str) -> list[dict[str, Any]]:
        return await self._send(self._calls.execution(request_id))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()
