"""Skill-chosen data that tries to make the supervisor work: catastrophic schema regexes, deeply
nested output, floods of cheap values against an output schema, and token counts past SQLite's
integers. Each must end as a bounded, logged result; none may raise out of `execute`."""

from __future__ import annotations

import http.server
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import msgspec
import pytest

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from sandbox.errors import SkillLoadError
from sandbox.execlog import JsonlExecutionLogger, SqliteExecutionLogger
from sandbox.jsonbounds import MAX_JSON_DEPTH
from sandbox.schema import SCHEMA_STEP_BUDGET
from tests.security.hostile import Hostile
from worker.protocol import MAX_TOKENS

#: A regex that backtracks exponentially in Python's `re` on a run of "a" and one mismatch.
EVIL = "^(a+)+$"
EVIL_TEXT = "a" * 40 + "!"

FORGE = """
    from worker.protocol import ChildResult, encode_frame

    def attack(input):
        os.write(3, encode_frame(ChildResult(ok=True, output={output!r}, tokens_used={tokens})))
        os._exit(0)
"""


def forge(output: bytes, tokens: int = 0) -> str:
    """Skill code writing a forged result frame carrying `output` straight to the result fd."""
    return FORGE.format(output=output, tokens=tokens)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def python_is_killed_for_cpu(code: str) -> bool:
    """Control: `code` run by plain Python in a subprocess limited to 1 s of CPU never
    finishes (killed for CPU) — a fact about the work, not about wall time."""

    def limit_cpu() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (1, 2))

    proc = subprocess.run([sys.executable, "-"], input=code.encode(), preexec_fn=limit_cpu,
                          timeout=30, capture_output=True, check=False)
    return proc.returncode in (-signal.SIGXCPU, -signal.SIGKILL)


def python_re_is_catastrophic(pattern: str, text: str) -> bool:
    """Control: the same search with Python's `re` exhausts a CPU budget."""
    return python_is_killed_for_cpu(f"import re; re.search({pattern!r}, {text!r})")


# -- regexes from the skill's own schema ---------------------------------------------------------

