"""Running a plan: steps in order, data passed by templates, one deadline for the whole plan.

`skill` steps go through `Sandbox.execute` (so policy, circuit breaker, limits and the
execution log apply to each), with the step's rendered arguments as input and the context's
identities; `tool` steps call the sandbox's registered tools in-process. Each step gets at
most the time left before `ec.deadline`. The first step that fails stops the plan and
`PlanFailed` is raised carrying its `StepResult`; on success the step results are returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from sandbox import jsonbounds
from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogRecord,
    StepInfo,
    record_for_step,
)
from sandbox.plans import (
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    InvalidPlan,
    PlanFailed,
    StepResult,
    StepType,
)
from sandbox.templates import TemplateError, render
from sandbox.tools import TIMEOUT_ERROR, ToolContext, ToolError
from worker.protocol import ExecutionRequest, ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    from sandbox.sandbox import Sandbox

CANCELED_ERROR = "runtime: execution canceled"
_log = logging.getLogger("sandbox")


@dataclass
class _Prepared:
    """A step ready to run, or the result that stops it before it runs."""

    arguments: dict[str, Any] | None = None
    timeout: float | None = None
    stopped: StepResult | None = None


class _Run:
    """State of one plan run shared by the sync and async drivers."""

    def __init__(self, sandbox: Sandbox, plan: ExecutionPlan, ec: ExecutionContext) -> None:
        if not ec.assistant_id:
            ec.assistant_id = plan.assistant_id
        self.sandbox = sandbox
        self.plan = plan
        self.ec = ec
        self.names: list[str] = []
        self.outputs: list[Any] = []
        self.results: list[StepResult] = []

    @contextlib.contextmanager
    def canceled_with_plan(self, request: ExecutionRequest) -> Iterator[None]:
        """While a skill step runs, `ec.cancel()` cancels its execution."""
        cancel = functools.partial(self.sandbox.cancel, request.request_id)
        self.ec._add_cancel_callback(cancel)
        try:
            yield
        finally:
            self.ec._remove_cancel_callback(cancel)

    def prepare(self, index: int, step: ExecutionStep) -> _Prepared:
        def stop(status: ExecutionStatus, error: str) -> _Prepared:
            return _Prepared(stopped=StepResult(step_name=step.name, type=_type(step),
                                                error=error, index=index,
                                                status=status.value))

        if self.ec.canceled:
            return stop(ExecutionStatus.CANCELED, f"{CANCELED_ERROR}: the plan was canceled "
                                                  "before this step started")
        timeout = self.ec.time_left()
        if timeout is not None and timeout <= 0:
            return stop(ExecutionStatus.TIMEOUT, f"{TIMEOUT_ERROR}: the plan's deadline "
                                                 "passed before this step started")
        try:
            arguments = render(step.arguments, self.names, self.outputs)
        except TemplateError as exc:
            return stop(ExecutionStatus.FAILED, f"argument template: {exc}")
        return _Prepared(arguments=arguments, timeout=timeout)

    def skill_request(self, step: ExecutionStep, arguments: dict[str, Any],
                      timeout: float | None) -> ExecutionRequest:
        """The step's request; its timeout is the skill's own unless the plan has less left
        (so a plan never asks for more than the skill's configured timeout)."""
        requested = None
        if timeout is not None:
            skill = self.sandbox.get_skill(step.name)
            if skill is None or timeout < skill.manifest.limits.timeout:
                requested = max(timeout, 0.001)
        return ExecutionRequest(skill_id=step.name, input=msgspec.json.encode(arguments),
                                timeout=requested, tenant_id=self.ec.tenant_id,
                                user_id=self.ec.user_id, request_id=self.ec.request_id)

    def step_info(self, index: int) -> StepInfo:
        return StepInfo(assistant_id=self.ec.assistant_id, session_id=self.ec.session_id,
                        step_index=index)

    def tool_context(self, index: int, step: ExecutionStep,
                     timeout: float | None) -> ToolContext:
        ec = self.ec
        return ToolContext(tool=step.name, request_id=ec.request_id,
                           assistant_id=ec.assistant_id, session_id=ec.session_id,
                           tenant_id=ec.tenant_id, user_id=ec.user_id, step_index=index,
                           timeout=timeout)

    def finish(self, index: int, step: ExecutionStep, result: StepResult) -> None:
        """Record a step's result; raise `PlanFailed` if it failed."""
        self.ec.add_result(result)
        self.results.append(result)
        if not result.ok:
            raise PlanFailed(result, list(self.results))
        self.names.append(step.name)
        self.outputs.append(result.output)

    def record(self, result: StepResult) -> ExecutionLogRecord:
        """The log record of a step that did not go through `execute` (tools, stopped steps)."""
        limit = getattr(self.sandbox.logger, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
        return record_for_step(self.ec, result, limit)


def _type(step: ExecutionStep) -> str:
    return step.type.value if isinstance(step.type, StepType) else str(step.type)


def skill_step_result(index: int, step: ExecutionStep, result: ExecutionResult) -> StepResult:
    output: Any = None
    error = result.error
    if result.output:  # bounded: a result built elsewhere may carry any bytes
        output, problem = jsonbounds.decode(result.output)
        if problem:
            output = result.output.decode("utf-8", errors="replace")
    if result.status is not ExecutionStatus.SUCCESS and not error:
        error = f"the skill ended with status {result.status.value}"
    return StepResult(step_name=step.name, type="skill", output=output, error=error,
                      duration=result.duration, index=index, status=result.status.value,
                      execution=result)


def tool_step_result(index: int, step: ExecutionStep, started: float, output: Any = None,
                     exc: BaseException | None = None) -> StepResult:
    duration = time.monotonic() - started
    if exc is None:
        try:
            output = msgspec.json.decode(msgspec.json.encode(output))
        except (TypeError, msgspec.EncodeError) as problem:
            exc = ToolError(f"tool {step.name!r} returned a value that is not JSON: {problem}")
    if exc is None:
        return StepResult(step_name=step.name, type="tool", output=output, duration=duration,
                          index=index)
    if isinstance(exc, ToolError):
        error = exc.detail
    else:
        error = f"tool {step.name!r} raised {type(exc).__name__}: {exc}"
    status = ExecutionStatus.TIMEOUT if error.startswith(TIMEOUT_ERROR) else \
        ExecutionStatus.FAILED
    return StepResult(step_name=step.name, type="tool", error=error, duration=duration,
                      index=index, status=status.value)


def _call_logger(sandbox: Sandbox, method: str, *args: Any) -> None:
    """The execution log must never fail a plan: a logger error is reported, then ignored."""
    logger = sandbox.logger
    if logger is None:
        return
    try:
        getattr(logger, method)(*args)
    except Exception:  # noqa: BLE001 - a broken logger must not fail the plan
        _log.exception("execution logger %r failed in %s", logger, method)


def run_plan(sandbox: Sandbox, plan: ExecutionPlan, ec: ExecutionContext) -> list[StepResult]:
    run = _Run(sandbox, plan, ec)
    _call_logger(sandbox, "log_plan_start", ec, plan)
    try:
        plan.validate(sandbox)
        for index, step in enumerate(plan.steps):
            run.finish(index, step, _run_step(run, index, step))
    except (InvalidPlan, PlanFailed) as exc:
        _call_logger(sandbox, "log_plan_end", ec, str(exc))
        raise
    except BaseException as exc:
        _call_logger(sandbox, "log_plan_end", ec, f"{type(exc).__name__}: {exc}")
        raise
    _call_logger(sandbox, "log_plan_end", ec, None)
    return run.results


def _run_step(run: _Run, index: int, step: ExecutionStep) -> StepResult:
    prepared = run.prepare(index, step)
    if prepared.stopped is not None:
        _call_logger(run.sandbox, "log_step", run.record(prepared.stopped))
        return prepared.stopped
    assert prepared.arguments is not None
    if step.type is StepType.SKILL:
        request = run.skill_request(step, prepared.arguments, prepared.timeout)
        with run.canceled_with_plan(request):
            result = run.sandbox._execute_step(request, run.step_info(index))
        return skill_step_result(index, step, result)
    started = time.monotonic()
    ctx = run.tool_context(index, step, prepared.timeout)
    try:
        output = run.sandbox.tools.call(step.name, prepared.arguments, ctx)
    except Exception as exc:  # noqa: BLE001 - a tool's failure is its step's result
        step_result = tool_step_result(index, step, started, exc=exc)
    else:
        step_result = tool_step_result(index, step, started, output)
    _call_logger(run.sandbox, "log_step", run.record(step_result))
    return step_result


async def arun_plan(sandbox: Sandbox, plan: ExecutionPlan,
                    ec: ExecutionContext) -> list[StepResult]:
    """`run_plan` for asyncio. Cancelling the awaiting task kills the running skill step and
    logs the plan as canceled before `CancelledError` propagates."""
    run = _Run(sandbox, plan, ec)
    await asyncio.to_thread(_call_logger, sandbox, "log_plan_start", ec, plan)
    try:
        plan.validate(sandbox)
        for index, step in enumerate(plan.steps):
            run.finish(index, step, await _arun_step(run, index, step))
    except (InvalidPlan, PlanFailed) as exc:
        await asyncio.to_thread(_call_logger, sandbox, "log_plan_end", ec, str(exc))
        raise
    except asyncio.CancelledError:
        _call_logger(sandbox, "log_plan_end", ec, f"{CANCELED_ERROR}: the task was canceled")
        raise
    except BaseException as exc:
        _call_logger(sandbox, "log_plan_end", ec, f"{type(exc).__name__}: {exc}")
        raise
    await asyncio.to_thread(_call_logger, sandbox, "log_plan_end", ec, None)
    return run.results


async def _arun_step(run: _Run, index: int, step: ExecutionStep) -> StepResult:
    prepared = run.prepare(index, step)
    if prepared.stopped is not None:
        await asyncio.to_thread(_call_logger, run.sandbox, "log_step",
                                run.record(prepared.stopped))
        return prepared.stopped
    assert prepared.arguments is not None
    if step.type is StepType.SKILL:
        request = run.skill_request(step, prepared.arguments, prepared.timeout)
        with run.canceled_with_plan(request):
            result = await run.sandbox._aexecute_step(request, run.step_info(index))
        return skill_step_result(index, step, result)
    started = time.monotonic()
    ctx = run.tool_context(index, step, prepared.timeout)
    try:
        output = await run.sandbox.tools.acall(step.name, prepared.arguments, ctx)
    except Exception as exc:  # noqa: BLE001 - a tool's failure is its step's result
        step_result = tool_step_result(index, step, started, exc=exc)
    else:
        step_result = tool_step_result(index, step, started, output)
    await asyncio.to_thread(_call_logger, run.sandbox, "log_step",
                            run.record(step_result))
    return step_result
