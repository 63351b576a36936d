"""Namespaces and mounts for the zygote (once) and its children (a tmpfs workdir each).

As root, the zygote moves into its own mount namespace (and, for skills without the network
permission, its own network namespace) before it serves. Inside it:

- paths the execution uid must read but cannot reach (an interpreter under a 0700 `/root`, a
  skill under a 0700 temp dir) are exposed: the blocking ancestor is covered with a small
  read-only tmpfs holding read-only bind mounts of just those paths, which also hides the
  ancestor's other contents;
- the whole view is made read-only (except the cgroup mounts the child writes before it drops
  privileges): the file-system fallback when Landlock is missing, and a second wall when not;
- SysV IPC objects live in the zygote's own IPC namespace; where seccomp does not refuse the
  calls, the zygote removes every object after each execution (`remove_sysv_objects`). POSIX
  message queues have no such sweep (listing them needs an mqueue mount): seccomp refuses
  mq_open, and the namespace keeps them from the host and other skills;
- each execution gets a size-capped tmpfs over its workdir (a disk quota that leaves nothing on
  the host), mounted by the child and detached by the zygote after the reap.

An ordinary user gets the same namespaces by first entering a user namespace of its own
(`enter_user_namespace`: its uid and gid mapped to themselves, so files keep their owners). Each
execution child then enters one more, nested (`enter_execution_user_namespace`): since Linux
5.14 RLIMIT_NPROC counts a uid's tasks per user namespace, so the child's own namespace makes
that rlimit a cap on the execution's tree alone — before it grows, without root or cgroups —
where for an ordinary user it would otherwise count every process the user has.
"""

from __future__ import annotations

import ctypes
import os
import stat

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2
_SYS_MOUNT_SETATTR = 442
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, ctypes.c_ulong(flags),
                       data.encode() if data else None), f"mount {target}")


def umount(target: str) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(MNT_DETACH)), f"umount {target}")


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _set_mount_attr(path: str, attr_set: int, attr_clr: int) -> None:
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(_libc.syscall(_SYS_MOUNT_SETATTR, ctypes.c_int(-100), path.encode(),
                         ctypes.c_uint(_AT_RECURSIVE), ctypes.byref(attr),
                         ctypes.c_size_t(ctypes.sizeof(attr))), f"mount_setattr {path}")


