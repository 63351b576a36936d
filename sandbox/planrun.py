"""Running a plan: steps in order, data passed by templates, one deadline for the whole plan.

`skill` steps go through the host's `execute` (so policy, circuit breaker, limits and the
execution log apply to each), with the step's rendered arguments as input and the context's
identities; `tool` steps call the host's registered tools in-process; `llm` steps send their
`prompt` argument to the host's LLM provider (`host.generate`, in the supervisor), the reply's
text being the step's output (`DEFAULT_LLM_TIMEOUT` bounds it when the plan has no deadline).
Each step gets at most the
time left before `ec.deadline`. The first step that fails stops the plan and `PlanFailed` is
raised carrying its `StepResult`; on success the step results are returned.

The host is anything with the `PlanHost` methods (a `Sandbox`): this module never imports the
sandbox, so the sandbox can import it without a cycle.

Sync and async run from one source: `_drive` is a generator that makes every decision and
yields the things that wait (a logger call, a skill execution, a tool or LLM call) as effects;
`run_plan` performs them by blocking, `arun_plan` by awaiting. It is the sans-IO shape (as in
h11, under httpcore): the logic cannot drift between the two because there is one copy of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec

from sandbox import jsonbounds
from sandbox.errors import ExecutionCanceled, ExecutionTimeout, InvalidPlan, PlanFailed, ToolError
from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogger,
    ExecutionLogRecord,
    StepInfo,
    record_for_step,
)
from sandbox.llm import Generation, LLMCanceled, LLMError, LLMTimeout
from sandbox.plans import (
    MAX_RETRIES,
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    PlanTarget,
    StepResult,
    StepType,
    parallel_batches,
)
from sandbox.skill import Skill
from sandbox.templates import TemplateError, coerce_string_numbers, go_results, render, render_go
from sandbox.tools import ToolContext, ToolRegistry, ToolTimeout
from worker.protocol import (
    ErrorKind,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ResourceUsage,
)

_log = logging.getLogger("sandbox")
#: Seconds an `llm` step may take when the plan has no deadline (openbotstack's default).
DEFAULT_LLM_TIMEOUT = 60.0

#: At most this many steps of one openbotstack `parallel_group` run at once.
MAX_PARALLEL_STEPS = 4


class PlanHost(PlanTarget, Protocol):
    """What running a plan asks of its host (a `Sandbox`): skills to execute (and cancel),
    tools to call, and where the execution log goes."""

    @property
    def logger(self) -> ExecutionLogger | None: ...

    @property
    def tools(self) -> ToolRegistry: ...

    def get_skill(self, skill_id: str) -> Skill | None: ...

    def execute(self, request: ExecutionRequest, *,
                step: StepInfo | None = None) -> ExecutionResult: ...

    async def aexecute(self, request: ExecutionRequest, *,
                       step: StepInfo | None = None) -> ExecutionResult: ...

    def cancel(self, request_id: str) -> bool: ...

    def generate(self, prompt: str, *, deadline: float, max_tokens: int | None = None,
                 canceled: Callable[[], bool] = ...) -> Generation: ...


@dataclass
class _Prepared:
    """A step ready to run, or the result that stops it before it runs."""

    arguments: dict[str, Any] | None = None
    timeout: float | None = None
    stopped: StepResult | None = None


class _Run:
    """State of one plan run."""

    def __init__(self, host: PlanHost, plan: ExecutionPlan, ec: ExecutionContext) -> None:
        if not ec.assistant_id:
            ec.assistant_id = plan.assistant_id
        self.host = host
        self.plan = plan
        self.ec = ec
        self.names: list[str] = []
        self.outputs: list[Any] = []
        self.results: list[StepResult] = []

    @contextlib.contextmanager
    def canceled_with_plan(self, request: ExecutionRequest) -> Iterator[None]:
        """While a skill step runs, `ec.cancel()` cancels its execution."""
        cancel = functools.partial(self.host.cancel, request.request_id)
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
            return stop(ExecutionStatus.CANCELED, f"{ExecutionCanceled.message}: the plan was "
                                                  "canceled before this step started")
        timeout = self.ec.time_left()
        if timeout is not None and timeout <= 0:
            return stop(ExecutionStatus.TIMEOUT, f"{ExecutionTimeout.message}: the plan's "
                                                 "deadline passed before this step started")
        if step.timeout_ms > 0:  # openbotstack's per-step limit, within the plan's
            timeout = min(step.timeout_ms / 1000.0, timeout if timeout is not None else math.inf)
        try:
            if self.plan.dialect == "openbotstack":  # coerce the plan's own values, then resolve
                arguments = render_go(coerce_string_numbers(step.arguments),
                                      go_results(self.names, self.outputs))
            else:
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
            skill = self.host.get_skill(step.name)
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

    def finish(self, step: ExecutionStep, result: StepResult) -> None:
        """Record a step's result; raise `PlanFailed` if it failed."""
        result.step_id = step.step_id
        self.ec.add_result(result)
        self.results.append(result)
        if not result.ok:
            raise PlanFailed(result, list(self.results))
        self.names.append(step.name)
        self.outputs.append(result.output)

    def record(self, result: StepResult) -> ExecutionLogRecord:
        """The log record of a step that did not go through `execute` (tools, stopped steps)."""
        limit = getattr(self.host.logger, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
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
    status = ExecutionStatus.TIMEOUT if isinstance(exc, ToolTimeout) else ExecutionStatus.FAILED
    return StepResult(step_name=step.name, type="tool", error=error, duration=duration,
                      index=index, status=status.value)


def _call_logger(logger: ExecutionLogger | None, method: str, *args: Any) -> None:
    """The execution log must never fail a plan: a logger error is reported, then ignored."""
    if logger is None:
        return
    try:
        getattr(logger, method)(*args)
    except Exception:  # noqa: BLE001 - a broken logger must not fail the plan
        _log.exception("execution logger %r failed in %s", logger, method)


# -- effects: what the driver asks its shell to do -------------------------------------------


@dataclass(frozen=True)
class _Log:
    """Call `method` of the execution logger with `args`; the reply is None."""

    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class _Execute:
    """Execute a skill step; the reply is its `ExecutionResult`."""

    request: ExecutionRequest
    step: StepInfo


@dataclass(frozen=True)
class _CallTool:
    """Call a tool; the reply is `(output, None)`, or `(None, exception)` if it raised."""

    name: str
    arguments: dict[str, Any]
    ctx: ToolContext


@dataclass(frozen=True)
class _Concurrently:
    """Perform `effects` (skill executions and tool calls) at the same time, at most
    `MAX_PARALLEL_STEPS` at once; the reply is their replies, in order."""

    effects: tuple[_Execute | _CallTool, ...]


@dataclass(frozen=True)
class _Sleep:
    """Wait `seconds` (a retry's backoff); the reply is None."""

    seconds: float


@dataclass(frozen=True)
class _Generate:
    """Ask the host's LLM provider; the reply is `(Generation, None)`, or `(None, exception)`."""

    prompt: str
    max_tokens: int | None
    deadline: float
    canceled: Callable[[], bool]


_Effect = _Log | _Execute | _CallTool | _Generate | _Concurrently | _Sleep


def _llm_prompt(arguments: dict[str, Any]) -> tuple[str, int | None, str]:
    """An `llm` step's prompt and max_tokens from its rendered arguments, or why not."""
    prompt = arguments.get("prompt")
    if prompt is None or prompt == "":
        return "", None, "an llm step needs a non-empty 'prompt' argument"
    if not isinstance(prompt, str):  # a whole earlier output: the model reads its JSON text
        prompt = msgspec.json.encode(prompt).decode()
    max_tokens = arguments.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or
                                   isinstance(max_tokens, bool) or max_tokens < 1):
        return "", None, f"max_tokens must be a positive integer, got {max_tokens!r}"
    return prompt, max_tokens, ""