REGEX_SCHEMAS = {  # keyword: (schema, hostile output, honest output)
    "pattern": ('{ type = "string", pattern = "^(a+)+$" }', EVIL_TEXT, "aaaa"),
    "patternProperties": ('{ type = "object", patternProperties = { "^(a+)+$" = '
                          '{ type = "string" } } }', {EVIL_TEXT: 1, "aa": 1}, {"aa": "x"}),
    "additionalProperties": ('{ type = "object", patternProperties = { "^(a+)+$" = {} }, '
                             "additionalProperties = false }", {EVIL_TEXT: 1}, {"aa": 1}),
    "propertyNames": ('{ type = "object", propertyNames = { pattern = "^(a+)+$" } }',
                      {EVIL_TEXT: 1}, {"aa": 1}),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("keyword", list(REGEX_SCHEMAS))
def test_catastrophic_schema_regex_is_matched_in_linear_time(
        hostile: Callable[..., Hostile], keyword: str) -> None:
    schema, value, honest = REGEX_SCHEMAS[keyword]
    assert python_re_is_catastrophic(EVIL, EVIL_TEXT)  # control: `re` would stall the supervisor
    attack = hostile("""
        def attack(input):
            return input["value"]
    """, manifest_extra=f"output_schema = {schema}")
    result = attack.run(value=value)
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error.startswith("invalid output: output does not match output_schema"), \
        result.error
    assert attack.run(value=honest).json() == honest


@pytest.mark.timeout(30)
def test_catastrophic_input_schema_regex_does_not_stall_admission(
        hostile: Callable[..., Hostile]) -> None:
    """The caller's input is validated with the skill author's schema too."""
    attack = hostile("""
        def attack(input):
            return "ran"
    """, manifest_extra='input_schema = { type = "object", properties = { text = '
                        '{ type = "string", pattern = "^(a+)+$" } } }')
    result = attack.run(text=EVIL_TEXT)
    assert result.status is ExecutionStatus.REJECTED
    assert "input does not match input_schema" in result.error, result.error
    assert attack.run(text="aaaa").json() == "ran"


@pytest.mark.parametrize("pattern", [r"^(a)\1$", "^(?=a)a$", "^(?<!b)a$"])
def test_schema_regex_re2_cannot_compile_is_refused_at_load(
        skill_dir: Callable[..., Path], pattern: str) -> None:
    re.compile(pattern)  # control: Python's engine takes it (and would backtrack on it)
    directory = skill_dir("def run(input):\n    return 'x'\n",
                          f"output_schema = {{ type = 'string', pattern = '{pattern}' }}")
    with pytest.raises(SkillLoadError) as caught:
        Skill.from_dir(directory)
    message = str(caught.value)
    assert "skill.toml" in message and "output_schema" in message and "RE2" in message, message


def test_pattern_property_key_re2_cannot_compile_is_refused_at_load(
        skill_dir: Callable[..., Path]) -> None:
    directory = skill_dir("def run(input):\n    return {}\n",
                          'input_schema = { type = "object", patternProperties = '
                          '{ "^(a)\\\\1$" = {} } }')
    with pytest.raises(SkillLoadError, match=r"input_schema.*RE2"):
        Skill.from_dir(directory)


# -- nesting -------------------------------------------------------------------------------------


@pytest.mark.parametrize("schema", ["", 'output_schema = { type = "array" }'])
def test_deeply_nested_output_is_a_logged_failure(hostile: Callable[..., Hostile],
                                                  tmp_path: Path, schema: str) -> None:
    deep = nested(50_000)
    with pytest.raises(RecursionError):  # control: the plain decoder recurses and gives up
        msgspec.json.decode(deep)
    log = SqliteExecutionLogger(tmp_path / "log.db")
    attack = hostile(forge(deep), manifest_extra=schema, logger=log)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED, result
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in result.error, result.error
    assert result.output == b""
    assert [r.status for r in log.by_request_id(result.request_id)] == ["failed"]
    if not schema:
        attack.assert_still_serving()


@pytest.mark.parametrize("depth,ok", [(MAX_JSON_DEPTH, True), (MAX_JSON_DEPTH + 1, False)])
def test_output_nesting_bound_is_exact(hostile: Callable[..., Hostile], depth: int,
                                       ok: bool) -> None:
    output = b'{"a": ' * (depth - 1) + b'["]]]][[[", "\\"["]' + b"}" * (depth - 1)
    attack = hostile(forge(output), manifest_extra='output_schema = { type = "object" }')
    result = attack.run()
    assert result.ok is ok, result
    if ok:
        assert result.output == output


def test_deeply_nested_command_stdout_is_a_logged_failure(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    directory = tmp_path / "deep"
    directory.mkdir()
    (directory / "skill.toml").write_text(
        'id = "test/deep-command"\ncommand = ["python3", "-c", '
        '"import sys; sys.stdout.write(\'[\' * 50000 + \']\' * 50000)"]\n')
    log = SqliteExecutionLogger(tmp_path / "log.db")
    sandbox = make_sandbox(Skill.from_dir(directory), logger=log)
    result = sandbox.execute(ExecutionRequest(skill_id="test/deep-command"))
    assert result.status is ExecutionStatus.FAILED, result
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in result.error, result.error
    assert log.count() == 1


def test_deeply_nested_caller_input_is_rejected_not_raised(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            return "ran"
    """, manifest_extra='input_schema = { type = "array" }')
    result = attack.sandbox.execute(ExecutionRequest(skill_id=attack.skill.id,
                                                     input=nested(50_000)))
    assert result.status is ExecutionStatus.REJECTED
    assert f"nested deeper than {MAX_JSON_DEPTH} levels" in result.error, result.error


def test_deeply_nested_schema_is_refused_at_load(skill_dir: Callable[..., Path]) -> None:
    schema = "{ items = " * 200 + "{}" + " }" * 200
    directory = skill_dir("def run(input):\n    return 'x'\n", f"output_schema = {schema}")
    with pytest.raises(SkillLoadError, match=r"output_schema.*nested deeper"):
        Skill.from_dir(directory)


@pytest.mark.parametrize("name,text", [
    ("skill.toml", 'id = "t/deep"\nentrypoint = "main:run"\nx = ' + "[" * 5000 + "1" + "]" * 5000),
    ("manifest.yaml", 'id: t/deep\nentrypoint: "main:run"\noutput_schema: '
     + "[" * 5000 + "1" + "]" * 5000),
])
def test_manifest_nested_past_the_parser_is_a_load_error(tmp_path: Path, name: str,
                                                         text: str) -> None:
    (tmp_path / name).write_text(text + "\n")
    (tmp_path / "main.py").write_text("def run(input):\n    return 1\n")
    with pytest.raises(SkillLoadError, match="nested too deeply"):
        Skill.from_dir(tmp_path)


# -- schemas that make the check itself expensive ------------------------------------------------

FLOAT_FLOOD = b"[" + b",".join([b"0.1234567890123456789"] * 45_000) + b"]"


def test_float_flood_against_output_schema_stops_at_the_step_budget(
        hostile: Callable[..., Hostile], tmp_path: Path) -> None:
    schema = 'output_schema = { type = "array", items = { type = "number" } }'
    steps = 0
    plain_type = jsonschema.Draft202012Validator.VALIDATORS["type"]

    def counted_type(*args: Any) -> Any:
        nonlocal steps
        steps += 1
        return plain_type(*args)

    counting = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft202012Validator, {"type": counted_type})
    plain = counting({"type": "array", "items": {"type": "number"}})
    assert not list(plain.iter_errors(msgspec.json.decode(FLOAT_FLOOD)))
    assert steps > 2 * SCHEMA_STEP_BUDGET  # control: unbounded, one step per element
    log = SqliteExecutionLogger(tmp_path / "log.db")
    attack = hostile(forge(FLOAT_FLOOD), manifest_extra=schema, logger=log)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED, result
    assert f"more than {SCHEMA_STEP_BUDGET} steps" in result.error, result.error
    assert log.count() == 1


def test_exponential_ref_schema_stops_at_the_step_budget(skill_dir: Callable[..., Path],
                                                          make_sandbox: Callable[..., Sandbox]
                                                          ) -> None:
    """A small schema whose `$ref`s fan out 2^30 ways ("billion laughs")."""
    defs = ", ".join(f'd{i} = {{ allOf = [{{ "$ref" = "#/$defs/d{i + 1}" }}, '
                     f'{{ "$ref" = "#/$defs/d{i + 1}" }}] }}' for i in range(30))
    directory = skill_dir("def run(input):\n    return 1\n",
                          f'output_schema = {{ "$ref" = "#/$defs/d0", "$defs" = {{ {defs}, '
                          "d30 = { type = 'integer' } } }")
    skill = Skill.from_dir(directory)
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    assert result.status is ExecutionStatus.FAILED
    assert f"more than {SCHEMA_STEP_BUDGET} steps" in result.error, result.error


def test_self_referencing_schema_is_a_failure_not_a_recursion_error(
        skill_dir: Callable[..., Path], make_sandbox: Callable[..., Sandbox]) -> None:
    directory = skill_dir("def run(input):\n    return 1\n", 'output_schema = { "$ref" = "#" }')
    skill = Skill.from_dir(directory)
    with pytest.raises(RecursionError):  # control: jsonschema alone recurses until it dies
        list(jsonschema.Draft202012Validator({"$ref": "#"}).iter_errors(1))
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid output: "), result.error


def test_remote_ref_in_schema_is_never_fetched(skill_dir: Callable[..., Path],
                                               make_sandbox: Callable[..., Sandbox]) -> None:
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"type": "integer"}')

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/schema.json"
        directory = skill_dir("def run(input):\n    return 1\n",
                              f'output_schema = {{ "$ref" = "{url}" }}')
        skill = Skill.from_dir(directory)
        result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert hits == []
    assert result.status is ExecutionStatus.FAILED
    assert "Unresolvable" in result.error or "cannot resolve" in result.error, result.error


def test_unique_items_on_a_large_array_is_linear(hostile: Callable[..., Hostile]) -> None:
    """jsonschema's fallback for unsortable items compares every pair (n² for 20 000 objects)."""
    output = b"[" + b",".join(b'{"a": %d}' % i for i in range(20_000)) + b"]"
    control = ("import jsonschema, msgspec; jsonschema.Draft202012Validator({'uniqueItems': True})"
               f".validate(msgspec.json.decode({output!r}))")
    assert python_is_killed_for_cpu(control)
    attack = hostile(forge(output), manifest_extra='output_schema = { uniqueItems = true }')
    result = attack.run()
    assert result.ok, result
    duplicate = hostile(forge(b'[{"a": [1]}, {"a": [1.0]}]'),
                        manifest_extra='output_schema = { uniqueItems = true }').run()
    assert not duplicate.ok and "has non-unique elements" in duplicate.error, duplicate


# -- concurrency: a flood must not stall an honest execution -------------------------------------


@pytest.mark.timeout(60)
def test_flooding_output_checks_do_not_stall_a_concurrent_honest_execution(
        skill_dir: Callable[..., Path], make_sandbox: Callable[..., Sandbox]) -> None:
    schema = 'output_schema = { type = "array", items = { type = "number" } }'
    flood = Skill.from_dir(skill_dir(
        "import os\nfrom worker.protocol import ChildResult, encode_frame\n"
        "def run(input):\n"
        "    flood = b'[' + b','.join([b'0'] * 500_000) + b']'\n"
        "    os.write(3, encode_frame(ChildResult(ok=True, output=flood)))\n"
        "    os._exit(0)\n", schema, skill_id="test/flood"))
    honest = Skill.from_dir(skill_dir("def run(input):\n    return [1.5, 2.5]\n", schema,
                                      skill_id="test/honest"))
    sandbox = make_sandbox(flood, honest, max_concurrency=4)
    judging_cpu: list[float] = []
    flood_results = []

    def flood_loop() -> None:
        for _ in range(3):
            started = time.thread_time()  # the supervisor thread's own CPU, not wall time
            flood_results.append(sandbox.execute(ExecutionRequest(skill_id="test/flood")))
            judging_cpu.append(time.thread_time() - started)

    threads = [threading.Thread(target=flood_loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    honest_results = [sandbox.execute(ExecutionRequest(skill_id="test/honest"))
                      for _ in range(5)]
    for thread in threads:
        thread.join(timeout=50)
    assert all(r.ok and r.json() == [1.5, 2.5] for r in honest_results), honest_results
    assert len(flood_results) == 6
    assert all(f"more than {SCHEMA_STEP_BUDGET} steps" in r.error for r in flood_results)
    # Unbounded, each flood cost ~5 s of supervisor CPU (one schema step per element).
    assert max(judging_cpu) < 1.0, judging_cpu


# -- tokens --------------------------------------------------------------------------------------


def test_sqlite_cannot_store_a_64_bit_token_count(tmp_path: Path) -> None:
    """Control for the token tests: the plain insert overflows."""
    conn = sqlite3.connect(tmp_path / "plain.db")
    conn.execute("CREATE TABLE t (tokens INTEGER)")
    with pytest.raises(OverflowError):
        conn.execute("INSERT INTO t VALUES (?)", (2**64 - 1,))
    conn.close()


@pytest.mark.parametrize("calls", [[2**64 - 1], [2**53 - 1, 2**53 - 1], [2**53 - 1, 1]])
def test_huge_token_reports_are_bounded_and_logged(skill_dir: Callable[..., Path],
                                                   make_sandbox: Callable[..., Sandbox],
                                                   tmp_path: Path, calls: list[int]) -> None:
    code = ("def run(input, ctx):\n"
            "    refused = 0\n"
            f"    for count in {calls!r}:\n"
            "        try:\n"
            "            ctx.report_tokens(count)\n"
            "        except ValueError:\n"
            "            refused += 1\n"
            "    return {'tokens': ctx.tokens_used, 'refused': refused}\n")
    skill = Skill.from_dir(skill_dir(code))
    log = SqliteExecutionLogger(tmp_path / "log.db")
    jsonl = JsonlExecutionLogger(tmp_path / "log.jsonl")
    from sandbox.execlog import MultiExecutionLogger

    sandbox = make_sandbox(skill, logger=MultiExecutionLogger(log, jsonl))
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id))
    assert result.ok, result
    reported = result.json()
    assert reported["tokens"] <= MAX_TOKENS
    assert result.resource_usage.tokens_used == reported["tokens"]
    if calls[0] > MAX_TOKENS:
        assert reported["refused"] == 1
    else:
        assert reported["tokens"] == MAX_TOKENS  # saturates
    assert [r.tokens for r in log.by_request_id(result.request_id)] == [reported["tokens"]]


@pytest.mark.parametrize("tokens", [2**64 - 1, 2**63, -(2**63)])
def test_forged_token_count_is_clamped_and_logged(hostile: Callable[..., Hostile],
                                                  tmp_path: Path, tokens: int) -> None:
    log = SqliteExecutionLogger(tmp_path / "log.db")
    attack = hostile(forge(b'"ok"', tokens), logger=log)
    result = attack.run()
    assert result.ok, result
    assert 0 <= result.resource_usage.tokens_used <= MAX_TOKENS
    records = log.by_request_id(result.request_id)
    assert [r.tokens for r in records] == [result.resource_usage.tokens_used]


def test_record_that_cannot_be_stored_as_is_is_stored_clamped(tmp_path: Path) -> None:
    """Any logger built on RecordLogger: a field SQLite refuses is clamped, never dropped."""
    from sandbox.execlog import ExecutionLogRecord

    log = SqliteExecutionLogger(tmp_path / "log.db")
    log.log_step(ExecutionLogRecord(request_id="r1", tokens=2**64 - 1, cpu_ms=2**70,
                                    step_index=-(2**80), output=[[1]] * 3))
    (record,) = log.by_request_id("r1")
    assert record.tokens == 2**63 - 1 and record.cpu_ms == 2**63 - 1
    assert record.step_index == -(2**63)


# -- everything that carries an output onwards ---------------------------------------------------


def test_daemon_response_with_a_deep_output_is_encodable() -> None:
    """A result may come from anywhere (a client, a plan): its JSON rendering never raises."""
    from sandbox.daemon.schemas import result_to_json
    from worker.protocol import ExecutionResult

    deep = nested(50_000)
    with pytest.raises(RecursionError):  # control: the plain decode the response used
        msgspec.json.decode(deep)
    body = msgspec.json.encode(result_to_json(
        ExecutionResult(status=ExecutionStatus.SUCCESS, output=deep)))
    assert msgspec.json.decode(body)["output"].startswith("[[[")


def test_log_record_for_a_deep_python_output_is_built_and_stored(tmp_path: Path) -> None:
    from sandbox.execlog import ExecutionLogRecord, bounded_output, read_jsonl

    deep: list[object] = []
    for _ in range(5_000):
        deep = [deep]
    with pytest.raises(RecursionError):  # control: encoding it as it is
        msgspec.json.encode(deep)
    preview, truncated = bounded_output(deep, 4096)
    assert truncated and "nested deeper" in preview
    log = JsonlExecutionLogger(tmp_path / "log.jsonl")
    log.log_step(ExecutionLogRecord(request_id="deep", output=deep))
    log.close()
    (record,) = read_jsonl(tmp_path / "log.jsonl")
    assert record.request_id == "deep" and record.output_truncated
