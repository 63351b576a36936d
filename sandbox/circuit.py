"""Circuit breaker per skill: stop sending work to a skill that keeps failing.

A skill that crashes, times out or exhausts its limits on every call costs a worker fork and
its full timeout each time; the breaker turns that into an immediate `rejected` result for a
cooldown, then lets a bounded number of probes through to see if the skill recovered.

States (as in openbotstack-core): `closed` (normal), `open` (reject at once), `half_open` (probing).
Opening: `failure_threshold` consecutive failures, or a failure rate of at least
`failure_rate` over the last `window` seconds once `min_calls` outcomes were seen there.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar, runtime_checkable

from worker.protocol import ErrorKind, ExecutionResult, ExecutionStatus


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@runtime_checkable
class CircuitBreaker(Protocol):
    """openbotstack-core's interface. `Sandbox` also calls `record_ignored(skill_id)`, if
    present, for an admitted execution whose outcome says nothing about the skill (canceled,
    rejected), so a half-open probe slot is not held forever."""

    def allow(self, skill_id: str) -> bool: ...

    def record_success(self, skill_id: str) -> None: ...

    def record_failure(self, skill_id: str) -> None: ...

    def state(self, skill_id: str) -> CircuitState: ...


def counts_as_failure(result: ExecutionResult) -> bool | None:
    """True for outcomes that are the skill's fault, False for success, None for neither.

    Decided by the supervisor's `error_kind`, never by text: the skill failing, timing out or
    exhausting its limits counts; cancellation, rejection, waiting for a slot and the sandbox's
    own failures (a zygote that died, no execution uid) say nothing about the skill's health.
    A result without a kind (built elsewhere) counts by status.
    """
    if result.status is ExecutionStatus.SUCCESS:
        return False
    if result.error_kind is ErrorKind.NONE:
        return True if result.status in (ExecutionStatus.FAILED, ExecutionStatus.TIMEOUT) \
            else None
    return True if result.error_kind in _SKILL_S_FAULT else None


_SKILL_S_FAULT = frozenset({ErrorKind.SKILL_FAILED, ErrorKind.TIMEOUT,
                            ErrorKind.RESOURCE_EXHAUSTED})


@dataclass
class _Bucket:
    start: float
    successes: int = 0
    failures: int = 0


@dataclass
class _Circuit:
    state: CircuitState = CircuitState.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    probes: deque[float] = field(default_factory=deque)  # start times of probes in flight
    buckets: deque[_Bucket] = field(default_factory=deque)
    times_opened: int = 0
    last_reason: str = ""


@dataclass(frozen=True)
class CircuitSnapshot:
    """What an operator sees for one skill (`InMemoryCircuitBreaker.snapshot()`)."""

    state: CircuitState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    times_opened: int
    reason: str
    retry_in: float  # seconds until an open circuit turns half-open; 0 otherwise


T = TypeVar("T")


class CircuitStore(Protocol):
    """Where circuits live. `update` applies `change` to the skill's circuit (a fresh closed
    one if it has none) atomically and returns what `change` returned; a store may call
    `change` more than once on fresh copies (an optimistic retry), so it must only touch the
    circuit it is given. `InMemoryCircuitStore` here; `sandbox.fleet.state` keeps them in
    Redis, shared by a fleet's workers and surviving restarts."""

    def update(self, skill_id: str, change: Callable[[_Circuit], T]) -> T: ...

    def skill_ids(self) -> list[str]: ...

    def delete(self, skill_id: str) -> None: ...


class InMemoryCircuitStore:
    """Circuits in this process's memory, guarded by one lock."""

    def __init__(self) -> None:
        self._circuits: dict[str, _Circuit] = {}
        self._lock = threading.Lock()

    def update(self, skill_id: str, change: Callable[[_Circuit], T]) -> T:
        with self._lock:
            circuit = self._circuits.get(skill_id)
            if circuit is None:
                circuit = self._circuits[skill_id] = _Circuit()
            return change(circuit)

    def skill_ids(self) -> list[str]:
        with self._lock:
            return list(self._circuits)

    def delete(self, skill_id: str) -> None:
        with self._lock:
            self._circuits.pop(skill_id, None)


