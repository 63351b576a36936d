"""A hand-built seccomp-BPF allow-list per runtime profile, compiled and installed once in the
zygote (every execution inherits it), plus a tiny filter each child stacks for mount/umount2.

Default-deny: a syscall that is not on the profile's list fails with ENOSYS (what an older
kernel would answer, so libc and runtimes fall back, as glibc does from clone3 to clone), and
the known-dangerous ones (ptrace, mount, bpf, kexec, keyctl, SysV IPC and POSIX message
queues, ...) fail with EPERM. The skill sees an ordinary OSError rather than being killed,
which keeps its failure readable. Lists were derived from what the runtimes really call: the
test suite, the example skills and shell/coreutils workloads run with `audit=True` (unlisted
calls allowed and logged by the kernel as audit type 1326), plus strace of the same.

Socket families follow the skill's permission. Without the network permission only AF_UNIX
stream and seqpacket sockets can be made (socket and socketpair) and connect() and bind() are
refused (EACCES): no socket can reach a host service by path or abstract name, no datagram
socket exists to sendto() one, and no name can be squatted (an abstract name a host client
would connect to, where there is no network namespace). With it: AF_UNIX, AF_INET, AF_INET6
and NETLINK_ROUTE (glibc's getaddrinfo needs it); never vsock, packet, alg, bluetooth or
anything a new kernel adds.

The program is a binary search over the syscall number (about 9 comparisons for any call, and
the kernel's per-syscall action cache skips the program entirely for calls whose verdict
depends on the number alone): no libseccomp, nothing beyond ctypes in the worker.

Only x86_64 is described here; on any other architecture `build_filter` raises and the layer is
reported unavailable instead of being installed with wrong numbers.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import platform
import struct

from worker.namespaces import CLONE_NEWPID

#: x86_64 numbers (arch/x86/entry/syscalls/syscall_64.tbl) of every syscall named below.
X86_64: dict[str, int] = {
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "poll": 7,
    "lseek": 8, "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "rt_sigaction": 13,
    "rt_sigprocmask": 14, "rt_sigreturn": 15, "ioctl": 16, "pread64": 17, "pwrite64": 18,
    "readv": 19, "writev": 20, "access": 21, "pipe": 22, "select": 23, "sched_yield": 24,
    "mremap": 25, "msync": 26, "mincore": 27, "madvise": 28, "shmget": 29, "shmat": 30,
    "shmctl": 31, "dup": 32, "dup2": 33, "pause": 34, "nanosleep": 35, "getitimer": 36,
    "alarm": 37, "setitimer": 38, "getpid": 39, "sendfile": 40, "socket": 41, "connect": 42,
    "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46, "recvmsg": 47, "shutdown": 48,
    "bind": 49, "listen": 50, "getsockname": 51, "getpeername": 52, "socketpair": 53,
    "setsockopt": 54, "getsockopt": 55, "clone": 56, "fork": 57, "vfork": 58, "execve": 59,
    "exit": 60, "wait4": 61, "kill": 62, "uname": 63, "semget": 64, "semop": 65, "semctl": 66,
    "shmdt": 67, "msgget": 68, "msgsnd": 69, "msgrcv": 70, "msgctl": 71, "fcntl": 72, "flock": 73,
    "fsync": 74, "fdatasync": 75, "truncate": 76, "ftruncate": 77, "getdents": 78, "getcwd": 79,
    "chdir": 80, "fchdir": 81, "rename": 82, "mkdir": 83, "rmdir": 84, "creat": 85, "link": 86,
    "unlink": 87, "symlink": 88, "readlink": 89, "chmod": 90, "fchmod": 91, "chown": 92,
    "fchown": 93, "lchown": 94, "umask": 95, "gettimeofday": 96, "getrlimit": 97, "getrusage": 98,
    "sysinfo": 99, "times": 100, "ptrace": 101, "getuid": 102, "syslog": 103, "getgid": 104,
    "setuid": 105, "setgid": 106, "geteuid": 107, "getegid": 108, "setpgid": 109, "getppid": 110,
    "getpgrp": 111, "setsid": 112, "setreuid": 113, "setregid": 114, "getgroups": 115,
    "setgroups": 116, "setresuid": 117, "getresuid": 118, "setresgid": 119, "getresgid": 120,
    "getpgid": 121, "getsid": 124, "capget": 125, "capset": 126,
    "rt_sigpending": 127, "rt_sigtimedwait": 128, "rt_sigqueueinfo": 129, "rt_sigsuspend": 130,
    "sigaltstack": 131, "utime": 132, "mknod": 133, "statfs": 137, "fstatfs": 138,
    "getpriority": 140, "setpriority": 141, "sched_setparam": 142, "sched_getparam": 143,
    "sched_setscheduler": 144, "sched_getscheduler": 145, "sched_get_priority_max": 146,
    "sched_get_priority_min": 147, "sched_rr_get_interval": 148, "mlock": 149, "munlock": 150,
    "mlockall": 151, "munlockall": 152, "vhangup": 153, "pivot_root": 155, "prctl": 157,
    "arch_prctl": 158, "adjtimex": 159, "setrlimit": 160, "chroot": 161, "sync": 162, "acct": 163,
    "settimeofday": 164, "mount": 165, "umount2": 166, "swapon": 167, "swapoff": 168,
    "reboot": 169, "sethostname": 170, "setdomainname": 171, "iopl": 172, "ioperm": 173,
    "create_module": 174, "init_module": 175, "delete_module": 176, "quotactl": 179,
    "gettid": 186, "readahead": 187, "setxattr": 188, "lsetxattr": 189, "fsetxattr": 190,
    "getxattr": 191, "lgetxattr": 192, "fgetxattr": 193, "listxattr": 194, "llistxattr": 195,
    "flistxattr": 196, "removexattr": 197, "lremovexattr": 198, "fremovexattr": 199, "tkill": 200,
    "time": 201, "futex": 202, "sched_setaffinity": 203, "sched_getaffinity": 204,
    "io_setup": 206, "io_destroy": 207, "io_getevents": 208, "io_submit": 209, "io_cancel": 210,
    "lookup_dcookie": 212, "epoll_create": 213, "getdents64": 217, "set_tid_address": 218,
    "restart_syscall": 219, "semtimedop": 220, "fadvise64": 221, "timer_create": 222,
    "timer_settime": 223, "timer_gettime": 224, "timer_getoverrun": 225, "timer_delete": 226,
    "clock_settime": 227, "clock_gettime": 228, "clock_getres": 229, "clock_nanosleep": 230,
    "exit_group": 231, "epoll_wait": 232, "epoll_ctl": 233, "tgkill": 234, "utimes": 235,
    "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239, "mq_open": 240, "mq_unlink": 241,
    "mq_timedsend": 242, "mq_timedreceive": 243, "mq_notify": 244, "mq_getsetattr": 245,
    "kexec_load": 246, "waitid": 247, "add_key": 248, "request_key": 249, "keyctl": 250,
    "ioprio_set": 251, "ioprio_get": 252, "inotify_init": 253, "inotify_add_watch": 254,
    "inotify_rm_watch": 255, "openat": 257, "mkdirat": 258, "mknodat": 259, "fchownat": 260,
    "futimesat": 261, "newfstatat": 262, "unlinkat": 263, "renameat": 264, "linkat": 265,
    "symlinkat": 266, "readlinkat": 267, "fchmodat": 268, "faccessat": 269, "pselect6": 270,
    "ppoll": 271, "unshare": 272, "set_robust_list": 273, "get_robust_list": 274, "splice": 275,
    "tee": 276, "sync_file_range": 277, "utimensat": 280, "epoll_pwait": 281, "signalfd": 282,
    "timerfd_create": 283, "eventfd": 284, "fallocate": 285, "timerfd_settime": 286,
    "timerfd_gettime": 287, "accept4": 288, "signalfd4": 289, "eventfd2": 290,
    "epoll_create1": 291, "dup3": 292, "pipe2": 293, "inotify_init1": 294, "preadv": 295,
    "pwritev": 296, "rt_tgsigqueueinfo": 297, "perf_event_open": 298, "recvmmsg": 299,
    "fanotify_init": 300, "prlimit64": 302, "name_to_handle_at": 303, "open_by_handle_at": 304,
    "clock_adjtime": 305, "syncfs": 306, "sendmmsg": 307, "setns": 308, "getcpu": 309,
    "process_vm_readv": 310, "process_vm_writev": 311, "kcmp": 312, "finit_module": 313,
    "sched_setattr": 314, "sched_getattr": 315, "renameat2": 316, "seccomp": 317,
    "getrandom": 318, "memfd_create": 319, "kexec_file_load": 320, "bpf": 321, "execveat": 322,
    "userfaultfd": 323, "membarrier": 324, "mlock2": 325, "copy_file_range": 326, "preadv2": 327,
    "pwritev2": 328, "pkey_mprotect": 329, "pkey_alloc": 330, "pkey_free": 331, "statx": 332,
    "io_pgetevents": 333, "rseq": 334, "pidfd_send_signal": 424, "io_uring_setup": 425,
    "io_uring_enter": 426, "io_uring_register": 427, "open_tree": 428, "move_mount": 429,
    "fsopen": 430, "fsconfig": 431, "fsmount": 432, "fspick": 433, "pidfd_open": 434,
    "clone3": 435, "close_range": 436, "openat2": 437, "pidfd_getfd": 438, "faccessat2": 439,
    "process_madvise": 440, "epoll_pwait2": 441, "mount_setattr": 442, "quotactl_fd": 443,
    "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
    "futex_waitv": 449, "cachestat": 451, "fchmodat2": 452, "map_shadow_stack": 453,
    "futex_wake": 454, "futex_wait": 455, "futex_requeue": 456, "mseal": 462, "getxattrat": 464,
    "listxattrat": 465,
}



def _names(text: str) -> frozenset[str]:
    """Syscall names written as words (long lists stay readable and diffable)."""
    return frozenset(text.split())


#: Every Python skill (fork and spawn mode) and the zygote serving it: the interpreter, its
#: stdlib (threads, asyncio, subprocess of /bin/sh and coreutils), native extensions (mmap,
#: futex, sched_*, getrandom) and the worker's own set-up (setresuid, Landlock, seccomp, prctl).
PYTHON_PROFILE = _names("""
read write readv writev pread64 pwrite64 preadv pwritev pwritev2 lseek close
close_range dup dup2 dup3 ioctl fsync fdatasync sync_file_range readahead fallocate ftruncate
truncate sendfile splice tee copy_file_range open openat openat2
creat stat fstat lstat newfstatat statx statfs fstatfs access faccessat faccessat2 getdents
getdents64 getcwd chdir fchdir readlink readlinkat mkdir mkdirat rmdir unlink unlinkat rename
renameat renameat2 link linkat symlink symlinkat chmod fchmod fchmodat fchmodat2 chown fchown
lchown fchownat umask utime utimes futimesat utimensat mknod mknodat getxattr lgetxattr
fgetxattr listxattr llistxattr flistxattr getxattrat listxattrat setxattr lsetxattr fsetxattr
removexattr lremovexattr fremovexattr pipe pipe2 select pselect6 poll ppoll epoll_create
epoll_create1 epoll_ctl epoll_wait epoll_pwait epoll_pwait2 eventfd eventfd2 signalfd
signalfd4 timerfd_create timerfd_settime timerfd_gettime memfd_create mmap munmap mprotect
mremap msync mincore brk pkey_mprotect pkey_alloc pkey_free get_mempolicy
set_mempolicy mbind map_shadow_stack mseal membarrier futex futex_waitv futex_wake futex_wait
futex_requeue set_robust_list get_robust_list set_tid_address rseq arch_prctl prctl
rt_sigaction rt_sigprocmask rt_sigreturn rt_sigpending rt_sigtimedwait rt_sigqueueinfo
rt_tgsigqueueinfo rt_sigsuspend sigaltstack pause alarm getitimer setitimer kill tkill tgkill
restart_syscall nanosleep clock_nanosleep clock_gettime clock_getres gettimeofday time
timer_create timer_settime timer_gettime timer_getoverrun timer_delete sched_yield
sched_getaffinity sched_setaffinity sched_getparam sched_setparam sched_getscheduler
sched_setscheduler sched_get_priority_max sched_get_priority_min sched_rr_get_interval
sched_getattr sched_setattr getcpu getpriority setpriority fork vfork execve execveat exit
exit_group wait4 waitid pidfd_open pidfd_send_signal getpid getppid gettid getuid geteuid
getgid getegid getresuid getresgid getgroups getpgid getpgrp getsid setsid setpgid setuid
setgid setreuid setregid setresuid setresgid setgroups capget capset getrlimit
setrlimit getrusage times sysinfo uname getrandom bind listen accept accept4
getsockname getpeername setsockopt getsockopt shutdown sendto recvfrom sendmsg recvmsg
sendmmsg recvmmsg landlock_create_ruleset landlock_add_rule landlock_restrict_self seccomp
""")
#: Command skills exec arbitrary programs: the python profile plus what shells, coreutils and
#: other runtimes use on top (sync, mlock, ioprio). Not AIO (`RWF_NOWAIT` hides in its iocbs,
#: out of the filter's sight) nor `cachestat`: both read the shared page cache's state.
COMMAND_PROFILE = PYTHON_PROFILE | _names("""
sync syncfs mlock munlock mlock2 mlockall munlockall ioprio_get ioprio_set
""")
#: WASM skills: wasmtime inside the worker interpreter. Compiled code is mapped in the zygote
#: (mmap/mprotect with PROT_EXEC are on the python list already, and stay: instantiation maps
#: linear memory and wasmtime's trap handlers use signals and sigaltstack); WASI's tokio pool
#: starts a thread (clone, checked). Nothing in it ever execs a program or serves a socket:
#: those calls are off, so a module that escaped wasmtime could still not start a shell.
WASM_PROFILE = PYTHON_PROFILE - _names("""
execve execveat fork vfork bind listen accept accept4
""")
PROFILES = {"python": PYTHON_PROFILE, "command": COMMAND_PROFILE, "wasm": WASM_PROFILE}
#: Allowed with their arguments checked: clone without namespace flags; socket, socketpair and
#: connect (and bind, on the list) as the network permission says (see the module docstring);
#: and the calls below that would otherwise be channels between executions.
CHECKED = frozenset({"clone", "socket", "socketpair", "connect", "fadvise64", "madvise",
                     "preadv2", "prlimit64", "fcntl", "flock"})
#: Known-dangerous: refused with EPERM (everything else off the list gets ENOSYS).
DENIED = _names("""
ptrace process_vm_readv process_vm_writev pidfd_getfd kcmp mount umount2 pivot_root chroot
open_tree move_mount fsopen fsconfig fsmount fspick mount_setattr bpf perf_event_open
kexec_load kexec_file_load init_module finit_module delete_module create_module keyctl add_key
request_key userfaultfd unshare setns reboot swapon swapoff acct quotactl quotactl_fd
name_to_handle_at open_by_handle_at settimeofday clock_settime adjtimex clock_adjtime
sethostname setdomainname iopl ioperm syslog vhangup lookup_dcookie fanotify_init
io_uring_setup io_uring_enter io_uring_register process_madvise shmget shmat shmdt shmctl
msgget msgsnd msgrcv msgctl semget semop semtimedop semctl mq_open mq_unlink mq_timedsend
mq_timedreceive mq_notify mq_getsetattr inotify_init inotify_init1 inotify_add_watch
inotify_rm_watch
""")
MOUNT_CALLS = ("mount", "umount2")
#: Left to the zygote's filter for the child's set-up, denied by the child's own filter.
CHILD_DENIED = (*MOUNT_CALLS, "unshare")
CLONE_NEWUSER = 0x10000000
_CLONE3 = "clone3"  # ENOSYS: libc falls back to clone, whose flags the filter can inspect

_X32_SYSCALL_BIT = 0x40000000
_AUDIT_ARCH_X86_64 = 0xC000003E
CLONE_NAMESPACE_FLAGS = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000
                         | 0x20000000 | 0x40000000)  # NEWNS CGROUP UTS IPC USER PID NET
#: A sibling instead of a child: it would be the zygote's, reaped there, its CPU billed to no
#: execution (where no cgroup counts it).
CLONE_PARENT = 0x00008000
#: Advice that evicts shared page-cache pages: with it, one execution could write bits into
#: the cache state of files every execution reads (`FADV_DONTNEED`; `MADV_COLD`/`PAGEOUT`).
#: Answered 0 without effect: advice may be ignored.
POSIX_FADV_DONTNEED = 4
MADV_COLD = 20
MADV_PAGEOUT = 21
#: `preadv2` flag that reads only what is cached (EAGAIN otherwise): a page-cache oracle.
RWF_NOWAIT = 0x8
#: fcntl commands refused: F_NOTIFY (dnotify: see who reads a shared directory).
F_NOTIFY = 1026
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10
AF_NETLINK = 16
NETLINK_ROUTE = 0
SOCK_STREAM = 1
SOCK_SEQPACKET = 5
_SOCK_TYPE_MASK = 0xF  # without SOCK_NONBLOCK / SOCK_CLOEXEC

# Classic BPF opcodes.
_LD_W_ABS = 0x20
_JA = 0x05
_JEQ_K = 0x15
_JGE_K = 0x35
_JSET_K = 0x45
_AND_K = 0x54
_RET_K = 0x06
_RET_ALLOW = 0x7FFF0000
_RET_LOG = 0x7FFC0000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_OFFSET_NR = 0
_OFFSET_ARCH = 4


def _arg(index: int) -> int:
    """Offset of the low 32 bits of args[index] in seccomp_data (little-endian)."""
    return 16 + 8 * index


PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
_SOCK_FILTER = struct.Struct("=HBBI")


class UnsupportedArchitecture(RuntimeError):
    pass


class _Program:
    """Instructions with jumps to named labels, resolved to relative offsets at the end.
    Conditional jumps reach 255 instructions at most; `ja` reaches anywhere."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int | str, int | str, int | str]] = []
        self.labels: dict[str, int] = {}
        self._names = itertools.count()

    def add(self, op: int, k: int, jt: int | str = 0, jf: int | str = 0) -> None:
        self.code.append((op, jt, jf, k))

    def ja(self, label: str) -> None:
        self.code.append((_JA, 0, 0, label))

    def ret(self, value: int) -> None:
        self.code.append((_RET_K, 0, 0, value))

    def new_label(self) -> str:
        return f"@{next(self._names)}"

    def mark(self, label: str) -> None:
        self.labels[label] = len(self.code)

    def assemble(self, returns: dict[str, int]) -> bytes:
        for name, value in returns.items():
            self.mark(name)
            self.ret(value)
        out = bytearray()
        for index, (op, jt, jf, k) in enumerate(self.code):
            if op == _JA:
                out += _SOCK_FILTER.pack(op, 0, 0, self._offset(k, index, 1 << 32))
            else:
                assert isinstance(k, int)
                out += _SOCK_FILTER.pack(op, self._offset(jt, index, 256),
                                         self._offset(jf, index, 256), k)
        return bytes(out)

    def _offset(self, target: int | str, index: int, limit: int) -> int:
        if isinstance(target, int):
            return target
        offset = self.labels[target] - index - 1
        if not 0 <= offset < limit:
            raise ValueError(f"seccomp jump to {target} out of range ({offset})")
        return offset


