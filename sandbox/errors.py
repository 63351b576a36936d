"""Every exception this library raises, in five families under one base `SandboxError`:

    SandboxError
    ├── Rejected             refused before anything ran (status `rejected`)
    │   ├── SkillNotLoaded
    │   ├── PolicyRejected ── InvalidInput
    │   ├── CircuitOpen
    │   └── InvalidPlan
    ├── ExecutionError       the execution's (or plan's, or tool's) own outcome
    │   ├── SkillFailed, ExecutionTimeout, ResourceExhausted, ExecutionCanceled
    │   ├── PlanFailed
    │   └── ToolError ── ToolTimeout
    ├── WorkerFailure        the sandbox's own machinery failed; not the skill's fault
    ├── DaemonError          talking to the daemon (`sandbox.client`)
    │   └── DaemonUnavailable, Unauthorized, BadRequest, DaemonBusy
    └── InvalidConfiguration what the operator gave cannot be used
        └── SkillLoadError, PolicyError

`Sandbox.execute` returns an `ExecutionResult` for every outcome; these exist for callers who
prefer raising (`result.raise_for_status()`) and for the API boundary (client, plans). Which
one is decided by type: a result's `error_kind` (set by the supervisor) or its status, never by
its text. Each class's `message` is openbotstack's, so logs and dashboards match the Go control
plane; it is rendered here, at the edge, and nothing reads it back.

This module imports nothing from `worker/` at run time (`worker.protocol` imports it lazily for
`raise_for_status`), so the two never form an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sandbox.plans import StepResult
    from worker.protocol import ExecutionResult


class SandboxError(Exception):
    """Base of every error this library raises. `detail` is the specific text, `result` the
    `ExecutionResult` it stands for (None when there is none)."""

    message = "runtime: sandbox error"

    def __init__(self, detail: str = "", result: ExecutionResult | None = None) -> None:
        self.detail = detail
        self.result = result
        super().__init__(self._text())

    def _text(self) -> str:
        if not self.detail or self.detail == self.message:
            return self.message
        if self.detail.startswith(self.message):  # rendering only: no verdict hangs on it
            return self.detail
        return f"{self.message}: {self.detail}"


# -- refused before anything ran ----------------------------------------------------------------


class Rejected(SandboxError):
    """Refused before any worker was touched: the skill, the input, the policy, the circuit
    breaker or the plan said no."""

    message = "runtime: rejected"


class SkillNotLoaded(Rejected):
    message = "runtime: skill not loaded"


class PolicyRejected(Rejected):
    message = "runtime: policy rejected execution"


class InvalidInput(PolicyRejected):
    """The input is not JSON, does not match the skill's `input_schema`, or the request's
    timeout is not positive; no worker was touched."""

    message = "runtime: invalid input"


class CircuitOpen(Rejected):
    message = "runtime: circuit breaker open"


class InvalidPlan(Rejected):
    """A plan that is malformed or cannot run here; raised before any step runs."""

    message = "runtime: invalid plan"


# -- the execution's own outcome ----------------------------------------------------------------


class ExecutionError(SandboxError):
    """It ran, and this is how it ended: the skill's (or plan's, or tool's) own outcome."""

    message = "runtime: execution failed"


class SkillFailed(ExecutionError):
    """The skill raised, crashed, exited non-zero or returned invalid output."""

    message = "runtime: skill failed"


class ExecutionTimeout(ExecutionError):
    message = "runtime: execution timeout"


class ResourceExhausted(ExecutionError):
    message = "runtime: resource exhausted"


class ExecutionCanceled(ExecutionError):
    message = "runtime: execution canceled"


class PlanFailed(ExecutionError):
    """A step failed and stopped the plan.

    `step_result` is the failing step's result, `results` every step result of this run (the
    failing one last), `result` the `ExecutionResult` when a skill step failed, and `__cause__`
    the matching `SandboxError` (e.g. `CircuitOpen`) when there is one.
    """

    message = "runtime: plan failed"

    def __init__(self, step_result: StepResult, results: list[StepResult]) -> None:
        self.step_result = step_result
        self.results = results
        super().__init__(f"steps[{step_result.index}] {step_result.step_name!r} "
                         f"({step_result.type}): {step_result.error}", step_result.execution)


