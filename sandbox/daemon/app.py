"""The HTTP/JSON API (Starlette) over a `Service`.

One app per listener: the Unix-socket app trusts the socket's file mode (0600), the TCP app is
wrapped in bearer-token authentication. Bodies are read with a byte cap and validated before
anything reaches a worker; every refusal is a JSON `{code, error}` with a 4xx, counted and logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sandbox.daemon import jsonlog, logquery
from sandbox.daemon.metrics import CONTENT_TYPE
from sandbox.daemon.schemas import (
    BodyError,
    ExecuteBody,
    PlanBody,
    openapi_document,
    parse_body,
    plan_to_json,
    result_to_json,
)
from sandbox.daemon.service import Refused, Service
from sandbox.plans import ExecutionContext, ExecutionPlan, InvalidPlan, PlanFailed, StepResult
from sandbox.sandbox import SKILL_NOT_LOADED

log = jsonlog.get_logger("http")
_QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
T = TypeVar("T")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return msgspec.json.encode(content)


def error_response(code: int, reason: str, message: str, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if code == 401 else None
    return JSONResponse({"code": reason, "error": message, **extra}, status_code=code,
                        headers=headers)


def _peer(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "unix"


def refuse(request: Request, service: Service, refused: Refused, **extra: Any) -> JSONResponse:
    """Answer a refusal, count it, and log it (operators grep these when a caller complains)."""
    service.metrics.rejected_requests.labels(refused.reason).inc()
    jsonlog.event(log, logging.WARNING, "request refused", code=refused.code,
                  reason=refused.reason, error=str(refused), method=request.method,
                  path=request.url.path, peer=_peer(request.scope), **extra)
    return error_response(refused.code, refused.reason, str(refused),
                          **({"problems": extra["problems"]} if "problems" in extra else {}))


class ClientGone(Exception):
    """The caller hung up before its request body was read: nobody to answer, not our error."""


def check_json_content_type(request: Request) -> None:
    """`Refused(415)` unless the body is declared JSON (`application/json`, any parameters,
    or a `+json` type): a form or text body is a caller's mistake, said at once."""
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (media.startswith("application/")
                                            and media.endswith("+json")):
        shown = f"Content-Type {declared!r}" if declared else "no Content-Type"
        raise Refused(415, "unsupported_media_type",
                      f"{shown}: send the body as JSON with 'Content-Type: application/json'")


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or `Refused(413)` as soon as it is known to be larger than `limit`;
    `ClientGone` if the caller hangs up (or misses the body deadline) first."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise Refused(400, "invalid_content_length",
                          f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise Refused(413, "body_too_large", f"request body of {int(declared)} bytes is "
                          f"larger than max_body_bytes ({limit})")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise Refused(413, "body_too_large",
                              f"request body is larger than max_body_bytes ({limit})")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientGone(f"{size} bytes of the body read") from None
    return b"".join(chunks)


def client_gone(request: Request, exc: ClientGone) -> Response:
    """Log a hang-up at INFO and answer 499 (nginx's "client closed request"), which nobody
    reads but the access log and the counters do: it is not a server error."""
    jsonlog.event(log, logging.INFO, "client disconnected before the body was read",
                  method=request.method, path=request.url.path, peer=_peer(request.scope),
                  detail=str(exc))
    return Response(status_code=499)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Run `work`, cancelling it if the caller hangs up: nobody would read the result, so its
    CPU and slot go back to the callers still waiting. None when cancelled that way."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.wait({task})
    return None


