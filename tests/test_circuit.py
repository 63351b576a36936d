"""Circuit breaker: opening, cooldown, half-open probes, thread safety, and its place in execute."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import (
    CircuitBreaker,
    CircuitState,
    ExecutionRequest,
    ExecutionStatus,
    InMemoryCircuitBreaker,
    Policy,
    Sandbox,
    TenantPolicy,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_opens_after_five_consecutive_failures_by_default(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock)
    for _ in range(4):
        breaker.record_failure("s")
    assert breaker.state("s") is CircuitState.CLOSED and breaker.allow("s")
    breaker.record_failure("s")
    assert breaker.state("s") is CircuitState.OPEN
    assert not breaker.allow("s")
    assert breaker.snapshot()["s"].reason == "5 consecutive failures"


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, min_calls=100)
    for _ in range(2):
        for _ in range(4):
            breaker.record_failure("s")
        breaker.record_success("s")
    assert breaker.state("s") is CircuitState.CLOSED


def test_failure_rate_over_the_window_opens_it(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=100, failure_rate=0.5,
                                     min_calls=10, window=60)
    for _ in range(4):
        breaker.record_success("s")
        breaker.record_failure("s")
        clock.advance(1)
    breaker.record_success("s")
    assert breaker.state("s") is CircuitState.CLOSED  # 4 of 9: too few calls, rate below half
    breaker.record_failure("s")
    assert breaker.state("s") is CircuitState.OPEN  # 5 of 10
    assert "5 of the last 10 calls failed" in breaker.snapshot()["s"].reason


def test_outcomes_older_than_the_window_do_not_count(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=100, failure_rate=0.5,
                                     min_calls=10, window=60)
    for _ in range(6):
        breaker.record_success("s")
        breaker.record_success("s")
        breaker.record_failure("s")
    assert breaker.snapshot()["s"].window_calls == 18
    clock.advance(66)  # the window is kept in 10 buckets: outcomes leave it by 1.1 x window
    breaker.record_failure("s")
    snapshot = breaker.snapshot()["s"]
    assert (snapshot.window_calls, snapshot.window_failures) == (1, 1)
    assert snapshot.state is CircuitState.CLOSED


def test_cooldown_then_half_open_with_bounded_probes(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1, half_open_max_probes=2)
    breaker.record_failure("s")
    clock.advance(29.9)
    assert breaker.state("s") is CircuitState.OPEN and not breaker.allow("s")
    assert breaker.snapshot()["s"].retry_in == pytest.approx(0.1)
    clock.advance(0.1)
    assert breaker.state("s") is CircuitState.HALF_OPEN
    assert [breaker.allow("s") for _ in range(4)] == [True, True, False, False]


def test_a_probe_success_closes_the_circuit(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=2)
    breaker.record_failure("s")
    breaker.record_failure("s")
    clock.advance(30)
    assert breaker.allow("s")
    breaker.record_success("s")
    assert breaker.state("s") is CircuitState.CLOSED
    breaker.record_failure("s")  # the count started again from zero
    assert breaker.state("s") is CircuitState.CLOSED


def test_a_probe_failure_reopens_for_a_fresh_cooldown(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1, cooldown=10)
    breaker.record_failure("s")
    clock.advance(10)
    assert breaker.allow("s")
    breaker.record_failure("s")
    assert breaker.state("s") is CircuitState.OPEN
    clock.advance(9)
    assert not breaker.allow("s")
    clock.advance(1)
    assert breaker.state("s") is CircuitState.HALF_OPEN
    assert breaker.snapshot()["s"].times_opened == 2


def test_an_ignored_outcome_or_a_lost_probe_frees_the_probe_slot(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1, cooldown=10)
    breaker.record_failure("s")
    clock.advance(10)
    assert breaker.allow("s") and not breaker.allow("s")
    breaker.record_ignored("s")
    assert breaker.allow("s") and not breaker.allow("s")
    clock.advance(10)  # probe_timeout defaults to the cooldown
    assert breaker.allow("s")


def test_circuits_are_per_skill(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1)
    breaker.record_failure("a")
    assert breaker.state("a") is CircuitState.OPEN
    assert breaker.state("b") is CircuitState.CLOSED and breaker.allow("b")
    breaker.reset("a")
    assert breaker.state("a") is CircuitState.CLOSED


@pytest.mark.parametrize(("option", "value", "message"), [
    ("failure_threshold", 0, "failure_threshold must be at least 1"),
    ("failure_rate", 1.5, "failure_rate must be in"),
    ("window", 0, "window must be positive"),
    ("min_calls", 0, "min_calls must be at least 1"),
    ("cooldown", -1, "cooldown must not be negative"),
    ("half_open_max_probes", 0, "half_open_max_probes must be at least 1"),
])
def test_bad_settings_are_refused(option: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        InMemoryCircuitBreaker(**{option: value})


def test_the_default_breaker_satisfies_the_protocol() -> None:
    assert isinstance(InMemoryCircuitBreaker(), CircuitBreaker)


def test_concurrent_failures_are_all_counted(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=10**9, min_calls=10**9)
    barrier = threading.Barrier(32)

    def hammer() -> None:
        barrier.wait(timeout=10)
        for _ in range(200):
            breaker.allow("s")
            breaker.record_failure("s")

    threads = [threading.Thread(target=hammer) for _ in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    snapshot = breaker.snapshot()["s"]
    assert snapshot.consecutive_failures == 6400
    assert snapshot.window_failures == 6400


def test_concurrent_callers_get_exactly_the_allowed_probes(clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1, half_open_max_probes=3)
    breaker.record_failure("s")
    clock.advance(30)
    barrier = threading.Barrier(64)
    admitted: list[bool] = []
    lock = threading.Lock()

    def probe() -> None:
        barrier.wait(timeout=10)
        allowed = breaker.allow("s")
        with lock:
            admitted.append(allowed)

    threads = [threading.Thread(target=probe) for _ in range(64)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)
    assert len(admitted) == 64
    assert admitted.count(True) == 3


# -- in Sandbox.execute ----------------------------------------------------------------------

FLAKY = ("import time\n"
         "def run(input):\n"
         "    if input.get('sleep'):\n"
         "        time.sleep(input['sleep'])\n"
         "    if input.get('fail'):\n"
         "        raise RuntimeError('down')\n"
         "    if input.get('big'):\n"
         "        return {'s': 'x' * 5000}\n"
         "    return {'ok': True}\n")


@pytest.fixture
def flaky(skill_dir: Callable[..., Path]) -> Path:
    return skill_dir(FLAKY, "[limits]\ntimeout = 5\nmax_output_bytes = 1024\n", skill_id="t/flaky")


def _counting(sandbox: Sandbox) -> list[str]:
    """Count how often a worker is asked to run (Sandbox._run is where a fork happens)."""
    calls: list[str] = []
    original = sandbox._run

    def run(loaded: Any, request: ExecutionRequest, *args: Any) -> Any:
        calls.append(request.request_id)
        return original(loaded, request, *args)

    sandbox._run = run  # type: ignore[method-assign,assignment]
    return calls


def _request(**input_: Any) -> ExecutionRequest:
    import json
    return ExecutionRequest(skill_id="t/flaky", input=json.dumps(input_).encode(), timeout=None)


def test_open_circuit_rejects_without_touching_a_worker_then_recovers(
        make_sandbox: Callable[..., Sandbox], flaky: Path, clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock)
    sandbox = make_sandbox(flaky, circuit_breaker=breaker)
    calls = _counting(sandbox)
    for _ in range(5):
        assert sandbox.execute(_request(fail=True)).status is ExecutionStatus.FAILED
    assert len(calls) == 5
    rejected = sandbox.execute(_request())
    assert rejected.status is ExecutionStatus.REJECTED
    assert rejected.error == "runtime: circuit breaker open"
    assert len(calls) == 5
    clock.advance(30)
    assert sandbox.execute(_request()).ok  # the half-open probe
    assert breaker.state("t/flaky") is CircuitState.CLOSED
    assert len(calls) == 6


def test_timeouts_and_resource_exhaustion_count_as_failures(
        make_sandbox: Callable[..., Sandbox], flaky: Path, clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=2)
    sandbox = make_sandbox(flaky, circuit_breaker=breaker)
    timed_out = sandbox.execute(ExecutionRequest(skill_id="t/flaky", input=b'{"sleep": 5}',
                                                 timeout=0.3))
    assert timed_out.status is ExecutionStatus.TIMEOUT
    assert breaker.state("t/flaky") is CircuitState.CLOSED
    exhausted = sandbox.execute(_request(big=True))
    assert exhausted.error.startswith("runtime: resource exhausted")
    assert breaker.state("t/flaky") is CircuitState.OPEN


def test_rejected_and_canceled_do_not_count(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        clock: FakeClock) -> None:
    typed = skill_dir(FLAKY, '[input_schema]\ntype = "object"\nrequired = ["x"]\n'
                      "[limits]\ntimeout = 5\n", skill_id="t/typed")
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1)
    policy = Policy(default=TenantPolicy(allowed_skills=["t/*"]),
                    tenants={"blocked": TenantPolicy(allowed_skills=[])})
    sandbox = make_sandbox(typed, circuit_breaker=breaker, policy=policy)
    invalid = sandbox.execute(ExecutionRequest(skill_id="t/typed", input=b"{}"))
    assert invalid.status is ExecutionStatus.REJECTED
    denied = sandbox.execute(ExecutionRequest(skill_id="t/typed", input=b'{"x": 1}',
                                              tenant_id="blocked"))
    assert denied.error.startswith("runtime: policy rejected execution")
    request = ExecutionRequest(skill_id="t/typed", input=b'{"x": 1, "sleep": 4}')
    timer = threading.Timer(0.3, sandbox.cancel, args=(request.request_id,))
    timer.start()
    try:
        canceled = sandbox.execute(request)
    finally:
        timer.cancel()
    assert canceled.status is ExecutionStatus.CANCELED
    assert breaker.state("t/typed") is CircuitState.CLOSED
    assert breaker.snapshot()["t/typed"].window_calls == 0


def test_circuit_breaker_can_be_turned_off(make_sandbox: Callable[..., Sandbox],
                                           flaky: Path) -> None:
    sandbox = make_sandbox(flaky, circuit_breaker=False)
    assert sandbox.circuit_breaker is None
    for _ in range(6):
        assert sandbox.execute(_request(fail=True)).status is ExecutionStatus.FAILED


def test_default_sandbox_has_an_in_memory_breaker(make_sandbox: Callable[..., Sandbox]) -> None:
    assert isinstance(make_sandbox().circuit_breaker, InMemoryCircuitBreaker)


def test_concurrent_executions_against_an_opening_circuit(
        make_sandbox: Callable[..., Sandbox], flaky: Path, clock: FakeClock) -> None:
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=3)
    sandbox = make_sandbox(flaky, circuit_breaker=breaker, max_concurrency=2)
    calls = _counting(sandbox)
    statuses: list[ExecutionStatus] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(4):
            result = sandbox.execute(_request(fail=True))
            with lock:
                statuses.append(result.status)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(statuses) == 24
    assert breaker.state("t/flaky") is CircuitState.OPEN
    # every execution that reached a worker failed; everything else was rejected at once
    assert statuses.count(ExecutionStatus.FAILED) == len(calls)
    assert statuses.count(ExecutionStatus.REJECTED) == 24 - len(calls)
    assert statuses.count(ExecutionStatus.REJECTED) > 0


def test_concurrent_async_executions_against_an_opening_circuit(
        make_sandbox: Callable[..., Sandbox], flaky: Path, clock: FakeClock) -> None:
    import asyncio

    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=2)
    sandbox = make_sandbox(flaky, circuit_breaker=breaker, max_concurrency=2)
    calls = _counting(sandbox)

    async def main() -> list[ExecutionStatus]:
        results = await asyncio.gather(*(sandbox.aexecute(_request(fail=True))
                                         for _ in range(12)))
        return [result.status for result in results]

    statuses = asyncio.run(main())
    assert breaker.state("t/flaky") is CircuitState.OPEN
    assert statuses.count(ExecutionStatus.FAILED) == len(calls) >= 2
    assert statuses.count(ExecutionStatus.REJECTED) == 12 - len(calls)


def test_waiting_for_a_free_slot_is_load_not_a_skill_failure(
        clock: FakeClock, skill_dir: Callable[..., Path]) -> None:
    from sandbox import Skill
    from sandbox.control import settle
    from worker.protocol import ErrorKind, ExecutionResult

    skill = Skill.from_dir(skill_dir(FLAKY, skill_id="t/flaky"))
    breaker = InMemoryCircuitBreaker(clock=clock, failure_threshold=1)
    queued = ExecutionResult(status=ExecutionStatus.TIMEOUT, error_kind=ErrorKind.NO_SLOT,
                             error="runtime: execution timeout: no execution slot free within 1s")
    settle(None, breaker, _request(), skill, queued)
    assert breaker.state("t/flaky") is CircuitState.CLOSED
    ran_out = ExecutionResult(status=ExecutionStatus.TIMEOUT, error_kind=ErrorKind.TIMEOUT,
                              error="runtime: execution timeout")
    settle(None, breaker, _request(), skill, ran_out)
    assert breaker.state("t/flaky") is CircuitState.OPEN
