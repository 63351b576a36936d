"""The project's own figures: `Sandbox.execute` latency, throughput, CPU overhead, footprint."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.series import RunFailed, Series
from sandbox import ExecutionRequest, Sandbox


def check_result(result: Any, expected: Any) -> None:
    """Raise RunFailed unless the execution succeeded with the expected output."""
    if not result.ok:
        raise RunFailed(f"{result.status.value}: {result.error}")
    if expected is not None and result.json() != expected:
        raise RunFailed(f"unexpected output {result.output[:200]!r}")


class SandboxSeries(Series):
    """`Sandbox.execute` of one skill, timed from the caller's side."""

    def __init__(self, runs: int, sandbox: Sandbox, skill_id: str, payload: bytes,
                 expected: Any, key: str, label: str, weight: int = 1) -> None:
        super().__init__(runs)
        self.weight = weight
        self.sandbox = sandbox
        self.skill_id = skill_id
        self.payload = payload
        self.expected = expected
        self.key = key
        self.label = label

    def once(self) -> None:
        result = self.sandbox.execute(ExecutionRequest(skill_id=self.skill_id,
                                                       input=self.payload))
        check_result(result, self.expected)


class IdleSandboxSeries(SandboxSeries):
    """The same execution after the sandbox sat idle for `gap` seconds: what a request pays when
    requests do not arrive back to back (caches cold, kernel fast paths expired)."""

    def __init__(self, runs: int, sandbox: Sandbox, skill_id: str, payload: bytes,
                 expected: Any, key: str, label: str, gap: float) -> None:
        super().__init__(runs, sandbox, skill_id, payload, expected, key, label)
        self.gap = gap

    def run(self, count: int) -> None:
        for _ in range(count):
            time.sleep(self.gap)
            super().run(1)


# -- throughput -----------------------------------------------------------------------------


@dataclass
class Throughput:
    concurrency: int
    executions: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""

    @property
    def per_second(self) -> float:
        return self.executions / self.seconds if self.seconds > 0 else 0.0


def measure_throughput(call: Callable[[], None], concurrency: int, total: int) -> Throughput:
    """`total` calls spread over `concurrency` threads; wall time from first start to last end."""
    lock = threading.Lock()
    issued = 0
    outcome = Throughput(concurrency=concurrency, executions=0, seconds=0.0)
    start_gate = threading.Barrier(concurrency + 1)

    def worker() -> None:
        nonlocal issued
        mine: list[float] = []
        errors = 0
        first = ""
        start_gate.wait()
        while True:
            with lock:
                if issued >= total:
                    break
                issued += 1
            began = time.perf_counter()
            try:
                call()
            except RunFailed as exc:
                errors += 1
                first = first or str(exc)
                continue
            mine.append(time.perf_counter() - began)
        with lock:
            outcome.latencies.extend(mine)
            outcome.errors += errors
            outcome.first_error = outcome.first_error or first

    threads = [threading.Thread(target=worker, name=f"bench-load-{index}")
               for index in range(concurrency)]
    for thread in threads:
        thread.start()
    start_gate.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    outcome.seconds = time.perf_counter() - began
    outcome.executions = len(outcome.latencies)
    return outcome


# -- CPU-bound overhead ---------------------------------------------------------------------


def calibrate_fib(function: Callable[[Any], Any], target_seconds: float) -> tuple[int, float]:
    """The n whose in-process fib(n) takes closest to `target_seconds`, and that duration."""
    def timed(n: int) -> float:
        start = time.perf_counter()
        function({"n": n})
        return time.perf_counter() - start

    n, spent = 15, timed(15)
    while spent < target_seconds and n < 40:
        n += 1
        spent = min(timed(n), timed(n))
    if n > 15:
        previous = min(timed(n - 1), timed(n - 1))
        if abs(previous - target_seconds) < abs(spent - target_seconds):
            return n - 1, previous
    return n, spent


# -- footprint ------------------------------------------------------------------------------


def _status_kb(pid: int | str, field_name: str) -> int:
    with open(f"/proc/{pid}/status", "rb") as status:
        for line in status:
            if line.startswith(field_name.encode() + b":"):
                return int(line.split()[1])
    return 0


def _smaps_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(field_name.encode() + b":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_memory(pid: int) -> dict[str, float]:
    """RSS (what the target counts), PSS and private memory in MB: shared library pages make
    RSS overstate what one more zygote costs the machine."""
    private = _smaps_kb(pid, "Private_Clean") + _smaps_kb(pid, "Private_Dirty")
    return {
        "rss_mb": _status_kb(pid, "VmRSS") / 1024,
        "pss_mb": _smaps_kb(pid, "Pss") / 1024,
        "private_mb": private / 1024,
    }


def self_rss_mb() -> float:
    return _status_kb("self", "VmRSS") / 1024


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class LeakCheck:
    executions: int
    rss_before_mb: float
    rss_after_mb: float
    fds_before: int
    fds_after: int
    errors: int
    first_error: str
    threads_before: int
    threads_after: int


def leak_check(sandbox: Sandbox, skill_id: str, payload: bytes, expected: Any, total: int,
               concurrency: int, on_progress: Callable[[int], None]) -> LeakCheck:
    """Supervisor RSS and open fds before and after `total` executions (after a warm-up, so
    one-off allocations — thread stacks, caches — are in the 'before' reading)."""

    def call() -> None:
        check_result(sandbox.execute(ExecutionRequest(skill_id=skill_id, input=payload)),
                     expected)

    warm = max(concurrency * 25, 50)
    measure_throughput(call, concurrency, warm)
    gc.collect()
    rss_before, fds_before = self_rss_mb(), open_fds()
    threads_before = threading.active_count()
    done = 0
    errors = 0
    first_error = ""
    chunk = max(1, min(1000, total // 10))
    while done < total:
        step = min(chunk, total - done)
        outcome = measure_throughput(call, concurrency, step)
        errors += outcome.errors
        first_error = first_error or outcome.first_error
        done += step
        on_progress(step)
    gc.collect()
    return LeakCheck(
        executions=done, rss_before_mb=rss_before, rss_after_mb=self_rss_mb(),
        fds_before=fds_before, fds_after=open_fds(), errors=errors, first_error=first_error,
        threads_before=threads_before, threads_after=threading.active_count(),
    )


def decode(payload: bytes) -> Any:
    return msgspec.json.decode(payload)


def skill_path(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"benchmark skill directory {path} is missing")
    return path
