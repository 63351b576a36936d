"""Fork straight into a new PID namespace: each execution is pid 1 of a namespace of its own.

In its own PID namespace an execution can name, and so signal, trace or open a pidfd of, no
process but its own descendants: not the supervisor, not its zygote, not another execution of
the same uid — the one wall that holds for an ordinary user on kernels whose Landlock cannot
scope signals (ABI < 6). And when its pid 1 exits, the kernel kills whatever it left behind.

`os.fork` takes no clone flags, and `unshare(CLONE_NEWPID)` moves only the *next* child, once:
the zygote could not go back to its own namespace for the following fork without privileges over
it, which an ordinary user's zygote lacks. So the zygote calls the raw `clone` syscall with
`CLONE_NEWPID | SIGCHLD`, wrapped exactly as `os.fork` wraps `fork()`: `PyOS_BeforeFork`, then
`PyOS_AfterFork_Child`/`_Parent`, with the GIL held throughout (`ctypes.PyDLL`). glibc's `fork`
also writes the child's thread id into its thread descriptor (`raise`, `abort` and recursive
locks read it); `CLONE_CHILD_SETTID` does the same here, at the offset glibc publishes for
debuggers (`_thread_db_pthread_tid`). The rest of what glibc's `fork` does in the child resets
locks other threads might hold; the zygote has no other thread. Where any piece is missing
(another libc, another architecture) `unavailable()` says which, and executions fork without a
namespace.

What changes for a skill: `os.getpid()` is 1 and `os.getppid()` 0 (its host pid is the target of
`/proc/self`). As any pid 1, it does not die of a signal it sends itself or that a descendant
sends it while the signal's action is the default (kernel-generated ones such as a segfault, and
the supervisor's kills, are delivered as always); orphans of its descendants become its children.
"""

from __future__ import annotations

import ctypes
import os
import platform
import signal

from worker.namespaces import CLONE_NEWPID

_CLONE_CHILD_SETTID = 0x01000000
#: clone's number and which argument slot takes the child-tid pointer (x86_64 and aarch64
#: differ: (flags, stack, parent_tid, child_tid, tls) against (flags, stack, parent_tid, tls,
#: child_tid)).
_CLONE = {"x86_64": (56, 3), "aarch64": (220, 4)}

_api = ctypes.pythonapi
_libc = ctypes.PyDLL(None, use_errno=True)  # PyDLL: the GIL stays held across the call
_libc.syscall.restype = ctypes.c_long
_libc.pthread_self.restype = ctypes.c_void_p


def _tid_offset() -> int | None:
    try:
        size_bits, count, offset = (ctypes.c_uint32 * 3).in_dll(_libc, "_thread_db_pthread_tid")
    except ValueError:
        return None
    return offset if size_bits == 32 and count == 1 else None


_TID_OFFSET = _tid_offset()


def cached_tid() -> int:
    """The thread id glibc keeps for this thread (what `raise` and `abort` signal), or -1
    where it does not publish where it keeps it."""
    if _TID_OFFSET is None:
        return -1
    return ctypes.c_int.from_address(_libc.pthread_self() + _TID_OFFSET).value


def unavailable() -> str:
    """Why `fork(new_namespace=True)` cannot be used in this interpreter ("" when it can);
    whether the kernel lets this process create the namespace is for the caller to try."""
    if platform.machine() not in _CLONE:
        return f"no clone call table for {platform.machine()}"
    if _TID_OFFSET is None:
        return "the C library does not publish its thread-id field (not glibc)"
    return ""


def fork(new_namespace: bool) -> int:
    """`os.fork()`, the child first of a new PID namespace when `new_namespace`: 0 in the
    child, the child's pid (as this process sees it) in the parent."""
    if not new_namespace:
        return os.fork()
    return _clone(CLONE_NEWPID, "clone(CLONE_NEWPID)")


def fork_sibling() -> int:
    """`os.fork()`, but the child is this process's *sibling*: its parent is this process's
    parent (`CLONE_PARENT`), which alone is told of its exit and reaps it. The shared base
    zygote (`worker.base`) forks skills' zygotes so: each is the supervisor's own child, as an
    exec'd one is, and outlives the base if the base is killed."""
    return _clone(_CLONE_PARENT, "clone(CLONE_PARENT)")


_CLONE_PARENT = 0x00008000


def _clone(extra_flags: int, what: str) -> int:
    """The raw clone syscall with `extra_flags`, wrapped as `os.fork` wraps `fork()`."""
    number, tid_slot = _CLONE[platform.machine()]
    args = [ctypes.c_void_p(0)] * 4
    self_thread = _libc.pthread_self()
    assert _TID_OFFSET is not None and self_thread is not None, unavailable()
    args[tid_slot - 1] = ctypes.c_void_p(self_thread + _TID_OFFSET)
    flags = ctypes.c_ulong(extra_flags | _CLONE_CHILD_SETTID | signal.SIGCHLD)
    _api.PyOS_BeforeFork()
    pid = _libc.syscall(ctypes.c_long(number), flags, *args)
    if pid == 0:
        _api.PyOS_AfterFork_Child()
        return 0
    err = ctypes.get_errno()
    _api.PyOS_AfterFork_Parent()
    if pid < 0:
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(pid)


def parent_pid() -> int:
    """This process's parent, as the /proc of the zygote's namespace names it: in a new PID
    namespace `os.getppid()` is 0 whoever the parent is, so the check that the zygote still
    lives (after setting the parent-death signal) reads it from /proc/self/stat instead."""
    ppid = os.getppid()
    if ppid:
        return ppid
    with open("/proc/self/stat", "rb") as stat:
        fields = stat.read().rsplit(b")", 1)[1].split()
    return int(fields[1])  # after the name: state, ppid