def llm_step_result(index: int, step: ExecutionStep, started: float, request_id: str,
                    answer: Generation | None, exc: BaseException | None) -> StepResult:
    """The step result of an `llm` step; `execution` carries its `tokens_used`."""
    duration = time.monotonic() - started
    status, kind, error, output = ExecutionStatus.SUCCESS, ErrorKind.NONE, "", None
    tokens = 0
    if answer is not None:
        output, tokens = answer.text, answer.tokens
    elif isinstance(exc, LLMTimeout):
        status, kind = ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT
        error = f"{ExecutionTimeout.message}: {exc}"
    elif isinstance(exc, LLMCanceled):
        status, kind = ExecutionStatus.CANCELED, ErrorKind.CANCELED
        error = f"{ExecutionCanceled.message}: {exc}"
    else:
        status, kind = ExecutionStatus.FAILED, ErrorKind.WORKER_FAILURE
        error = str(exc) if isinstance(exc, LLMError) else f"{type(exc).__name__}: {exc}"
    execution = ExecutionResult(
        status=status, output=msgspec.json.encode(output) if output is not None else b"",
        error=error, duration=duration, resource_usage=ResourceUsage(tokens_used=tokens),
        request_id=request_id, error_kind=kind)
    return StepResult(step_name=step.name, type="llm", output=output, error=error,
                      duration=duration, index=index, status=status.value, execution=execution)