def _check_arch() -> None:
    if platform.machine() != "x86_64":
        raise UnsupportedArchitecture(f"no seccomp syscall table for {platform.machine()}")


def _prologue(program: _Program) -> None:
    """Right architecture or die; x32 syscall numbers (which would dodge the table) refused."""
    program.add(_LD_W_ABS, _OFFSET_ARCH)
    program.add(_JEQ_K, _AUDIT_ARCH_X86_64, 1, 0)
    program.ret(_RET_KILL_PROCESS)
    program.add(_LD_W_ABS, _OFFSET_NR)
    program.add(_JGE_K, _X32_SYSCALL_BIT, 0, 1)
    program.ret(_RET_ERRNO | errno.EPERM)


def allowed_calls(profile: str) -> frozenset[str]:
    """The names a profile lets through (those in `CHECKED` only with the right arguments)."""
    return PROFILES[profile] | CHECKED


def _actions(profile: str, deny_network: bool, allow_mount: bool,
             allow_userns: bool) -> dict[int, str]:
    """Syscall number -> the label of its verdict (or of the block checking its arguments)."""
    actions = {X86_64[name]: "eperm" for name in DENIED}
    actions.update({X86_64[name]: "allow" for name in PROFILES[profile]})
    actions[X86_64[_CLONE3]] = "enosys"
    actions[X86_64["clone"]] = "check_clone"
    actions[X86_64["socket"]] = "check_socket"
    for name in ("fadvise64", "madvise", "preadv2", "prlimit64", "fcntl"):
        actions[X86_64[name]] = f"check_{name}"
    # flock on a file every execution may open read-only is a lock any of them can take: a
    # channel between concurrent executions. (fcntl locks need write access for a write lock,
    # and read locks never conflict.)
    actions[X86_64["flock"]] = "enolck"
    actions[X86_64["socketpair"]] = "check_socketpair" if deny_network else "allow"
    actions[X86_64["connect"]] = "eacces" if deny_network else "allow"
    if deny_network:  # nor a name to squat: an abstract one a host client would connect to
        actions[X86_64["bind"]] = "eacces"
    if allow_mount:
        actions.update({X86_64[name]: "allow" for name in MOUNT_CALLS})
    if allow_userns:
        actions[X86_64["unshare"]] = "check_unshare"
    return actions


