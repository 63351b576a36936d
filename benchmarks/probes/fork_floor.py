"""The fork floor measured from a lean, zygote-sized process.

Imports what a zygote imports (the worker runtime, msgspec), freezes the heap like a zygote,
then answers "N" lines on stdin with a JSON list of N fork + pipe write + wait4 round trips in
nanoseconds. Fork cost grows with the forking process's size, so this is the floor for forking
a zygote, while the harness's own floor is the floor for forking the supervisor.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import msgspec

import worker.runtime
import worker.zygote  # noqa: F401


def round_trip() -> int:
    start = time.perf_counter_ns()
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:
            os.write(write_end, b"x")
            os._exit(0)
        os.read(read_end, 1)
        os.wait4(pid, 0)
        return time.perf_counter_ns() - start
    finally:
        os.close(read_end)
        os.close(write_end)


def main() -> None:
    gc.collect()
    gc.freeze()
    encoder = msgspec.json.Encoder()
    for line in sys.stdin.buffer:
        count = int(line)
        timings = [round_trip() for _ in range(count)]
        sys.stdout.buffer.write(encoder.encode(timings) + b"\n")
        sys.stdout.buffer.flush()


if __name__ == "__main__":
    main()