def _drive(host: PlanHost, plan: ExecutionPlan,
           ec: ExecutionContext) -> Generator[_Effect, Any, list[StepResult]]:
    """The whole plan run; yields effects, gets their replies, returns the step results."""
    run = _Run(host, plan, ec)
    yield _Log("log_plan_start", (ec, plan))
    try:
        plan.validate(host)
        batches = (parallel_batches(plan.steps) if plan.dialect == "openbotstack"
                   else [[index] for index in range(len(plan.steps))])
        for batch in batches:
            if len(batch) == 1:
                step = plan.steps[batch[0]]
                run.finish(step, (yield from _drive_retrying(run, batch[0], step)))
            else:
                for index, result in (yield from _drive_batch(run, batch)):
                    run.finish(plan.steps[index], result)
    except GeneratorExit:  # the shell let go of the driver: nothing left to log through it
        raise
    except BaseException as exc:
        yield _Log("log_plan_end", (ec, *_plan_end(exc)))
        raise
    yield _Log("log_plan_end", (ec, None, ExecutionStatus.SUCCESS))
    return run.results


def _plan_end(exc: BaseException) -> tuple[str, ExecutionStatus]:
    """The error text and the verdict of a plan that ended with `exc`, decided by its type."""
    if isinstance(exc, InvalidPlan):
        return str(exc), ExecutionStatus.REJECTED
    if isinstance(exc, PlanFailed):
        canceled = exc.step_result.status == ExecutionStatus.CANCELED.value
        return str(exc), ExecutionStatus.CANCELED if canceled else ExecutionStatus.FAILED
    if isinstance(exc, asyncio.CancelledError):
        return f"{ExecutionCanceled.message}: the task was canceled", ExecutionStatus.CANCELED
    return f"{type(exc).__name__}: {exc}", ExecutionStatus.FAILED


def _drive_step(run: _Run, index: int,
                step: ExecutionStep) -> Generator[_Effect, Any, StepResult]:
    prepared = run.prepare(index, step)
    if prepared.stopped is not None:
        yield _Log("log_step", (run.record(prepared.stopped),))
        return prepared.stopped
    assert prepared.arguments is not None
    if step.type is StepType.SKILL:
        request = run.skill_request(step, prepared.arguments, prepared.timeout)
        with run.canceled_with_plan(request):
            result = yield _Execute(request, run.step_info(index))
        return skill_step_result(index, step, result)
    started = time.monotonic()
    if step.type is StepType.LLM:
        prompt, max_tokens, problem = _llm_prompt(prepared.arguments)
        if problem:
            answer, exc = None, LLMError(problem)
        else:
            timeout = DEFAULT_LLM_TIMEOUT if prepared.timeout is None else prepared.timeout
            answer, exc = yield _Generate(prompt, max_tokens, started + timeout,
                                          lambda: run.ec.canceled)
        step_result = llm_step_result(index, step, started, run.ec.request_id, answer, exc)
        yield _Log("log_step", (run.record(step_result),))
        return step_result
    output, exc = yield _CallTool(step.name, prepared.arguments,
                                  run.tool_context(index, step, prepared.timeout))
    step_result = tool_step_result(index, step, started, output, exc)
    yield _Log("log_step", (run.record(step_result),))
    return step_result