def _search(program: _Program, ranges: list[tuple[int, str]], returns: dict[str, int]) -> None:
    """Binary search over `ranges` (first number, verdict), sorted, the first starting at 0:
    each leaf returns its verdict inline or jumps to its argument check."""
    if len(ranges) == 1:
        label = ranges[0][1]
        if label in returns:
            program.ret(returns[label])
        else:
            program.ja(label)
        return
    middle = len(ranges) // 2
    upper = program.new_label()
    program.add(_JGE_K, ranges[middle][0], upper, 0)
    _search(program, ranges[:middle], returns)
    program.mark(upper)
    _search(program, ranges[middle:], returns)


def _unix_stream_only(program: _Program, type_arg: int) -> None:
    program.add(_LD_W_ABS, _arg(type_arg))
    program.add(_AND_K, _SOCK_TYPE_MASK)
    program.add(_JEQ_K, SOCK_STREAM, "allow", 0)
    program.add(_JEQ_K, SOCK_SEQPACKET, "allow", "eacces")


def build_filter(deny_network: bool, allow_mount: bool = False, profile: str = "python",
                 audit: bool = False, allow_userns: bool = False,
                 allow_pidns: bool = False) -> bytes:
    """The BPF program for this machine and `profile`. `deny_network`: AF_UNIX stream
    sockets only, no connect() or bind(). `allow_mount` leaves mount/umount2, `allow_userns`
    unshare(CLONE_NEWUSER) (nothing else) and `allow_pidns` clone(CLONE_NEWPID) (the zygote's
    fork of each execution) to a later `build_child_filter`.
    `audit`: calls off the list are allowed and logged by the kernel instead of refused (for
    deriving a profile, never for serving)."""
    _check_arch()
    returns = {
        "allow": _RET_ALLOW,
        "eperm": _RET_ERRNO | errno.EPERM,
        "enosys": _RET_ERRNO | errno.ENOSYS,
        "eacces": _RET_ERRNO | errno.EACCES,
        "unlisted": _RET_LOG if audit else _RET_ERRNO | errno.ENOSYS,
        "ignore": _RET_ERRNO | 0,  # the call returns 0 and does nothing
        "eopnotsupp": _RET_ERRNO | errno.EOPNOTSUPP,
        "enolck": _RET_ERRNO | errno.ENOLCK,
    }
    actions = _actions(profile, deny_network, allow_mount, allow_userns)
    ranges: list[tuple[int, str]] = []
    for number in range(max(actions) + 2):
        verdict = actions.get(number, "unlisted")
        if not ranges or ranges[-1][1] != verdict:
            ranges.append((number, verdict))
    program = _Program()
    _prologue(program)
    _search(program, ranges, returns)
    # clone(flags, ...): a new process or thread, never a new namespace nor a sibling.
    program.mark("check_clone")
    program.add(_LD_W_ABS, _arg(0))
    refused = CLONE_NAMESPACE_FLAGS & ~CLONE_NEWPID if allow_pidns else CLONE_NAMESPACE_FLAGS
    program.add(_JSET_K, refused | CLONE_PARENT, "eperm", "allow")
    if allow_userns:  # unshare(flags): a user namespace alone, for the execution child
        program.mark("check_unshare")
        program.add(_LD_W_ABS, _arg(0))
        program.add(_JEQ_K, CLONE_NEWUSER, "allow", "eperm")
    _channel_checks(program)
    program.mark("check_socket")
    program.add(_LD_W_ABS, _arg(0))
    if deny_network:
        program.add(_JEQ_K, AF_UNIX, 0, "eacces")
        _unix_stream_only(program, 1)
        program.mark("check_socketpair")
        _unix_stream_only(program, 1)
    else:
        for family in (AF_UNIX, AF_INET, AF_INET6):
            program.add(_JEQ_K, family, "allow", 0)
        program.add(_JEQ_K, AF_NETLINK, 0, "eacces")
        program.add(_LD_W_ABS, _arg(2))
        program.add(_JEQ_K, NETLINK_ROUTE, "allow", "eacces")
    return program.assemble(returns)


