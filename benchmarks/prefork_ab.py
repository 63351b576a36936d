"""Interleaved A/B of the zygote's pre-forked spare child: fork-mode echo with `prefork=False`
(every execution forked on request, its cgroup join on the request path) against
`prefork=True` (the spare is forked, set up and in its cgroups before the request), in one
process, alternating blocks so both see the same host load.

    python -m benchmarks.prefork_ab [--runs 1000] [--block 100] [--gaps 0,20] [--json FILE]

Each gap (ms of idleness before every request; 0 = back to back) is measured for both
variants; the figures are `Sandbox.execute` wall times of successful executions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.stats import Summary, summarize
from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill

ECHO_DIR = Path(__file__).resolve().parent.parent / "skills_examples" / "echo"
PAYLOAD = b'{"message": "hello", "n": 42}'


def _block(sandbox: Sandbox, skill_id: str, runs: int, gap: float) -> list[float]:
    times = []
    for _ in range(runs):
        if gap:
            time.sleep(gap)
        start = time.perf_counter()
        result = sandbox.execute(ExecutionRequest(skill_id=skill_id, input=PAYLOAD))
        elapsed = time.perf_counter() - start
        if result.status is not ExecutionStatus.SUCCESS:
            raise SystemExit(f"echo failed: {result.error}")
        times.append(elapsed)
    return times


def measure(runs: int, block: int, gap_ms: float) -> dict[str, Summary]:
    skill = Skill.from_dir(ECHO_DIR)
    samples: dict[str, list[float]] = {"fork on request": [], "prefork": []}
    with Sandbox([skill], max_concurrency=1, prefork=False) as before, \
            Sandbox([skill], max_concurrency=1, prefork=True) as after:
        variants = {"fork on request": before, "prefork": after}
        for sandbox in variants.values():  # warm up: first forks, page cache, cgroup pool
            _block(sandbox, skill.id, 20, 0.0)
        order = list(variants)
        for index in range(0, runs, block):
            for name in order if (index // block) % 2 == 0 else reversed(order):
                samples[name] += _block(variants[name], skill.id, min(block, runs - index),
                                        gap_ms / 1e3)
    return {name: summarize(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="executions per variant and gap")
    parser.add_argument("--block", type=int, default=100, help="executions per interleaved block")
    parser.add_argument("--gaps", default="0,20", help="idle ms before each request, comma list")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = {}
    print(f"host: {os.uname().release}, {os.cpu_count()} cpus, load {os.getloadavg()}")
    for gap in (float(value) for value in args.gaps.split(",")):
        results = measure(args.runs, args.block, gap)
        figures[f"gap {gap:g} ms"] = {name: summary.to_json() for name, summary in results.items()}
        for name, summary in results.items():
            print(f"gap {gap:>4g} ms  {name:<16} n={summary.n:<5} p50 {summary.p50_ms:6.2f} ms  "
                  f"p99 {summary.p99_ms:6.2f} ms  mean {summary.mean_ms:6.2f} ms")
        sys.stdout.flush()
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
