"""Latency series and the interleaved schedule that makes their ratios hold on a noisy machine.

Each series is one thing timed over and over (a bare fork, a `Sandbox.execute`, a fresh
interpreter...). Rather than running series one after another — where a neighbour's compile
job would land on whichever series happened to be running — the runner takes a block of runs
from each series in turn until all are done, so every series samples the same background.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from benchmarks.progress import Progress


class RunFailed(Exception):
    """One run produced the wrong answer or failed: counted as an error, never timed."""


class Series:
    """Something timed over and over. Subclasses implement `once` (or `run` for batches)."""

    key = ""
    label = ""
    #: Progress units per run: a fresh interpreter costs ~15 forks, and the bar's ETA should
    #: know it.
    weight = 1

    def __init__(self, runs: int) -> None:
        self.runs = runs
        self.samples: list[float] = []
        self.errors = 0
        self.first_error = ""

    def once(self) -> None:
        raise NotImplementedError

    def warm(self, count: int) -> None:
        """Runs not recorded: caches, lazy imports, first-touch page faults."""
        for _ in range(count):
            try:
                self.once()
            except RunFailed as exc:
                self.failed(exc)

    def run(self, count: int) -> None:
        """`count` timed runs; a failed run is counted, not timed."""
        clock = time.perf_counter
        for _ in range(count):
            start = clock()
            try:
                self.once()
            except RunFailed as exc:
                self.failed(exc)
                continue
            self.samples.append(clock() - start)

    def failed(self, exc: BaseException) -> None:
        self.errors += 1
        if not self.first_error:
            self.first_error = str(exc) or type(exc).__name__

    def close(self) -> None:
        """Release processes and descriptors the series holds."""


def interleave(series: Sequence[Series], block: int, warmup: int, progress: Progress,
               phase: str = "latency") -> None:
    """Warm every series, then run blocks of each in turn until each has its runs."""
    for item in series:
        progress.phase(f"{phase}: warm-up, {item.label}")
        item.warm(min(warmup, item.runs))
    remaining = {id(item): item.runs for item in series}
    while any(remaining.values()):
        for item in series:
            count = min(block, remaining[id(item)])
            if not count:
                continue
            progress.phase(f"{phase}: {item.label}")
            item.run(count)
            remaining[id(item)] -= count
            progress.advance(count * item.weight)
