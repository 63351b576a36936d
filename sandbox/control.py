"""The control steps `Sandbox.execute` takes around a run: admit (policy, then circuit
breaker), settle (release the policy's hold, tell the breaker how it went), and log.

Kept apart from `sandbox.sandbox` so the execution path there stays readable; every function
here is called with the sandbox's configured policy, breaker and logger (each may be None).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sandbox.circuit import CircuitBreaker, counts_as_failure
from sandbox.errors import CircuitOpen, PolicyRejected
from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogger,
    StepInfo,
    record_for_execution,
)
from worker.protocol import ErrorKind, ExecutionRequest, ExecutionResult

if TYPE_CHECKING:
    from sandbox.policy import ExecutionPolicy
    from sandbox.skill import Skill

POLICY_REJECTED = PolicyRejected.message
CIRCUIT_OPEN = CircuitOpen.message

_log = logging.getLogger("sandbox")


def admission_error(policy: ExecutionPolicy | None, breaker: CircuitBreaker | None,
                    request: ExecutionRequest, skill: Skill) -> tuple[ErrorKind, str] | None:
    """The rejection (its kind and text) for this request, or None to run it.

    A policy that raises rejects (fail closed). When the breaker refuses after the policy
    admitted, the policy's hold is released at once.
    """
    if policy is not None:
        try:
            reason = policy.check(request, skill)
        except Exception as exc:  # noqa: BLE001 - a broken policy rejects, never crashes
            _log.exception("policy %r raised for %s", policy, request.skill_id)
            return (ErrorKind.POLICY_REJECTED,
                    f"{POLICY_REJECTED}: the policy check raised {type(exc).__name__}: {exc}")
        if reason:
            return ErrorKind.POLICY_REJECTED, f"{POLICY_REJECTED}: {reason}"
    if breaker is not None and not breaker.allow(skill.id):
        _release(policy, request, skill)
        return ErrorKind.CIRCUIT_OPEN, CIRCUIT_OPEN
    return None


def settle(policy: ExecutionPolicy | None, breaker: CircuitBreaker | None,
           request: ExecutionRequest, skill: Skill, result: ExecutionResult | None) -> None:
    """After an admitted execution (result None: it raised): release and record the outcome."""
    _release(policy, request, skill)
    if breaker is None:
        return
    failure = None if result is None else counts_as_failure(result)
    if failure is True:
        breaker.record_failure(skill.id)
    elif failure is False:
        breaker.record_success(skill.id)
    else:
        ignored = getattr(breaker, "record_ignored", None)
        if ignored is not None:
            ignored(skill.id)


def _release(policy: ExecutionPolicy | None, request: ExecutionRequest, skill: Skill) -> None:
    release = getattr(policy, "release", None)
    if release is None:
        return
    try:
        release(request, skill)
    except Exception:  # noqa: BLE001 - a broken policy must not fail the execution
        _log.exception("policy %r failed to release %s", policy, request.request_id)


def log_execution(logger: ExecutionLogger | None, request: ExecutionRequest,
                  result: ExecutionResult, step: StepInfo | None) -> None:
    """One record per execute; a logger that fails is reported and never fails the caller."""
    if logger is None:
        return
    try:
        limit = getattr(logger, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)
        logger.log_step(record_for_execution(request, result, step, limit))
    except Exception:  # noqa: BLE001 - a broken logger must not fail the execution
        _log.exception("execution logger %r failed for request %s", logger, request.request_id)
