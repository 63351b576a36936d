"""`skill-sandbox` / `python -m sandbox`: every command has --help and --json, exit codes say
what happened, and errors are messages, not tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result
from daemon_util import EXAMPLES, ROOT, Daemon, wait_for, write_skill

from sandbox.cli import (
    EXIT_CANCELED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_REJECTED,
    EXIT_TIMEOUT,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    main,
)

ECHO = str(EXAMPLES / "echo")


@pytest.fixture(scope="module")
def skills_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli-skills")
    write_skill(root, "boom", "def run(input):\n    raise ValueError('no')\n")
    write_skill(root, "slow", "import time\n\ndef run(input):\n    time.sleep(10)\n",
                "[limits]\ntimeout = 0.5\n")
    write_skill(root, "sleeper", "import time\n\ndef run(input):\n    time.sleep(15)\n",
                "[limits]\ntimeout = 20\n")
    write_skill(root, "typed", "def run(input):\n    return input['n']\n",
                '[input_schema]\ntype = "object"\nrequired = ["n"]\n')
    return root


@pytest.fixture(scope="module")
def daemon(skills_root: Path) -> Iterator[Daemon]:
    item = Daemon([EXAMPLES / "echo", skills_root])
    try:
        yield item.start()
        assert item.stop() == 0
    finally:
        item.close()


def invoke(*args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False,
                              env={"SKILL_SANDBOX_SOCKET": None, "SKILL_SANDBOX_URL": None})


def _all_commands(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name, command in group.commands.items():
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from _all_commands(command, (*prefix, name))


COMMANDS = list(_all_commands(main))


@pytest.mark.parametrize("command", [(), *COMMANDS], ids=lambda c: " ".join(c) or "main")
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    result = invoke(*command, "--help")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: ")
    if command and not isinstance(main.commands.get(command[0]), click.Group):
        assert "--json" in result.output


def test_commands_cover_the_operators_needs() -> None:
    assert {("serve",), ("run",), ("exec",), ("skills", "list"), ("skills", "validate"),
            ("skills", "show"), ("status",), ("logs",), ("doctor",), ("bench",)} <= \
        set(COMMANDS)


def test_python_dash_m_sandbox_is_the_cli() -> None:
    result = subprocess.run([sys.executable, "-m", "sandbox", "--version"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0
    assert result.stdout.startswith("skill-sandbox ")


# -- run (in-process) ----------------------------------------------------------------------------


def test_run_prints_the_result_and_exits_0() -> None:
    result = invoke("run", ECHO, "--input", '{"hello": "world"}')
    assert result.exit_code == EXIT_OK
    assert "status    success" in result.output
    assert '"hello": "world"' in result.output


def test_run_json_is_the_api_result(tmp_path: Path) -> None:
    payload = tmp_path / "input.json"
    payload.write_text('{"from": "file"}')
    result = invoke("run", ECHO, "--input", f"@{payload}", "--json", "--request-id", "cli-1")
    data = json.loads(result.output)
    assert data["output"] == {"from": "file"} and data["request_id"] == "cli-1"
    assert data["status"] == "success"
    piped = invoke("run", ECHO, "--input", "-", "--json", stdin='[1, 2, 3]')
    assert json.loads(piped.output)["output"] == [1, 2, 3]


@pytest.mark.parametrize(("skill", "arguments", "code", "status"), [
    ("test/boom", [], EXIT_FAILED, "failed"),
    ("test/slow", [], EXIT_TIMEOUT, "timeout"),
    ("test/typed", ["--input", '{"m": 1}'], EXIT_REJECTED, "rejected"),
    ("test/typed", ["--input", '{"n": 7}'], EXIT_OK, "success"),
])
def test_run_exit_code_reflects_the_status(skills_root: Path, skill: str,
                                           arguments: list[str], code: int,
                                           status: str) -> None:
    result = invoke("run", skill, "--skills", str(skills_root), "--json", *arguments)
    assert result.exit_code == code
    assert json.loads(result.output)["status"] == status


def test_run_usage_errors_exit_2_with_a_message(skills_root: Path) -> None:
    bad_json = invoke("run", ECHO, "--input", "{nope")
    assert bad_json.exit_code == EXIT_USAGE and "not valid JSON" in bad_json.output
    missing = invoke("run", "test/absent", "--skills", str(skills_root))
    assert missing.exit_code == EXIT_USAGE
    assert "no skill 'test/absent'" in missing.output and "test/boom" in missing.output
    no_dirs = invoke("run", "test/boom")
    assert no_dirs.exit_code == EXIT_USAGE and "--skills" in no_dirs.output


# -- skills on disk ------------------------------------------------------------------------------


def test_skills_validate_names_file_and_field(tmp_path: Path) -> None:
    write_skill(tmp_path, "good", "def run(input):\n    return 1\n")
    bad = write_skill(tmp_path, "bad", "def run(input):\n    return 1\n")
    (bad / "skill.toml").write_text('id = "t/bad"\nentrypoint = "main:run"\n'
                                    "[limits]\ntimeout = -1\n")
    result = invoke("skills", "validate", str(tmp_path))
    assert result.exit_code == EXIT_FAILED
    assert "ok     test/good" in result.output
    assert f"{bad / 'skill.toml'}: field 'limits.timeout'" in result.output
    data = json.loads(invoke("skills", "validate", str(tmp_path), "--json").output)
    assert [item["id"] for item in data["valid"]] == ["test/good"]
    assert len(data["errors"]) == 1
    assert invoke("skills", "validate", ECHO).exit_code == EXIT_OK


def test_skills_list_and_show_from_disk(skills_root: Path) -> None:
    listing = invoke("skills", "list", "--dir", str(skills_root))
    assert listing.exit_code == EXIT_OK
    lines = listing.output.splitlines()
    assert lines[0].split()[:3] == ["ID", "VERSION", "KIND"]
    assert [line.split()[0] for line in lines[1:]] == ["test/boom", "test/sleeper", "test/slow",
                                                       "test/typed"]
    shown = json.loads(invoke("skills", "show", str(skills_root / "typed"), "--json").output)
    assert shown["input_schema"]["required"] == ["n"]
    human = invoke("skills", "show", str(skills_root / "slow"))
    assert "timeout=0.5" in human.output


# -- through the daemon --------------------------------------------------------------------------


def test_exec_status_skills_and_logs_through_the_daemon(daemon: Daemon) -> None:
    socket = str(daemon.socket)
    ran = invoke("exec", "examples/echo", "--socket", socket, "-i", '{"via": "daemon"}',
                 "--request-id", "cli-exec-1", "--tenant", "cli", "--json")
    assert ran.exit_code == EXIT_OK
    assert json.loads(ran.output)["output"] == {"via": "daemon"}
    failed = invoke("exec", "test/boom", "--socket", socket)
    assert failed.exit_code == EXIT_FAILED and "ValueError: no" in failed.output
    status = invoke("status", "--socket", socket)
    assert status.exit_code == EXIT_OK
    assert "ready      yes" in status.output and "examples/echo" in status.output
    data = json.loads(invoke("status", "--socket", socket, "--json").output)
    assert data["ready"] is True and data["pid"] == daemon.pid
    listing = json.loads(invoke("skills", "list", "--socket", socket, "--json").output)
    assert {skill["id"] for skill in listing["skills"]} >= {"examples/echo", "test/boom"}
    shown = invoke("skills", "show", "examples/echo", "--socket", socket)
    assert "zygote" in shown.output and "up" in shown.output
    logs = json.loads(invoke("logs", "--socket", socket, "--tenant", "cli", "--json").output)
    assert [record["request_id"] for record in logs["records"]] == ["cli-exec-1"]
    table = invoke("logs", "--socket", socket, "--request-id", "cli-exec-1")
    assert table.output.splitlines()[0].split()[:3] == ["TIME", "REQUEST", "SKILL"]
    assert "cli-exec-1" in table.output
    direct = json.loads(invoke("logs", "--db", str(daemon.exec_log), "--skill",
                               "examples/echo", "--since", "1h", "--json").output)
    assert "cli-exec-1" in [record["request_id"] for record in direct["records"]]
    reloaded = invoke("skills", "reload", "--socket", socket, "--json")
    assert reloaded.exit_code == EXIT_OK and json.loads(reloaded.output)["errors"] == []
    assert invoke("cancel", "nothing-running", "--socket", socket).exit_code == EXIT_FAILED


def test_exec_timeout_and_canceled_exit_codes(daemon: Daemon) -> None:
    socket = str(daemon.socket)
    timed_out = invoke("exec", "test/slow", "--socket", socket)
    assert timed_out.exit_code == EXIT_TIMEOUT
    assert "runtime: execution timeout" in timed_out.output
    command = [sys.executable, "-m", "sandbox", "exec", "test/sleeper", "--socket", socket,
               "--request-id", "cli-cancel", "--json"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        with daemon.client() as client:
            wait_for(lambda: client.status()["running"] == 1, what="the execution to run")
            cancel = invoke("cancel", "cli-cancel", "--socket", socket)
        output, _ = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert cancel.exit_code == EXIT_OK and "canceled" in cancel.output
    assert process.returncode == EXIT_CANCELED
    assert json.loads(output)["status"] == "canceled"


def test_no_daemon_exits_69_with_a_hint(tmp_path: Path) -> None:
    missing = str(tmp_path / "none.sock")
    for args in (["status"], ["exec", "examples/echo"], ["skills", "list"], ["logs"]):
        result = invoke(*args, "--socket", missing)
        assert result.exit_code == EXIT_UNAVAILABLE, args
        assert "is `skill-sandbox serve` running?" in result.output
    as_json = invoke("status", "--socket", missing, "--json")
    assert json.loads(as_json.output)["code"] == "daemon_unavailable"


# -- serve, doctor, bench ------------------------------------------------------------------------


def test_serve_check_prints_the_effective_config(tmp_path: Path) -> None:
    config = tmp_path / "daemon.toml"
    config.write_text("max_queue = 3\n[limits]\ntimeout = 9\n")
    result = invoke("serve", "--config", str(config), "--max-queue", "4", "--check", "--json")
    assert result.exit_code == EXIT_OK
    data = json.loads(result.output)
    assert data["max_queue"] == 4 and data["limits"]["timeout"] == 9.0
    bad = invoke("serve", "--config", str(config), "--grace-period", "-3", "--check")
    assert bad.exit_code == EXIT_USAGE and "flag --grace-period" in bad.output
    no_token = invoke("serve", "--tcp", "127.0.0.1:0", "--check", "--json")
    assert no_token.exit_code == EXIT_USAGE
    assert "refusing to listen on TCP" in json.loads(no_token.output)["error"]


def test_doctor_reports_the_isolation_layers() -> None:
    result = invoke("doctor", "--json")
    data = json.loads(result.output)
    assert data["layers"]
    assert all(set(layer) == {"name", "status", "detail"} for layer in data["layers"])
    assert {layer["status"] for layer in data["layers"]} <= {"active", "fallback",
                                                             "unavailable"}
    assert result.exit_code == (EXIT_OK if data["all_active"] else EXIT_FAILED)
    human = invoke("doctor")
    assert human.exit_code == result.exit_code
    assert "layers:" in human.output


def test_bench_forwards_its_arguments() -> None:
    result = CliRunner().invoke(main, ["bench", "--", "--latency-runs", "0"])
    assert result.exit_code == 2  # the harness's own argument check answered


def test_the_installed_command_finds_the_harness_of_its_checkout(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "skill-sandbox"
    done = subprocess.run([str(script), "bench", "--", "--latency-runs", "0"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done.stderr  # the harness's own argument check answered
    assert "--latency-runs" in done.stderr


def test_bench_outside_a_checkout_says_it_is_not_shipped(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sandbox.cli

    assert sandbox.cli._benchmarks(tmp_path) is None
    assert sandbox.cli._benchmarks(ROOT) is not None  # control: a checkout has it
    monkeypatch.setattr(sandbox.cli, "_benchmarks", lambda: None)
    result = invoke("bench")
    assert result.exit_code == EXIT_FAILED
    assert "not shipped in the wheel" in result.output


def test_serve_without_the_daemon_extra_says_what_to_install(tmp_path: Path) -> None:
    script = ("import sys\n{block}from sandbox.cli import main\n"
              "main(['serve', '--check', '--socket', sys.argv[1]])\n")
    socket = str(tmp_path / "s.sock")
    blocked = subprocess.run(
        [sys.executable, "-c", script.format(block="sys.modules['starlette'] = None\n"), socket],
        capture_output=True, text=True, timeout=60, check=False)
    assert blocked.returncode == EXIT_UNAVAILABLE, blocked.stderr
    assert "pip install 'skill-sandbox[daemon]'" in blocked.stderr
    assert "Traceback" not in blocked.stderr
    plain = subprocess.run([sys.executable, "-c", script.format(block=""), socket],
                           capture_output=True, text=True, timeout=60, check=False)
    assert plain.returncode == EXIT_OK, plain.stderr  # control: with it, the check passes


TERMINAL_TRICKS = ("import sys\n"
                   "def run(input):\n"
                   "    sys.stdout.write('\\x1b]52;c;cm0gLXJmIH4=\\x07out\\n')\n"
                   "    sys.stderr.write('\\x1b[2K\\rstatus    success\\n')\n"
                   "    raise ValueError('\\x1b[1A\\x1b[2Kstatus    success\\u202e')\n")


def test_run_never_passes_a_skill_s_terminal_escapes_to_the_terminal(tmp_path: Path) -> None:
    skill = tmp_path / "tricks"
    skill.mkdir()
    (skill / "main.py").write_text(TERMINAL_TRICKS)
    (skill / "skill.toml").write_text('id = "test/tricks"\nversion = "0.1.0"\n'
                                      'entrypoint = "main:run"\n')
    skill.chmod(0o755)
    as_json = invoke("run", str(skill), "--json")
    raw = json.loads(as_json.output)
    assert "\x1b" in raw["stdout"] and "\x1b" in raw["stderr"]  # control: the skill wrote them
    shown = invoke("run", str(skill))
    assert shown.exit_code == EXIT_FAILED
    assert "\x1b" not in shown.output and "\u202e" not in shown.output
    assert "\\u001b" in shown.output  # visible, as an escape
    assert "status    failed" in shown.output
