"""`Sandbox.execute`: every outcome is a result with the status and error prefix of DESIGN.md's
table; typed inputs, the context, tokens, captured output, fresh workdirs, spawn mode, command
skills, zygote restarts and `close()` behave as a caller running untrusted code expects."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import (
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    InvalidInput,
    Sandbox,
    Skill,
    SkillFailed,
    SkillNotLoaded,
)
from sandbox.capabilities import IsolationConfig
from tests.conftest import (
    descendants,
    execution_children,
    execution_survivors,
    wait_until_gone,
)

Run = Callable[..., ExecutionResult]


def request(skill: Skill | str, data: bytes | str = b"{}", **fields: object) -> ExecutionRequest:
    payload = data.encode() if isinstance(data, str) else data
    skill_id = skill.id if isinstance(skill, Skill) else skill
    return ExecutionRequest(skill_id=skill_id, input=payload, **fields)  # type: ignore[arg-type]


# -- success and the skill's own failures -------------------------------------------------------


def test_echo_returns_its_input_with_usage_and_ids(make_sandbox: Callable[..., Sandbox],
                                                   example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo)
    result = sandbox.execute(request(echo, '{"message": "hi", "n": [1, 2]}',
                                     request_id="req-1"))
    assert result.status is ExecutionStatus.SUCCESS
    assert result.json() == {"message": "hi", "n": [1, 2]}
    assert result.error == ""
    assert result.request_id == "req-1" and result.skill_id == "examples/echo"
    assert result.duration > 0
    assert result.resource_usage.cpu_time_ms >= 0 and result.resource_usage.memory_mb >= 0
    assert result.raise_for_status() is result


def test_skill_that_raises_is_failed_with_the_exception(run_skill: Run) -> None:
    result = run_skill("def run(input):\n    raise ValueError('n must be positive')\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "ValueError: n must be positive"
    assert "Traceback" in result.stderr and "n must be positive" in result.stderr
    with pytest.raises(SkillFailed, match="ValueError: n must be positive"):
        result.raise_for_status()


def test_skill_that_exits_without_a_result_is_failed(run_skill: Run) -> None:
    result = run_skill("import os\ndef run(input):\n    os._exit(5)\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "skill exited with status 5 without a result"


def test_skill_that_crashes_is_failed_naming_the_signal(run_skill: Run) -> None:
    # A real fault: the kernel's SIGSEGV reaches even a PID namespace's pid 1, which ignores
    # one it sends itself (with the default action).
    result = run_skill("import ctypes\n"
                       "def run(input):\n    ctypes.string_at(0)\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "skill was killed by SIGSEGV without a result"


def test_sys_exit_in_a_skill_is_a_failure_not_an_exit(run_skill: Run) -> None:
    result = run_skill("import sys\ndef run(input):\n    sys.exit(3)\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error == "SystemExit: 3"


def test_import_error_in_the_skill_module_is_failed(run_skill: Run) -> None:
    result = run_skill("import no_such_module_here\ndef run(input):\n    return 1\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("ModuleNotFoundError: No module named 'no_such_module_here'")


def test_return_value_that_is_not_json_is_failed(run_skill: Run) -> None:
    result = run_skill("def run(input):\n    return object()\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid output:")
    assert "not JSON-serialisable" in result.error


def test_async_entrypoint_is_awaited(run_skill: Run) -> None:
    code = "import asyncio\nasync def run(input):\n    await asyncio.sleep(0)\n    return input\n"
    assert run_skill(code, '{"a": 1}').json() == {"a": 1}


# -- rejection before any worker runs -----------------------------------------------------------


def test_unknown_skill_is_rejected_as_not_loaded(make_sandbox: Callable[..., Sandbox]) -> None:
    sandbox = make_sandbox()
    result = sandbox.execute(request("nobody/home"))
    assert result.status is ExecutionStatus.REJECTED
    assert result.error == "runtime: skill not loaded"
    assert not sandbox.can_execute("nobody/home")
    with pytest.raises(SkillNotLoaded, match=r"^runtime: skill not loaded$"):
        result.raise_for_status()


def test_unloaded_skill_is_rejected_and_its_zygote_stops(make_sandbox: Callable[..., Sandbox],
                                                         example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo)
    assert sandbox.can_execute(echo.id)
    zygote_pid = sandbox.zygote_info(echo.id)["pid"]
    sandbox.unload_skill(echo.id)
    assert not sandbox.can_execute(echo.id)
    assert sandbox.execute(request(echo)).error == "runtime: skill not loaded"
    assert not wait_until_gone({zygote_pid})
    with pytest.raises(KeyError, match="not loaded"):
        sandbox.unload_skill(echo.id)


def test_input_schema_mismatch_is_rejected_naming_the_field(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    code = "def run(input):\n    return input\n"
    skill = Skill.from_dir(skill_dir(code, '[input_schema]\ntype = "object"\n'
                                           'required = ["n"]\n'
                                           'properties.n = { type = "integer" }'))
    sandbox = make_sandbox(skill)
    result = sandbox.execute(request(skill, '{"n": "seven"}'))
    assert result.status is ExecutionStatus.REJECTED
    assert result.error.startswith("runtime: invalid input: input does not match input_schema")
    assert "$.n" in result.error and "'seven' is not of type 'integer'" in result.error
    with pytest.raises(InvalidInput):
        result.raise_for_status()
    missing = sandbox.execute(request(skill, "{}"))
    assert missing.status is ExecutionStatus.REJECTED
    assert "'n' is a required property" in missing.error
    assert sandbox.execute(request(skill, '{"n": 7}')).ok


def test_input_that_is_not_json_is_rejected(run_skill: Run) -> None:
    result = run_skill("def run(input):\n    return input\n", b"{nope")
    assert result.status is ExecutionStatus.REJECTED
    assert result.error.startswith("runtime: invalid input: input is not JSON")


@pytest.mark.parametrize("timeout", [0, -1.5])
def test_non_positive_request_timeout_is_rejected(run_skill: Run, timeout: float) -> None:
    result = run_skill("def run(input):\n    return 1\n", timeout=timeout)
    assert result.status is ExecutionStatus.REJECTED
    assert "timeout must be positive" in result.error


def test_output_schema_mismatch_is_failed_naming_the_field(run_skill: Run) -> None:
    result = run_skill("def run(input):\n    return {'count': 'many'}\n",
                       manifest_extra='[output_schema]\ntype = "object"\n'
                                      'properties.count = { type = "integer" }')
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid output: output does not match output_schema")
    assert "$.count" in result.error
    assert result.output == b""


# -- typed input ---------------------------------------------------------------------------------


def test_struct_typed_input_is_converted(make_sandbox: Callable[..., Sandbox],
                                         example: Callable[[str], Skill]) -> None:
    word_count = example("word_count")
    sandbox = make_sandbox(word_count)
    result = sandbox.execute(request(word_count, '{"text": "a b a\\nc", "top": 1}'))
    assert result.json() == {"words": 4, "lines": 2, "chars": 7, "most_common": [["a", 2]]}


@pytest.mark.parametrize(("data", "field"), [('{"text": 5}', "$.text"),
                                             ('{"top": 1}', "`text`"),
                                             ('{"text": "x", "top": "many"}', "$.top")])
def test_struct_typed_input_mismatch_is_failed_naming_the_field(
        make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill], data: str,
        field: str) -> None:
    word_count = example("word_count")
    result = make_sandbox(word_count).execute(request(word_count, data))
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid input:")
    assert field in result.error


def test_pydantic_typed_input_and_output(make_sandbox: Callable[..., Sandbox],
                                         example: Callable[[str], Skill]) -> None:
    temperature = example("temperature")
    sandbox = make_sandbox(temperature, isolation=IsolationConfig(trusted_preload=("pydantic",)))
    result = sandbox.execute(request(temperature, '{"value": 212, "unit": "F"}'))
    assert result.json() == {"value": 100.0, "unit": "C"}
    bad = sandbox.execute(request(temperature, '{"value": "hot", "unit": "F"}'))
    assert bad.status is ExecutionStatus.FAILED
    assert bad.error.startswith("invalid input:") and "value" in bad.error
    wrong_unit = sandbox.execute(request(temperature, '{"value": 1, "unit": "X"}'))
    assert wrong_unit.status is ExecutionStatus.FAILED and "unit" in wrong_unit.error


# -- the context and tokens ---------------------------------------------------------------------

CONTEXT = """\
import os
def run(input, ctx):
    return {"request_id": ctx.request_id, "tenant_id": ctx.tenant_id, "user_id": ctx.user_id,
            "skill_id": ctx.skill_id, "workdir": ctx.workdir, "cwd": os.getcwd(),
            "deadline": ctx.deadline, "time_left": ctx.time_left()}
