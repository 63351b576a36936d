"""Limits: wall time, CPU, memory, output, processes and file size each end the execution with
the status and error of DESIGN.md's table, the whole tree dies, and the usage the supervisor
reports (measured from outside the child) is close to the truth."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import (
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ExecutionTimeout,
    ResourceExhausted,
    Sandbox,
    Skill,
)
from tests.conftest import execution_survivors, slow

Run = Callable[..., ExecutionResult]
EXHAUSTED = "runtime: resource exhausted"


def run_example(make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill],
                name: str, data: bytes | None = None) -> ExecutionResult:
    skill = example(name)
    payload = data if data is not None else (skill.path / "example.json").read_bytes()
    return make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id, input=payload))


def assert_exhausted(result: ExecutionResult, which: str) -> None:
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error.startswith(f"{EXHAUSTED}: {which}"), result.error
    assert result.output == b""
    with pytest.raises(ResourceExhausted):
        result.raise_for_status()


# -- wall time ----------------------------------------------------------------------------------


def test_manifest_timeout_ends_a_sleeping_skill(run_skill: Run) -> None:
    result = run_skill("import time\ndef run(input):\n    time.sleep(60)\n",
                       manifest_extra="[limits]\ntimeout = 0.5")
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error.startswith("runtime: execution timeout")
    assert result.duration >= 0.5
    with pytest.raises(ExecutionTimeout):
        result.raise_for_status()


def test_request_timeout_overrides_the_manifest(run_skill: Run) -> None:
    result = run_skill("import time\ndef run(input):\n    time.sleep(60)\n",
                       manifest_extra="[limits]\ntimeout = 60", timeout=0.3)
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error == "runtime: execution timeout after 0.3s"


def test_timeout_ends_a_skill_that_ignores_signals(run_skill: Run) -> None:
    code = ("import signal, time\ndef run(input):\n"
            "    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM, signal.SIGHUP):\n"
            "        signal.signal(s, signal.SIG_IGN)\n"
            "    while True:\n        time.sleep(0.01)\n")
    result = run_skill(code, timeout=0.5)
    assert result.status is ExecutionStatus.TIMEOUT


def test_timeout_kills_descendants_that_left_the_process_group(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    code = ("import os, sys, time\ndef run(input):\n"
            "    for _ in range(3):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            os.setsid()\n"
            "            if os.fork():\n"  # double fork: the grandchild is orphaned at once
            "                os._exit(0)\n"
            "            print('escaped', file=sys.stderr, flush=True)\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "        if os.waitpid(pid, 0)[1] == 0:\n"  # its fork worked: a grandchild left
            "            print('forked', file=sys.stderr, flush=True)\n"
            "    time.sleep(60)\n")
    skill = Skill.from_dir(skill_dir(code))
    sandbox = make_sandbox(skill)
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, timeout=1.0))
    assert result.status is ExecutionStatus.TIMEOUT
    # Control: three grandchildren left the process group (each one's parent said so); the
    # zygote may already have killed some as orphans, and none may outlive the execution.
    assert result.stderr.split().count("forked") == 3, result.stderr
    assert not execution_survivors(sandbox)


# -- CPU ----------------------------------------------------------------------------------------


def test_cpu_hog_is_stopped_at_its_cpu_limit(make_sandbox: Callable[..., Sandbox],
                                             example: Callable[[str], Skill]) -> None:
    result = run_example(make_sandbox, example, "cpu_hog")
    assert_exhausted(result, "cpu time")
    assert result.resource_usage.cpu_time_ms >= 1000


def test_cpu_is_limited_across_the_whole_tree(run_skill: Run) -> None:
    # Three busy processes: each alone stays under its own 1 s RLIMIT_CPU for a while, the
    # tree's total passes 1 s first.
    code = ("import os, signal\ndef run(input):\n"
            "    signal.signal(signal.SIGXCPU, signal.SIG_IGN)\n"
            "    for _ in range(2):\n"
            "        if os.fork() == 0:\n"
            "            while True:\n                pass\n"
            "    while True:\n        pass\n")
    result = run_skill(code, manifest_extra=f"[limits]\ncpu_time = 1\ntimeout = {slow(10)}")
    assert_exhausted(result, "cpu time")


def test_cpu_time_of_a_half_second_busy_loop_is_measured_within_15_percent(
        run_skill: Run) -> None:
    # The loop scales with the host's slowness, so the execution's fixed set-up CPU (an
    # emulated VM spends ten times more on it) stays as small a part of it as here.
    busy = slow(0.5)
    code = ("import time\ndef run(input):\n"
            "    start = time.process_time()\n"
            f"    while time.process_time() - start < {busy}:\n        pass\n"
            "    return time.process_time() - start\n")
    result = run_skill(code, manifest_extra=f"[limits]\ncpu_time = {slow(5)}\n"
                                            f"timeout = {slow(30)}")
    assert result.ok, result.error
    assert busy * 850 <= result.resource_usage.cpu_time_ms <= busy * 1150, result.resource_usage


def test_cpu_time_of_reaped_children_is_counted(run_skill: Run) -> None:
    code = ("import os, time\ndef run(input):\n"
            "    pid = os.fork()\n"
            "    if pid == 0:\n"
            "        start = time.process_time()\n"
            "        while time.process_time() - start < 0.4:\n            pass\n"
            "        os._exit(0)\n"
            "    os.waitpid(pid, 0)\n"
            "    return 'ok'\n")
    result = run_skill(code)
    assert result.ok, result.error
    assert 340 <= result.resource_usage.cpu_time_ms <= 520, result.resource_usage


# -- memory -------------------------------------------------------------------------------------


def test_memory_hog_is_stopped_at_its_memory_limit(make_sandbox: Callable[..., Sandbox],
                                                   example: Callable[[str], Skill]) -> None:
    result = run_example(make_sandbox, example, "memory_hog")
    assert_exhausted(result, "memory")
    assert result.resource_usage.memory_mb <= 64 + 16


def test_memory_is_limited_across_the_whole_tree(run_skill: Run) -> None:
    # Each process stays under its own RLIMIT_DATA (64 MB); together they hold 120 MB.
    code = ("import os, time\ndef run(input):\n"
            "    for _ in range(3):\n"
            "        if os.fork() == 0:\n"
            "            block = bytearray(40 << 20)\n"
            "            block[::4096] = b'x' * ((40 << 20) // 4096)\n"
            "            time.sleep(60)\n"
            "            os._exit(0)\n"
            "    time.sleep(60)\n")
    result = run_skill(code, manifest_extra="[limits]\nmemory_mb = 64\ntimeout = 10")
    assert_exhausted(result, "memory")


def test_peak_memory_of_200_mb_is_measured_within_10_percent(run_skill: Run) -> None:
    code = ("def run(input):\n"
            "    size = 200 << 20\n"
            "    block = bytearray(size)\n"
            "    block[::4096] = b'x' * (size // 4096)\n"
            "    return len(block)\n")
    result = run_skill(code, manifest_extra="[limits]\nmemory_mb = 400")
    assert result.ok, result.error
    assert 180 <= result.resource_usage.memory_mb <= 220, result.resource_usage


def test_memory_error_raised_inside_the_skill_is_reported_as_the_memory_limit(
        run_skill: Run) -> None:
    result = run_skill("def run(input):\n    return len(bytearray(1 << 30))\n",
                       manifest_extra="[limits]\nmemory_mb = 32")
    assert_exhausted(result, "memory")


# -- output ---------------------------------------------------------------------------------------


def test_output_flood_is_stopped_at_the_output_cap(make_sandbox: Callable[..., Sandbox],
                                                   example: Callable[[str], Skill]) -> None:
    result = run_example(make_sandbox, example, "output_flood")
    assert_exhausted(result, "output: stdout exceeds 65536 bytes")
    assert 0 < len(result.stdout) <= 8192  # the tail, not the flood


def test_stderr_flood_is_stopped_too(run_skill: Run) -> None:
    code = "import os\ndef run(input):\n    while True:\n        os.write(2, b'e' * 4096)\n"
    result = run_skill(code, manifest_extra="[limits]\nmax_output_bytes = 10000")
    assert_exhausted(result, "output: stderr exceeds 10000 bytes")


def test_result_larger_than_the_cap_is_exhausted_output(run_skill: Run) -> None:
    result = run_skill("def run(input):\n    return 'x' * 50000\n",
                       manifest_extra="[limits]\nmax_output_bytes = 10000")
    assert_exhausted(result, "output")
    assert "limit is 10000" in result.error


def test_command_stdout_flood_is_stopped(make_sandbox: Callable[..., Sandbox],
                                         tmp_path: Path) -> None:
    directory = tmp_path / "yes"
    directory.mkdir()
    (directory / "skill.toml").write_text('id = "cmd/yes"\ncommand = ["yes"]\n'
                                          "[limits]\nmax_output_bytes = 100000\n")
    skill = Skill.from_dir(directory)
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    assert_exhausted(result, "output: stdout exceeds 100000 bytes")


# -- processes ----------------------------------------------------------------------------------


def test_fork_bomb_is_stopped_at_its_process_limit(make_sandbox: Callable[..., Sandbox],
                                                   example: Callable[[str], Skill]) -> None:
    result = run_example(make_sandbox, example, "fork_bomb")
    assert_exhausted(result, "processes")


def test_threads_count_against_the_process_limit(run_skill: Run) -> None:
    # 12 thread stacks fit the default data limit: the tree watch is what stops them.
    code = ("import threading, time\ndef run(input):\n"
            "    for _ in range(12):\n"
            "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "    time.sleep(60)\n")
    result = run_skill(code, manifest_extra="[limits]\nmax_processes = 8\ntimeout = 5")
    assert_exhausted(result, "processes")


def test_thread_that_cannot_start_is_exhausted_threads(run_skill: Run) -> None:
    # Thread stacks (8 MB each) count against the data limit long before 200 threads run.
    code = ("import threading, time\ndef run(input):\n"
            "    for _ in range(200):\n"
            "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n")
    result = run_skill(code, manifest_extra="[limits]\nmax_processes = 1000\nmemory_mb = 32\n"
                                            "timeout = 5")
    assert_exhausted(result, "threads: RuntimeError: can't start new thread")


def test_processes_within_the_limit_are_fine(run_skill: Run) -> None:
    code = ("import os\ndef run(input):\n"
            "    pids = [os.fork() or os._exit(0) for _ in range(3)]\n"
            "    return [os.waitpid(pid, 0)[1] for pid in pids]\n")
    result = run_skill(code, manifest_extra="[limits]\nmax_processes = 8")
    assert result.ok and result.json() == [0, 0, 0]


# -- file size ----------------------------------------------------------------------------------


def test_file_past_the_size_limit_is_exhausted_file_size(run_skill: Run) -> None:
    code = ("def run(input):\n"
            "    with open('big.bin', 'wb') as f:\n"
            "        f.write(b'x' * (2 << 20))\n")
    result = run_skill(code, manifest_extra="[limits]\nmax_file_bytes = 1048576")
    assert_exhausted(result, "file size")


def test_command_writing_past_the_size_limit_is_exhausted_file_size(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    directory = tmp_path / "dd"
    directory.mkdir()
    (directory / "skill.toml").write_text(
        'id = "cmd/dd"\ncommand = ["dd", "if=/dev/zero", "of=big", "bs=1M", "count=4"]\n'
        "[limits]\nmax_file_bytes = 1000000\n")
    skill = Skill.from_dir(directory)
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    assert_exhausted(result, "file size")


def test_files_within_the_size_limit_are_fine(run_skill: Run) -> None:
    code = ("import os\ndef run(input):\n"
            "    with open('ok.bin', 'wb') as f:\n"
            "        f.write(b'x' * 1000)\n"
            "    return os.path.getsize('ok.bin')\n")
    result = run_skill(code, manifest_extra="[limits]\nmax_file_bytes = 4096")
    assert result.ok and result.json() == 1000
