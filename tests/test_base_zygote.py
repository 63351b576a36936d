"""The shared base zygote (`worker.base`): skills' zygotes are forked from one interpreter that
already imported the worker runtime, instead of each exec'ing its own; the base can die without
losing an execution, and `base_zygote=False` turns it off."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import BASE_NAME, descendants, wait_until_gone, zygotes_below

from sandbox import ExecutionRequest, Sandbox, Skill
from sandbox.zygote import BaseUnavailable, BaseZygote

ECHO = "def run(input):\n    return {'echo': input}\n"


def _echo(skill_dir: Callable[..., Path]) -> Skill:
    return Skill.from_dir(skill_dir(ECHO))


def _run(sandbox: Sandbox, skill: Skill, value: int) -> dict[str, object]:
    request = ExecutionRequest(skill_id=skill.id, input=f'{{"n": {value}}}'.encode())
    result = sandbox.execute(request)
    assert result.ok, result
    answer: dict[str, object] = result.json()
    assert answer["echo"] == {"n": value}
    return answer


def _bases_below() -> set[int]:
    found = set()
    for child in psutil.Process().children():
        try:
            if child.name() == BASE_NAME:
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def test_a_cold_start_forks_the_zygote_from_the_base_and_answers_right(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    first, second = _echo(skill_dir), _echo(skill_dir)
    sandbox = make_sandbox(first, second)
    assert _bases_below() == set()  # lazy: nothing runs before the first cold start
    _run(sandbox, first, 1)
    _run(sandbox, second, 2)
    [base] = sandbox.base_zygote_pids()
    assert _bases_below() == {base}
    for skill in (first, second):
        info = sandbox.zygote_info(skill.id)
        assert info["from_base"], info
        # The supervisor's own child (CLONE_PARENT), not the base's: it waits for it and kills it.
        assert psutil.Process(info["pid"]).ppid() == os.getpid()
    assert zygotes_below() == {sandbox.zygote_info(s.id)["pid"] for s in (first, second)}
    assert psutil.Process(base).children() == []


def test_with_the_base_off_every_zygote_is_exec_d(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = _echo(skill_dir)
    sandbox = make_sandbox(skill, base_zygote=False)
    _run(sandbox, skill, 3)
    assert not sandbox.zygote_info(skill.id)["from_base"]
    assert sandbox.base_zygote_pids() == [] and _bases_below() == set()
    assert zygotes_below() == {sandbox.zygote_info(skill.id)["pid"]}


def test_a_base_killed_from_outside_loses_no_execution_and_is_replaced(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    warm, cold = _echo(skill_dir), _echo(skill_dir)
    sandbox = make_sandbox(warm, cold)
    _run(sandbox, warm, 1)
    [base] = sandbox.base_zygote_pids()
    zygote = sandbox.zygote_info(warm.id)["pid"]
    os.kill(base, signal.SIGKILL)
    assert wait_until_gone({base}) == set()
    # The zygote it forked is not its child: it keeps serving, same process.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda n: _run(sandbox, warm, n), range(8)))
    assert len(answers) == 8
    assert sandbox.zygote_info(warm.id)["pid"] == zygote
    # The next cold start starts a new base and forks from it.
    _run(sandbox, cold, 2)
    info = sandbox.zygote_info(cold.id)
    assert info["from_base"], info
    [replacement] = sandbox.base_zygote_pids()
    assert replacement != base
    # The killed base was reaped, not left a zombie.
    assert not psutil.pid_exists(base) or psutil.Process(base).ppid() != os.getpid()


def test_close_leaves_no_base_zygote_or_forked_zygote_behind(
        skill_dir: Callable[..., Path]) -> None:
    skills = [_echo(skill_dir) for _ in range(3)]
    before = {process.pid for process in descendants()}
    sandbox = Sandbox(skills)
    for index, skill in enumerate(skills):
        _run(sandbox, skill, index)
    started = {process.pid for process in descendants()} - before
    assert set(sandbox.base_zygote_pids()) <= started and len(started) >= 4  # control
    sandbox.close()
    # Gone and reaped: not even a zombie left under this process.
    assert {process.pid for process in descendants()} & started == set()


def test_a_base_dying_between_fork_and_reply_leaves_no_zombie_zygote(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The base forks the zygote (this process's child, `CLONE_PARENT`) and dies before its
    reply: the load falls back to an exec'd zygote, and the stray, which exits on EOF before
    its config, is reaped, not left a zombie until the supervisor exits."""
    skill = _echo(skill_dir)
    sandbox = make_sandbox(skill)
    before = {child.pid for child in psutil.Process().children()}
    strays: list[int] = []
    original = BaseZygote._receive

    def die_before_reply(self: BaseZygote, timeout: float) -> object:
        if not self.pid:  # the base's own start: let it through
            return original(self, timeout)
        deadline = time.monotonic() + 10
        while not strays and time.monotonic() < deadline:
            strays.extend(child.pid for child in psutil.Process().children()
                          if child.pid not in before and child.pid != self.pid)
            time.sleep(0.005)
        os.kill(self.pid, signal.SIGKILL)
        raise BaseUnavailable("base zygote is gone")

    monkeypatch.setattr(BaseZygote, "_receive", die_before_reply)
    _run(sandbox, skill, 1)
    assert not sandbox.zygote_info(skill.id)["from_base"]
    assert len(strays) == 1  # control: the base did fork a zygote before it died
    [stray] = strays
    deadline = time.monotonic() + 10
    while psutil.pid_exists(stray) and time.monotonic() < deadline:
        try:
            if psutil.Process(stray).ppid() != os.getpid():
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    # Gone and reaped: not a zombie child of this process.
    assert not psutil.pid_exists(stray) or psutil.Process(stray).ppid() != os.getpid()
