"""The HTTP API's bodies as pydantic models: validation of what comes in, and the OpenAPI
document of what goes out (generated from the same models, so the two cannot disagree).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, TypeVar

import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sandbox import jsonbounds
from sandbox.daemon import logquery
from sandbox.plans import ExecutionContext, RetryPolicy, StepResult
from sandbox.validation import field_problems
from worker.protocol import ErrorKind, ExecutionRequest, ExecutionResult

REQUEST_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
API_VERSION = "1"
M = TypeVar("M", bound=BaseModel)


class BodyError(ValueError):
    """A request body that is not acceptable; `problems` lists `{field, message}`. `code` is
    400 when the body is not acceptable JSON text at all (or names a value JSON cannot carry),
    422 when it is JSON that fails validation."""

    def __init__(self, message: str, problems: list[dict[str, str]] | None = None,
                 code: int | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []
        self.code = code if code is not None else (422 if self.problems else 400)


class _NonFinite:
    """Stands in for NaN/Infinity/an overflowing number while parsing, so the walk that
    follows can name the field (JSON has no such values; they must not become `null`)."""

    def __init__(self, text: str) -> None:
        self.text = text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


#: A field's path as a linked list (parent, key): pushing a child is O(1) however deep the
#: body is; the dotted name is only built for a field with a problem.
_Path = tuple["_Path", str | int] | None


def _field(path: _Path) -> str:
    parts: list[str] = []
    while path is not None:
        path, key = path
        parts.append(str(key))
    return ".".join(reversed(parts)) or "(body)"


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


_SURROGATE = "is not valid Unicode (a lone surrogate escape such as \\ud800)"


def _strict_problems(data: Any) -> list[dict[str, str]]:
    """Values JSON text can carry but JSON data cannot: lone surrogates (`"\\ud800"`), which
    no UTF-8 encoder accepts later, and non-finite numbers. One problem per field."""
    problems: list[dict[str, str]] = []
    stack: list[tuple[_Path, Any]] = [(None, data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _unencodable(value):
                problems.append({"field": _field(path), "message": f"text {_SURROGATE}"})
        elif isinstance(value, _NonFinite):
            problems.append({"field": _field(path), "message": f"{value.text} is not a finite "
                             "number (JSON has no NaN or Infinity)"})
        elif isinstance(value, dict):
            if any(_unencodable(key) for key in value):
                problems.append({"field": _field(path), "message": f"a key {_SURROGATE}"})
                continue
            stack.extend(((path, key), item) for key, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend(((path, index), item)
                         for index, item in reversed(list(enumerate(value))))
    return problems


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExecuteBody(_Body):
    """openbotstack's ExecutionRequest, with `input` as a JSON value instead of bytes."""

    skill_id: str = Field(min_length=1, max_length=256, description="e.g. 'examples/echo'")
    input: Any = Field(default_factory=dict, description="any JSON value; validated against "
                       "the skill's input_schema")
    timeout: float | None = Field(default=None, gt=0, le=86400, strict=True,
                                  description="seconds; overrides the skill's wall timeout")
    tenant_id: str = Field(default="", max_length=256)
    user_id: str = Field(default="", max_length=256)
    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN,
                                   description="generated when absent; must be unique in flight")

    def to_request(self) -> ExecutionRequest:
        fields: dict[str, Any] = {
            "skill_id": self.skill_id, "input": msgspec.json.encode(self.input),
            "timeout": self.timeout, "tenant_id": self.tenant_id, "user_id": self.user_id,
        }
        if self.request_id:
            fields["request_id"] = self.request_id
        return ExecutionRequest(**fields)


class ResourceUsageModel(_Body):
    cpu_time_ms: int = Field(description="CPU of the whole process tree, measured outside it")
    memory_mb: int = Field(description="peak memory above the worker's baseline")
    tokens_used: int = Field(description="reported by the skill (ctx.report_tokens)")


