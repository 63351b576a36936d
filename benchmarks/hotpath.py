"""Just the fork-mode echo against the zygote-sized floor, and where its CPU goes.

`make bench` takes minutes and runs every row; working on the execution hot path needs the one
ratio the target is stated in (issue 13: fork echo p50 over the zygote-sized floor p50, measured
in the same run) in seconds, plus the CPU split between the three parties that pay for an
execution: the supervisor, the zygote, and the execution child (the spare it was handed to).

    .venv/bin/python -m benchmarks.hotpath [RUNS]

The two series are interleaved in blocks exactly as the full bench does (`series.interleave`),
so the ratio holds on a busy machine even where the absolute times move. The CPU split comes
from each process's own counters: `getrusage` for the supervisor, /proc/<pid>/stat of the
zygote (its children are reaped by the zygote, so its *children* columns are the executions'
and spares' CPU), read before and after the timed runs.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys

import msgspec

from benchmarks import baselines, project
from benchmarks.progress import Progress
from benchmarks.runner import ECHO_DIR, ECHO_ID, _echo_payload
from benchmarks.series import interleave

_TICK = os.sysconf("SC_CLK_TCK")


def _zygotes() -> list[int]:
    """This process's children that are zygotes (the base and the skill's own)."""
    pids: list[int] = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children", "rb") as children:
            pids += [int(pid) for pid in children.read().split()]
    return pids


def _cpu_and_faults(pid: int) -> tuple[float, float, int, int]:
    """(own CPU s, reaped children's CPU s, own minor faults, reaped children's minor faults)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    # fields[0] is field 3 (state): minflt is field 10, cminflt 11, utime 14 ... cstime 17.
    own = (int(fields[11]) + int(fields[12])) / _TICK
    children = (int(fields[13]) + int(fields[14])) / _TICK
    return own, children, int(fields[7]), int(fields[8])


def main(runs: int) -> None:
    from sandbox import Sandbox, Skill

    payload = _echo_payload()
    expected = msgspec.json.decode(payload)
    sandbox = Sandbox([Skill.from_dir(ECHO_DIR)], max_concurrency=4)
    lean = baselines.LeanForkFloor(runs)
    try:
        echo = project.SandboxSeries(runs, sandbox, ECHO_ID, payload, expected, "fork_echo",
                                     "echo, fork mode")
        interleave([lean, echo], 20, 50, Progress(1, enabled=False))
        floor_p50 = statistics.median(lean.samples)
        echo_p50 = statistics.median(echo.samples)
        print(f"floor (zygote-sized) p50 {floor_p50 * 1e3:.3f} ms   fork echo p50 "
              f"{echo_p50 * 1e3:.3f} ms   ratio {echo_p50 / floor_p50:.2f}x   "
              f"errors {echo.errors} {echo.first_error}")
        zygotes = _zygotes()
        before = {pid: _cpu_and_faults(pid) for pid in zygotes}
        self_before = resource.getrusage(resource.RUSAGE_SELF)
        echo.samples.clear()
        echo.run(runs)
        self_after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (self_after.ru_utime + self_after.ru_stime
               - self_before.ru_utime - self_before.ru_stime)
        print(f"per execution (CPU ms, minor faults), {runs} back-to-back runs:")
        print(f"  supervisor          {cpu / runs * 1e3:6.2f} ms "
              f"{(self_after.ru_minflt - self_before.ru_minflt) / runs:6.0f} faults")
        for pid in zygotes:
            after = _cpu_and_faults(pid)
            delta = [b - a for a, b in zip(before[pid], after, strict=True)]
            if not delta[0] and not delta[1]:
                continue  # the base zygote: idle once the skill's zygote is up
            print(f"  zygote {pid:<8}     {delta[0] / runs * 1e3:6.2f} ms {delta[2] / runs:6.0f}"
                  f" faults\n  its children        {delta[1] / runs * 1e3:6.2f} ms "
                  f"{delta[3] / runs:6.0f} faults")
    finally:
        lean.close()
        sandbox.close()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 600)
