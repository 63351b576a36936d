"""Execution plans: openbotstack-core's `ExecutionPlan`, `ExecutionStep`, `StepResult` and
`ExecutionContext`.

A plan is what a control plane (typically an LLM planner) hands the execution plane: an ordered
list of skill and tool calls whose arguments may use earlier outputs (see `sandbox.templates`).
Plans arrive as JSON from outside, so parsing is lenient about *what* is in a step and
`validate()` is strict, naming the step (`steps[i] 'name'`) and what is wrong with it.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from sandbox.errors import InvalidPlan as InvalidPlan  # raised here; defined with the others
from sandbox.errors import PlanFailed as PlanFailed
from sandbox.templates import TemplateError, references_in, resolve_reference

if TYPE_CHECKING:
    from worker.protocol import ExecutionResult

#: Characters a step name may not contain: they would make `{{name#N.field}}` ambiguous.
_FORBIDDEN_IN_NAME = frozenset("{}#") | frozenset(" \t\r\n")


class StepType(enum.StrEnum):
    SKILL = "skill"
    TOOL = "tool"
    #: A prompt (`arguments.prompt`) sent to the sandbox's LLM provider; the text is the output.
    LLM = "llm"


class PlanTarget(Protocol):
    """What `validate` asks of the executor (a `Sandbox`): is this skill/tool available?"""

    def can_execute(self, skill_id: str) -> bool: ...

    def has_tool(self, name: str) -> bool: ...


@dataclass
class ExecutionStep:
    """One call: `name` is the skill id (type `skill`) or tool name (type `tool`).

    `type` stays a plain string when it is not a known `StepType`, so that `validate()` can
    name the offending step instead of the parser failing somewhere inside it.
    """

    name: str
    type: StepType | str
    arguments: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.type, str) and not isinstance(self.type, StepType):
            with contextlib.suppress(ValueError):
                self.type = StepType(self.type)

    def arguments_json(self) -> bytes:
        return msgspec.json.encode(self.arguments)

    def to_dict(self) -> dict[str, Any]:
        kind = self.type.value if isinstance(self.type, StepType) else self.type
        return {"name": self.name, "type": kind, "arguments": self.arguments}

    @classmethod
    def from_dict(cls, data: Any, index: int = 0) -> ExecutionStep:
        if not isinstance(data, dict):
            raise InvalidPlan(f"steps[{index}]: must be a JSON object, got {_json_type(data)}")
        unknown = sorted(set(data) - {"name", "type", "arguments"})
        if unknown:
            raise InvalidPlan(f"steps[{index}]: unknown field(s) {', '.join(unknown)} "
                              "(a step has name, type and arguments)")
        name, kind = data.get("name", ""), data.get("type", "")
        if not isinstance(name, str):
            raise InvalidPlan(f"steps[{index}]: name must be a string, got {_json_type(name)}")
        if not isinstance(kind, str):
            raise InvalidPlan(f"steps[{index}] {name!r}: type must be a string, got "
                              f"{_json_type(kind)}")
        arguments = data.get("arguments")
        return cls(name=name, type=kind, arguments={} if arguments is None else arguments)


@dataclass
class ExecutionPlan:
    assistant_id: str
    steps: list[ExecutionStep]
    reasoning: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"assistant_id": self.assistant_id,
                                "steps": [step.to_dict() for step in self.steps]}
        if self.reasoning:
            data["reasoning"] = self.reasoning
        return data

    def to_json(self) -> bytes:
        return msgspec.json.encode(self.to_dict())

    @classmethod
    def from_dict(cls, data: Any) -> ExecutionPlan:
        if not isinstance(data, dict):
            raise InvalidPlan(f"a plan must be a JSON object, got {_json_type(data)}")
        unknown = sorted(set(data) - {"assistant_id", "steps", "reasoning"})
        if unknown:
            raise InvalidPlan(f"unknown plan field(s) {', '.join(unknown)} "
                              "(a plan has assistant_id, steps and reasoning)")
        assistant_id = data.get("assistant_id", "")
        reasoning = data.get("reasoning") or ""
        steps = data.get("steps")
        if not isinstance(assistant_id, str):
            raise InvalidPlan(f"assistant_id must be a string, got {_json_type(assistant_id)}")
        if not isinstance(reasoning, str):
            raise InvalidPlan(f"reasoning must be a string, got {_json_type(reasoning)}")
        if steps is None:
            steps = []
        if not isinstance(steps, list):
            raise InvalidPlan(f"steps must be a JSON array, got {_json_type(steps)}")
        return cls(assistant_id=assistant_id, reasoning=reasoning,
                   steps=[ExecutionStep.from_dict(item, index)
                          for index, item in enumerate(steps)])

    @classmethod
    def from_json(cls, data: bytes | str) -> ExecutionPlan:
        try:
            decoded = msgspec.json.decode(data)
        except msgspec.DecodeError as exc:
            raise InvalidPlan(f"not valid JSON: {exc}") from None
        return cls.from_dict(decoded)

    def validate(self, target: PlanTarget | None = None) -> None:
        """Raise `InvalidPlan` naming the first bad step; with a `target`, also require every
        skill to be loaded and every tool registered there."""
        if not self.steps:
            raise InvalidPlan("the plan has no steps")
        names: list[str] = []
        for index, step in enumerate(self.steps):
            where = f"steps[{index}] {step.name!r}"
            if not isinstance(step.name, str) or not step.name:
                raise InvalidPlan(f"steps[{index}]: name is empty")
            bad = sorted(set(step.name) & _FORBIDDEN_IN_NAME)
            if bad:
                raise InvalidPlan(f"{where}: name contains {''.join(bad)!r} (not allowed: "
                                  "whitespace, '{', '}', '#')")
            if not isinstance(step.type, StepType):
                raise InvalidPlan(f"{where}: unknown type {step.type!r} "
                                  "(expected 'skill', 'tool' or 'llm')")
            if not isinstance(step.arguments, dict):
                raise InvalidPlan(f"{where}: arguments must be a JSON object, got "
                                  f"{_json_type(step.arguments)}")
            problem = _json_problem(step.arguments, "arguments")
            if problem:
                raise InvalidPlan(f"{where}: {problem}")
            for reference in references_in(step.arguments):
                try:
                    resolve_reference(reference, names)
                except TemplateError as exc:
                    raise InvalidPlan(f"{where}: {exc} (a step may only use the output of "
                                      "steps before it)") from None
            if target is not None:
                if step.type is StepType.SKILL and not target.can_execute(step.name):
                    raise InvalidPlan(f"{where}: skill {step.name!r} is not loaded")
                if step.type is StepType.TOOL and not target.has_tool(step.name):
                    raise InvalidPlan(f"{where}: tool {step.name!r} is not registered")
                if step.type is StepType.LLM and getattr(target, "llm", True) is None:
                    raise InvalidPlan(f"{where}: an llm step needs an LLM provider, and none "
                                      "is configured (Sandbox(llm=...); daemon: [llm])")
            names.append(step.name)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return f"a Python {type(value).__name__}"


def _json_problem(value: Any, path: str) -> str | None:
    """Why `value` is not plain JSON (the plan must survive a JSON round trip), or None."""
    if value is None or isinstance(value, str | bool | int):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value}, which JSON cannot hold"
    if isinstance(value, list):
        for position, item in enumerate(value):
            problem = _json_problem(item, f"{path}[{position}]")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path} has a non-string key {key!r}"
            problem = _json_problem(item, f"{path}.{key}")
            if problem:
                return problem
        return None
    return f"{path} is {_json_type(value)}, which is not JSON"


@dataclass
class StepResult:
    """Outcome of one step. `error` is empty on success; `duration` is in seconds.

    `status` uses the execution statuses (`success`, `failed`, `timeout`, `canceled`,
    `rejected`); `index` is the step's position in the plan; `execution` is the full
    `ExecutionResult` of a skill step (resource usage, stdout/stderr tails) or of an `llm` step
    (its `tokens_used`), None for tools.
    """

    step_name: str
    type: str
    output: Any = None
    error: str = ""
    duration: float = 0.0
    index: int = 0
    status: str = "success"
    execution: ExecutionResult | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.error


class ExecutionContext:
    """Request-scoped state of one plan run: identities, bounds, and the results so far.

    `deadline` bounds the whole plan. Time left is measured on the monotonic clock from the
    moment the context was made, so a wall-clock jump does not stretch or cut the plan.
    `cancel()` stops the plan: the running skill step is killed and no further step starts.
    """

    def __init__(self, request_id: str | None = None, assistant_id: str = "",
                 session_id: str = "", tenant_id: str = "", user_id: str = "", *,
                 timeout: float | None = None, deadline: datetime | None = None,
                 started_at: datetime | None = None) -> None:
        if timeout is not None and deadline is not None:
            raise ValueError("give timeout or deadline, not both")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.request_id = request_id or uuid.uuid4().hex
        self.assistant_id = assistant_id
        self.session_id = session_id
        self.tenant_id = tenant_id
        self.user_id = user_id
        self.started_at = started_at or datetime.now(UTC)
        self._monotonic_start = time.monotonic()
        if timeout is not None:
            deadline = self.started_at + timedelta(seconds=timeout)
        self.deadline = deadline
        self._results: list[StepResult] = []
        self._lock = threading.Lock()
        self._canceled = False
        self._on_cancel: list[Callable[[], object]] = []

    def time_left(self) -> float | None:
        """Seconds until the deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        budget = (self.deadline - self.started_at).total_seconds()
        return max(0.0, budget - (time.monotonic() - self._monotonic_start))

    def elapsed(self) -> float:
        """Seconds since the context was made (monotonic)."""
        return time.monotonic() - self._monotonic_start

    def add_result(self, result: StepResult) -> None:
        with self._lock:
            self._results.append(result)

    def results(self) -> list[StepResult]:
        with self._lock:
            return list(self._results)

    @property
    def canceled(self) -> bool:
        return self._canceled

    def cancel(self) -> None:
        with self._lock:
            self._canceled = True
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            callback()

    def _add_cancel_callback(self, callback: Callable[[], object]) -> None:
        with self._lock:
            self._on_cancel.append(callback)
            canceled = self._canceled
        if canceled:
            callback()

    def _remove_cancel_callback(self, callback: Callable[[], object]) -> None:
        with self._lock:
            if callback in self._on_cancel:
                self._on_cancel.remove(callback)

    def __repr__(self) -> str:
        return (f"ExecutionContext(request_id={self.request_id!r}, "
                f"assistant_id={self.assistant_id!r}, tenant_id={self.tenant_id!r}, "
                f"user_id={self.user_id!r}, deadline={self.deadline!r})")
