"""Misbehaves on purpose: writes to stdout forever."""

from typing import Any


def run(input: Any) -> None:
    line = "flood " * 20
    while True:
        print(line, flush=True)
