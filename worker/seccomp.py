"""A hand-built seccomp-BPF deny-list, compiled once in the zygote and installed in each child.

No libseccomp: the program is ~50 classic-BPF instructions built here from a syscall table, so
the worker needs nothing beyond ctypes. Denied calls fail with EPERM (ENOSYS for clone3, so libc
falls back to clone, whose namespace flags this filter can inspect); the skill sees an ordinary
OSError rather than being killed, which keeps its failure readable.

Only x86_64 is described here; on any other architecture `build_filter` raises and the layer is
reported unavailable instead of being installed with wrong numbers.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

# x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl).
X86_64_DENIED: dict[str, int] = {
    "ptrace": 101, "process_vm_readv": 310, "process_vm_writev": 311, "pidfd_getfd": 438,
    "kcmp": 312, "mount": 165, "umount2": 166, "pivot_root": 155, "chroot": 161,
    "open_tree": 428, "move_mount": 429, "fsopen": 430, "fsconfig": 431, "fsmount": 432,
    "fspick": 433, "mount_setattr": 442, "bpf": 321, "perf_event_open": 298,
    "kexec_load": 246, "kexec_file_load": 320, "init_module": 175, "finit_module": 313,
    "delete_module": 176, "create_module": 174, "keyctl": 250, "add_key": 248,
    "request_key": 249, "userfaultfd": 323, "unshare": 272, "setns": 308, "reboot": 169,
    "swapon": 167, "swapoff": 168, "acct": 163, "quotactl": 179, "quotactl_fd": 443,
    "name_to_handle_at": 303, "open_by_handle_at": 304, "settimeofday": 164,
    "clock_settime": 227, "adjtimex": 159, "clock_adjtime": 305, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "syslog": 103, "vhangup": 153,
    "lookup_dcookie": 212, "fanotify_init": 300, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "process_madvise": 440,
}
_X86_64_CLONE = 56
_X86_64_CLONE3 = 435
_X86_64_SOCKET = 41
_X32_SYSCALL_BIT = 0x40000000
_AUDIT_ARCH_X86_64 = 0xC000003E

CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                         | 0x20000000 | 0x40000000)  # NEWNS CGROUP UTS IPC USER PID NET
AF_UNIX = 1

# Classic BPF opcodes.
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_OFFSET_ARG0 = 16  # low 32 bits of args[0] on a little-endian machine

PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SOCK_FILTER = struct.Struct("=HBBI")


class UnsupportedArchitecture(RuntimeError):
    pass


class _Program:
    """Instructions with jumps to named return blocks, resolved to relative offsets at the end."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int]] = []

    def add(self, op: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((op, jt, jf, k))

    def assemble(self, returns: dict[str, int]) -> bytes:
        labels = {name: len(self.code) + index for index, name in enumerate(returns)}
        out = bytearray()
        for index, (op, jt, jf, k) in enumerate(self.code):
            out += _SOCK_FILTER.pack(op, self._offset(jt, index, labels),
                                     self._offset(jf, index, labels), k)
        for value in returns.values():
            out += _SOCK_FILTER.pack(_RET_K, 0, 0, value)
        return bytes(out)

    @staticmethod
    def _offset(target: int | str, index: int, labels: dict[str, int]) -> int:
        if isinstance(target, int):
            return target
        offset = labels[target] - index - 1
        if not 0 <= offset <= 255:
            raise ValueError(f"seccomp jump to {target} out of range ({offset})")
        return offset


_RETURNS = {
    "allow": _RET_ALLOW,
    "eperm": _RET_ERRNO | errno.EPERM,
    "enosys": _RET_ERRNO | errno.ENOSYS,
    "eacces": _RET_ERRNO | errno.EACCES,
    "kill": _RET_KILL_PROCESS,
}
MOUNT_CALLS = ("mount", "umount2")


def _check_arch() -> None:
    if platform.machine() != "x86_64":
        raise UnsupportedArchitecture(f"no seccomp syscall table for {platform.machine()}")


def _prologue(program: _Program) -> None:
    """Right architecture or die; x32 syscall numbers (which would dodge the table) refused."""
    program.add(_LD_W_ABS, _OFFSET_ARCH)
    program.add(_JEQ_K, _AUDIT_ARCH_X86_64, 0, "kill")
    program.add(_LD_W_ABS, _OFFSET_NR)
    program.add(_JGE_K, _X32_SYSCALL_BIT, "eperm", 0)


def build_filter(deny_network: bool, allow_mount: bool = False) -> bytes:
    """The BPF program for this machine: deny-list, namespace-free clone, optionally AF_UNIX
    only. `allow_mount` leaves mount/umount2 to a later `build_mount_filter`."""
    _check_arch()
    program = _Program()
    _prologue(program)
    skipped = {X86_64_DENIED[name] for name in MOUNT_CALLS} if allow_mount else set()
    for number in sorted(set(X86_64_DENIED.values()) - skipped):
        program.add(_JEQ_K, number, "eperm", 0)
    program.add(_JEQ_K, _X86_64_CLONE3, "enosys", 0)
    if deny_network:
        # socket(family, ...): only AF_UNIX when the skill has no network permission.
        program.add(_JEQ_K, _X86_64_SOCKET, 0, 2)
        program.add(_LD_W_ABS, _OFFSET_ARG0)
        program.add(_JEQ_K, AF_UNIX, "allow", "eacces")
    # clone(flags, ...): a new process or thread, never a new namespace.
    program.add(_JEQ_K, _X86_64_CLONE, 0, "allow")
    program.add(_LD_W_ABS, _OFFSET_ARG0)
    program.add(_JSET_K, CLONE_NAMESPACE_FLAGS, "eperm", "allow")
    return program.assemble(_RETURNS)


def build_mount_filter() -> bytes:
    """mount/umount2 denied: stacked on `build_filter(allow_mount=True)` once a child has
    mounted its workdir (a small filter attaches in ~10 µs; the full one costs ~80 µs)."""
    _check_arch()
    program = _Program()
    _prologue(program)
    for name in MOUNT_CALLS:
        program.add(_JEQ_K, X86_64_DENIED[name], "eperm", 0)
    program.add(_RET_K, _RET_ALLOW)
    return program.assemble(_RETURNS)


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl  # resolved here, in the zygote, not in every child


class Filter:
    """A compiled program kept in memory, ready for `install` after a fork (one syscall)."""

    def __init__(self, program: bytes) -> None:
        self._buffer = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // _SOCK_FILTER.size,
                                 ctypes.addressof(self._buffer))
        self._pointer = ctypes.byref(self._fprog)

    def install(self) -> None:
        """Filter every later syscall of this process and its descendants (needs no_new_privs)."""
        if _prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, self._pointer, 0, 0) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"seccomp filter: {os.strerror(err)}")