def _drive_retrying(run: _Run, index: int,
                    step: ExecutionStep) -> Generator[_Effect, Any, StepResult]:
    """A step under the plan's `RetryPolicy`: retried after a failure (not after a cancel or
    the plan's deadline), then replaced by the fallback tool's result if there is one."""
    result = yield from _drive_step(run, index, step)
    policy = run.plan.retry_policy(step)
    if result.ok or policy is None:
        return result
    retries = min(max(policy.max_retries, 0), MAX_RETRIES)
    for attempt in range(1, retries + 1):
        left = run.ec.time_left()
        if run.ec.canceled or (left is not None and left <= 0):
            return result
        delay = policy.backoff(attempt)
        if delay > 0:
            yield _Sleep(delay if left is None else min(delay, left))
        result = yield from _drive_step(run, index, step)
        result.retries = attempt
        if result.ok:
            return result
    if policy.fallback_tool and not run.ec.canceled:
        fallback = ExecutionStep(name=policy.fallback_tool, type=StepType.TOOL,
                                 arguments=step.arguments)
        replaced = yield from _drive_step(run, index, fallback)
        if replaced.ok:
            replaced.step_name, replaced.retries, replaced.fallback = step.name, retries, True
            return replaced
    return result


def _drive_batch(run: _Run,
                 batch: list[int]) -> Generator[_Effect, Any, list[tuple[int, StepResult]]]:
    """One openbotstack parallel group: every step prepared from the outputs before the group,
    run concurrently, results returned in plan order (the first failure then stops the plan)."""
    steps = run.plan.steps
    prepared = {index: run.prepare(index, steps[index]) for index in batch}
    running = [index for index in batch if prepared[index].stopped is None]
    effects: list[_Execute | _CallTool] = []
    starts: dict[int, float] = {}
    with contextlib.ExitStack() as cancels:
        for index in running:
            step, ready = steps[index], prepared[index]
            assert ready.arguments is not None
            if step.type is StepType.SKILL:
                request = run.skill_request(step, ready.arguments, ready.timeout)
                cancels.enter_context(run.canceled_with_plan(request))
                effects.append(_Execute(request, run.step_info(index)))
            else:
                starts[index] = time.monotonic()
                effects.append(_CallTool(step.name, ready.arguments,
                                         run.tool_context(index, step, ready.timeout)))
        replies = (yield _Concurrently(tuple(effects))) if effects else []
    results: list[tuple[int, StepResult]] = []
    by_index = dict(zip(running, replies, strict=True))
    for index in batch:
        step, stopped = steps[index], prepared[index].stopped
        if stopped is not None:
            yield _Log("log_step", (run.record(stopped),))
            results.append((index, stopped))
        elif step.type is StepType.SKILL:
            results.append((index, skill_step_result(index, step, by_index[index])))
        else:
            output, exc = by_index[index]
            step_result = tool_step_result(index, step, starts[index], output, exc)
            yield _Log("log_step", (run.record(step_result),))
            results.append((index, step_result))
    return results


class _Driver:
    """Steps `_drive` for a shell: `next()` is the next effect (None when the plan is done,
    its step results then in `results`); the shell sets `reply` or `failure` after each."""

    def __init__(self, host: PlanHost, plan: ExecutionPlan, ec: ExecutionContext) -> None:
        self._steps = _drive(host, plan, ec)
        self.reply: Any = None
        self.failure: BaseException | None = None
        self.results: list[StepResult] = []

    def next(self) -> _Effect | None:
        failure, self.failure = self.failure, None
        try:
            effect = self._steps.send(self.reply) if failure is None else \
                self._steps.throw(failure)
        except StopIteration as done:
            self.results = done.value
            return None
        self.reply = None
        return effect