class ExecutionResultModel(_Body):
    """openbotstack's ExecutionResult, with `output` as a JSON value."""

    status: Literal["success", "failed", "timeout", "canceled", "rejected"]
    output: Any = Field(description="the skill's JSON output; null when there is none")
    error: str = Field(description="empty on success, else starts with openbotstack-core's message")
    duration: float = Field(description="seconds")
    resource_usage: ResourceUsageModel
    stdout: str
    stderr: str
    request_id: str
    skill_id: str
    error_kind: Literal[tuple(kind.value for kind in ErrorKind)] = Field(  # type: ignore[valid-type]
        description="why it did not succeed, as the sandbox observed it (empty on success); "
                    "decide by this, never by parsing `error`")


class PlanContextBody(_Body):
    """openbotstack's ExecutionContext: who the plan runs for and how long it may take."""

    request_id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN,
                                   description="generated when absent; every step uses it")
    assistant_id: str | None = Field(default=None, max_length=256,
                                     description="defaults to the plan's")
    session_id: str = Field(default="", max_length=256)
    tenant_id: str = Field(default="", max_length=256)
    user_id: str = Field(default="", max_length=256)
    timeout: float | None = Field(default=None, gt=0, le=86400, strict=True,
                                  description="seconds for the whole plan (its deadline)")


class RetryPolicyBody(_Body):
    """openbotstack's RetryPolicy, for the steps of one plan run (see docs/plans.md)."""

    max_retries: int = Field(default=0, ge=0, le=1000, strict=True,
                             description="retries after a failure; capped at 3 as in openbotstack")
    initial_backoff: float = Field(default=0.0, ge=0, le=60,
                                   description="seconds before the first retry, doubling after")
    max_backoff: float = Field(default=0.0, ge=0, le=300, description="the doubling's ceiling")
    fallback_tool: str = Field(default="", max_length=256,
                               description="a tool whose output replaces the step's when every "
                                           "retry failed")

    def policy(self) -> RetryPolicy:
        return RetryPolicy(max_retries=self.max_retries, initial_backoff=self.initial_backoff,
                           max_backoff=self.max_backoff, fallback_tool=self.fallback_tool)


class PlanBody(_Body):
    """An openbotstack ExecutionPlan and the ExecutionContext to run it in."""

    plan: dict[str, Any] = Field(description="{assistant_id, steps: [{name, type, arguments}], "
                                 "reasoning}")
    dialect: Literal["native", "openbotstack"] = Field(
        default="native", description="'openbotstack': the plan as openbotstack-core's planner "
                                      "writes it (llm steps, step_id, timeout_ms, parallel "
                                      "groups, Go template typing); see docs/plans.md")
    context: PlanContextBody = Field(default_factory=PlanContextBody)
    retry: RetryPolicyBody | None = Field(default=None, description="for every step")
    step_retry: dict[str, RetryPolicyBody] = Field(
        default_factory=dict, max_length=256,
        description="by step name; wins over `retry` for that step")


class StepResultModel(_Body):
    step_name: str
    type: Literal["skill", "tool", "llm"]
    status: str
    output: Any
    error: str
    duration: float
    index: int
    execution: ExecutionResultModel | None = Field(
        description="the skill step's full result; null for tools")
    step_id: str = Field(description="the step's step_id (openbotstack dialect), else empty")
    retries: int = Field(description="retries the step took under the retry policy")
    fallback: bool = Field(description="true when the output came from the fallback tool")


class PlanResultModel(_Body):
    request_id: str
    assistant_id: str
    status: str = Field(description="'success', or the failing step's status")
    error: str = Field(description="empty on success, else names the failing step")
    steps: list[StepResultModel] = Field(description="the steps that ran, in order")


class ErrorBody(_Body):
    code: str = Field(description="machine-readable reason, e.g. 'invalid_body'")
    error: str = Field(description="what was wrong, for a human")
    problems: list[dict[str, str]] = Field(default_factory=list,
                                           description="[{field, message}] for invalid bodies")


