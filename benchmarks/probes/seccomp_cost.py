"""What the seccomp allow-list costs, measured in forked children of a lean interpreter.

Prints JSON: the build time of each profile's program, its length, the time to attach it
(once per zygote in this design; what a child would pay if it stacked one per execution), the
mount filter every child does attach, and the time of a syscall-heavy Python loop (stat, getpid,
read of /dev/zero) with no filter and under each profile (the per-call cost of the program,
which the kernel's action cache skips for calls allowed by number alone).
"""

from __future__ import annotations

import ctypes
import json
import os
import time
from collections.abc import Callable

from worker import seccomp

_libc = ctypes.CDLL(None, use_errno=True)
_ROUNDS = 5
_LOOP = 20_000


def _workload() -> None:
    with open("/dev/zero", "rb", buffering=0) as zero:
        for _ in range(_LOOP):
            os.stat("/")
            os.getppid()
            zero.read(16)


def _in_child(measure: Callable[[], float]) -> float:
    """Run `measure` in a forked child (a filter cannot be removed) and return its number."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.write(write_end, repr(measure()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        value = float(answer.read() or "nan")
    os.waitpid(pid, 0)
    return value


def _attach(program: bytes) -> Callable[[], float]:
    def measure() -> float:
        _libc.prctl(38, ctypes.c_ulong(1), 0, 0, 0)  # no_new_privs
        compiled = seccomp.Filter(program)
        start = time.perf_counter_ns()
        compiled.install()
        return (time.perf_counter_ns() - start) / 1e3
    return measure


def _loop(program: bytes | None) -> Callable[[], float]:
    def measure() -> float:
        if program is not None:
            _libc.prctl(38, ctypes.c_ulong(1), 0, 0, 0)
            seccomp.Filter(program).install()
        start = time.perf_counter_ns()
        _workload()
        return (time.perf_counter_ns() - start) / 1e6
    return measure


def _best(measure: Callable[[], float]) -> float:
    return min(_in_child(measure) for _ in range(_ROUNDS))


def main() -> None:
    results: dict[str, object] = {"loop_no_filter_ms": _best(_loop(None))}
    for profile in seccomp.PROFILES:
        start = time.perf_counter_ns()
        program = seccomp.build_filter(True, allow_mount=True, profile=profile)
        results[f"{profile}_build_us"] = (time.perf_counter_ns() - start) / 1e3
        results[f"{profile}_instructions"] = len(program) // 8
        results[f"{profile}_attach_us"] = _best(_attach(program))
        results[f"{profile}_loop_ms"] = _best(_loop(program))
    results["child_filter_attach_us"] = _best(_attach(seccomp.build_child_filter()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
