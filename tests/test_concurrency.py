"""Many callers at once: threads and asyncio tasks all get their own correct results, no more
than `max_concurrency` executions run at a time, and cancelling (by request id, or by
cancelling the awaiting task) kills the execution and reports `canceled`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from sandbox import (
    ExecutionCanceled,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    Sandbox,
    Skill,
)
from tests.conftest import execution_children, wait_until_gone

#: Sleeps, then says when it ran (wall-clock instants, taken inside the execution).
INTERVAL = """\
import os, time
def run(input):
    start = time.time()
    time.sleep(input["sleep"])
    return {"start": start, "end": time.time(), "tag": input["tag"],
            "pid": int(os.readlink("/proc/self"))}
"""
SLEEP_FOREVER = "import time\ndef run(input):\n    time.sleep(60)\n"


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    return peak


def wait_for_execution_child(sandbox: Sandbox, skill_id: str, timeout: float = 5.0) -> int:
    """The pid of the skill's running execution, once its zygote has forked it."""
    zygote = psutil.Process(sandbox.zygote_info(skill_id)["pid"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = execution_children(zygote)
        if children:
            return children[0].pid
        time.sleep(0.01)
    raise AssertionError("the execution never started")


@pytest.fixture
def interval_skill(skill_dir: Callable[..., Path]) -> Skill:
    return Skill.from_dir(skill_dir(INTERVAL, "[limits]\ntimeout = 20", skill_id="test/interval"))


def test_many_threads_each_get_their_own_result(make_sandbox: Callable[..., Sandbox],
                                                example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo, max_concurrency=2)

    def call(index: int) -> tuple[int, ExecutionResult]:
        data = f'{{"caller": {index}}}'.encode()
        return index, sandbox.execute(ExecutionRequest(skill_id=echo.id, input=data,
                                                       request_id=f"t{index}"))

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(call, range(40)))
    assert len(results) == 40
    for index, result in results:
        assert result.ok, result.error
        assert result.json() == {"caller": index}
        assert result.request_id == f"t{index}"


def test_many_tasks_each_get_their_own_result(make_sandbox: Callable[..., Sandbox],
                                              example: Callable[[str], Skill]) -> None:
    echo, counter = example("echo"), example("token_counter")
    sandbox = make_sandbox(echo, counter, max_concurrency=2)

    async def main() -> list[ExecutionResult]:
        calls = []
        for index in range(30):
            if index % 2:
                calls.append(sandbox.aexecute(ExecutionRequest(
                    skill_id=echo.id, input=f"[{index}]".encode())))
            else:
                calls.append(sandbox.aexecute(ExecutionRequest(
                    skill_id=counter.id, input=('{"text": "%s"}' % ("w " * index)).encode())))
        return await asyncio.gather(*calls)

    results = asyncio.run(main())
    for index, result in enumerate(results):
        assert result.ok, result.error
        if index % 2:
            assert result.json() == [index]
        else:
            assert result.json() == {"tokens": index}
            assert result.resource_usage.tokens_used == index


def test_executions_are_bounded_by_max_concurrency(make_sandbox: Callable[..., Sandbox],
                                                   interval_skill: Skill) -> None:
    sandbox = make_sandbox(interval_skill, max_concurrency=2)

    def call(index: int) -> ExecutionResult:
        data = f'{{"sleep": 0.3, "tag": {index}}}'.encode()
        return sandbox.execute(ExecutionRequest(skill_id=interval_skill.id, input=data))

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(call, range(6)))
    outputs = [result.json() for result in results]
    assert [output["tag"] for output in outputs] == list(range(6))
    assert len({output["pid"] for output in outputs}) == 6
    # Never more than two at once, and the two slots were really used side by side.
    assert max_overlap([(output["start"], output["end"]) for output in outputs]) == 2


def test_async_executions_are_bounded_by_max_concurrency(make_sandbox: Callable[..., Sandbox],
                                                         interval_skill: Skill) -> None:
    sandbox = make_sandbox(interval_skill, max_concurrency=1)

    async def main() -> list[ExecutionResult]:
        return await asyncio.gather(*(sandbox.aexecute(ExecutionRequest(
            skill_id=interval_skill.id, input=f'{{"sleep": 0.1, "tag": {i}}}'.encode()))
            for i in range(4)))

    outputs = [result.json() for result in asyncio.run(main())]
    assert max_overlap([(output["start"], output["end"]) for output in outputs]) == 1