class Api:
    """Route handlers bound to one `Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    async def body(self, request: Request) -> bytes:
        check_json_content_type(request)
        return await read_body(request, self.service.config.max_body_bytes)

    async def execute(self, request: Request) -> Response:
        service = self.service
        try:
            body = parse_body(await self.body(request), ExecuteBody)
        except ClientGone as exc:
            return client_gone(request, exc)
        except Refused as refused:
            return refuse(request, service, refused)
        except BodyError as exc:
            return refuse(request, service, Refused(exc.code, "invalid_body", str(exc)),
                          problems=exc.problems)
        execution = body.to_request()
        try:
            service.admit(execution.request_id)
        except Refused as refused:
            return refuse(request, service, refused, request_id=execution.request_id,
                          skill_id=execution.skill_id)
        try:
            result = await until_disconnect(request, service.sandbox.aexecute(execution))
        finally:
            service.release(execution.request_id)
        if result is None:
            jsonlog.event(log, logging.WARNING, "caller disconnected; execution canceled",
                          request_id=execution.request_id, skill_id=execution.skill_id)
            return Response(status_code=499)
        service.record(result, tenant_id=execution.tenant_id)
        return JSONResponse(result_to_json(result),
                            headers={"X-Request-Id": result.request_id})

    async def plans(self, request: Request) -> Response:
        service = self.service
        try:
            body = parse_body(await self.body(request), PlanBody)
            plan = ExecutionPlan.from_dict(body.plan, body.dialect)
            plan.retry = None if body.retry is None else body.retry.policy()
            plan.step_retry = {name: policy.policy() for name, policy in body.step_retry.items()}
        except ClientGone as exc:
            return client_gone(request, exc)
        except Refused as refused:
            return refuse(request, service, refused)
        except BodyError as exc:
            return refuse(request, service, Refused(exc.code, "invalid_body", str(exc)),
                          problems=exc.problems)
        except InvalidPlan as exc:
            return refuse(request, service, Refused(422, "invalid_plan", str(exc)))
        context = body.context
        ec = ExecutionContext(request_id=context.request_id,
                              assistant_id=context.assistant_id or plan.assistant_id,
                              session_id=context.session_id, tenant_id=context.tenant_id,
                              user_id=context.user_id, timeout=context.timeout)
        try:
            service.admit(ec.request_id)
        except Refused as refused:
            return refuse(request, service, refused, request_id=ec.request_id)
        steps: list[StepResult] = []
        error, status = "", "success"
        try:
            outcome = await until_disconnect(request, service.sandbox.aexecute_plan(plan, ec))
        except InvalidPlan as exc:
            return refuse(request, service, Refused(422, "invalid_plan", str(exc)),
                          request_id=ec.request_id)
        except PlanFailed as exc:
            steps, error, status = exc.results, str(exc), exc.step_result.status
        else:
            if outcome is None:
                ec.cancel()
                jsonlog.event(log, logging.WARNING, "caller disconnected; plan canceled",
                              request_id=ec.request_id)
                return Response(status_code=499)
            steps = outcome
        finally:
            service.release(ec.request_id)
        for step in steps:
            if step.execution is not None:
                service.record(step.execution, tenant_id=ec.tenant_id)
        service.metrics.plans.labels("success" if not error else status).inc()
        jsonlog.event(log, logging.INFO if not error else logging.WARNING, "plan",
                      request_id=ec.request_id, assistant_id=ec.assistant_id, status=status,
                      steps=len(steps), error=error or None)
        return JSONResponse(plan_to_json(ec, steps, error, status),
                            headers={"X-Request-Id": ec.request_id})

    async def executions(self, request: Request) -> Response:
        try:
            filters = logquery.Filters.from_strings(dict(request.query_params))
        except ValueError as exc:
            return refuse(request, self.service, Refused(400, "invalid_query", str(exc)))
        try:
            return JSONResponse({"records": await self._records(filters)})
        except LookupError as exc:
            return error_response(404, "no_execution_log", str(exc))

    async def execution(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        try:
            records = await self._records(logquery.Filters(request_id=request_id,
                                                           limit=logquery.MAX_LIMIT))
        except LookupError as exc:
            return error_response(404, "no_execution_log", str(exc))
        if not records:
            return error_response(404, "unknown_request_id",
                                  f"no execution-log records for request_id {request_id!r}")
        return JSONResponse({"request_id": request_id, "records": records[::-1]})

    async def _records(self, filters: logquery.Filters) -> list[dict[str, Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.service.query_log, filters)

    async def skills(self, request: Request) -> Response:
        service = self.service
        skills = [info for skill in sorted(service.sandbox.skills(), key=lambda item: item.id)
                  if (info := service.skill_info(skill.id)) is not None]
        return JSONResponse({"skills": skills, "errors": service.skill_errors})

    async def skill(self, request: Request) -> Response:
        skill_id = request.path_params["skill_id"]
        info = self.service.skill_info(skill_id)
        if info is None:
            return error_response(404, "skill_not_loaded", f"{SKILL_NOT_LOADED}: {skill_id}")
        return JSONResponse(info)

    async def reload(self, request: Request) -> Response:
        force = request.query_params.get("force", "").lower() in {"1", "true", "yes"}
        report = await self.service.reload(force=force)
        return JSONResponse(report.as_dict())

    async def cancel(self, request: Request) -> Response:
        request_id = request.path_params["request_id"]
        if not self.service.cancel(request_id):
            return error_response(404, "not_in_flight",
                                  f"no execution with request_id {request_id!r} is in flight")
        jsonlog.event(log, logging.INFO, "cancel requested", request_id=request_id)
        return JSONResponse({"request_id": request_id, "canceled": True})

    async def status(self, request: Request) -> Response:
        return JSONResponse(self.service.status())

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "draining": self.service.draining})

    async def readyz(self, request: Request) -> Response:
        ready, down = self.service.ready()
        body = {"status": "ready" if ready else "not ready", "draining": self.service.draining,
                "zygotes_down": down}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics(self, request: Request) -> Response:
        return Response(self.service.metrics.render(), media_type=CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, reason,
                              f"{request.method} {request.url.path}: {exc.detail}")
    response.headers.update(exc.headers or {})  # 405 carries Allow
    return response


async def _server_error(request: Request, exc: Exception) -> Response:
    jsonlog.event(log, logging.ERROR, "internal error", method=request.method,
                  path=request.url.path, error=repr(exc))
    return error_response(500, "internal_error", "internal error; see the daemon's log")


def routes(api: Api) -> list[Route]:
    return [
        Route("/v1/execute", api.execute, methods=["POST"]),
        Route("/v1/skills", api.skills, methods=["GET"]),
        Route("/v1/skills/reload", api.reload, methods=["POST"]),
        Route("/v1/skills/{skill_id:path}", api.skill, methods=["GET"]),
        Route("/v1/plans", api.plans, methods=["POST"]),
        Route("/v1/executions", api.executions, methods=["GET"]),
        Route("/v1/executions/{request_id}", api.execution, methods=["GET"]),
        Route("/v1/executions/{request_id}/cancel", api.cancel, methods=["POST"]),
        Route("/v1/status", api.status, methods=["GET"]),
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/openapi.json", api.openapi, methods=["GET"]),
    ]


class AccessLog:
    """One log line and one counter per request, labelled by route template (bounded)."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            self.service.metrics.http_requests.labels(label, str(status)).inc()
            level = logging.DEBUG if scope["path"] in _QUIET_ROUTES and status < 400 \
                else logging.INFO
            jsonlog.event(log, level, "http", method=scope["method"], path=scope["path"],
                          status=status, duration_ms=round((time.monotonic() - started) * 1000,
                                                           3), peer=_peer(scope))


