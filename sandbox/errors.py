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


class SkillLoadError(SandboxError):
    """A skill directory or manifest that cannot be loaded; the text names the file and field."""

    message = "runtime: cannot load skill"


# Longest prefixes first: InvalidInput's message is not a prefix of PolicyRejected's, but keep
# the order explicit so a future overlapping message cannot shadow another.
_BY_PREFIX: tuple[type[SandboxError], ...] = (
    SkillNotLoaded,
    ExecutionTimeout,
    CircuitOpen,
    ResourceExhausted,
    InvalidInput,
    PolicyRejected,
    ExecutionCanceled,
)


def error_for_result(result: ExecutionResult) -> SandboxError | None:
    """The exception matching a result, or None for a success."""
    from worker.protocol import ExecutionStatus

    if result.status is ExecutionStatus.SUCCESS:
        return None
    for cls in _BY_PREFIX:
        if result.error.startswith(cls.message):
            return cls(result.error, result)
    if result.status is ExecutionStatus.TIMEOUT:
        return ExecutionTimeout(result.error, result)
    if result.status is ExecutionStatus.CANCELED:
        return ExecutionCanceled(result.error, result)
    if result.status is ExecutionStatus.REJECTED:
        return PolicyRejected(result.error, result)
    return SkillFailed(result.error, result)