def test_cancel_by_request_id_kills_the_execution(make_sandbox: Callable[..., Sandbox],
                                                  skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEP_FOREVER, "[limits]\ntimeout = 30"))
    sandbox = make_sandbox(skill)
    results: list[ExecutionResult] = []
    caller = threading.Thread(target=lambda: results.append(sandbox.execute(
        ExecutionRequest(skill_id=skill.id, request_id="to-cancel"))))
    caller.start()
    child = wait_for_execution_child(sandbox, skill.id)
    assert sandbox.cancel("to-cancel") is True
    caller.join(timeout=10)
    assert not caller.is_alive()
    result = results[0]
    assert result.status is ExecutionStatus.CANCELED
    assert result.error == "runtime: execution canceled"
    assert result.request_id == "to-cancel"
    assert not wait_until_gone({child})
    with pytest.raises(ExecutionCanceled):
        result.raise_for_status()
    assert sandbox.cancel("to-cancel") is False  # finished: nothing left to cancel


def test_cancel_of_an_unknown_request_is_false(make_sandbox: Callable[..., Sandbox]) -> None:
    assert make_sandbox().cancel("never-heard-of-it") is False


def test_cancelling_the_awaiting_task_kills_the_execution(make_sandbox: Callable[..., Sandbox],
                                                          skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEP_FOREVER, "[limits]\ntimeout = 30"))
    sandbox = make_sandbox(skill)

    async def main() -> int:
        task = asyncio.create_task(sandbox.aexecute(
            ExecutionRequest(skill_id=skill.id, request_id="task")))
        child = await asyncio.to_thread(wait_for_execution_child, sandbox, skill.id)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return child

    child = asyncio.run(main())
    # CancelledError only propagates once the execution is killed and reaped.
    assert not psutil.pid_exists(child)
    assert sandbox.cancel("task") is False
    after = sandbox.execute(ExecutionRequest(skill_id=skill.id, timeout=0.2))
    assert after.status is ExecutionStatus.TIMEOUT  # the sandbox carries on


def test_cancelling_a_queued_execution_does_not_wait_for_a_slot(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEP_FOREVER, "[limits]\ntimeout = 30"))
    sandbox = make_sandbox(skill, max_concurrency=1)
    results: dict[str, ExecutionResult] = {}

    def call(request_id: str) -> None:
        results[request_id] = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                                               request_id=request_id))

    running = threading.Thread(target=call, args=("running",))
    running.start()
    wait_for_execution_child(sandbox, skill.id)
    queued = threading.Thread(target=call, args=("queued",))
    queued.start()
    deadline = time.monotonic() + 5
    while not sandbox.cancel("queued") and time.monotonic() < deadline:
        time.sleep(0.01)  # until the queued call has registered itself
    queued.join(timeout=5)
    assert not queued.is_alive(), "a cancelled queued call waited for the slot"
    assert results["queued"].status is ExecutionStatus.CANCELED
    assert running.is_alive()  # the slot holder was not touched
    assert sandbox.cancel("running") is True
    running.join(timeout=10)
    assert results["running"].status is ExecutionStatus.CANCELED


def test_queued_caller_times_out_within_its_own_timeout(make_sandbox: Callable[..., Sandbox],
                                                        skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEP_FOREVER, "[limits]\ntimeout = 30"))
    sandbox = make_sandbox(skill, max_concurrency=1)
    holder = threading.Thread(target=sandbox.execute,
                              args=(ExecutionRequest(skill_id=skill.id, request_id="holder"),))
    holder.start()
    wait_for_execution_child(sandbox, skill.id)
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id, timeout=0.3))
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error.startswith("runtime: execution timeout")
    sandbox.cancel("holder")
    holder.join(timeout=10)
    assert not holder.is_alive()


def test_mixed_outcomes_under_load_do_not_disturb_each_other(
        make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill],
        skill_dir: Callable[..., Path]) -> None:
    echo = example("echo")
    failing = Skill.from_dir(skill_dir("def run(input):\n    raise ValueError(input['n'])\n"))
    sleeper = Skill.from_dir(skill_dir(SLEEP_FOREVER))
    sandbox = make_sandbox(echo, failing, sleeper, max_concurrency=3)

    def call(index: int) -> tuple[int, ExecutionResult]:
        kind = index % 3
        if kind == 0:
            request = ExecutionRequest(skill_id=echo.id, input=f'{{"n": {index}}}'.encode())
        elif kind == 1:
            request = ExecutionRequest(skill_id=failing.id, input=f'{{"n": {index}}}'.encode())
        else:
            request = ExecutionRequest(skill_id=sleeper.id, timeout=0.2)
        return kind, sandbox.execute(request)

    with ThreadPoolExecutor(max_workers=6) as pool:
        # Four calls of each kind: fewer failures in a row than a circuit breaker's threshold.
        results = list(pool.map(call, range(12)))
    for index, (kind, result) in enumerate(results):
        if kind == 0:
            assert result.ok and result.json() == {"n": index}
        elif kind == 1:
            assert result.status is ExecutionStatus.FAILED
            assert result.error == f"ValueError: {index}"
        else:
            assert result.status is ExecutionStatus.TIMEOUT


