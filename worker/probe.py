"""Try each isolation mechanism for real, in throw-away children, and print what worked as JSON.

Run by `sandbox.capabilities.detect()` as `python -I -B -m worker.probe UID` in a fresh
interpreter (forking the multi-threaded supervisor to experiment would be unsafe). Each probe
forks, attempts the same calls the zygote and the execution child make, and reports "" on
success or the error; a host where a call is filtered or forbidden says so here, not in the
first execution.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable

from worker import landlock, namespaces, pidns, seccomp

_PROBE_DEADLINE = 5.0
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _in_child(probe: Callable[[], None]) -> str:
    """Run `probe` in a forked child; "" if it returned, else the error it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        message = ""
        try:
            probe()
        except BaseException as exc:  # noqa: BLE001 - the error is the answer
            message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        os.write(write_end, message.encode()[:1000] or b"ok")
        os._exit(0)
    os.close(write_end)
    try:
        answer = os.read(read_end, 1000).decode(errors="replace")
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return "" if answer == "ok" else (answer or "probe died without an answer")


def _no_new_privs() -> None:
    if _libc.prctl(38, ctypes.c_ulong(1), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def _mount_ns(directory: str) -> Callable[[], None]:
    def probe() -> None:
        namespaces.enter_mount_namespace()
        namespaces.mount_workdir(directory, os.getuid(), os.getgid(), 1 << 20)
        namespaces.umount(directory)
        namespaces.read_only_view([])
    return probe


def _pid_ns() -> None:
    """The zygote's own fork of an execution: straight into a new PID namespace, as pid 1,
    with the thread id glibc keeps right (`os.abort` signals the thread it names)."""
    reason = pidns.unavailable()
    if reason:
        raise OSError(reason)
    pid = pidns.fork(True)
    if pid == 0:
        os._exit(0 if os.getpid() == 1 and pidns.cached_tid() == 1 and pidns.parent_pid() > 0
                 else 1)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError("the first child of a new PID namespace is not pid 1, or its "
                           "thread id or parent are wrong")


def _in_user_namespace(probe: Callable[[], None]) -> Callable[[], None]:
    """`probe` as an ordinary user's zygote runs it: inside a user namespace of its own."""
    def wrapped() -> None:
        namespaces.enter_user_namespace()
        probe()
    return wrapped


def _nproc_per_user_namespace() -> None:
    """RLIMIT_NPROC counted per user namespace (Linux 5.14+): in a fresh one, a cap of 3 tasks
    lets 2 children start, whatever else the uid runs; where the kernel counts the uid
    host-wide, the uid's other processes would use up the cap (or, for root, nothing counts)."""
    namespaces.enter_user_namespace()
    namespaces.enter_execution_user_namespace()
    resource.setrlimit(resource.RLIMIT_NPROC, (3, 3))
    children = []
    try:
        for _ in range(4):
            try:
                pid = os.fork()
            except BlockingIOError:
                break
            if pid == 0:
                time.sleep(_PROBE_DEADLINE)
                os._exit(0)
            children.append(pid)
    finally:
        for pid in children:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    if len(children) != 2:
        raise RuntimeError(f"RLIMIT_NPROC=3 in a new user namespace let {len(children)} "
                           "children start, not 2: the kernel does not count tasks per user "
                           "namespace (Linux 5.14+)")


def _setuid(uid: int) -> Callable[[], None]:
    def probe() -> None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    return probe


def _seccomp() -> None:
    _no_new_privs()
    seccomp.Filter(seccomp.build_filter(deny_network=True)).install()
    if _libc.syscall(272, ctypes.c_ulong(0)) != -1 or ctypes.get_errno() != errno.EPERM:
        raise RuntimeError("the filter is installed but unshare() was not refused")


def _landlock(writable: str) -> Callable[[], None]:
    def probe() -> None:
        abi = landlock.abi_version()
        if not abi:
            raise OSError("Landlock is not enabled in this kernel")
        _no_new_privs()
        landlock.Plan(abi, {"/usr": landlock.READ_EXEC}).restrict(writable)
        try:
            os.listdir("/")
        except PermissionError:
            return
        raise RuntimeError("restricted, yet / can still be listed")
    return probe


def main() -> None:
    uid = int(sys.argv[1]) if len(sys.argv) > 1 else 65534
    scratch = tempfile.mkdtemp(prefix="skill-sandbox-probe-")
    probes: dict[str, Callable[[], None]] = {
        "no_new_privs": _no_new_privs,
        "seccomp": _seccomp,
        "landlock": _landlock(scratch),
        "mountns": _mount_ns(scratch),
        "netns": lambda: namespaces.unshare(namespaces.CLONE_NEWNET),
        "ipcns": lambda: namespaces.unshare(namespaces.CLONE_NEWIPC),
        "pidns": _pid_ns,
        "userns": lambda: namespaces.unshare(0x10000000),
        "setuid": _setuid(uid),
    }
    if os.geteuid() != 0:
        # An ordinary user has these namespaces only inside a user namespace of its own.
        for name in ("mountns", "netns", "ipcns", "pidns"):
            probes[name] = _in_user_namespace(probes[name])
        probes["userns_nproc"] = _nproc_per_user_namespace
    try:
        results = {name: _in_child(probe) for name, probe in probes.items()}
    finally:
        os.rmdir(scratch)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