def _map_identity(uid: int, gid: int) -> None:
    """Map the caller's uid and gid to themselves in its new user namespace (setgroups must be
    denied before an unprivileged process may write a gid map)."""
    for name, line in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"),
                       ("gid_map", f"{gid} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def enter_user_namespace() -> None:
    """A user namespace of this process's own, in which an ordinary user may create mount,
    network and IPC namespaces. The process must be single-threaded."""
    uid, gid = os.getuid(), os.getgid()
    unshare(CLONE_NEWUSER)
    _map_identity(uid, gid)


def enter_execution_user_namespace() -> None:
    """A nested user namespace for one execution: its RLIMIT_NPROC counts only the tasks
    created in it. It has no uid map: /proc is read-only in the zygote's mount namespace (a
    skill must not write another execution's /proc files), so inside, the process and the
    files it owns show as the overflow uid (65534); the kernel still checks access with its
    real uid. The capabilities it brings (over a namespace that owns nothing) are dropped with
    `drop_capabilities`."""
    unshare(CLONE_NEWUSER)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPSET = 126


def drop_capabilities() -> None:
    """Empty effective, permitted and inheritable sets (this process only)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), ctypes.byref(data)), "capset")


def enter_mount_namespace() -> None:
    """A private copy of the mount table: nothing mounted here reaches the host, or back."""
    unshare(CLONE_NEWNS)
    mount(None, "/", None, MS_REC | MS_PRIVATE)


def read_only_view(writable: list[str]) -> None:
    """Every mount read-only and nosuid, except the `writable` mount points (recursively)."""
    _set_mount_attr("/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0)
    for path in writable:
        if os.path.ismount(path):
            _set_mount_attr(path, 0, _MOUNT_ATTR_RDONLY)


def hidden_ancestor(path: str) -> str | None:
    """The shallowest directory above `path` that a stranger (other uid, no groups) cannot
    traverse, or None."""
    current = ""
    for part in path.strip("/").split("/")[:-1]:
        current += "/" + part
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return None


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def expose(paths: list[str]) -> None:
    """Make each of `paths` reachable by a stranger, read-only, without touching the host.

    Covers each blocking ancestor with a tmpfs that holds read-only binds of the needed paths
    beneath it (opened before the cover goes on). Repeats for ancestors only visible through
    an earlier bind (`check_reachable` says which path stays out of reach, if any).
    """
    for _ in range(8):
        blocked = {path: hidden_ancestor(path) for path in paths}
        tops = [ancestor for ancestor in blocked.values() if ancestor]
        if not tops:
            break
        top = min(tops, key=len)
        under = sorted({path for path in paths if _inside(path, top)}, key=len)
        outermost = [path for path in under
                     if not any(other != path and _inside(path, other) for other in under)]
        fds = {path: os.open(path, os.O_PATH | os.O_CLOEXEC) for path in outermost}
        try:
            mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                  "size=64k,nr_inodes=256,mode=0755")
            for path, fd in fds.items():
                if os.path.isdir(f"/proc/self/fd/{fd}"):
                    os.makedirs(path, mode=0o755, exist_ok=True)
                else:
                    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
                    os.close(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
                mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID)
        finally:
            for fd in fds.values():
                os.close(fd)


def check_reachable(paths: list[str], readable: list[str]) -> None:
    """Raise `PermissionError` naming the first of `paths` a stranger cannot reach, or of
    `readable` one it cannot list."""
    for path in paths:
        ancestor = hidden_ancestor(path)
        if ancestor is not None:
            mode = stat.S_IMODE(os.stat(ancestor).st_mode)
            raise PermissionError(f"{path} is not reachable by the execution uid: {ancestor} "
                                  f"has mode {mode:04o}")
    for path in readable:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if (mode & 0o005) != 0o005:
            raise PermissionError(f"{path} is not readable by the execution uid (mode "
                                  f"{mode:04o}): make it world-readable, e.g. chmod o+rx")


def cover_workdir_root(root: str) -> None:
    """A tmpfs of this mount namespace's own over the workdir root: the zygote makes and removes
    each execution's directory there, in memory, so neither it nor the supervisor touches the
    host's filesystem per execution (an rmdir on a journaling disk waits for its journal, a
    millisecond or more on a busy host, on the caller's path). It holds empty directories
    only, each under an execution's own tmpfs; executions of other zygotes are not in it."""
    mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          "size=64k,nr_inodes=65536,mode=0711")


def mount_workdir(path: str, uid: int, gid: int, size_bytes: int) -> None:
    """A fresh tmpfs owned by the execution uid: its disk quota, gone when unmounted."""
    inodes = max(1024, size_bytes // 4096)
    mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
          f"size={size_bytes},nr_inodes={inodes},mode=0700,uid={uid},gid={gid}")


_SYSV_TABLES = (("/proc/sysvipc/shm", "shmctl"), ("/proc/sysvipc/msg", "msgctl"),
                ("/proc/sysvipc/sem", "semctl"))
_IPC_RMID = 0


def remove_sysv_objects() -> None:
    """Remove every SysV segment, queue and semaphore set of this IPC namespace (the files
    under /proc/sysvipc list the caller's namespace only). An id gone meanwhile is skipped."""
    for table, call in _SYSV_TABLES:
        try:
            with open(table, "rb") as listing:
                lines = listing.read().splitlines()[1:]
        except OSError:
            continue
        remove = getattr(_libc, call)
        for line in lines:
            fields = line.split()
            if len(fields) > 1:
                if call == "semctl":
                    remove(ctypes.c_int(int(fields[1])), 0, _IPC_RMID)
                else:
                    remove(ctypes.c_int(int(fields[1])), _IPC_RMID, None)
