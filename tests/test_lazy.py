"""Zygotes follow the hot set: a loaded skill costs no process until it is used, idle zygotes
are evicted (LRU beyond `max_zygotes`, or unused for `zygote_idle_ttl`), never under an
execution, and an evicted skill's next request boots it again transparently."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest
from conftest import descendants, execution_children, slow, wait_until_gone, zygotes_below

from sandbox import ErrorKind, ExecutionRequest, ExecutionStatus, Sandbox, Skill

SLEEPER = "import time\ndef run(input):\n    time.sleep(input.get('sleep', 0))\n    return 'ok'\n"


def _request(skill: Skill, sleep: float = 0.0, **fields: object) -> ExecutionRequest:
    return ExecutionRequest(skill_id=skill.id, input=f'{{"sleep": {sleep}}}'.encode(),
                            **fields)  # type: ignore[arg-type]


def _skills(skill_dir: Callable[..., Path], count: int) -> list[Skill]:
    return [Skill.from_dir(skill_dir(SLEEPER)) for _ in range(count)]


def test_a_loaded_skill_starts_no_process_until_its_first_execution(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    before = {process.pid for process in descendants()}
    first, second, third = _skills(skill_dir, 3)
    sandbox = make_sandbox(first, second, third)
    assert {process.pid for process in descendants()} - before == set()
    assert {state["state"] for state in sandbox.skills_state().values()} == {"cold"}
    assert sandbox.execute(_request(second)).ok
    state = sandbox.skills_state()
    assert state[second.id]["state"] == "warm" and state[second.id]["alive"]
    assert state[second.id]["cold_starts"] == 1 and state[second.id]["last_used"] is not None
    assert state[second.id]["pss_kb"] > 0 and state[second.id]["rss_kb"] > 0
    assert zygotes_below() == {state[second.id]["pid"]}  # one zygote: the used skill's
    assert state[first.id]["state"] == state[third.id]["state"] == "cold"
    assert state[first.id]["pid"] == 0 and state[first.id]["last_used"] is None
    assert sandbox.live_zygotes() == 1 and sandbox.cold_starts == 1


def test_warm_starts_the_zygote_at_load(make_sandbox: Callable[..., Sandbox],
                                        skill_dir: Callable[..., Path]) -> None:
    eager, lazy, later = _skills(skill_dir, 3)
    sandbox = make_sandbox(eager, warm=True)
    sandbox.load_skill(lazy, warm=False)
    sandbox.load_skill(later, warm=True)
    state = sandbox.skills_state()
    assert state[eager.id]["state"] == state[later.id]["state"] == "warm"
    assert state[lazy.id]["state"] == "cold"
    assert zygotes_below() == {state[eager.id]["pid"], state[later.id]["pid"]}


def test_a_skill_that_cannot_boot_loads_lazily_and_fails_its_first_execution(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    broken = Skill.from_dir(skill_dir("def run(input:\n"))
    sandbox = make_sandbox(broken)  # nothing boots: the SyntaxError waits for first use
    result = sandbox.execute(_request(broken))
    assert result.status is ExecutionStatus.FAILED, result
    # Its own code: the skill's fault (its circuit breaker counts it), not the host's.
    assert result.error_kind is ErrorKind.SKILL_FAILED, result
    assert "SyntaxError" in result.error
    assert sandbox.skill_state(broken.id)["state"] == "cold"
    # Control: a zygote that cannot boot for the host's reasons (here: no time to start) is a
    # worker failure.
    sound = Skill.from_dir(skill_dir("def run(input):\n    return 1\n"))
    slow_host = make_sandbox(sound, zygote_start_timeout=1e-6)
    result = slow_host.execute(_request(sound))
    assert result.error_kind is ErrorKind.WORKER_FAILURE, result
    assert result.error.startswith("runtime: worker failure"), result


@pytest.mark.timeout(120)
def test_an_evicted_skill_in_the_middle_of_a_burst_still_answers(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skills = _skills(skill_dir, 3)
    sandbox = make_sandbox(*skills, max_zygotes=1, max_concurrency=2)
    requests = [_request(skills[index % 3], 0.02, timeout=60) for index in range(30)]
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(sandbox.execute, requests))
    # Every zygote stopped while an execution ran in it would have killed that execution.
    assert [result.status for result in results] == [ExecutionStatus.SUCCESS] * 30, \
        [result.error for result in results if not result.ok]
    assert sandbox.evictions > 0 and sandbox.cold_starts > 3
    for skill in skills:  # one at a time: each cold start evicts the idle previous one
        assert sandbox.execute(_request(skill)).ok
        assert sandbox.live_zygotes() == 1 and len(zygotes_below()) == 1
        # every cold start of the burst forked from the one shared base (the default)
        assert sandbox.zygote_info(skill.id)["from_base"]
    assert len(sandbox.base_zygote_pids()) == 1


def test_a_zygote_with_an_execution_in_flight_is_never_evicted(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    busy, other = _skills(skill_dir, 2)
    sandbox = make_sandbox(busy, other, max_zygotes=1, zygote_idle_ttl=0.1)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(sandbox.execute, _request(busy, 1.5))
        zygote = psutil.Process(sandbox.zygote_info(busy.id)["pid"])
        deadline = time.monotonic() + slow(10)
        while not execution_children(zygote):
            assert time.monotonic() < deadline, "the long execution never started"
            time.sleep(0.01)
        # Over budget (max_zygotes=1) and past its idle TTL, yet in use: it must stay.
        assert sandbox.execute(_request(other)).ok
        assert zygote.is_running() and sandbox.skill_state(busy.id)["state"] == "warm"
        assert running.result(timeout=slow(20)).ok


def test_an_idle_zygote_is_evicted_after_its_ttl_and_cold_starts_on_next_use(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    (skill,) = _skills(skill_dir, 1)
    sandbox = make_sandbox(skill, zygote_idle_ttl=0.3)
    assert sandbox.execute(_request(skill)).ok
    pid = sandbox.skill_state(skill.id)["pid"]
    assert pid > 0
    assert wait_until_gone({pid}, timeout=10) == set(), "the idle zygote was never evicted"
    state = sandbox.skill_state(skill.id)
    assert state["state"] == "evicted" and state["evictions"] == 1 and state["pid"] == 0
    assert sandbox.execute(_request(skill)).ok  # the caller only sees a slower success
    state = sandbox.skill_state(skill.id)
    assert state["state"] == "warm" and state["cold_starts"] == 2 and state["pid"] != pid
    assert state["restarts"] == 0  # an eviction is not a crash


def test_two_concurrent_first_requests_start_one_zygote(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    (skill,) = _skills(skill_dir, 1)
    sandbox = make_sandbox(skill, max_concurrency=4)
    gate = threading.Barrier(4)

    def first_request() -> bool:
        gate.wait(timeout=10)
        return sandbox.execute(_request(skill)).ok

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(lambda _: first_request(), range(4)))
    state = sandbox.skill_state(skill.id)
    assert state["starts"] == 1 and state["cold_starts"] == 1
    assert len(zygotes_below()) == 1


@pytest.mark.timeout(60)
def test_a_request_never_waits_past_its_timeout_for_a_slow_boot_which_serves_the_next(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A boot slower than the first request's timeout (a WASM module's compile takes seconds;
    here the zygote's start is held 3 s): that request times out at its own deadline, naming
    the boot; the boot goes on, and the next request finds the zygote warm. Before, the caller
    sat through the whole boot, whatever its timeout."""
    from sandbox.zygote import ZygoteProcess

    real_start = ZygoteProcess.start

    def slow_start(self: ZygoteProcess) -> None:
        time.sleep(3)
        real_start(self)

    monkeypatch.setattr(ZygoteProcess, "start", slow_start)
    (skill,) = _skills(skill_dir, 1)
    sandbox = make_sandbox(skill)
    first = sandbox.execute(_request(skill, timeout=0.5))
    assert first.status is ExecutionStatus.TIMEOUT, first
    assert first.error_kind is ErrorKind.TIMEOUT
    assert "zygote was still starting" in first.error
    assert first.duration < 3  # it did not sit through the boot
    deadline = time.monotonic() + 30
    while sandbox.skill_state(skill.id)["state"] != "warm" and time.monotonic() < deadline:
        time.sleep(0.05)
    second = sandbox.execute(_request(skill, timeout=5))
    assert second.ok, second
    assert sandbox.skill_state(skill.id)["cold_starts"] == 1