def _channel_checks(program: _Program) -> None:
    """Argument checks that keep ordinary calls from becoming channels between executions
    (or handles on another process of the same uid)."""
    program.mark("check_fadvise64")  # fadvise64(fd, offset, len, advice)
    program.add(_LD_W_ABS, _arg(3))
    program.add(_JEQ_K, POSIX_FADV_DONTNEED, "ignore", "allow")
    program.mark("check_madvise")  # madvise(addr, len, advice)
    program.add(_LD_W_ABS, _arg(2))
    program.add(_JEQ_K, MADV_COLD, "ignore", 0)
    program.add(_JEQ_K, MADV_PAGEOUT, "ignore", "allow")
    program.mark("check_preadv2")  # preadv2(fd, iov, iovcnt, pos_l, pos_h, flags)
    program.add(_LD_W_ABS, _arg(5))
    program.add(_JSET_K, RWF_NOWAIT, "eopnotsupp", "allow")
    program.mark("check_prlimit64")  # prlimit64(pid, ...): its own limits only
    program.add(_LD_W_ABS, _arg(0))
    program.add(_JEQ_K, 0, "allow", "eperm")
    program.mark("check_fcntl")  # fcntl(fd, cmd, ...)
    program.add(_LD_W_ABS, _arg(1))
    program.add(_JEQ_K, F_NOTIFY, "eperm", "allow")


def build_child_filter() -> bytes:
    """mount, umount2, unshare and clone with any namespace flag denied: stacked on a
    `build_filter` that left them to the child's set-up (`allow_mount`, `allow_userns`,
    `allow_pidns`) once the child is set up (a small filter attaches in ~10 µs)."""
    _check_arch()
    program = _Program()
    _prologue(program)
    for name in CHILD_DENIED:
        program.add(_JEQ_K, X86_64[name], "eperm", 0)
    program.add(_JEQ_K, X86_64["clone"], 0, "allow")
    program.add(_LD_W_ABS, _arg(0))
    program.add(_JSET_K, CLONE_NAMESPACE_FLAGS, "eperm", "allow")
    return program.assemble({"eperm": _RET_ERRNO | errno.EPERM, "allow": _RET_ALLOW})


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
