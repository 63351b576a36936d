"""The error model: openbotstack's five runtime errors, plus the skill's own failure.

Every outcome of `Sandbox.execute` is an `ExecutionResult`; these exceptions exist for callers
who prefer raising (`result.raise_for_status()`) and for the API boundary (client, plans).
The messages are the seed's, so logs and dashboards match the Go control plane.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.protocol import ExecutionResult


class SandboxError(Exception):
    """Base of every error this library raises."""

    message = "runtime: sandbox error"

    def __init__(self, detail: str = "", result: ExecutionResult | None = None) -> None:
        self.detail = detail
        self.result = result
        super().__init__(self._text())

    def _text(self) -> str:
        if not self.detail or self.detail == self.message:
            return self.message
        if self.detail.startswith(self.message):
            return self.detail
        return f"{self.message}: {self.detail}"


class SkillNotLoaded(SandboxError):
    message = "runtime: skill not loaded"


class ExecutionTimeout(SandboxError):
    message = "runtime: execution timeout"


class CircuitOpen(SandboxError):
    message = "runtime: circuit breaker open"


class ResourceExhausted(SandboxError):
    message = "runtime: resource exhausted"


class PolicyRejected(SandboxError):
    message = "runtime: policy rejected execution"


class InvalidInput(PolicyRejected):
    """The input does not match the skill's `input_schema`; no worker was touched."""

    message = "runtime: invalid input"


class ExecutionCanceled(SandboxError):
    message = "runtime: execution canceled"


class SkillFailed(SandboxError):
    """The skill raised, crashed, exited non-zero or returned invalid output."""

    message = "runtime: skill failed"


class WorkerFailure(SandboxError):
    """The sandbox's own machinery failed (a zygote died, no execution uid was free, a worker
    could not be set up): not the skill's fault, and not counted against it."""

    message = "runtime: worker failure"


class SkillLoadError(SandboxError):
    """A skill directory or manifest that cannot be loaded; the text names the file and field."""

    message = "runtime: cannot load skill"


def error_for_result(result: ExecutionResult) -> SandboxError | None:
    """The exception matching a result, or None for a success.

    Decided by `error_kind` (set by the supervisor), then by status for results that carry no
    kind; the text is never parsed: a skill writes its own error text.
    """
    from worker.protocol import ExecutionStatus

    if result.status is ExecutionStatus.SUCCESS:
        return None
    cls = _BY_KIND.get(result.error_kind.value) or _BY_STATUS.get(result.status.value,
                                                                  SkillFailed)
    return cls(result.error, result)


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
