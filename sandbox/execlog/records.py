"""The execution log's record and the `ExecutionLogger` protocol.

One record per `execute` and per plan step (skill steps are logged by the `execute` they go
through, tool steps by the plan runner), plus a `plan` record when a plan starts and ends.
The JSON field names are openbotstack-core's (`request_id`, `assistant_id`, `step_name`,
`step_type`, `status`, `output`, `error`, `duration_ms`, `timestamp`), extended with who
asked and what it cost. `timestamp` is when the step ended, in UTC.
"""

from __future__ import annotations

import abc
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import msgspec

from sandbox import jsonbounds

if TYPE_CHECKING:
    from sandbox.plans import ExecutionContext, ExecutionPlan, StepResult
    from worker.protocol import ExecutionRequest, ExecutionResult, ExecutionStatus

#: Outputs larger than this (encoded JSON bytes) are logged as a truncated text preview.
DEFAULT_MAX_OUTPUT_BYTES = 4096

PLAN_STEP_TYPE = "plan"


class ExecutionLogRecord(msgspec.Struct, kw_only=True):
    request_id: str
    assistant_id: str = ""
    step_name: str = ""
    step_type: str = ""  # "skill", "tool" or "plan"
    status: str = ""
    output: Any = None
    error: str = ""
    duration_ms: float = 0.0
    timestamp: datetime = msgspec.field(default_factory=lambda: datetime.now(UTC))
    tenant_id: str = ""
    user_id: str = ""
    session_id: str = ""
    step_index: int | None = None  # position in the plan; None for an execute outside a plan
    cpu_ms: int = 0
    memory_mb: int = 0
    tokens: int = 0
    output_truncated: bool = False
    error_kind: str = ""  # the supervisor's verdict (`ErrorKind`); "" on success and for plans
    node: str = ""  # the fleet node that ran it (`sandbox.fleet`); "" for a single host

    def to_dict(self) -> dict[str, Any]:
        return msgspec.to_builtins(self)  # type: ignore[no-any-return]

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> ExecutionLogRecord:
        return msgspec.json.decode(data, type=cls)


_DECODER = msgspec.json.Decoder(ExecutionLogRecord)


def decode_record(data: bytes) -> ExecutionLogRecord:
    return _DECODER.decode(data)


@runtime_checkable
class ExecutionLogger(Protocol):
    """Where execution events go. Implementations must be thread-safe; a logger that raises
    is reported (stdlib logging) and never fails the execution."""

    def log_step(self, record: ExecutionLogRecord) -> None: ...

    def log_plan_start(self, ec: ExecutionContext, plan: ExecutionPlan) -> None: ...

    def log_plan_end(self, ec: ExecutionContext, error: str | None,
                     status: ExecutionStatus) -> None:
        """The plan ended: `status` is its verdict (`success`, `failed`, `timeout`,
        `canceled` or `rejected`), decided by the runner; `error` is text for people."""


class StepInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Plan-side facts about a skill step that `execute` alone does not know."""

    assistant_id: str = ""
    session_id: str = ""
    step_index: int | None = None


def bounded_output(output: Any, limit: int) -> tuple[Any, bool]:
    """`(value, truncated)`: the output as JSON data if it fits in `limit` encoded bytes, else
    a text preview of its first `limit` bytes. Bytes are decoded as JSON when they are JSON.

    Never raises: output nested deeper than `MAX_JSON_DEPTH`, or that cannot be encoded, is
    kept as a text preview, so a record can always be built (and stored).
    """
    if isinstance(output, bytes | bytearray | memoryview):
        raw = bytes(output)
        if not raw:
            return None, False
        if len(raw) <= limit:
            data, problem = jsonbounds.decode(raw)
            if not problem:
                return data, False
            return raw.decode("utf-8", errors="replace"), False
        return raw[:limit].decode("utf-8", errors="ignore"), True
    if output is None:
        return None, False
    if not jsonbounds.within_depth(output):
        return f"<output nested deeper than {jsonbounds.MAX_JSON_DEPTH} levels>", True
    try:
        encoded = msgspec.json.encode(output)
    except Exception:  # noqa: BLE001 - not JSON-encodable: keep a (bounded) description
        encoded = f"<unencodable {type(output).__name__}>".encode()
        output = encoded.decode()
    if len(encoded) <= limit:
        return output, False
    return encoded[:limit].decode("utf-8", errors="ignore"), True


#: SQLite's INTEGER range; the JSON encoders take more, SQLite does not.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1
_INT_FIELDS = ("step_index", "cpu_ms", "memory_mb", "tokens")
_TEXT_FIELDS = ("request_id", "assistant_id", "step_name", "step_type", "status", "error",
                "tenant_id", "user_id", "session_id")
#: Text fields longer than this are cut when a record had to be made storable.
_MAX_TEXT = 64 << 10


def storable(record: ExecutionLogRecord, max_output_bytes: int) -> ExecutionLogRecord:
    """`record` with every field a store may refuse brought in range: integers clamped to
    64 bits, text cut to 64 KiB and made valid UTF-8, output as a bounded text preview."""
    changes: dict[str, Any] = {}
    for name in _INT_FIELDS:
        value = getattr(record, name)
        if isinstance(value, int) and not _INT_MIN <= value <= _INT_MAX:
            changes[name] = min(max(value, _INT_MIN), _INT_MAX)
    for name in _TEXT_FIELDS:
        value = getattr(record, name)
        text = value if isinstance(value, str) else str(value)
        clean = text[:_MAX_TEXT].encode("utf-8", errors="replace").decode("utf-8")
        if clean != value:
            changes[name] = clean
    if record.output is not None:
        preview = msgspec.json.encode(_preview(record.output))[:max_output_bytes]
        changes["output"] = preview.decode("utf-8", errors="ignore")
        changes["output_truncated"] = True
    if not isinstance(record.duration_ms, float):
        changes["duration_ms"] = 0.0
    return msgspec.structs.replace(record, **changes) if changes else record


def _preview(output: Any) -> str:
    try:
        value, _ = bounded_output(output, 1 << 10)
        return value if isinstance(value, str) else msgspec.json.encode(value).decode()
    except Exception:  # noqa: BLE001 - a description is all a broken value gets
        return f"<{type(output).__name__}>"


def record_for_execution(request: ExecutionRequest, result: ExecutionResult,
                         step: StepInfo | None = None,
                         max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> ExecutionLogRecord:
    output, truncated = bounded_output(result.output, max_output_bytes)
    usage = result.resource_usage
    return ExecutionLogRecord(
        request_id=request.request_id, assistant_id=step.assistant_id if step else "",
        step_name=request.skill_id, step_type="skill", status=result.status.value,
        output=output, output_truncated=truncated, error=result.error,
        duration_ms=result.duration * 1000.0, tenant_id=request.tenant_id,
        user_id=request.user_id, session_id=step.session_id if step else "",
        step_index=step.step_index if step else None, cpu_ms=usage.cpu_time_ms,
        memory_mb=usage.memory_mb, tokens=usage.tokens_used, error_kind=result.error_kind.value,
        node=result.node,
    )


def record_for_step(ec: ExecutionContext, result: StepResult,
                    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> ExecutionLogRecord:
    output, truncated = bounded_output(result.output, max_output_bytes)
    return ExecutionLogRecord(
        request_id=ec.request_id, assistant_id=ec.assistant_id, step_name=result.step_name,
        step_type=result.type, status=result.status,
        output=output, output_truncated=truncated, error=result.error,
        duration_ms=result.duration * 1000.0, tenant_id=ec.tenant_id, user_id=ec.user_id,
        session_id=ec.session_id, step_index=result.index,
        tokens=result.execution.resource_usage.tokens_used if result.execution else 0,
    )


class RecordLogger(abc.ABC):
    """Base for loggers that store records: plan events become records with step_type `plan`
    (status `started`, then the verdict the plan runner passes to `log_plan_end`)."""

    def __init__(self, max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        if max_output_bytes < 0:
            raise ValueError(f"max_output_bytes must not be negative, got {max_output_bytes}")
        self.max_output_bytes = max_output_bytes

    @abc.abstractmethod
    def write(self, record: ExecutionLogRecord) -> None:
        """Store one record durably enough for this logger's promise, then return."""

    def log_step(self, record: ExecutionLogRecord) -> None:
        if record.output is not None and not record.output_truncated:
            output, truncated = bounded_output(record.output, self.max_output_bytes)
            if truncated:
                record = msgspec.structs.replace(record, output=output, output_truncated=True)
        self._store(record)

    def _store(self, record: ExecutionLogRecord) -> None:
        """Write `record`; one the store refuses as it is (an integer past 64 bits, text that
        is not UTF-8, output it cannot encode) is written again with those fields brought in
        range (`storable`): a record is never dropped for what its fields hold."""
        try:
            self.write(record)
        except Exception:  # retried with every field made storable
            fixed = storable(record, self.max_output_bytes)
            if fixed is record:
                raise  # nothing to fix: the store itself is failing
            self.write(fixed)

    def log_plan_start(self, ec: ExecutionContext, plan: ExecutionPlan) -> None:
        output, truncated = bounded_output(plan.to_dict(), self.max_output_bytes)
        self._store(ExecutionLogRecord(
            request_id=ec.request_id, assistant_id=ec.assistant_id or plan.assistant_id,
            step_type=PLAN_STEP_TYPE, status="started",
            output=output, output_truncated=truncated, tenant_id=ec.tenant_id,
            user_id=ec.user_id, session_id=ec.session_id))

    def log_plan_end(self, ec: ExecutionContext, error: str | None,
                     status: ExecutionStatus) -> None:
        self._store(ExecutionLogRecord(
            request_id=ec.request_id, assistant_id=ec.assistant_id, step_type=PLAN_STEP_TYPE,
            status=status.value, error=error or "",
            duration_ms=ec.elapsed() * 1000.0, tenant_id=ec.tenant_id, user_id=ec.user_id,
            session_id=ec.session_id))

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections; the default has none."""

    def __enter__(self) -> RecordLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
