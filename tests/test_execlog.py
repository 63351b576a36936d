"""Execution log: what execute and plans record, the SQLite query API, JSONL under concurrency,
the logging bridge, and that nothing acknowledged is lost when the writer is SIGKILLed."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import (
    ExecutionContext,
    ExecutionLogRecord,
    ExecutionPlan,
    ExecutionRequest,
    ExecutionStep,
    InvalidPlan,
    JsonlExecutionLogger,
    LoggingExecutionLogger,
    MultiExecutionLogger,
    PlanFailed,
    Sandbox,
    Skill,
    SqliteExecutionLogger,
)
from sandbox.execlog import SCHEMA_VERSION, SchemaError, read_jsonl

ROOT = Path(__file__).resolve().parent.parent

TOKENS = ("def run(input, ctx):\n    ctx.report_tokens(len(input['text'].split()))\n"
          "    return {'words': input['text'].split()}\n")
FAIL = "def run(input):\n    raise ValueError('bad ' + str(input))\n"
BIG = "def run(input):\n    return {'blob': 'x' * 20000}\n"


@pytest.fixture
def db(tmp_path: Path) -> Any:
    logger = SqliteExecutionLogger(tmp_path / "log.db")
    yield logger
    logger.close()


@pytest.fixture
def logged(make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
           db: SqliteExecutionLogger) -> Sandbox:
    return make_sandbox(skill_dir(TOKENS, skill_id="t/tokens"), skill_dir(FAIL, skill_id="t/fail"),
                        skill_dir(BIG, skill_id="t/big"), logger=db)


def test_every_execute_is_logged_with_identities_and_cost(logged: Sandbox,
                                                          db: SqliteExecutionLogger) -> None:
    before = datetime.now(UTC)
    request = ExecutionRequest(skill_id="t/tokens", input=b'{"text": "a b c"}', tenant_id="acme",
                               user_id="u1", request_id="req-1")
    result = logged.execute(request)
    assert result.ok
    [record] = db.by_request_id("req-1")
    assert (record.request_id, record.tenant_id, record.user_id, record.step_name,
            record.step_type, record.status) == ("req-1", "acme", "u1", "t/tokens", "skill",
                                                 "success")
    assert record.output == {"words": ["a", "b", "c"]}
    assert record.tokens == 3
    assert record.cpu_ms == result.resource_usage.cpu_time_ms
    assert record.memory_mb == result.resource_usage.memory_mb
    assert record.duration_ms == pytest.approx(result.duration * 1000)
    assert record.step_index is None and record.error == ""
    assert before <= record.timestamp <= datetime.now(UTC)


def test_async_executions_and_plans_are_logged(logged: Sandbox,
                                               db: SqliteExecutionLogger) -> None:
    import asyncio

    async def main() -> None:
        await logged.aexecute(ExecutionRequest(skill_id="t/tokens", input=b'{"text": "a"}',
                                               request_id="async-1"))
        await logged.aexecute_plan(ExecutionPlan("a", [
            ExecutionStep("t/tokens", "skill", {"text": "b c"})]),
            ExecutionContext(request_id="async-plan"))

    asyncio.run(main())
    assert [(r.step_type, r.status) for r in db.by_request_id("async-1")] == [
        ("skill", "success")]
    assert [(r.step_type, r.status, r.tokens) for r in db.by_request_id("async-plan")] == [
        ("plan", "started", 0), ("skill", "success", 2), ("plan", "success", 0)]


def test_failures_and_rejections_are_logged_too(logged: Sandbox,
                                                db: SqliteExecutionLogger) -> None:
    logged.execute(ExecutionRequest(skill_id="t/fail", input=b'{"n": 1}', request_id="f"))
    logged.execute(ExecutionRequest(skill_id="nope/none", request_id="r"))
    [failed] = db.by_request_id("f")
    assert failed.status == "failed" and "ValueError: bad {'n': 1}" in failed.error
    [rejected] = db.by_request_id("r")
    assert (rejected.status, rejected.error) == ("rejected", "runtime: skill not loaded")


def test_large_outputs_are_logged_as_a_bounded_preview(logged: Sandbox,
                                                       db: SqliteExecutionLogger) -> None:
    assert logged.execute(ExecutionRequest(skill_id="t/big", request_id="b")).ok
    [record] = db.by_request_id("b")
    assert record.output_truncated
    assert isinstance(record.output, str) and len(record.output) == db.max_output_bytes
    assert record.output.startswith('{"blob":"xxx')


def test_plans_log_start_each_step_and_end(logged: Sandbox, db: SqliteExecutionLogger) -> None:
    logged.register_tool("count", lambda args: len(args["words"]))
    plan = ExecutionPlan("asst-7", [
        ExecutionStep("t/tokens", "skill", {"text": "x y"}),
        ExecutionStep("count", "tool", {"words": "{{t/tokens.words}}"}),
    ])
    ec = ExecutionContext(request_id="plan-1", session_id="s1", tenant_id="acme", user_id="u")
    logged.execute_plan(plan, ec)
    records = db.by_request_id("plan-1")
    assert [(r.step_type, r.step_name, r.status, r.step_index) for r in records] == [
        ("plan", "", "started", None), ("skill", "t/tokens", "success", 0),
        ("tool", "count", "success", 1), ("plan", "", "success", None)]
    assert {r.assistant_id for r in records} == {"asst-7"}
    assert {(r.tenant_id, r.user_id) for r in records} == {("acme", "u")}
    assert records[0].output["steps"][1]["name"] == "count"  # the plan itself, for audit
    assert records[1].session_id == "s1" and records[1].tokens == 2
    assert records[2].output == 2


def test_failed_and_invalid_plans_are_logged(logged: Sandbox, db: SqliteExecutionLogger) -> None:
    with pytest.raises(PlanFailed):
        logged.execute_plan(ExecutionPlan("a", [ExecutionStep("t/fail", "skill", {})]),
                            ExecutionContext(request_id="p-fail"))
    end = db.by_request_id("p-fail")[-1]
    assert (end.step_type, end.status) == ("plan", "failed")
    assert end.error.startswith("runtime: plan failed: steps[0] 't/fail' (skill)")
    with pytest.raises(InvalidPlan):
        logged.execute_plan(ExecutionPlan("a", []), ExecutionContext(request_id="p-bad"))
    assert [(r.status, r.error) for r in db.by_request_id("p-bad")] == [
        ("started", ""), ("rejected", "runtime: invalid plan: the plan has no steps")]


SLOW = "import time\ndef run(input):\n    time.sleep(8)\n    return {}\n"


@pytest.mark.parametrize("when", ["between steps", "during a skill step"])
def test_a_plan_canceled_with_its_context_is_logged_canceled(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        db: SqliteExecutionLogger, when: str) -> None:
    sandbox = make_sandbox(skill_dir(TOKENS, skill_id="t/tokens"),
                           skill_dir(SLOW, "[limits]\ntimeout = 20\n", skill_id="t/slow"),
                           logger=db)
    ec = ExecutionContext(request_id="p-cancel")
    sandbox.register_tool("stop", lambda args: ec.cancel())
    first = (ExecutionStep("stop", "tool", {}) if when == "between steps"
             else ExecutionStep("t/slow", "skill", {}))
    timer = threading.Timer(0.5, ec.cancel)
    timer.start()
    try:
        with pytest.raises(PlanFailed) as caught:
            sandbox.execute_plan(ExecutionPlan("a", [
                first, ExecutionStep("t/tokens", "skill", {"text": "never"})]), ec)
    finally:
        timer.cancel()
    assert caught.value.step_result.status == "canceled"
    end = db.by_request_id("p-cancel")[-1]
    assert (end.step_type, end.status) == ("plan", "canceled")


def test_an_async_plan_canceled_with_its_context_is_logged_canceled(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        db: SqliteExecutionLogger) -> None:
    sandbox = make_sandbox(skill_dir(TOKENS, skill_id="t/tokens"), logger=db)
    ec = ExecutionContext(request_id="p-acancel")
    sandbox.register_tool("stop", lambda args: ec.cancel())
    plan = ExecutionPlan("a", [ExecutionStep("stop", "tool", {}),
                               ExecutionStep("t/tokens", "skill", {"text": "never"})])
    with pytest.raises(PlanFailed):
        asyncio.run(sandbox.aexecute_plan(plan, ec))
    assert [(r.step_type, r.status) for r in db.by_request_id("p-acancel")] == [
        ("plan", "started"), ("tool", "success"), ("skill", "canceled"), ("plan", "canceled")]


def test_a_failing_logger_never_fails_the_execution(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def log_step(self, record: ExecutionLogRecord) -> None:
            raise OSError("disk full")

        def log_plan_start(self, ec: Any, plan: Any) -> None:
            raise OSError("disk full")

        def log_plan_end(self, ec: Any, error: str | None, status: Any) -> None:
            raise OSError("disk full")

    sandbox = make_sandbox(skill_dir(TOKENS, skill_id="t/tokens"), logger=Broken())
    with caplog.at_level(logging.ERROR, logger="sandbox"):
        assert sandbox.execute(ExecutionRequest(skill_id="t/tokens",
                                                input=b'{"text": "a"}')).ok
        [step] = sandbox.execute_plan(ExecutionPlan("a", [
            ExecutionStep("t/tokens", "skill", {"text": "b"})]))
    assert step.ok
    assert sum("disk full" in (r.exc_text or "") for r in caplog.records) == 4


# -- SQLite -------------------------------------------------------------------------------------


def _rec(request_id: str, **fields: Any) -> ExecutionLogRecord:
    return ExecutionLogRecord(request_id=request_id, step_type="skill", **fields)


def test_sqlite_query_api(db: SqliteExecutionLogger) -> None:
    t0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    db.log_step(_rec("r1", tenant_id="a", step_name="s/one", status="success", timestamp=t0))
    db.log_step(_rec("r1", tenant_id="a", step_name="s/two", status="failed",
                     timestamp=t0 + timedelta(minutes=1)))
    db.log_step(_rec("r2", tenant_id="b", step_name="s/one", status="timeout",
                     timestamp=t0 + timedelta(minutes=2)))
    def names(records: list[ExecutionLogRecord]) -> list[tuple[str, str]]:
        return [(r.request_id, r.step_name) for r in records]

    assert names(db.by_request_id("r1")) == [("r1", "s/one"), ("r1", "s/two")]
    assert names(db.by_tenant("b")) == [("r2", "s/one")]
    assert names(db.query(skill="s/one")) == [("r1", "s/one"), ("r2", "s/one")]
    assert names(db.query(status="failed")) == [("r1", "s/two")]
    assert names(db.since(t0 + timedelta(minutes=1))) == [("r1", "s/two"), ("r2", "s/one")]
    assert names(db.since((t0 + timedelta(minutes=1)).timestamp(), status="timeout")) == [
        ("r2", "s/one")]
    assert names(db.query(until=t0 + timedelta(minutes=1))) == [("r1", "s/one")]
    assert names(db.query(newest_first=True, limit=1)) == [("r2", "s/one")]
    assert db.count() == 3
    with pytest.raises(ValueError, match="aware datetime"):
        db.since(datetime(2026, 1, 1))


def test_sqlite_schema_is_versioned_indexed_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    SqliteExecutionLogger(path).close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SCHEMA_VERSION,)]
        indexed = {row[0] for row in conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}
        for columns in ("(request_id)", "(tenant_id, ts)", "(step_name, ts)", "(ts)"):
            assert any(sql.endswith(columns) for sql in indexed), columns
        SqliteExecutionLogger(path).close()  # reopening does not add a version row
        assert conn.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
        conn.execute("INSERT INTO schema_version VALUES (99, 'later')")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(SchemaError, match="schema version 99 is newer"):
        SqliteExecutionLogger(path)  # a newer schema is refused, not misread


def test_sqlite_is_readable_from_a_second_connection_while_open(
        db: SqliteExecutionLogger) -> None:
    db.log_step(_rec("r1", status="success"))
    reader = SqliteExecutionLogger(db.path)
    try:
        assert [r.request_id for r in reader.query()] == ["r1"]
    finally:
        reader.close()


_records = st.builds(
    ExecutionLogRecord,
    request_id=st.text(min_size=1, max_size=10),
    assistant_id=st.text(max_size=5), step_name=st.text(max_size=10),
    step_type=st.sampled_from(["skill", "tool", "plan"]),
    status=st.sampled_from(["success", "failed", "timeout", "canceled", "rejected"]),
    output=st.recursive(st.none() | st.booleans() | st.integers(-(2**62), 2**62) | st.text(),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                        max_leaves=6),
    error=st.text(max_size=20), duration_ms=st.floats(0, 1e9),
    timestamp=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                           timezones=st.just(UTC)),
    tenant_id=st.text(max_size=5), step_index=st.none() | st.integers(0, 100),
    cpu_ms=st.integers(0, 10**9), tokens=st.integers(0, 10**9))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_records)
def test_records_round_trip_through_json_and_sqlite(db: SqliteExecutionLogger,
                                                    record: ExecutionLogRecord) -> None:
    assert ExecutionLogRecord.from_json(record.to_json()) == record
    db.write(record)
    stored = db.query(newest_first=True, limit=1)[0]
    assert stored == record


# -- JSON Lines ----------------------------------------------------------------------------------


def test_jsonl_concurrent_writers_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    logger = JsonlExecutionLogger(path)
    barrier = threading.Barrier(8)

    def write(worker: int) -> None:
        barrier.wait(timeout=10)
        for index in range(250):
            logger.log_step(_rec(f"w{worker}-{index}", output={"pad": "y" * (index * 37 % 3000)}))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    logger.close()
    records = read_jsonl(path)
    assert len(records) == 2000
    assert {r.request_id for r in records} == {f"w{w}-{i}" for w in range(8) for i in range(250)}


def test_jsonl_reader_skips_a_partial_last_line_and_names_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    with JsonlExecutionLogger(path) as logger:
        logger.log_step(_rec("r1"))
    with open(path, "ab") as handle:
        handle.write(b'{"request_id": "r2", "st')
    assert [r.request_id for r in read_jsonl(path)] == ["r1"]
    path.write_bytes(b'{"request_id": "r1"}\nnot json\n{"request_id": "r3"}\n')
    with pytest.raises(ValueError, match="line 2 is not an execution log record"):
        read_jsonl(path)


def test_jsonl_uses_the_seed_field_names(tmp_path: Path) -> None:
    import json

    path = tmp_path / "log.jsonl"
    with JsonlExecutionLogger(path) as logger:
        logger.log_step(_rec("r1", assistant_id="a", step_name="s", status="success",
                             output=[1], error="", duration_ms=2.5))
    line = json.loads(path.read_text())
    for key in ("request_id", "assistant_id", "step_name", "step_type", "status", "output",
                "error", "duration_ms", "timestamp"):
        assert key in line
    assert line["timestamp"].endswith("Z")


# -- logging bridge and fan-out ------------------------------------------------------------------


def test_logging_bridge_levels_and_structured_extra(caplog: pytest.LogCaptureFixture) -> None:
    bridge = LoggingExecutionLogger("test.execution")
    with caplog.at_level(logging.INFO, logger="test.execution"):
        bridge.log_step(_rec("r1", step_name="s/ok", status="success", duration_ms=3))
        bridge.log_step(_rec("r2", step_name="s/bad", status="failed", error="ValueError: x"))
    ok, bad = caplog.records
    assert ok.levelno == logging.INFO and ok.getMessage() == "r1 skill s/ok success in 3.0 ms"
    assert bad.levelno == logging.WARNING and bad.getMessage().endswith(": ValueError: x")
    assert bad.execution["step_name"] == "s/bad"  # type: ignore[attr-defined]


def test_multi_logger_keeps_going_when_one_fails(tmp_path: Path) -> None:
    class Broken:
        def log_step(self, record: ExecutionLogRecord) -> None:
            raise OSError("nope")

    jsonl = JsonlExecutionLogger(tmp_path / "a.jsonl")
    fanout = MultiExecutionLogger(Broken(), jsonl)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="nope"):
        fanout.log_step(_rec("r1"))
    fanout.close()
    assert [r.request_id for r in read_jsonl(tmp_path / "a.jsonl")] == ["r1"]


# -- nothing is lost -----------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys
    from sandbox.execlog import ExecutionLogRecord, JsonlExecutionLogger, SqliteExecutionLogger

    kind, path = sys.argv[1], sys.argv[2]
    log = SqliteExecutionLogger(path) if kind == "sqlite" else JsonlExecutionLogger(path)
    index = 0
    while True:
        log.log_step(ExecutionLogRecord(request_id=f"r{index}", step_name="s", status="success",
                                        output={"i": index, "pad": "z" * (index % 500)}))
        sys.stdout.write(f"{index}\\n")
        sys.stdout.flush()
        index += 1
""")


