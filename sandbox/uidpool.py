"""The uids executions run as when the supervisor is root: one per concurrent execution.

An execution with a uid of its own cannot signal, ptrace or read the /proc files of another
execution, and RLIMIT_NPROC becomes a per-execution cap. The pool is shared by every `Sandbox`
of the process (two sandboxes with the same range never hand out the same uid at once);
supervisors in different processes should use different ranges. Released uids go to the back of
the queue, so a uid is reused as late as possible.
"""

from __future__ import annotations

import threading
from collections import deque


class UidPoolExhausted(RuntimeError):
    pass


class UidPool:
    _shared: dict[tuple[int, int], UidPool] = {}
    _shared_lock = threading.Lock()

    def __init__(self, base: int, count: int) -> None:
        self.base = base
        self.count = count
        self._free = deque(range(base, base + count))
        self._available = threading.Condition()

    @classmethod
    def shared(cls, base: int, count: int) -> UidPool:
        with cls._shared_lock:
            pool = cls._shared.get((base, count))
            if pool is None:
                pool = cls._shared[(base, count)] = cls(base, count)
            return pool

    def acquire(self, timeout: float) -> int:
        with self._available:
            if not self._available.wait_for(lambda: bool(self._free), timeout=timeout):
                raise UidPoolExhausted(f"all {self.count} execution uids from {self.base} are "
                                       f"in use; raise IsolationConfig.uid_count")
            return self._free.popleft()

    def release(self, uid: int) -> None:
        with self._available:
            self._free.append(uid)
            self._available.notify()
