"""One deadline per request, fixed when it arrives: every wait before the run spends from it,
and the reported duration counts from arrival."""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import execution_children

from sandbox import ErrorKind, ExecutionRequest, ExecutionStatus, Sandbox, Skill, execution
from sandbox.capabilities import IsolationConfig

SLEEPER = "import time\ndef run(input):\n    time.sleep(input['sleep'])\n    return 'slept'\n"


def _sleep(skill: Skill, seconds: float, timeout: float | None = None) -> ExecutionRequest:
    return ExecutionRequest(skill_id=skill.id, input=f'{{"sleep": {seconds}}}'.encode(),
                            timeout=timeout)


def _wait_running(sandbox: Sandbox, skill: Skill, timeout: float = 10.0) -> None:
    """Until an execution of `skill` runs (its zygote forked or handed off a child for it)."""
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])
    deadline = time.monotonic() + timeout
    while not execution_children(zygote):
        assert time.monotonic() < deadline, "the holder's execution never started"
        time.sleep(0.01)


def test_waiting_for_an_execution_uid_spends_the_request_s_own_timeout(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEPER))
    sandbox = make_sandbox(skill, max_concurrency=2, isolation=IsolationConfig(uid_count=1))
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(sandbox.execute, _sleep(skill, 1.0))
        _wait_running(sandbox, skill)  # the holder took the only uid first
        # ~1 s waiting for the uid plus 1.0 s of sleep cannot fit in 1.5 s from arrival.
        late = sandbox.execute(_sleep(skill, 1.0, timeout=1.5))
        assert holder.result(timeout=10).ok
    assert late.status is ExecutionStatus.TIMEOUT, late
    assert late.error_kind is ErrorKind.TIMEOUT
    assert "after 1.5s" in late.error
    assert late.duration >= 1.5, late.duration  # from arrival, not from the fork


def test_waiting_for_a_slot_counts_in_the_reported_duration(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEPER))
    sandbox = make_sandbox(skill, max_concurrency=1)
    with ThreadPoolExecutor(1) as pool:
        holder = pool.submit(sandbox.execute, _sleep(skill, 0.8))
        _wait_running(sandbox, skill)  # the holder took the only slot first
        queued = sandbox.execute(_sleep(skill, 0.0, timeout=5))
        assert holder.result(timeout=10).ok
    assert queued.ok, queued
    # It queued behind the holder (at least the holder's remaining ~0.8 s) and said so.
    assert queued.duration >= 0.4, queued.duration


def test_a_supervisor_side_failure_is_a_worker_failure_result_not_an_exception(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    skill = Skill.from_dir(skill_dir(SLEEPER))
    sandbox = make_sandbox(skill)

    def no_fds_left(*args: object) -> object:  # the first step of setting an execution up
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(execution, "granted", no_fds_left)
    result = sandbox.execute(_sleep(skill, 0))
    assert result.status is ExecutionStatus.FAILED
    assert result.error_kind is ErrorKind.WORKER_FAILURE, result
    assert "Too many open files" in result.error
    monkeypatch.undo()
    assert sandbox.execute(_sleep(skill, 0)).ok
