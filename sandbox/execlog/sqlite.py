"""SQLite execution log: the embedded default, queryable after the fact.

WAL mode, one committed transaction per record: once `log_step` returns, the record survives
the writing process being killed (and, with `synchronous="FULL"`, a power loss). Readers in
other processes (an operator's shell, the CLI) can query while the sandbox writes.
The schema carries a version in `schema_version`; a database written by a newer version of
this library is refused rather than misread.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from sandbox.execlog.records import DEFAULT_MAX_OUTPUT_BYTES, ExecutionLogRecord, RecordLogger

SCHEMA_VERSION = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_version (
    version    INTEGER NOT NULL,
    applied_at TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS execution_log (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    ts               REAL    NOT NULL,  -- seconds since the epoch, for range queries
    timestamp        TEXT    NOT NULL,  -- RFC 3339, UTC
    request_id       TEXT    NOT NULL,
    assistant_id     TEXT    NOT NULL DEFAULT '',
    session_id       TEXT    NOT NULL DEFAULT '',
    tenant_id        TEXT    NOT NULL DEFAULT '',
    user_id          TEXT    NOT NULL DEFAULT '',
    step_name        TEXT    NOT NULL DEFAULT '',
    step_type        TEXT    NOT NULL DEFAULT '',
    step_index       INTEGER,
    status           TEXT    NOT NULL DEFAULT '',
    error            TEXT    NOT NULL DEFAULT '',
    output           TEXT,              -- JSON
    output_truncated INTEGER NOT NULL DEFAULT 0,
    duration_ms      REAL    NOT NULL DEFAULT 0,
    cpu_ms           INTEGER NOT NULL DEFAULT 0,
    memory_mb        INTEGER NOT NULL DEFAULT 0,
    tokens           INTEGER NOT NULL DEFAULT 0,
    error_kind       TEXT    NOT NULL DEFAULT '',  -- the supervisor's verdict (version 2)
    node             TEXT    NOT NULL DEFAULT ''   -- the fleet node that ran it (version 3)
);
CREATE INDEX IF NOT EXISTS execution_log_request ON execution_log (request_id);
CREATE INDEX IF NOT EXISTS execution_log_tenant  ON execution_log (tenant_id, ts);
CREATE INDEX IF NOT EXISTS execution_log_skill   ON execution_log (step_name, ts);
CREATE INDEX IF NOT EXISTS execution_log_status  ON execution_log (status, ts);
CREATE INDEX IF NOT EXISTS execution_log_ts      ON execution_log (ts);
"""

_COLUMNS = ("ts", "timestamp", "request_id", "assistant_id", "session_id", "tenant_id",
            "user_id", "step_name", "step_type", "step_index", "status", "error", "output",
            "output_truncated", "duration_ms", "cpu_ms", "memory_mb", "tokens", "error_kind",
            "node")
_INSERT = (f"INSERT INTO execution_log ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")


class SchemaError(RuntimeError):
    """The database was written by an incompatible version of the schema."""


#: SQLite's companion files of a WAL database; it creates them with the database's mode.
_COMPANIONS = ("-wal", "-shm", "-journal")