"""


def test_context_carries_ids_workdir_and_deadline(run_skill: Run) -> None:
    before = time.time()
    result = run_skill(CONTEXT, timeout=7.0, request_id="r-42", tenant_id="acme",
                       user_id="ada")
    after = time.time()
    ctx = result.json()
    assert (ctx["request_id"], ctx["tenant_id"], ctx["user_id"]) == ("r-42", "acme", "ada")
    assert ctx["skill_id"] == result.skill_id
    assert ctx["workdir"] == ctx["cwd"]
    assert before + 7.0 - 1 <= ctx["deadline"] <= after + 7.0
    assert 0 < ctx["time_left"] <= 7.0


def test_report_tokens_lands_in_tokens_used(run_skill: Run) -> None:
    code = "def run(input, ctx):\n    ctx.report_tokens(5)\n    ctx.report_tokens(37)\n" \
           "    return 'ok'\n"
    result = run_skill(code)
    assert result.ok
    assert result.resource_usage.tokens_used == 42


def test_tokens_reported_before_a_failure_still_count(run_skill: Run) -> None:
    code = "def run(input, ctx):\n    ctx.report_tokens(9)\n    raise RuntimeError('late')\n"
    result = run_skill(code)
    assert result.status is ExecutionStatus.FAILED
    assert result.resource_usage.tokens_used == 9


@pytest.mark.parametrize("count", ["-1", "1.5", "True"])
def test_report_tokens_rejects_nonsense(run_skill: Run, count: str) -> None:
    result = run_skill(f"def run(input, ctx):\n    ctx.report_tokens({count})\n")
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("ValueError: report_tokens needs a non-negative int")


def test_token_counter_example_reports_its_tokens(make_sandbox: Callable[..., Sandbox],
                                                  example: Callable[[str], Skill]) -> None:
    skill = example("token_counter")
    result = make_sandbox(skill).execute(request(skill, '{"text": "a bb  ccc\\nd"}'))
    assert result.json() == {"tokens": 4}
    assert result.resource_usage.tokens_used == 4


# -- captured output -----------------------------------------------------------------------------


def test_stdout_and_stderr_are_captured_separately(run_skill: Run) -> None:
    code = "import sys\ndef run(input):\n    print('to stdout')\n" \
           "    print('to stderr', file=sys.stderr)\n    return 1\n"
    result = run_skill(code)
    assert result.ok and result.json() == 1
    assert result.stdout == "to stdout\n"
    assert result.stderr == "to stderr\n"


def test_captured_output_keeps_a_bounded_tail(make_sandbox: Callable[..., Sandbox],
                                              skill_dir: Callable[..., Path]) -> None:
    code = ("import sys\ndef run(input):\n"
            "    for i in range(2000):\n"
            "        print(f'line {i:05d}')\n"
            "        print(f'err {i:05d}', file=sys.stderr)\n"
            "    return 'done'\n")
    skill = Skill.from_dir(skill_dir(code))
    result = make_sandbox(skill, tail_bytes=1024).execute(request(skill))
    assert result.ok
    assert 0 < len(result.stdout) <= 1024 and 0 < len(result.stderr) <= 1024
    assert result.stdout.endswith("line 01999\n") and "line 00000" not in result.stdout
    assert result.stderr.endswith("err 01999\n")


# -- workdirs, environment and freshness ---------------------------------------------------------


def test_each_execution_gets_a_fresh_workdir_removed_afterwards(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        tmp_path: Path) -> None:
    code = ("import os\ndef run(input):\n"
            "    seen = sorted(os.listdir('.'))\n"
            "    with open('scratch.txt', 'w') as f:\n        f.write('x' * 1000)\n"
            "    return {'cwd': os.getcwd(), 'seen': seen}\n")
    skill = Skill.from_dir(skill_dir(code))
    root = tmp_path / "workdirs"
    sandbox = make_sandbox(skill, workdir_root=str(root))
    first, second = (sandbox.execute(request(skill)).json() for _ in range(2))
    assert first["seen"] == [] and second["seen"] == []
    assert first["cwd"] != second["cwd"]
    for cwd in (first["cwd"], second["cwd"]):
        assert Path(cwd).parent == root
        assert not Path(cwd).exists()
    assert list(root.iterdir()) == []


def test_workdir_is_removed_after_a_timeout_too(make_sandbox: Callable[..., Sandbox],
                                                skill_dir: Callable[..., Path],
                                                tmp_path: Path) -> None:
    code = "import time\ndef run(input):\n    open('left', 'w').write('x')\n    time.sleep(60)\n"
    skill = Skill.from_dir(skill_dir(code))
    root = tmp_path / "workdirs"
    result = make_sandbox(skill, workdir_root=str(root)).execute(request(skill, timeout=0.5))
    assert result.status is ExecutionStatus.TIMEOUT
    assert list(root.iterdir()) == []


def test_a_tmpfs_workdir_leaves_no_directory_on_the_host_even_while_it_runs(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        tmp_path: Path) -> None:
    """With the mount namespace layer the zygote makes each execution's directory on a tmpfs of
    its own namespace (no mkdir/rmdir on the host's disk per execution): the running skill has
    its workdir, with its file in it, and the host's workdir root stays empty throughout."""
    code = ("import os, time\ndef run(input):\n"
            "    open('marker', 'w').write('here')\n    time.sleep(30)\n")
    skill = Skill.from_dir(skill_dir(code))
    root = tmp_path / "workdirs"
    sandbox = make_sandbox(skill, workdir_root=str(root))
    if not sandbox._plan.workdir_bytes:
        pytest.skip("no mount namespace here: the workdir is a directory on the host's disk")
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])
    runner = threading.Thread(target=sandbox.execute, args=(request(skill, timeout=10),))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        seen = ""
        while not seen and time.monotonic() < deadline:
            for child in execution_children(zygote):
                try:
                    with open(f"/proc/{child.pid}/cwd/marker") as marker:
                        seen, cwd = marker.read(), os.readlink(f"/proc/{child.pid}/cwd")
                except OSError:
                    continue
            time.sleep(0.01)
        assert seen == "here"  # control: the skill runs in its workdir and wrote its file
        assert Path(cwd).parent == root
        assert not Path(cwd).exists()
        assert list(root.iterdir()) == []
    finally:
        for child in execution_children(zygote):
            child.kill()
        runner.join(timeout=15)
    assert list(root.iterdir()) == []