def test_a_crashed_zygote_is_restarted_not_counted_as_a_cold_start(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    (skill,) = _skills(skill_dir, 1)
    sandbox = make_sandbox(skill)
    assert sandbox.execute(_request(skill)).ok
    pid = sandbox.skill_state(skill.id)["pid"]
    psutil.Process(pid).kill()
    assert wait_until_gone({pid}) == set()
    assert sandbox.execute(_request(skill)).ok
    state = sandbox.skill_state(skill.id)
    assert state["restarts"] == 1 and state["cold_starts"] == 1 and state["starts"] == 2


def test_a_reloaded_warm_skill_stays_warm_and_a_cold_one_stays_cold(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    hot, idle = _skills(skill_dir, 2)
    sandbox = make_sandbox(hot, idle)
    assert sandbox.execute(_request(hot)).ok
    old = sandbox.skill_state(hot.id)["pid"]
    sandbox.load_skill(Skill.from_dir(hot.path))
    sandbox.load_skill(Skill.from_dir(idle.path))
    assert wait_until_gone({old}) == set()
    state = sandbox.skills_state()
    assert state[hot.id]["state"] == "warm" and state[hot.id]["pid"] not in (0, old)
    assert state[idle.id]["state"] == "cold"
    assert zygotes_below() == {state[hot.id]["pid"]}


_WASM_ECHO = """(module
  (import "env" "set_output" (func $set (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "1")
  (func (export "execute") (call $set (i32.const 0) (i32.const 1))))"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["wasm", "python"])
def test_wasm_zygotes_boot_a_few_at_a_time_others_do_not_wait_for_them(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path, skill_dir: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """A burst of first requests across WASM skills compiles `max_wasm_compiles` modules at a
    time (each boot held 0.5 s here, as a compile takes seconds); Python skills' boots, the
    control, overlap freely."""
    wasmtime = pytest.importorskip("wasmtime")
    from sandbox.zygote import ZygoteProcess

    real_start = ZygoteProcess.start
    lock = threading.Lock()
    booting, most = 0, 0

    def held_start(self: ZygoteProcess) -> None:
        nonlocal booting, most
        with lock:
            booting += 1
            most = max(most, booting)
        try:
            time.sleep(0.5)
            real_start(self)
        finally:
            with lock:
                booting -= 1

    monkeypatch.setattr(ZygoteProcess, "start", held_start)
    if kind == "wasm":
        skills = []
        for index in range(4):
            directory = tmp_path / f"wasm{index}"
            directory.mkdir()
            (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(_WASM_ECHO))
            (directory / "skill.toml").write_text(
                f'id = "test/wasm{index}"\nwasm = "main.wasm"\n')
            skills.append(Skill.from_dir(directory))
    else:
        skills = list(_skills(skill_dir, 4))
    sandbox = make_sandbox(*skills, max_wasm_compiles=2, max_concurrency=4)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda skill: sandbox.execute(_request(skill, timeout=30)),
                                skills))
    assert all(result.ok for result in results), results
    if kind == "wasm":
        assert most == 2, most  # never more than two compiling, and two did at once
    else:
        assert most > 2, most  # the bound is for compiles only
