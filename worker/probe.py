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
import sys
import tempfile
from collections.abc import Callable

from worker import landlock, namespaces, seccomp

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
        namespaces.mount_workdir(directory, 0, 0, 1 << 20)
        namespaces.umount(directory)
        namespaces.read_only_view([])
    return probe


def _pid_ns() -> None:
    namespaces.unshare(0x20000000)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if os.getpid() == 1 else 1)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise RuntimeError("the first child of a new PID namespace is not pid 1")


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
    try:
        results = {name: _in_child(probe) for name, probe in probes.items()}
    finally:
        os.rmdir(scratch)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
