"""How much to run: the counts behind every figure, from command-line flags."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchConfig:
    """Run counts. The defaults give ≥ 1,000 runs per latency figure and fit in 5 minutes on a
    2-core machine; `quick()` is for the smoke test and for trying the harness out."""

    latency_runs: int = 1000  # fork-mode, command, floors, reused worker
    spawn_runs: int = 1000  # everything that starts an interpreter per run
    block: int = 50  # series are interleaved in blocks of this many runs
    warmup: int = 20
    throughput_runs: int = 2000  # executions per concurrency level
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    fib_ms: float = 200.0  # in-process duration the CPU-bound skill is calibrated to
    fib_runs: int = 15
    leak_runs: int = 10_000
    leak_concurrency: int = 4
    daemon_runs: int = 1000
    idle_runs: int = 30  # executions after an idle gap (each costs the gap: 100 ms)
    idle_gap_ms: float = 100.0
    output: Path | None = None
    progress: bool = True
    quick: bool = False

    @classmethod
    def quick_config(cls, **overrides: object) -> BenchConfig:
        values: dict[str, object] = {
            "latency_runs": 20, "spawn_runs": 4, "block": 5, "warmup": 2,
            "throughput_runs": 24, "fib_ms": 10.0, "fib_runs": 3, "leak_runs": 100,
            "daemon_runs": 10, "idle_runs": 3, "idle_gap_ms": 20.0, "quick": True,
        }
        values.update(overrides)
        return cls(**values)  # type: ignore[arg-type]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated whole numbers such as 1,2,4,8, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1, got {text!r}")
    return levels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Skill Sandbox benchmarks: latency, throughput and footprint against "
                    "baselines measured in the same run. Prints a table and writes JSON.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="tiny counts (seconds, not minutes): checks the harness, not speed")
    parser.add_argument("--latency-runs", type=_positive, help="runs per fast latency figure")
    parser.add_argument("--spawn-runs", type=_positive,
                        help="runs per figure that starts an interpreter per run")
    parser.add_argument("--block", type=_positive, help="interleaving block size")
    parser.add_argument("--warmup", type=_positive, help="warm-up runs before each series")
    parser.add_argument("--throughput-runs", type=_positive,
                        help="executions per concurrency level")
    parser.add_argument("--concurrency", type=_levels, help="levels, e.g. 1,2,4,8")
    parser.add_argument("--fib-ms", type=float, help="target in-process duration of the CPU-"
                                                     "bound skill, in ms")
    parser.add_argument("--fib-runs", type=_positive, help="runs of the CPU-bound skill")
    parser.add_argument("--leak-runs", type=_positive,
                        help="executions between the supervisor RSS/fd readings")
    parser.add_argument("--daemon-runs", type=_positive, help="requests to the daemon")
    parser.add_argument("--idle-runs", type=_positive,
                        help="executions measured after the sandbox sat idle")
    parser.add_argument("--idle-gap-ms", type=float, help="that idle time, in ms")
    parser.add_argument("--output", "-o", type=Path,
                        help="JSON file to write (default: bench-results/bench-<time>.json)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    args = build_parser().parse_args(argv)
    for flag, value in (("--fib-ms", args.fib_ms), ("--idle-gap-ms", args.idle_gap_ms)):
        if value is not None and not value > 0:
            build_parser().error(f"{flag} must be positive, got {value}")
    overrides = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(BenchConfig)
        if field.name not in ("progress", "quick") and getattr(args, field.name, None) is not None
    }
    overrides["progress"] = not args.no_progress
    if args.quick:
        return BenchConfig.quick_config(**overrides)
    return BenchConfig(**overrides)
