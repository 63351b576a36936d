"""Misbehaves on purpose: forks sleeping children in a loop, each in its own session.

The growth is linear and capped at `max` so a host without a process limit still survives
a broken sandbox; the sandbox is expected to stop it long before (max_processes = 8).
"""

import os
import time
from typing import Any


def run(input: Any) -> int:
    children = 0
    for _ in range(int(input.get("max", 300))):
        if os.fork() == 0:
            os.setsid()  # try to escape the execution's process group
            time.sleep(60)
            os._exit(0)
        children += 1
    time.sleep(60)
    return children
