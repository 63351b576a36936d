"""Execution log to stdlib `logging`, and a logger that fans out to several.

The bridge puts the whole record on the `LogRecord` as `execution` (a dict), so a JSON log
formatter or a handler shipping to a log service gets every field; the message is one line a
person can read. Failed steps log at `failure_level`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogger,
    ExecutionLogRecord,
    RecordLogger,
)

if TYPE_CHECKING:
    from sandbox.plans import ExecutionContext, ExecutionPlan
    from worker.protocol import ExecutionStatus

_QUIET = {"success", "started"}


class LoggingExecutionLogger(RecordLogger):
    def __init__(self, logger: logging.Logger | str = "sandbox.execution", *,
                 level: int = logging.INFO, failure_level: int = logging.WARNING,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        super().__init__(max_output_bytes)
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level
        self.failure_level = failure_level

    def write(self, record: ExecutionLogRecord) -> None:
        level = self.level if record.status in _QUIET else self.failure_level
        if not self.logger.isEnabledFor(level):
            return
        subject = record.step_name or record.assistant_id or "-"
        self.logger.log(
            level, "%s %s %s %s in %.1f ms%s", record.request_id, record.step_type, subject,
            record.status, record.duration_ms, f": {record.error}" if record.error else "",
            extra={"execution": record.to_dict()})


class MultiExecutionLogger:
    """Sends every event to each logger in turn; one failing does not stop the others (the
    first error is raised after all were tried)."""

    def __init__(self, *loggers: ExecutionLogger) -> None:
        self.loggers = loggers

    def _each(self, method: str, *args: object) -> None:
        first: BaseException | None = None
        for logger in self.loggers:
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - every logger gets the record first
                first = first or exc
        if first is not None:
            raise first

    def log_step(self, record: ExecutionLogRecord) -> None:
        self._each("log_step", record)

    def log_plan_start(self, ec: ExecutionContext, plan: ExecutionPlan) -> None:
        self._each("log_plan_start", ec, plan)

    def log_plan_end(self, ec: ExecutionContext, error: str | None,
                     status: ExecutionStatus) -> None:
        self._each("log_plan_end", ec, error, status)

    def close(self) -> None:
        for logger in self.loggers:
            close = getattr(logger, "close", None)
            if close is not None:
                close()