def parse_body(raw: bytes, model: type[M]) -> M:
    """Decode and validate; every failure is a `BodyError` that names the field."""
    if not raw.strip():
        raise BodyError("the request body is empty; send a JSON object")
    try:
        data = json.loads(raw, parse_float=_parse_float, parse_constant=_NonFinite)
    except UnicodeDecodeError:
        raise BodyError("the request body is not UTF-8 JSON") from None
    except ValueError as exc:
        raise BodyError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise BodyError("the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise BodyError(f"the request body must be a JSON object, got {type(data).__name__}")
    strict = _strict_problems(data)
    if strict:
        text = "; ".join(f"field '{p['field']}': {p['message']}" for p in strict)
        raise BodyError(f"invalid request body: {text}", strict, code=400)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"field": field, "message": message}
                    for field, message in field_problems(exc, "(body)")]
        text = "; ".join(f"field '{p['field']}': {p['message']}" for p in problems)
        raise BodyError(f"invalid request body: {text}", problems) from None


def step_to_json(step: StepResult) -> dict[str, Any]:
    return {"step_name": step.step_name, "type": step.type, "status": step.status,
            "output": step.output, "error": step.error, "duration": step.duration,
            "index": step.index, "step_id": step.step_id, "retries": step.retries,
            "fallback": step.fallback,
            "execution": None if step.execution is None else result_to_json(step.execution)}


def plan_to_json(ec: ExecutionContext, steps: list[StepResult], error: str = "",
                 status: str = "success") -> dict[str, Any]:
    return {"request_id": ec.request_id, "assistant_id": ec.assistant_id, "status": status,
            "error": error, "steps": [step_to_json(step) for step in steps]}


def result_to_json(result: ExecutionResult) -> dict[str, Any]:
    output: Any = None
    if result.output:  # bounded in depth, so encoding the response cannot fail on it
        output, problem = jsonbounds.decode(result.output)
        if problem:
            output = result.output.decode("utf-8", "replace")
    usage = result.resource_usage
    return {
        "status": result.status.value, "output": output, "error": result.error,
        "duration": result.duration,
        "resource_usage": {"cpu_time_ms": usage.cpu_time_ms, "memory_mb": usage.memory_mb,
                           "tokens_used": usage.tokens_used},
        "stdout": result.stdout, "stderr": result.stderr, "request_id": result.request_id,
        "skill_id": result.skill_id, "error_kind": result.error_kind.value,
    }


# -- OpenAPI -----------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "") -> dict[str, Any]:
    return {"description": description or "OK",
            "content": {"application/json": {"schema": schema}}}


_UNAUTHORIZED = {"401": _json(_ref("ErrorBody"), "missing or wrong bearer token (TCP only)")}
#: What any route with a JSON body can answer besides 200 (every one of them a JSON ErrorBody).
_ERRORS = {
    "400": _json(_ref("ErrorBody"), "body is not JSON, not an object, or holds a value JSON "
                 "data cannot (a lone surrogate, NaN, Infinity); `problems` names the field"),
    **_UNAUTHORIZED,
    "408": _json(_ref("ErrorBody"), "the body did not arrive within body_timeout"),
    "409": _json(_ref("ErrorBody"), "request_id already in flight"),
    "413": _json(_ref("ErrorBody"), "body larger than max_body_bytes"),
    "415": _json(_ref("ErrorBody"), "Content-Type is not application/json"),
    "422": _json(_ref("ErrorBody"), "body fails validation (wrong type, unknown field, out of "
                 "range); `problems` names the fields"),
    "429": _json(_ref("ErrorBody"), "queue full (max_concurrency + max_queue in flight)"),
    "503": _json(_ref("ErrorBody"), "draining: the daemon is shutting down"),
}
_OBJECT = {"type": "object"}


