"""`python -m sandbox.demo` (what `make run` calls): every example runs, the table shows each
one's status, usage and output or error, and the exit status says whether all of them ran."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sandbox import ExecutionResult, ExecutionStatus, ResourceUsage, Skill
from sandbox.demo import Row, format_table, main, slowed

EXAMPLES = Path(__file__).resolve().parent.parent / "skills_examples"


def table_rows(output: str) -> dict[str, list[str]]:
    rows = {}
    for line in output.splitlines()[2:]:
        if not line.strip():
            break
        cells = line.split(maxsplit=6)
        rows[cells[0]] = cells
    return rows


def test_demo_runs_every_example_and_shows_how_each_ended(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(EXAMPLES), "--max-concurrency", "2"]) == 0
    output = capsys.readouterr().out
    assert output.splitlines()[0].split()[:6] == ["skill", "status", "ms", "cpu", "ms", "mem"]
    rows = table_rows(output)
    expected_failures = {
        "misbehaving/cpu_hog": "runtime: resource exhausted: cpu time",
        "misbehaving/memory_hog": "runtime: resource exhausted: memory",
        "misbehaving/fork_bomb": "runtime: resource exhausted: processes",
        "misbehaving/output_flood": "runtime: resource exhausted: output",
    }
    assert len(rows) >= 14
    for skill_id, cells in rows.items():
        if skill_id in expected_failures:
            assert cells[1] == "failed", cells
            assert cells[6].startswith(expected_failures[skill_id]), cells
        else:
            assert cells[1] == "success", cells
    assert rows["text/token_counter"][5] == "7"
    assert rows["math/fib"][6] == '{"n":27,"fib":196418}'
    assert int(rows["misbehaving/cpu_hog"][3]) >= 1000
    assert "examples in" in output.splitlines()[-1] and "4 failed" in output.splitlines()[-1]


def test_demo_fails_when_an_example_input_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(EXAMPLES / "echo", tmp_path / "echo")
    shutil.copytree(EXAMPLES / "fib", tmp_path / "fib")
    (tmp_path / "fib" / "example.json").unlink()
    assert main([str(tmp_path)]) == 1
    rows = table_rows(capsys.readouterr().out)
    assert rows["examples/echo"][1] == "success"
    assert rows["math/fib"][1:3] == ["not", "run"]
    assert "example.json: cannot read" in rows["math/fib"][-1]


def test_demo_reports_a_broken_skill_and_exits_1(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "skill.toml").write_text('id = "BAD"\nentrypoint = "main:run"\n')
    assert main([str(tmp_path)]) == 1
    assert "field 'id'" in capsys.readouterr().err


def test_table_is_aligned_and_cuts_long_output_to_one_line() -> None:
    long_error = "ValueError: " + "very long\nmulti-line " * 40
    rows = [
        Row("a/short", ExecutionResult(status=ExecutionStatus.SUCCESS, output=b'{"x":1}',
                                       duration=0.0123,
                                       resource_usage=ResourceUsage(cpu_time_ms=5,
                                                                    memory_mb=1))),
        Row("a/much.longer_id", ExecutionResult(status=ExecutionStatus.FAILED,
                                                error=long_error, duration=1.5)),
        Row("a/none", None, "no example"),
    ]
    lines = format_table(rows, width=100).splitlines()
    assert len(lines) == 5
    assert all(len(line) <= 100 for line in lines)
    status_column = lines[0].index("status")
    assert [line[status_column:].split()[0] for line in (lines[2], lines[3], lines[4])] == [
        "success", "failed", "not"]
    assert lines[2].split()[2] == "12.3"
    assert lines[3].endswith("…") and "\n" not in lines[3]
    assert lines[4].endswith("no example")


def test_slowdown_multiplies_each_example_s_wall_and_cpu_limits_only() -> None:
    skill = Skill.from_dir(Path(__file__).resolve().parent.parent / "skills_examples" / "cpu_hog")
    scaled = slowed(skill, 10).manifest.limits
    limits = skill.manifest.limits
    assert (scaled.timeout, scaled.cpu_time) == (limits.timeout * 10, limits.cpu_time * 10)
    assert (scaled.memory_mb, scaled.max_processes) == (limits.memory_mb, limits.max_processes)
    assert slowed(skill, 1) is skill
