"""Misbehaves on purpose: grabs 4 KB-touched 16 MB blocks until something stops it."""

from typing import Any

BLOCK = 16 << 20


def run(input: Any) -> int:
    blocks = []
    for _ in range(int(input.get("blocks", 256))):  # 4 GB unless stopped
        block = bytearray(BLOCK)
        block[::4096] = b"x" * (BLOCK // 4096)  # touch every page so it is really resident
        blocks.append(block)
    return len(blocks)