def test_no_state_survives_between_executions(make_sandbox: Callable[..., Sandbox],
                                              skill_dir: Callable[..., Path]) -> None:
    code = ("import os, sys\nCOUNTER = []\n"
            "def run(input):\n"
            "    COUNTER.append(1)\n"
            "    planted = hasattr(sys, 'planted_by_skill') or 'PLANTED' in os.environ\n"
            "    sys.planted_by_skill = True\n"
            "    os.environ['PLANTED'] = '1'\n"
            "    return {'counter': len(COUNTER), 'planted': planted,\n"
            "            'pid': os.readlink('/proc/self')}\n")
    skill = Skill.from_dir(skill_dir(code))
    sandbox = make_sandbox(skill)
    results = [sandbox.execute(request(skill)).json() for _ in range(3)]
    assert [r["counter"] for r in results] == [1, 1, 1]
    assert not any(r["planted"] for r in results)
    assert len({r["pid"] for r in results}) == 3


def test_environment_is_scrubbed_and_manifest_env_is_passed(
        run_skill: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPERVISOR_SECRET", "hunter2")
    code = "import os\ndef run(input):\n    return dict(os.environ)\n"
    env = run_skill(code, manifest_extra='[permissions]\nenv = { GREETING = "hello" }').json()
    assert "SUPERVISOR_SECRET" not in env
    assert "hunter2" not in repr(env)
    assert env["GREETING"] == "hello"
    assert env["HOME"] == env["TMPDIR"]


# -- spawn mode ---------------------------------------------------------------------------------


def test_spawn_skill_runs_in_a_fresh_interpreter(make_sandbox: Callable[..., Sandbox],
                                                 example: Callable[[str], Skill]) -> None:
    skill = example("spawn_info")
    result = make_sandbox(skill).execute(request(skill, '{"name": "spawned"}'))
    assert result.ok, result.error
    output = result.json()
    assert output["started_as"] == "worker.spawn"
    assert output["in_workdir"] is True
    assert output["greeting"] == "hello, spawned"


def test_spawn_skill_failure_and_timeout(run_skill: Run, make_sandbox: Callable[..., Sandbox],
                                         skill_dir: Callable[..., Path]) -> None:
    failing = run_skill("def run(input):\n    raise KeyError('k')\n",
                        manifest_extra='isolation = "spawn"')
    assert failing.status is ExecutionStatus.FAILED and failing.error == "KeyError: 'k'"
    sleeper = Skill.from_dir(skill_dir("import time\ndef run(input):\n    time.sleep(60)\n",
                                       'isolation = "spawn"'))
    result = make_sandbox(sleeper).execute(request(sleeper, timeout=1.0))
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error.startswith("runtime: execution timeout")


# -- command skills -----------------------------------------------------------------------------


def command_skill(directory: Path, command: str, script: str | None = None,
                  extra: str = "") -> Skill:
    directory.mkdir()
    if script is not None:
        path = directory / "prog.sh"
        path.write_text(script)
        path.chmod(0o755)
    (directory / "skill.toml").write_text(f'id = "cmd/{directory.name}"\ncommand = {command}\n'
                                          f"{extra}\n")
    return Skill.from_dir(directory)


def test_shell_command_example_counts_with_wc(make_sandbox: Callable[..., Sandbox],
                                              example: Callable[[str], Skill]) -> None:
    wc = example("wc_command")
    sandbox = make_sandbox(wc)
    result = sandbox.execute(request(wc, '{"text": "one two\\nthree"}'))
    assert result.ok, result.error
    assert result.json() == {"lines": 2, "words": 3, "bytes": 13}
    bad = sandbox.execute(request(wc, '{"other": 1}'))
    assert bad.status is ExecutionStatus.FAILED
    assert bad.error == 'command exited with status 2: wc: input needs a "text" string'


def test_command_on_path_reads_stdin_and_answers_on_stdout(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    cat = command_skill(tmp_path / "cat", '["cat"]')
    result = make_sandbox(cat).execute(request(cat, '{"same": [1, 2, 3]}'))
    assert result.ok and result.json() == {"same": [1, 2, 3]}


def test_command_printing_non_json_is_failed(make_sandbox: Callable[..., Sandbox],
                                             tmp_path: Path) -> None:
    skill = command_skill(tmp_path / "text", '["./prog.sh"]', "#!/bin/sh\necho not json\n")
    result = make_sandbox(skill).execute(request(skill))
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid output: stdout is not JSON")


def test_command_output_is_checked_against_output_schema(make_sandbox: Callable[..., Sandbox],
                                                         tmp_path: Path) -> None:
    skill = command_skill(tmp_path / "schema", '["./prog.sh"]', "#!/bin/sh\necho '[1]'\n",
                          '[output_schema]\ntype = "object"')
    result = make_sandbox(skill).execute(request(skill))
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("invalid output: output does not match output_schema")


def test_command_obeys_the_timeout_and_its_children_die(make_sandbox: Callable[..., Sandbox],
                                                        tmp_path: Path) -> None:
    skill = command_skill(tmp_path / "slow", '["./prog.sh"]',
                          "#!/bin/sh\nsleep 60 &\necho started >&2\nsleep 60\n")
    sandbox = make_sandbox(skill)
    result = sandbox.execute(request(skill, timeout=0.5))
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error.startswith("runtime: execution timeout")
    assert result.stderr == "started\n"
    assert not execution_survivors(sandbox)


# -- zygotes and the sandbox's own lifecycle ----------------------------------------------------


def test_killed_zygote_is_restarted_on_the_next_execute(make_sandbox: Callable[..., Sandbox],
                                                        example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo)
    assert sandbox.execute(request(echo, '{"n": 1}')).ok
    first = sandbox.zygote_info(echo.id)
    os.kill(first["pid"], signal.SIGKILL)
    assert not wait_until_gone({first["pid"]})
    result = sandbox.execute(request(echo, '{"n": 2}'))
    assert result.ok and result.json() == {"n": 2}
    second = sandbox.zygote_info(echo.id)
    assert second["pid"] != first["pid"] and second["starts"] == first["starts"] + 1
    assert second["alive"]


def test_zygote_killed_mid_execution_gives_a_failed_result(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    code = "import time\ndef run(input):\n    time.sleep(5)\n"
    skill = Skill.from_dir(skill_dir(code, "[limits]\ntimeout = 5"))
    sandbox = make_sandbox(skill)
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])

    def kill_zygote_once_running() -> None:  # from outside: the skill itself may not
        deadline = time.monotonic() + 5
        while not execution_children(zygote) and time.monotonic() < deadline:
            time.sleep(0.01)
        zygote.kill()

    killer = threading.Thread(target=kill_zygote_once_running)
    killer.start()
    result = sandbox.execute(request(skill))
    killer.join()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith("runtime: worker failure")
    again = Skill.from_dir(skill_dir("def run(input):\n    return 'fine'\n"))
    sandbox.load_skill(again)
    assert sandbox.execute(request(again)).json() == "fine"


def test_reloading_a_skill_replaces_its_zygote(make_sandbox: Callable[..., Sandbox],
                                               example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo)
    old_pid = sandbox.zygote_info(echo.id)["pid"]
    sandbox.load_skill(example("echo"))
    assert sandbox.zygote_info(echo.id)["pid"] != old_pid
    assert not wait_until_gone({old_pid})
    assert sandbox.execute(request(echo, "[1]")).json() == [1]


def test_broken_skill_fails_to_load_with_the_reason(make_sandbox: Callable[..., Sandbox],
                                                    skill_dir: Callable[..., Path]) -> None:
    sandbox = make_sandbox(isolation=IsolationConfig(trusted_preload=("no_such_preload",)))
    broken = skill_dir("def run(input):\n    return 1\n", 'preload = ["no_such_preload"]')
    with pytest.raises(Exception, match="no_such_preload"):
        sandbox.load_skill(broken, warm=True)
    syntax = skill_dir("def run(input:\n")
    with pytest.raises(Exception, match="SyntaxError"):
        sandbox.load_skill(syntax, warm=True)
    assert sandbox.skills() == []


def test_close_kills_running_executions_and_leaves_no_process(
        example: Callable[[str], Skill], skill_dir: Callable[..., Path]) -> None:
    import threading

    before = {p.pid for p in descendants()}
    sleeper = Skill.from_dir(skill_dir("import time\ndef run(input):\n    time.sleep(60)\n"))
    sandbox = Sandbox([example("echo"), example("fib"), sleeper])
    results: list[ExecutionResult] = []
    worker = threading.Thread(target=lambda: results.append(
        sandbox.execute(request(sleeper, request_id="long"))))
    worker.start()
    zygote = psutil.Process(sandbox.zygote_info(sleeper.id)["pid"])
    deadline = time.monotonic() + 5
    while not execution_children(zygote) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert execution_children(zygote), "the execution never started"
    sandbox.close()
    worker.join(timeout=10)
    assert not worker.is_alive()
    assert results[0].status is ExecutionStatus.CANCELED
    assert not wait_until_gone({p.pid for p in descendants()} - before)
    assert not sandbox.can_execute("examples/echo")
    assert sandbox.execute(request("examples/echo")).error == "runtime: skill not loaded"
    with pytest.raises(RuntimeError, match="closed"):
        sandbox.load_skill(example("echo"))
    sandbox.close()  # idempotent


def test_context_manager_closes_the_sandbox(example: Callable[[str], Skill]) -> None:
    with Sandbox([example("echo")]) as sandbox:
        pid = sandbox.zygote_info("examples/echo")["pid"]
        assert sandbox.execute(request("examples/echo", "1")).json() == 1
    assert not wait_until_gone({pid})
    assert not sandbox.can_execute("examples/echo")


# -- the examples --------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "data", "expected"), [
    ("json_transform", '{"records": [{"a": 1, "b": 2}], "pick": ["a"], "rename": {"a": "x"}}',
     {"records": [{"x": 1}]}),
    ("fib", '{"n": 20}', {"n": 20, "fib": 6765}),
    ("openbotstack_reverse", '{"text": "abc def", "by": "chars"}', {"text": "fed cba"}),
    ("sleepy", '{"seconds": 0.05}', {"requested": 0.05, "slept": 0.05, "cut_short": False}),
])
def test_examples_compute_their_answers(make_sandbox: Callable[..., Sandbox],
                                        example: Callable[[str], Skill], name: str, data: str,
                                        expected: object) -> None:
    skill = example(name)
    result = make_sandbox(skill).execute(request(skill, data))
    assert result.ok, result.error
    output = result.json()
    if name == "sleepy":
        assert output["slept"] >= 0.05
        output["slept"] = 0.05
    assert output == expected


