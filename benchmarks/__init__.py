"""The Skill Sandbox benchmark harness: `python -m benchmarks`, `make bench`,
`skill-sandbox bench`.

Measures fork-mode, spawn-mode and command-skill latency, throughput under concurrency,
CPU-bound overhead and footprint, each beside baselines taken in the same run (a bare fork, a
fresh interpreter per execution, a warm reused worker, bubblewrap), and checks them against the
targets of the performance issue. Prints a table and writes every figure to a JSON file.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks with command-line style arguments; returns the exit status
    (0, or 1 when runs failed and the figures are not to be trusted)."""
    from benchmarks.runner import main as run_main

    return run_main(argv)