# -- the two shells ----------------------------------------------------------------------------


def run_plan(host: PlanHost, plan: ExecutionPlan, ec: ExecutionContext) -> list[StepResult]:
    """Run the plan, blocking; see the module docstring."""
    driver = _Driver(host, plan, ec)
    while (effect := driver.next()) is not None:
        try:
            driver.reply = _perform(host, effect)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver, which re-raises
            driver.failure = exc
    return driver.results


def _perform(host: PlanHost, effect: _Effect) -> Any:
    if isinstance(effect, _Sleep):
        return time.sleep(effect.seconds)
    if isinstance(effect, _Concurrently):
        workers = min(MAX_PARALLEL_STEPS, len(effect.effects))
        with concurrent.futures.ThreadPoolExecutor(workers, "sandbox-plan") as pool:
            futures = [pool.submit(_perform, host, item) for item in effect.effects]
            return [future.result() for future in futures]  # the first error, after all ended
    if isinstance(effect, _Log):
        return _call_logger(host.logger, effect.method, *effect.args)
    if isinstance(effect, _Execute):
        return host.execute(effect.request, step=effect.step)
    if isinstance(effect, _Generate):
        return _generate(host, effect, effect.canceled)
    try:
        return host.tools.call(effect.name, effect.arguments, effect.ctx), None
    except Exception as exc:  # noqa: BLE001 - a tool's failure is its step's result
        return None, exc


async def arun_plan(host: PlanHost, plan: ExecutionPlan,
                    ec: ExecutionContext) -> list[StepResult]:
    """`run_plan` for asyncio. Cancelling the awaiting task kills the running skill step and
    logs the plan as canceled before `CancelledError` propagates."""
    driver = _Driver(host, plan, ec)
    canceled = False
    while (effect := driver.next()) is not None:
        try:
            driver.reply = await _aperform(host, effect, canceled)
        except BaseException as exc:  # noqa: BLE001 - handed to the driver, which re-raises
            canceled = canceled or isinstance(exc, asyncio.CancelledError)
            driver.failure = exc
    return driver.results


async def _aperform(host: PlanHost, effect: _Effect, canceled: bool) -> Any:
    if isinstance(effect, _Sleep):
        return await asyncio.sleep(effect.seconds)
    if isinstance(effect, _Concurrently):
        bound = asyncio.Semaphore(MAX_PARALLEL_STEPS)

        async def one(item: _Execute | _CallTool) -> Any:
            async with bound:
                return await _aperform(host, item, canceled)

        replies = await asyncio.gather(*(one(item) for item in effect.effects),
                                       return_exceptions=True)
        for reply in replies:  # as the blocking shell: the first error, after all ended
            if isinstance(reply, BaseException):
                raise reply
        return replies
    if isinstance(effect, _Log):
        if canceled:  # the task is being cancelled: log at once rather than await again
            return _call_logger(host.logger, effect.method, *effect.args)
        return await asyncio.to_thread(_call_logger, host.logger, effect.method, *effect.args)
    if isinstance(effect, _Execute):
        return await host.aexecute(effect.request, step=effect.step)
    if isinstance(effect, _Generate):
        stop = threading.Event()  # the task cancelled: the provider call stops waiting too
        try:
            return await asyncio.to_thread(_generate, host, effect,
                                           lambda: stop.is_set() or effect.canceled())
        except asyncio.CancelledError:
            stop.set()
            raise
    try:
        return await host.tools.acall(effect.name, effect.arguments, effect.ctx), None
    except Exception as exc:  # noqa: BLE001 - a tool's failure is its step's result
        return None, exc


def _generate(host: PlanHost, effect: _Generate,
              canceled: Callable[[], bool]) -> tuple[Generation | None, BaseException | None]:
    try:
        return host.generate(effect.prompt, deadline=effect.deadline,
                             max_tokens=effect.max_tokens, canceled=canceled), None
    except Exception as exc:  # noqa: BLE001 - the provider's failure is its step's result
        return None, exc