def test_sleepy_stops_at_its_deadline_instead_of_being_killed(
        make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill]) -> None:
    skill = example("sleepy")
    result = make_sandbox(skill).execute(request(skill, '{"seconds": 30}', timeout=0.6))
    assert result.ok, result.error
    output = result.json()
    assert output["cut_short"] is True and output["slept"] < 0.6


def test_fib_rejects_an_input_outside_its_schema(make_sandbox: Callable[..., Sandbox],
                                                 example: Callable[[str], Skill]) -> None:
    fib = example("fib")
    result = make_sandbox(fib).execute(request(fib, '{"n": 99}'))
    assert result.status is ExecutionStatus.REJECTED
    assert "$.n" in result.error


# -- large inputs and leftovers ------------------------------------------------------------------


def test_large_input_round_trips_through_the_pipes(make_sandbox: Callable[..., Sandbox],
                                                  example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    payload = ('{"blob": "' + "x" * 700_000 + '"}').encode()
    result = make_sandbox(echo).execute(request(echo, payload))
    assert result.ok, result.error
    assert result.output == payload.replace(b" ", b"")


def test_command_that_never_reads_its_input_is_fine(make_sandbox: Callable[..., Sandbox],
                                                    tmp_path: Path) -> None:
    skill = command_skill(tmp_path / "noread", '["./prog.sh"]', "#!/bin/sh\necho '{}'\n")
    payload = ('{"blob": "' + "x" * 500_000 + '"}').encode()
    result = make_sandbox(skill).execute(request(skill, payload))
    assert result.ok, result.error
    assert result.json() == {}


def test_descendants_left_by_a_successful_execution_are_killed(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    code = ("import os, sys, time\ndef run(input):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        os.setsid()\n"
            "        if os.fork():\n"
            "            os._exit(0)\n"
            "        print('escaped', file=sys.stderr, flush=True)\n"
            "        time.sleep(60)\n"  # holds stdout/stderr open, outside the process group
            "        os._exit(0)\n"
            "    os.waitpid(pid, 0)\n"
            "    time.sleep(0.1)\n"
            "    return 'done'\n")
    skill = Skill.from_dir(skill_dir(code))
    sandbox = make_sandbox(skill)
    result = sandbox.execute(request(skill))
    assert result.ok, result.error
    assert result.json() == "done"
    assert not execution_survivors(sandbox)
    assert sandbox.execute(request(skill)).ok


def test_default_workdir_root_is_private_and_removed_by_close(
        example: Callable[[str], Skill]) -> None:
    first, second = Sandbox([example("echo")]), Sandbox()
    try:
        assert first.workdir_root != second.workdir_root
        assert first.execute(request("examples/echo", "1")).ok
        assert Path(first.workdir_root).is_dir()
    finally:
        first.close()
        second.close()
    assert not Path(first.workdir_root).exists()
    assert not Path(second.workdir_root).exists()


def test_a_given_workdir_root_is_left_in_place(make_sandbox: Callable[..., Sandbox],
                                              example: Callable[[str], Skill],
                                              tmp_path: Path) -> None:
    sandbox = make_sandbox(example("echo"), workdir_root=str(tmp_path / "mine"))
    assert sandbox.execute(request("examples/echo", "1")).ok
    sandbox.close()
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