def _acknowledged_then_killed(kind: str, path: Path, wanted: int) -> list[int]:
    """Run a writer, SIGKILL it once `wanted` records were acknowledged; every ack seen."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(path)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert writer.stdout is not None
    buffer = b""
    deadline = time.monotonic() + 30
    try:
        while buffer.count(b"\n") < wanted:
            ready, _, _ = select.select([writer.stdout], [], [], max(0.0,
                                                                     deadline - time.monotonic()))
            assert ready, "the writer acknowledged too little before the deadline"
            chunk = os.read(writer.stdout.fileno(), 65536)
            assert chunk, writer.stderr.read().decode() if writer.stderr else "writer died"
            buffer += chunk
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait(timeout=10)
        buffer += writer.stdout.read()  # acknowledgements still in the pipe count too
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=10)
        writer.stdout.close()
        if writer.stderr:
            writer.stderr.close()
    assert writer.returncode == -signal.SIGKILL
    complete = buffer[: buffer.rfind(b"\n") + 1]
    return [int(line) for line in complete.split()]


def test_sqlite_keeps_every_acknowledged_record_after_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    acknowledged = _acknowledged_then_killed("sqlite", path, wanted=300)
    assert len(acknowledged) >= 300
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    reader = SqliteExecutionLogger(path)
    try:
        stored = {record.request_id: record for record in reader.query(limit=None)}
    finally:
        reader.close()
    missing = [index for index in acknowledged if f"r{index}" not in stored]
    assert missing == []
    assert stored[f"r{acknowledged[-1]}"].output["i"] == acknowledged[-1]


def test_jsonl_keeps_every_acknowledged_record_after_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    acknowledged = _acknowledged_then_killed("jsonl", path, wanted=300)
    stored = {record.request_id for record in read_jsonl(path)}
    assert [index for index in acknowledged if f"r{index}" not in stored] == []


_V1_TABLE = """CREATE TABLE execution_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL, timestamp TEXT NOT NULL,
    request_id TEXT NOT NULL, assistant_id TEXT NOT NULL DEFAULT '',
    session_id TEXT NOT NULL DEFAULT '', tenant_id TEXT NOT NULL DEFAULT '',
    user_id TEXT NOT NULL DEFAULT '', step_name TEXT NOT NULL DEFAULT '',
    step_type TEXT NOT NULL DEFAULT '', step_index INTEGER, status TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '', output TEXT, output_truncated INTEGER NOT NULL DEFAULT 0,
    duration_ms REAL NOT NULL DEFAULT 0, cpu_ms INTEGER NOT NULL DEFAULT 0,
    memory_mb INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0)"""


def test_a_version_1_log_gains_the_error_kind_column_and_keeps_its_records(
        tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(f"""
        CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL);
        INSERT INTO schema_version VALUES (1, 'then');
        {_V1_TABLE};
        INSERT INTO execution_log (ts, timestamp, request_id, status)
            VALUES (1.0, '2026-01-01T00:00:00+00:00', 'old', 'failed');
    """)
    conn.close()
    db = SqliteExecutionLogger(path)
    try:
        assert db.schema_version() == SCHEMA_VERSION == 3
        db.log_step(_rec("new", status="failed", error_kind="skill_failed"))
        kinds = {record.request_id: record.error_kind for record in db.query()}
        assert kinds == {"old": "", "new": "skill_failed"}
    finally:
        db.close()


def test_a_version_2_log_gains_the_node_column_and_keeps_its_records(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path)
    conn.executescript(f"""
        CREATE TABLE schema_version (version INTEGER NOT NULL, applied_at TEXT NOT NULL);
        INSERT INTO schema_version VALUES (2, 'then');
        {_V1_TABLE};
        ALTER TABLE execution_log ADD COLUMN error_kind TEXT NOT NULL DEFAULT '';
        INSERT INTO execution_log (ts, timestamp, request_id, status, error_kind)
            VALUES (1.0, '2026-01-01T00:00:00+00:00', 'old', 'failed', 'timeout');
    """)
    conn.close()
    db = SqliteExecutionLogger(path)
    try:
        assert db.schema_version() == 3
        record = _rec("new")
        record.node = "host-a"
        db.log_step(record)
        got = {r.request_id: (r.error_kind, r.node) for r in db.query()}
        assert got == {"old": ("timeout", ""), "new": ("", "host-a")}
    finally:
        db.close()


def test_the_log_records_the_supervisor_s_verdict_not_the_skill_s_words(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        tmp_path: Path) -> None:
    db = SqliteExecutionLogger(tmp_path / "log.db")
    try:
        code = ("def run(input):\n"
                "    raise type('runtime', (Exception,), {})('circuit breaker open')\n")
        skill = Skill.from_dir(skill_dir(code))
        make_sandbox(skill, logger=db).execute(ExecutionRequest(skill_id=skill.id))
        [record] = db.query()
        assert "circuit breaker open" in record.error  # control: the skill's words are there
        assert record.error_kind == "skill_failed"
    finally:
        db.close()