class BearerAuth:
    """Every request but /healthz needs `Authorization: Bearer <token>`, compared in constant
    time. The token is read from the service at each request, so a reload can rotate it."""

    def __init__(self, app: ASGIApp, service: Service,
                 token: Callable[[], str | None]) -> None:
        self.app = app
        self.service = service
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/healthz":
            await self.app(scope, receive, send)
            return
        expected = self.token()
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if expected and scheme.lower() == b"bearer" and \
                hmac.compare_digest(given.strip(), expected.encode()):
            await self.app(scope, receive, send)
            return
        reason = "missing bearer token" if not header else "invalid bearer token"
        self.service.metrics.rejected_requests.labels("unauthorized").inc()
        jsonlog.event(log, logging.WARNING, "request refused", code=401, reason="unauthorized",
                      error=reason, method=scope["method"], path=scope["path"],
                      peer=_peer(scope))
        response = error_response(401, "unauthorized",
                                  f"{reason}: send 'Authorization: Bearer <token>'")
        await response(scope, receive, send)


def build_app(service: Service, *, require_token: bool = False) -> ASGIApp:
    api = Api(service)
    app: ASGIApp = Starlette(
        routes=routes(api),
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    if require_token:
        app = BearerAuth(app, service, service.bearer_token)
    return AccessLog(app, service)
