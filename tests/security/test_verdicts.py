"""What a skill can make the supervisor believe: nothing it writes decides a verdict.

A skill controls its own error text and, by writing to its result pipe, the whole frame. The
verdict (`error_kind`, the exception `raise_for_status` raises, what the circuit breaker
counts) comes from what the supervisor observed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sandbox import (
    CircuitOpen,
    ErrorKind,
    ExecutionCanceled,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    ExecutionTimeout,
    InMemoryCircuitBreaker,
    PolicyRejected,
    ResourceExhausted,
    Sandbox,
    Skill,
    SkillFailed,
    SkillNotLoaded,
    WorkerFailure,
    execution,
)
from sandbox.capabilities import IsolationConfig
from sandbox.circuit import CircuitState
from tests.conftest import slow
from tests.security.hostile import Hostile

SUPERVISOR_PHRASES = [
    ("runtime: circuit breaker open", CircuitOpen),
    ("runtime: policy rejected execution", PolicyRejected),
    ("runtime: skill not loaded", SkillNotLoaded),
    ("runtime: execution timeout", ExecutionTimeout),
    ("runtime: execution canceled", ExecutionCanceled),
    ("runtime: resource exhausted: memory", ResourceExhausted),
    ("runtime: invalid input: nothing", PolicyRejected),
]


@pytest.mark.parametrize(("phrase", "imitated"), SUPERVISOR_PHRASES)
def test_a_skill_s_error_text_cannot_pose_as_a_supervisor_verdict(
        hostile: Callable[..., Hostile], phrase: str, imitated: type[Exception]) -> None:
    # A class named "runtime" makes the error text start with the supervisor's own words.
    attack = hostile(f"""
        runtime = type("runtime", (Exception,), {{}})

        def attack(input):
            raise runtime({phrase.removeprefix("runtime: ")!r})
    """)
    result = attack.run()
    # Control: the text does imitate the phrase, and matching text alone would have mapped to
    # the imitated exception.
    assert phrase in result.error
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.SKILL_FAILED
    assert not result.error.startswith("runtime:"), result.error
    with pytest.raises(SkillFailed) as raised:
        result.raise_for_status()
    assert not isinstance(raised.value, imitated)
    attack.assert_still_serving()


@pytest.mark.parametrize(("phrase", "imitated"), SUPERVISOR_PHRASES)
def test_a_forged_result_frame_cannot_pose_as_a_supervisor_verdict(
        hostile: Callable[..., Hostile], phrase: str, imitated: type[Exception]) -> None:
    attack = hostile(f"""
        from worker.protocol import ChildResult, encode_frame

        def attack(input):
            os.write(3, encode_frame(ChildResult(ok=False, error={phrase!r})))
            os._exit(0)
    """)
    result = attack.run()
    assert phrase in result.error
    assert result.error_kind is ErrorKind.SKILL_FAILED
    with pytest.raises(SkillFailed) as raised:
        result.raise_for_status()
    assert not isinstance(raised.value, imitated)


def test_a_forged_limit_claim_cannot_name_a_limit_of_its_own_choosing(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        from worker.protocol import ChildResult, encode_frame

        def attack(input):
            os.write(3, encode_frame(ChildResult(ok=False, limit="circuit breaker open",
                                                 error="runtime: circuit breaker open")))
            os._exit(0)
    """)
    result = attack.run()
    assert result.error_kind is ErrorKind.SKILL_FAILED, result
    assert not result.error.startswith("runtime:"), result.error
    with pytest.raises(SkillFailed):
        result.raise_for_status()


def test_a_failing_skill_cannot_keep_its_circuit_closed_with_the_queue_timeout_text(
        hostile: Callable[..., Hostile]) -> None:
    breaker = InMemoryCircuitBreaker(failure_threshold=3, cooldown=60)
    attack = hostile("""
        def attack(input):
            raise RuntimeError("runtime: execution timeout: no execution slot free within 1s")
    """, circuit_breaker=breaker)
    results = [attack.run() for _ in range(3)]
    assert all(r.status is ExecutionStatus.FAILED for r in results), results
    assert all("no execution slot free" in r.error for r in results)  # control: the text is there
    assert breaker.state(attack.skill.id) is CircuitState.OPEN
    rejected = attack.run()
    assert rejected.status is ExecutionStatus.REJECTED
    assert rejected.error_kind is ErrorKind.CIRCUIT_OPEN
    with pytest.raises(CircuitOpen):
        rejected.raise_for_status()


def test_verdicts_come_from_the_kind_even_when_the_text_says_otherwise() -> None:
    """Results decoded from elsewhere (a client, a log) map by kind, never by text."""
    result = ExecutionResult(status=ExecutionStatus.FAILED, error="runtime: circuit breaker open",
                             error_kind=ErrorKind.SKILL_FAILED)
    with pytest.raises(SkillFailed):
        result.raise_for_status()
    result = ExecutionResult(status=ExecutionStatus.REJECTED, error="anything at all",
                             error_kind=ErrorKind.CIRCUIT_OPEN)
    with pytest.raises(CircuitOpen) as raised:
        result.raise_for_status()
    assert str(raised.value).startswith("runtime: circuit breaker open")


def test_running_out_of_execution_uids_is_the_sandbox_s_failure_not_the_skill_s(
        hostile: Callable[..., Hostile]) -> None:
    breaker = InMemoryCircuitBreaker(failure_threshold=1, cooldown=60)
    attack = hostile("""
        def attack(input):
            time.sleep(input["sleep"])
            return "slept"
    """, circuit_breaker=breaker, isolation=IsolationConfig(uid_count=1))
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(attack.run, sleep=1.5)
        time.sleep(0.3)  # ordering only: the slow one holds the only uid first
        starved = attack.sandbox.execute(ExecutionRequest(
            skill_id=attack.skill.id, input=b'{"sleep": 0}', timeout=0.5))
        assert slow.result(timeout=10).ok
    assert starved.status is ExecutionStatus.FAILED, starved
    assert starved.error_kind is ErrorKind.WORKER_FAILURE, starved
    with pytest.raises(WorkerFailure):
        starved.raise_for_status()
    assert breaker.state(attack.skill.id) is CircuitState.CLOSED
    assert attack.run(sleep=0).ok


