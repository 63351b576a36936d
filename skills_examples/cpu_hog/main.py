"""Misbehaves on purpose: a busy loop that ignores SIGXCPU."""

import signal
from typing import Any


def run(input: Any) -> None:
    signal.signal(signal.SIGXCPU, signal.SIG_IGN)  # the soft limit alone must not be enough
    n = 0
    while True:
        n += 1