class ToolError(ExecutionError):
    """A tool call that failed: raised, timed out, or (HTTP) answered with an error."""

    message = "runtime: tool failed"


class ToolTimeout(ToolError):
    """A tool call that did not finish within its step's time: the step's status is
    `timeout`."""


# -- the sandbox's own machinery ----------------------------------------------------------------


class WorkerFailure(SandboxError):
    """The sandbox's own machinery failed (a zygote died, no execution uid was free, a worker
    could not be set up): not the skill's fault, and not counted against it."""

    message = "runtime: worker failure"


# -- the daemon and its client ------------------------------------------------------------------


class DaemonError(SandboxError):
    """The daemon answered with an error of its own (a bug or a server fault)."""

    message = "runtime: daemon error"

    def __init__(self, detail: str = "", status_code: int = 0, code: str = "") -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.code = code


class DaemonUnavailable(DaemonError):
    """No daemon to talk to: not running, wrong socket/URL, shutting down, or no answer."""

    message = "runtime: daemon unavailable"


class Unauthorized(DaemonError):
    message = "runtime: daemon refused the bearer token"


class BadRequest(DaemonError):
    """The daemon refused the request as malformed (4xx); `problems` names the fields."""

    message = "runtime: daemon rejected the request"

    def __init__(self, detail: str = "", status_code: int = 0, code: str = "",
                 problems: list[dict[str, str]] | None = None) -> None:
        super().__init__(detail, status_code, code)
        self.problems = problems or []


class DaemonBusy(DaemonError):
    """Too many executions in flight on the daemon; retry later."""

    message = "runtime: daemon busy"


# -- configuration ------------------------------------------------------------------------------


class InvalidConfiguration(SandboxError):
    """Something the operator configured (a skill, a policy) cannot be used as given."""

    message = "runtime: invalid configuration"


class SkillLoadError(InvalidConfiguration):
    """A skill directory or manifest that cannot be loaded; the text names the file and field."""

    message = "runtime: cannot load skill"


class SkillCodeInvalid(SkillLoadError):
    """The skill's own code does not compile (its zygote said so at boot): the skill's fault,
    where other boot failures are the host's."""


class PolicyError(InvalidConfiguration):
    """A policy file or rule that is malformed; the text names the file and the rule."""

    message = "runtime: invalid policy"


# -- from a result to its exception -------------------------------------------------------------


def error_for_result(result: ExecutionResult) -> SandboxError | None:
    """The exception matching a result, or None for a success.

    Decided by `error_kind` (set by the supervisor), then by status for results that carry no
    kind; the text is never parsed: a skill writes its own error text.
    """
    if result.status.value == "success":
        return None
    cls = _BY_KIND.get(result.error_kind.value) or _BY_STATUS.get(result.status.value,
                                                                  SkillFailed)
    return cls(result.error, result)


#: By `ErrorKind` value (compared as text: this module does not import `worker.protocol`).
_BY_KIND: dict[str, type[SandboxError]] = {
    "skill_failed": SkillFailed,
    "resource_exhausted": ResourceExhausted,
    "timeout": ExecutionTimeout,
    "no_slot": ExecutionTimeout,
    "canceled": ExecutionCanceled,
    "skill_not_loaded": SkillNotLoaded,
    "invalid_input": InvalidInput,
    "policy_rejected": PolicyRejected,
    "circuit_open": CircuitOpen,
    "worker_failure": WorkerFailure,
}
_BY_STATUS: dict[str, type[SandboxError]] = {
    "timeout": ExecutionTimeout,
    "canceled": ExecutionCanceled,
    "rejected": PolicyRejected,
}