def _private(path: Path) -> None:
    """Create the database file mode 0600 before SQLite opens it (SQLite would use 0644 minus
    the umask, and copies the database's mode to its -wal/-shm files), and tighten a file an
    older version made: every caller's input and output is in there."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        for name in (str(path), *(f"{path}{suffix}" for suffix in _COMPANIONS)):
            try:
                if os.stat(name).st_mode & 0o077:
                    os.chmod(name, 0o600)
            except FileNotFoundError:
                continue
            except PermissionError:  # not ours to change (e.g. read by another user)
                continue
    else:
        os.close(fd)


def _epoch(value: datetime | float) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"give an aware datetime (e.g. with tzinfo=UTC), got {value!r}")
        return value.timestamp()
    return float(value)


class SqliteExecutionLogger(RecordLogger):
    """Write and query an execution log database; thread-safe (one connection, one lock)."""

    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL",
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES,
                 busy_timeout: float = 5.0) -> None:
        super().__init__(max_output_bytes)
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self._lock = threading.Lock()
        self._encoder = msgspec.json.Encoder()
        _private(self.path)
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            self.path, timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._migrate(self._conn)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            row = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
            version = row[0]
            if version is None:
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                             (SCHEMA_VERSION, datetime.now(UTC).isoformat()))
            elif version > SCHEMA_VERSION:
                raise SchemaError(f"{self.path}: execution log schema version {version} is "
                                  f"newer than this library's ({SCHEMA_VERSION})")
            elif version < SCHEMA_VERSION:
                if version < 2:  # version 1 had no error_kind column
                    conn.execute("ALTER TABLE execution_log ADD COLUMN error_kind TEXT NOT "
                                 "NULL DEFAULT ''")
                # version 2 had no node column (fleet workers stamp it)
                conn.execute("ALTER TABLE execution_log ADD COLUMN node TEXT NOT NULL "
                             "DEFAULT ''")
                conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                             (SCHEMA_VERSION, datetime.now(UTC).isoformat()))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"{self.path}: the execution log is closed")
        return self._conn

    def write(self, record: ExecutionLogRecord) -> None:
        output = None if record.output is None else self._encoder.encode(record.output).decode()
        row = (record.timestamp.timestamp(), record.timestamp.isoformat(), record.request_id,
               record.assistant_id, record.session_id, record.tenant_id, record.user_id,
               record.step_name, record.step_type, record.step_index, record.status,
               record.error, output, int(record.output_truncated), record.duration_ms,
               record.cpu_ms, record.memory_mb, record.tokens, record.error_kind, record.node)
        with self._lock:
            self._connection().execute(_INSERT, row)  # autocommit: one transaction per record

    def schema_version(self) -> int:
        with self._lock:
            row = self._connection().execute(
                "SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0])

    def query(self, *, request_id: str | None = None, tenant_id: str | None = None,
              skill: str | None = None, step_type: str | None = None,
              status: str | None = None, since: datetime | float | None = None,
              until: datetime | float | None = None, limit: int | None = 1000,
              newest_first: bool = False) -> list[ExecutionLogRecord]:
        """Records matching every given filter, oldest first (or newest first).

        `skill` matches `step_name` (the skill id or tool name); `since`/`until` are aware
        datetimes or epoch seconds, `since` inclusive, `until` exclusive.
        """
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (("request_id", request_id), ("tenant_id", tenant_id),
                              ("step_name", skill), ("step_type", step_type),
                              ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if since is not None:
            clauses.append("ts >= ?")
            params.append(_epoch(since))
        if until is not None:
            clauses.append("ts < ?")
            params.append(_epoch(until))
        sql = "SELECT * FROM execution_log"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._lock:
            cursor = self._connection().execute(sql, params)
            names = [item[0] for item in cursor.description]
            rows = cursor.fetchall()
        return [_record(dict(zip(names, row, strict=True))) for row in rows]

    def by_request_id(self, request_id: str) -> list[ExecutionLogRecord]:
        return self.query(request_id=request_id, limit=None)

    def by_tenant(self, tenant_id: str, *, since: datetime | float | None = None,
                  limit: int | None = 1000) -> list[ExecutionLogRecord]:
        return self.query(tenant_id=tenant_id, since=since, limit=limit)

    def since(self, when: datetime | float, *, status: str | None = None,
              limit: int | None = 1000) -> list[ExecutionLogRecord]:
        return self.query(since=when, status=status, limit=limit)

    def count(self) -> int:
        with self._lock:
            return int(self._connection().execute(
                "SELECT COUNT(*) FROM execution_log").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _record(row: dict[str, Any]) -> ExecutionLogRecord:
    output = row["output"]
    return ExecutionLogRecord(
        request_id=row["request_id"], assistant_id=row["assistant_id"],
        step_name=row["step_name"], step_type=row["step_type"], status=row["status"],
        output=None if output is None else msgspec.json.decode(output), error=row["error"],
        duration_ms=row["duration_ms"], timestamp=datetime.fromisoformat(row["timestamp"]),
        tenant_id=row["tenant_id"], user_id=row["user_id"], session_id=row["session_id"],
        step_index=row["step_index"], cpu_ms=row["cpu_ms"], memory_mb=row["memory_mb"],
        tokens=row["tokens"], output_truncated=bool(row["output_truncated"]),
        error_kind=row["error_kind"], node=row["node"],
    )