def test_killed_zygote_is_restarted_once_for_many_concurrent_callers(
        make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill]) -> None:
    echo = example("echo")
    sandbox = make_sandbox(echo, max_concurrency=2)
    first = sandbox.zygote_info(echo.id)
    psutil.Process(first["pid"]).kill()
    assert not wait_until_gone({first["pid"]})

    def call(index: int) -> ExecutionResult:
        return sandbox.execute(ExecutionRequest(skill_id=echo.id, input=f"[{index}]".encode()))

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(16)))
    assert [result.json() for result in results] == [[index] for index in range(16)]
    after = sandbox.zygote_info(echo.id)
    assert after["starts"] == first["starts"] + 1 and after["alive"]


def _wait_for_queue(sandbox: Sandbox, depth: int, timeout: float = 5.0) -> float:
    """Wait until `depth` callers wait for a slot; the monotonic instant it was seen."""
    deadline = time.monotonic() + timeout
    while sandbox.queued != depth:
        assert time.monotonic() < deadline, f"queue depth {sandbox.queued}, expected {depth}"
        time.sleep(0.01)
    return time.monotonic()


def test_an_embedder_sees_the_queue_depth_and_each_granted_slot_wait(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(SLEEP_FOREVER, "[limits]\ntimeout = 30"))
    waits: list[float] = []
    sandbox = make_sandbox(skill, max_concurrency=1, on_slot_wait=waits.append)
    results: dict[str, ExecutionResult] = {}

    def call(request_id: str, timeout: float | None = None) -> None:
        results[request_id] = sandbox.execute(ExecutionRequest(
            skill_id=skill.id, request_id=request_id, timeout=timeout))

    assert sandbox.queued == 0
    holder = threading.Thread(target=call, args=("holder",))
    holder.start()
    wait_for_execution_child(sandbox, skill.id)
    assert waits == [0.0]  # a free slot is taken without waiting
    queued = threading.Thread(target=call, args=("queued",))
    queued.start()
    seen_queued = _wait_for_queue(sandbox, 1)
    # A caller whose own timeout runs out in the queue is counted while it waits, and its
    # wait is not reported: it never got a slot.
    call("gives-up", timeout=0.3)
    assert results["gives-up"].status is ExecutionStatus.TIMEOUT
    assert sandbox.queued == 1 and waits == [0.0]
    released = time.monotonic()
    assert sandbox.cancel("holder") is True
    holder.join(timeout=10)
    _wait_for_queue(sandbox, 0)
    wait_for_execution_child(sandbox, skill.id)
    assert len(waits) == 2
    # It waited from before it was seen queued until after the holder let go.
    assert waits[1] >= released - seen_queued > 0
    assert sandbox.cancel("queued") is True
    queued.join(timeout=10)
    assert not holder.is_alive() and not queued.is_alive()
    assert results["queued"].status is ExecutionStatus.CANCELED


OBSERVER_ERROR = RuntimeError("observer broke")


def test_a_failing_slot_wait_observer_does_not_cost_the_execution_or_its_slot(
        make_sandbox: Callable[..., Sandbox], example: Callable[[str], Skill],
        caplog: pytest.LogCaptureFixture) -> None:
    def broken(seconds: float) -> None:
        raise OBSERVER_ERROR

    echo = example("echo")
    sandbox = make_sandbox(echo, max_concurrency=1, on_slot_wait=broken)
    for index in range(2):  # the second would wait forever if the first kept the slot
        result = sandbox.execute(ExecutionRequest(skill_id=echo.id, input=f"[{index}]".encode(),
                                                  timeout=5))
        assert result.ok, result.error
        assert result.json() == [index]
    assert [record.exc_info[1] for record in caplog.records
            if record.exc_info] == [OBSERVER_ERROR, OBSERVER_ERROR]