def openapi_document() -> dict[str, Any]:
    models: list[type[BaseModel]] = [ExecuteBody, ExecutionResultModel, ResourceUsageModel,
                                     PlanBody, PlanContextBody, RetryPolicyBody,
                                     StepResultModel,
                                     PlanResultModel, ErrorBody]
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema

    def op(summary: str, responses: dict[str, Any], body: str | None = None,
           params: list[dict[str, Any]] | None = None, public: bool = False) -> dict[str, Any]:
        operation: dict[str, Any] = {
            "summary": summary,
            "responses": responses if public else {**responses, **_UNAUTHORIZED}}
        if public:
            operation["security"] = []
        if body:
            operation["requestBody"] = {"required": True,
                                        "content": {"application/json": {"schema": _ref(body)}}}
        if params:
            operation["parameters"] = params
        return operation

    def path_param(name: str) -> dict[str, Any]:
        return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}

    def query(name: str, description: str,
              schema: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"name": name, "in": "query", "required": False,
                "schema": schema or {"type": "string"}, "description": description}

    paths = {
        "/v1/execute": {"post": op("Run one skill execution; every outcome is a 200 result",
                                   {"200": _json(_ref("ExecutionResultModel")), **_ERRORS},
                                   body="ExecuteBody")},
        "/v1/plans": {"post": op("Run a multi-step execution plan",
                                 {"200": _json(_ref("PlanResultModel"),
                                               "every plan that ran, failed or not"),
                                  **_ERRORS},
                                 body="PlanBody")},
        "/v1/skills": {"get": op("Loaded skills and load errors", {"200": _json(_OBJECT)})},
        "/v1/skills/{skill_id}": {"get": op(
            "One loaded skill: manifest, limits, zygote, circuit",
            {"200": _json(_OBJECT), "404": _json(_ref("ErrorBody"), "skill not loaded")},
            params=[path_param("skill_id")])},
        "/v1/skills/reload": {"post": op(
            "Re-read config, load new/changed skills, unload removed ones (like SIGHUP)",
            {"200": _json(_OBJECT, "added/reloaded/unchanged/removed/errors")},
            params=[query("force", "1 reloads every skill, changed or not")])},
        "/v1/executions": {"get": op(
            "Query the execution log",
            {"200": _json(_OBJECT), "404": _json(_ref("ErrorBody"), "no execution log"),
             "400": _json(_ref("ErrorBody"), "a query parameter is not valid")},
            params=[query("request_id", ""), query("tenant_id", ""), query("skill_id", ""),
                    query("status", ""), query("since", "ISO time or age like '1h'"),
                    query("limit", "max records (default 100)",
                          {"type": "integer", "minimum": 1, "maximum": logquery.MAX_LIMIT})])},
        "/v1/executions/{request_id}": {"get": op(
            "Execution-log records of one request",
            {"200": _json(_OBJECT), "404": _json(_ref("ErrorBody"), "unknown request id")},
            params=[path_param("request_id")])},
        "/v1/executions/{request_id}/cancel": {"post": op(
            "Cancel a running or queued execution; its caller gets status 'canceled'",
            {"200": _json(_OBJECT), "404": _json(_ref("ErrorBody"), "not in flight")},
            params=[path_param("request_id")])},
        "/v1/status": {"get": op("Daemon status: skills, zygotes, circuits, in-flight",
                                 {"200": _json(_OBJECT)})},
        "/healthz": {"get": op("Liveness: 200 while the process serves",
                               {"200": _json(_OBJECT)}, public=True)},
        "/readyz": {"get": op("Readiness: 200 when every zygote is up and not draining",
                              {"200": _json(_OBJECT), "503": _json(_OBJECT, "not ready")})},
        "/openapi.json": {"get": op("This document", {"200": _json(_OBJECT)})},
        "/metrics": {"get": op("Prometheus metrics", {
            "200": {"description": "text exposition format",
                    "content": {"text/plain": {"schema": {"type": "string"}}}}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "Skill Sandbox daemon", "version": API_VERSION,
                 "description": "Runs untrusted skills in isolated, resource-limited workers. "
                 "Over TCP every route but /healthz needs `Authorization: Bearer <token>`."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }
