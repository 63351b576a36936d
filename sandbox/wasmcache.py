"""Compiled WASM modules kept by the supervisor between boots of their skills' zygotes.

A Go module takes seconds of CPU to compile, at every zygote boot: after each eviction, crash
or reload. Its first zygote hands over the compiled module (wasmtime's serialized artifact, in
a sealed memfd it made before its layers: see `worker.wasm.prepare`), and later boots get it
back, to deserialize in under a millisecond. Only the fd is kept here, never read: the
artifact is native code wasmtime trusts, made by a zygote and given only to zygotes of the same
skill, which use it only for the module bytes it was made from.

Kept in memory (shmem), so within a byte budget, least recently used first out; nothing
survives the process.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

#: Bytes of compiled modules kept at most (a Go module's artifact is ~8 MB).
DEFAULT_BUDGET = 256 << 20


class CompiledModules:
    """skill id -> (artifact fd, digest of the module it was made from), LRU within `budget`."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self._items: OrderedDict[str, tuple[int, str, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def take(self, skill_id: str) -> tuple[int, str] | None:
        """A duplicate of the skill's artifact fd (the caller closes it) and its digest."""
        with self._lock:
            item = self._items.get(skill_id)
            if item is None:
                return None
            self._items.move_to_end(skill_id)
            return os.dup(item[0]), item[1]

    def keep(self, skill_id: str, fd: int, sha256: str) -> None:
        """Keep `fd` (now ours) as the skill's artifact, in place of any earlier one."""
        size = os.fstat(fd).st_size
        with self._lock:
            self._drop(skill_id)
            if size > self.budget:
                os.close(fd)
                return
            self._items[skill_id] = (fd, sha256, size)
            self._bytes += size
            while self._bytes > self.budget:
                self._drop(next(iter(self._items)))

    def forget(self, skill_id: str) -> None:
        with self._lock:
            self._drop(skill_id)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        with self._lock:
            for skill_id in list(self._items):
                self._drop(skill_id)

    def _drop(self, skill_id: str) -> None:
        item = self._items.pop(skill_id, None)
        if item is not None:
            os.close(item[0])
            self._bytes -= item[2]
