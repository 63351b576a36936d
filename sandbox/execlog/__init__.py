"""The execution log: what ran, for whom, how it ended and what it cost, queryable afterwards.

`SqliteExecutionLogger` is the embedded default (WAL, indexed, queryable),
`JsonlExecutionLogger` appends JSON Lines for log shippers, `LoggingExecutionLogger` forwards
to stdlib `logging`, and `MultiExecutionLogger` fans out to several. Any object with the
`ExecutionLogger` methods works.
"""

from sandbox.execlog.bridge import LoggingExecutionLogger, MultiExecutionLogger
from sandbox.execlog.jsonl import JsonlExecutionLogger, iter_jsonl, read_jsonl
from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogger,
    ExecutionLogRecord,
    RecordLogger,
    StepInfo,
    bounded_output,
    record_for_execution,
    record_for_step,
)
from sandbox.execlog.sqlite import SCHEMA_VERSION, SchemaError, SqliteExecutionLogger

__all__ = [
    "DEFAULT_MAX_OUTPUT_BYTES",
    "SCHEMA_VERSION",
    "ExecutionLogRecord",
    "ExecutionLogger",
    "JsonlExecutionLogger",
    "LoggingExecutionLogger",
    "MultiExecutionLogger",
    "RecordLogger",
    "SchemaError",
    "SqliteExecutionLogger",
    "StepInfo",
    "bounded_output",
    "iter_jsonl",
    "read_jsonl",
    "record_for_execution",
    "record_for_step",
]
