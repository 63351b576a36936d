"""Declarative skills: a prompt template (`SkillManifest.instructions`, SKILL.md's body) sent to
the operator's LLM provider; the model's reply, parsed as JSON, is the output.

No worker process runs: the call is made by the supervisor (the API key never leaves it), after
the same admission as any execution (input schema, policy, circuit breaker) and into the same
`ExecutionResult`, execution log and breaker accounting. As in openbotstack-runtime, `{{.Input}}`
is replaced by the request's input JSON text, as sent; nothing else in the template is
substituted. Unlike openbotstack (which hands the reply back as it is), the reply must be JSON
and match `output_schema`, as any skill's output must; Markdown code fences are not stripped
(openbotstack does not strip them either; its prompts ask for bare JSON).

Verdicts: a reply that is not JSON, fails `output_schema` or is larger than
`limits.max_output_bytes` is the skill's fault (its prompt), like a Python skill's invalid
output; the provider failing (HTTP error, unreachable, malformed response) or missing is a
`worker_failure` (the sandbox's machinery, not the skill's health); the deadline
(`limits.timeout`) passing is a `timeout`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sandbox import jsonbounds, llm
from sandbox.execution import CANCELED_ERROR, EXHAUSTED_ERROR, TIMEOUT_ERROR, WORKER_ERROR
from sandbox.skill import Skill
from sandbox.skilltext import printable
from worker.protocol import (
    ErrorKind,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    Limits,
    ResourceUsage,
)

INPUT_PLACEHOLDER = "{{.Input}}"
_log = logging.getLogger("sandbox")


def render(instructions: str, input_json: bytes) -> str:
    """The prompt: `{{.Input}}` replaced by the input JSON text (openbotstack's
    `strings.ReplaceAll(prompt, "{{.Input}}", string(input))`)."""
    return instructions.replace(INPUT_PLACEHOLDER, input_json.decode("utf-8", "replace"))


def missing_provider(skill_id: str) -> str:
    return (f"{WORKER_ERROR}: skill {skill_id!r} is declarative and needs an LLM provider, but "
            "none is configured (Sandbox(llm=...); daemon: the [llm] section)")


def run(skill: Skill, provider: llm.LLMProvider | None, request: ExecutionRequest,
        limits: Limits, arrived: float, deadline: float,
        canceled: Callable[[], bool]) -> ExecutionResult:
    """One declarative execution, from prompt to verdict. Never raises: whatever the
    provider or the model does (or a bug here) is a result, so the execution is logged."""
    try:
        return _run(skill, provider, request, limits, arrived, deadline, canceled)
    except Exception as exc:  # noqa: BLE001 - a result, like any failure in the supervisor
        _log.exception("declarative execution of %s failed in the supervisor", skill.id)
        return ExecutionResult(status=ExecutionStatus.FAILED,
                               error=f"{WORKER_ERROR}: {type(exc).__name__}: {exc}",
                               duration=time.monotonic() - arrived,
                               request_id=request.request_id, skill_id=skill.id,
                               error_kind=ErrorKind.WORKER_FAILURE)


def _run(skill: Skill, provider: llm.LLMProvider | None, request: ExecutionRequest,
         limits: Limits, arrived: float, deadline: float,
         canceled: Callable[[], bool]) -> ExecutionResult:
    tokens = 0

    def result(status: ExecutionStatus, kind: ErrorKind = ErrorKind.NONE, error: str = "",
               output: bytes = b"") -> ExecutionResult:
        return ExecutionResult(status=status, output=output, error=error,
                               duration=time.monotonic() - arrived,
                               resource_usage=ResourceUsage(tokens_used=tokens),
                               request_id=request.request_id, skill_id=skill.id,
                               error_kind=kind)

    failed = ExecutionStatus.FAILED
    if provider is None:
        return result(failed, ErrorKind.WORKER_FAILURE, missing_provider(skill.id))
    assert skill.manifest.instructions is not None
    prompt = render(skill.manifest.instructions, request.input)
    try:
        answer = llm.call(provider, prompt, deadline=deadline, canceled=canceled)
    except llm.LLMCanceled:
        return result(ExecutionStatus.CANCELED, ErrorKind.CANCELED, CANCELED_ERROR)
    except llm.LLMTimeout:
        return result(ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                      f"{TIMEOUT_ERROR} after {limits.timeout:g}s")
    except llm.LLMError as exc:
        return result(failed, ErrorKind.WORKER_FAILURE, f"{WORKER_ERROR}: {exc}")
    tokens = answer.tokens
    raw = answer.text.strip().encode("utf-8", "replace")
    if len(raw) > limits.max_output_bytes:
        return result(failed, ErrorKind.RESOURCE_EXHAUSTED,
                      f"{EXHAUSTED_ERROR}: output: the model's reply is {len(raw)} bytes, "
                      f"limit is {limits.max_output_bytes}")
    problem = _output_problem(skill, raw)
    if problem:
        return result(failed, ErrorKind.SKILL_FAILED, f"invalid output: {problem}")
    return result(ExecutionStatus.SUCCESS, output=raw)


def _output_problem(skill: Skill, raw: bytes) -> str:
    """Why the model's reply is not this skill's output, or ""."""
    data, problem = jsonbounds.decode(raw)
    if problem:
        start = printable(raw[:60].decode("utf-8", "replace"))
        hint = " (it starts with a Markdown code fence: the prompt must ask for bare JSON)" \
            if raw.startswith(b"```") else ""
        return f"the model's reply is {problem[:200]}{hint}; it starts with {start!r}"
    try:
        return skill.output_problem(data) or ""
    except Exception as exc:  # noqa: BLE001 - a bug or a limit we missed: still a result
        return f"the output check failed: {type(exc).__name__}: {str(exc)[:200]}"
