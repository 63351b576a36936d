"""The uids executions run as when the supervisor is root: one per concurrent execution.

An execution with a uid of its own cannot signal, ptrace, `prlimit` or read the /proc files of
another execution, and RLIMIT_NPROC becomes a per-execution cap. That holds only if no two
executions on the host ever hold the same uid at once — across every `Sandbox` of the process
(whatever ranges they were given) and across processes (a daemon and a `skill-sandbox run`
beside it, two daemons). So a uid is *leased*: an exclusive `flock` on its own lock file in a
root-only directory, held while the execution runs. The kernel drops the lock when the holder
exits, however it exits, so a crashed supervisor leaves no stale lease. Released uids go to the
back of the queue, so a uid is reused as late as possible.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections import deque

#: Where the lease files live (root-only); one file per uid ever leased, a few bytes each.
LEASE_DIR = "/run/skill-sandbox/uids"
#: While every uid is leased, how often to look again (a lease held by another process frees
#: without telling this one).
_RETRY = 0.05


class UidPoolExhausted(RuntimeError):
    pass


class UidPool:
    """One range of uids; a uid is handed out only while this process holds its lease."""

    _shared: dict[tuple[int, int], UidPool] = {}
    _shared_lock = threading.Lock()

    def __init__(self, base: int, count: int, lease_dir: str = LEASE_DIR) -> None:
        self.base = base
        self.count = count
        self.lease_dir = lease_dir
        self._free = deque(range(base, base + count))
        self._leases: dict[int, int] = {}  # uid -> fd holding its lock
        self._available = threading.Condition()
        os.makedirs(lease_dir, mode=0o700, exist_ok=True)

    @classmethod
    def shared(cls, base: int, count: int) -> UidPool:
        with cls._shared_lock:
            pool = cls._shared.get((base, count))
            if pool is None:
                pool = cls._shared[(base, count)] = cls(base, count)
            return pool

    def acquire(self, timeout: float) -> int:
        """Lease a uid no other execution on the host holds, waiting up to `timeout` s."""
        deadline = time.monotonic() + timeout
        with self._available:
            while True:
                uid = self._lease_one()
                if uid is not None:
                    return uid
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UidPoolExhausted(
                        f"all {self.count} execution uids from {self.base} are in use (by this "
                        "or another supervisor on the host); raise IsolationConfig.uid_count")
                self._available.wait(timeout=min(left, _RETRY))

    def _lease_one(self) -> int | None:
        for _ in range(len(self._free)):
            uid = self._free.popleft()
            fd = os.open(os.path.join(self.lease_dir, str(uid)),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # leased elsewhere: another Sandbox or process
                os.close(fd)
                self._free.append(uid)
                continue
            self._leases[uid] = fd
            return uid
        return None

    def release(self, uid: int) -> None:
        with self._available:
            fd = self._leases.pop(uid, None)
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)  # drops the lock
            self._free.append(uid)
            self._available.notify()
