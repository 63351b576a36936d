"""Attacks on shared resources: processes, threads, memory, CPU, time, disk and output."""

from __future__ import annotations

import os
from collections.abc import Callable

from sandbox import ErrorKind, ExecutionStatus
from sandbox.capabilities import IsolationConfig
from tests.conftest import slow
from tests.security.hostile import EXHAUSTED, LIMITS, Hostile, requires


@requires("processes")
def test_fork_bomb_hits_the_process_limit_and_dies(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            while True:
                try:
                    os.fork()
                except OSError:
                    pass
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: processes"), result.error
    attack.assert_still_serving()


@requires("processes")
def test_thread_bomb_hits_the_task_limit(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        import threading

        def attack(input):
            while True:
                threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(EXHAUSTED), result.error
    assert "processes" in result.error or "threads" in result.error, result.error
    attack.assert_still_serving()


#: Without cgroups the process cap is RLIMIT_NPROC (max_processes + 2) in the execution's own
#: uid (as root) or user namespace (an ordinary user), and the tree watch kills past
#: max_processes. A skill that starts children and then fails is judged by that alone.
_NO_CGROUPS = IsolationConfig(disabled=frozenset({"cgroups"}))
_FORKER = """
    def attack(input):
        for index in range(input["children"]):
            if os.fork() == 0:
                time.sleep(input["linger"])
                os._exit(0)
            sys.stderr.write("+")  # how many it started, kept whatever the verdict
            sys.stderr.flush()
        raise ValueError(f"gave up after {input['children']} children")
"""


@requires("identity")
def test_a_skill_failing_with_children_within_its_limit_is_its_own_failure_without_cgroups(
        hostile: Callable[..., Hostile]) -> None:
    # max_processes - 1 children, lingering past the skill's own failure, and the skill: within
    # the limit, so this failure is the skill's own, not a process limit, whatever a judgement
    # of fork bombs that fail on EAGAIN (not made from outside yet) comes to count.
    attack = hostile(_FORKER, isolation=_NO_CGROUPS)
    children = int(LIMITS["max_processes"]) - 1
    result = attack.run(children=children, linger=0.5)
    assert result.stderr.count("+") == children, result
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error_kind is ErrorKind.SKILL_FAILED, result.error
    assert result.error == f"ValueError: gave up after {children} children"
    attack.assert_still_serving()


def test_one_huge_bytearray_is_refused(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            return len(bytearray(1 << 30))
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: memory"), result.error
    attack.assert_still_serving()


def test_many_small_objects_run_out_of_memory(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            hoard = []
            while True:
                hoard.append([object() for _ in range(1000)])
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: memory"), result.error
    attack.assert_still_serving()


@requires("processes")
def test_memory_spread_over_processes_is_capped_for_the_whole_execution(
        hostile: Callable[..., Hostile]) -> None:
    # Each process stays under its own 64 MB data limit; together they are far over it.
    attack = hostile("""
        def attack(input):
            for _ in range(6):
                pid = os.fork()
                if pid == 0:
                    report_pid(host_pid())
                    block = b"x" * (50 << 20)
                    time.sleep(30)
                    os._exit(len(block) & 1)
            time.sleep(30)
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: memory"), result.error
    attack.assert_still_serving()


def test_cpu_spin_is_stopped_at_the_cpu_limit(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            while True:
                pass
    """, limits={"timeout": slow(5)})  # wall time to spare on a busy machine: CPU must stop it
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: cpu time"), result.error
    attack.assert_still_serving()


def test_sleeping_forever_ends_at_the_wall_timeout(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            time.sleep(3600)
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error.startswith("runtime: execution timeout"), result.error
    attack.assert_still_serving()


@requires("filesystem")
def test_filling_the_disk_stops_at_the_workdir_quota(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            chunk = b"\\0" * (4 << 20)
            for index in range(10_000):  # 40 GB if nothing stopped it
                with open(f"fill{index}", "wb") as handle:
                    handle.write(chunk)
                sys.stderr.write(f"WROTE {(index + 1) * 4}\\n")
    """, limits={"memory_mb": 256})  # tmpfs files are memory too: the disk quota must stop it
    workdir_root = attack.sandbox.workdir_root
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: disk"), result.error
    written = [int(line.split()[1]) for line in result.stderr.splitlines()
               if line.startswith("WROTE ")]
    assert written and max(written) <= attack.sandbox.isolation.workdir_mb
    assert os.listdir(workdir_root) == []
    attack.assert_still_serving()


def test_stdout_flood_is_cut_at_the_output_cap(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            line = "x" * 65536
            while True:
                sys.stdout.write(line)
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: output: stdout"), result.error
    assert len(result.stdout) <= 8192
    attack.assert_still_serving()


def test_stderr_flood_is_cut_at_the_output_cap(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            line = b"y" * 65536
            while True:
                os.write(2, line)
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    assert result.error.startswith(f"{EXHAUSTED}: output: stderr"), result.error
    assert len(result.stderr) <= 8192
    attack.assert_still_serving()