@pytest.mark.parametrize("disguise", [
    "\u200bruntime: circuit breaker open",  # zero-width space first
    "\x1b[2K\rruntime: circuit breaker open",  # erase the line, then the supervisor's words
    "\x00runtime: circuit breaker open",
    "runtim\u0435: circuit breaker open",  # Cyrillic e
    " runtime : circuit breaker open",
])
def test_a_disguised_supervisor_phrase_is_still_marked_as_the_skill_s(
        hostile: Callable[..., Hostile], disguise: str) -> None:
    attack = hostile(f"""
        from worker.protocol import ChildResult, encode_frame

        def attack(input):
            os.write(3, encode_frame(ChildResult(ok=False, error={disguise!r})))
            os._exit(0)
    """)
    result = attack.run()
    assert "circuit breaker open" in result.error  # control: the words came through
    assert result.error.startswith("skill error: "), repr(result.error)
    assert result.error.isprintable(), repr(result.error)
    assert result.error_kind is ErrorKind.SKILL_FAILED


def test_a_skill_writing_a_byte_at_a_time_costs_the_supervisor_little_cpu(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        import threading

        def trickle(stream):
            # 1.5 s, and at least 1100 bytes: a host ten times slower (an emulated VM) writes
            # fewer than 1000 in 1.5 s, this one far more.
            end, written = time.monotonic() + 1.5, 0
            while time.monotonic() < end or written < 1100:
                os.write(stream, b"x")
                written += 1
                time.sleep(0.0002)

        def attack(input):
            began = time.monotonic()
            threads = [threading.Thread(target=trickle, args=(1 + i % 2,)) for i in range(4)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return time.monotonic() - began
    """, limits={"timeout": slow(10), "cpu_time": slow(10), "memory_mb": 256,
                 "max_output_bytes": 1 << 24})
    before = time.thread_time()  # execute runs the supervision loop in this thread
    result = attack.run()
    spent = time.thread_time() - before
    assert result.ok, result
    # Control: the skill really did write thousands of separate bytes on both streams.
    assert len(result.stdout) > 2000 or len(result.stderr) > 2000, (len(result.stdout),
                                                                   len(result.stderr))
    # The supervisor rests between reads of a stream, so its wake-ups follow the trickle's
    # length (1.5 s here; longer where the bytes come slower, as in an emulated VM), and each
    # costs SLOWDOWN times more CPU on a slower host.
    trickled = float(result.json())
    assert spent < slow(0.2) * max(1.0, trickled / 1.5), (
        f"the supervisor spent {spent:.2f}s of CPU on one skill trickling for {trickled:.1f}s")


@pytest.mark.parametrize("disabled", [frozenset(), frozenset({"mountns"}),
                                      frozenset({"mountns", "landlock"})],
                         ids=["zygote-mounts-workdir", "child-sets-up", "child-without-landlock"])
def test_an_execution_that_cannot_be_set_up_is_the_sandbox_s_failure_not_the_skill_s(
        hostile: Callable[..., Hostile], monkeypatch: pytest.MonkeyPatch,
        disabled: frozenset[str]) -> None:
    breaker = InMemoryCircuitBreaker(failure_threshold=1, cooldown=60)
    attack = hostile("""
        def attack(input):
            os._exit(71)  # the set-up failure's own exit code, from skill code
    """, circuit_breaker=breaker, isolation=IsolationConfig(disabled=disabled))
    # Control: the skill exiting with that code after it read its request is its own failure.
    posing = attack.run()
    assert posing.error_kind is ErrorKind.SKILL_FAILED, posing
    breaker.reset(attack.skill.id)
    made = execution._make_workdir

    def vanished(root: str, exec_id: str) -> str:  # a temp cleaner took it: infrastructure
        path = made(root, exec_id)
        os.rmdir(path)
        return path

    if attack.sandbox._plan.workdir_bytes:
        # The zygote makes the directory, on a tmpfs of its mount namespace that no host
        # cleaner reaches: it cannot make one whose parent is gone.
        monkeypatch.setattr(execution, "_workdir_path",
                            lambda root, exec_id: os.path.join(root, "gone", exec_id))
    else:
        monkeypatch.setattr(execution, "_make_workdir", vanished)
    broken = attack.sandbox.execute(ExecutionRequest(skill_id=attack.skill.id,
                                                     input=b'{"probe": true}'))
    assert broken.error_kind is ErrorKind.WORKER_FAILURE, broken
    assert "No such file or directory" in broken.error, broken
    assert breaker.state(attack.skill.id) is CircuitState.CLOSED
    monkeypatch.undo()
    alive = attack.run(probe=True)
    assert alive.output == b'"alive"', alive


def test_a_command_exiting_with_the_set_up_failure_code_is_its_own_failure(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    # It never reads its stdin: the request is read for it before the exec all the same.
    directory = tmp_path / "exit71"
    directory.mkdir(mode=0o755)
    (directory / "skill.toml").write_text('id = "test/exit71"\nversion = "0.1.0"\n'
                                          'command = ["/bin/sh", "-c", "exit 71"]\n')
    skill = Skill.from_dir(directory)
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
    assert result.error_kind is ErrorKind.SKILL_FAILED, result
    assert result.error.startswith("command exited with status 71"), result