class StoredCircuitBreaker:
    """The breaker's logic over a `CircuitStore` (see `InMemoryCircuitBreaker` for the knobs).

    `clock` is a seconds function, injectable so tests drive time without sleeping; it must be
    comparable across every process sharing the store (monotonic for one process, wall time
    for a fleet).
    """

    _BUCKETS = 10

    def __init__(self, store: CircuitStore, *, failure_threshold: int = 5,
                 failure_rate: float = 0.5, window: float = 60.0, min_calls: int = 20,
                 cooldown: float = 30.0, half_open_max_probes: int = 1,
                 probe_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, got {failure_threshold}")
        if not 0.0 < failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
        if not window > 0:
            raise ValueError(f"window must be positive, got {window}")
        if min_calls < 1:
            raise ValueError(f"min_calls must be at least 1, got {min_calls}")
        if not cooldown >= 0:
            raise ValueError(f"cooldown must not be negative, got {cooldown}")
        if half_open_max_probes < 1:
            raise ValueError(f"half_open_max_probes must be at least 1, got "
                             f"{half_open_max_probes}")
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.window = window
        self.min_calls = min_calls
        self.cooldown = cooldown
        self.half_open_max_probes = half_open_max_probes
        self.probe_timeout = cooldown if probe_timeout is None else probe_timeout
        self.clock = clock
        self.store = store

    def _advance(self, circuit: _Circuit, now: float) -> None:
        """Apply the passage of time: open → half-open after the cooldown; expire probes."""
        if circuit.state is CircuitState.OPEN and now - circuit.opened_at >= self.cooldown:
            circuit.state = CircuitState.HALF_OPEN
            circuit.probes.clear()
        if circuit.state is CircuitState.HALF_OPEN:
            while circuit.probes and now - circuit.probes[0] >= self.probe_timeout:
                circuit.probes.popleft()
        horizon = now - self.window
        bucket_span = self.window / self._BUCKETS
        while circuit.buckets and circuit.buckets[0].start + bucket_span <= horizon:
            circuit.buckets.popleft()

    def allow(self, skill_id: str) -> bool:
        now = self.clock()

        def change(circuit: _Circuit) -> bool:
            self._advance(circuit, now)
            if circuit.state is CircuitState.CLOSED:
                return True
            if circuit.state is CircuitState.OPEN:
                return False
            if len(circuit.probes) >= self.half_open_max_probes:
                return False
            circuit.probes.append(now)
            return True

        return self.store.update(skill_id, change)

    def record_success(self, skill_id: str) -> None:
        now = self.clock()

        def change(circuit: _Circuit) -> None:
            self._advance(circuit, now)
            if circuit.state is CircuitState.HALF_OPEN:
                self._close(circuit)
                return
            circuit.consecutive_failures = 0
            self._bucket(circuit, now).successes += 1

        self.store.update(skill_id, change)

    def record_failure(self, skill_id: str) -> None:
        now = self.clock()

        def change(circuit: _Circuit) -> None:
            self._advance(circuit, now)
            if circuit.state is CircuitState.HALF_OPEN:
                self._open(circuit, now, "a half-open probe failed")
                return
            if circuit.state is CircuitState.OPEN:
                return  # an execution admitted before the circuit opened
            circuit.consecutive_failures += 1
            self._bucket(circuit, now).failures += 1
            if circuit.consecutive_failures >= self.failure_threshold:
                self._open(circuit, now, f"{circuit.consecutive_failures} consecutive failures")
                return
            calls, failures = self._window_counts(circuit)
            if calls >= self.min_calls and failures >= self.failure_rate * calls:
                self._open(circuit, now, f"{failures} of the last {calls} calls failed "
                                         f"within {self.window:g}s")

        self.store.update(skill_id, change)

    def record_ignored(self, skill_id: str) -> None:
        """An admitted execution ended without saying anything about the skill: free its probe."""

        def change(circuit: _Circuit) -> None:
            if circuit.state is CircuitState.HALF_OPEN and circuit.probes:
                circuit.probes.popleft()

        self.store.update(skill_id, change)

    def state(self, skill_id: str) -> CircuitState:
        now = self.clock()

        def change(circuit: _Circuit) -> CircuitState:
            self._advance(circuit, now)
            return circuit.state

        return self.store.update(skill_id, change)

    def reset(self, skill_id: str) -> None:
        """Close the circuit by hand (an operator fixed the skill)."""
        self.store.delete(skill_id)

    def snapshot(self) -> dict[str, CircuitSnapshot]:
        now = self.clock()

        def view(circuit: _Circuit) -> CircuitSnapshot:
            self._advance(circuit, now)
            calls, failures = self._window_counts(circuit)
            retry_in = (max(0.0, circuit.opened_at + self.cooldown - now)
                        if circuit.state is CircuitState.OPEN else 0.0)
            return CircuitSnapshot(
                state=circuit.state, consecutive_failures=circuit.consecutive_failures,
                window_calls=calls, window_failures=failures,
                times_opened=circuit.times_opened, reason=circuit.last_reason,
                retry_in=retry_in)

        return {skill_id: self.store.update(skill_id, view)
                for skill_id in self.store.skill_ids()}

    def _bucket(self, circuit: _Circuit, now: float) -> _Bucket:
        span = self.window / self._BUCKETS
        if not circuit.buckets or now >= circuit.buckets[-1].start + span:
            circuit.buckets.append(_Bucket(start=now))
        return circuit.buckets[-1]

    @staticmethod
    def _window_counts(circuit: _Circuit) -> tuple[int, int]:
        failures = sum(bucket.failures for bucket in circuit.buckets)
        return failures + sum(bucket.successes for bucket in circuit.buckets), failures

    def _open(self, circuit: _Circuit, now: float, reason: str) -> None:
        circuit.state = CircuitState.OPEN
        circuit.opened_at = now
        circuit.probes.clear()
        circuit.times_opened += 1
        circuit.last_reason = reason

    @staticmethod
    def _close(circuit: _Circuit) -> None:
        circuit.state = CircuitState.CLOSED
        circuit.consecutive_failures = 0
        circuit.probes.clear()
        circuit.buckets.clear()


class InMemoryCircuitBreaker(StoredCircuitBreaker):
    """The default breaker: per skill id, in this process, guarded by one lock.

    `clock` is a monotonic seconds function, injectable so tests drive time without sleeping.
    A probe whose outcome is never recorded stops counting against `half_open_max_probes`
    after `probe_timeout` seconds (default: the cooldown). The failure-rate window is kept as
    10 buckets, so memory stays constant at any call rate and an outcome leaves the window
    between `window` and 1.1 x `window` seconds after it was recorded.
    """

    def __init__(self, *, failure_threshold: int = 5, failure_rate: float = 0.5,
                 window: float = 60.0, min_calls: int = 20, cooldown: float = 30.0,
                 half_open_max_probes: int = 1, probe_timeout: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(InMemoryCircuitStore(), failure_threshold=failure_threshold,
                         failure_rate=failure_rate, window=window, min_calls=min_calls,
                         cooldown=cooldown, half_open_max_probes=half_open_max_probes,
                         probe_timeout=probe_timeout, clock=clock)
