"""Landlock through ctypes: a per-execution ruleset of read-only system paths and one writable
workdir, plus (ABI 6+) scoping that stops signals and abstract-unix connections leaving the
execution.

The zygote resolves the path list once (`Plan`); each child opens those paths, adds its own
workdir and `/proc/<pid>`, and restricts itself. The ruleset is built per child because rules
added to a shared ruleset fd would accumulate every execution's workdir.
"""

from __future__ import annotations

import ctypes
import os
import stat

_SYS_CREATE_RULESET = 444
_SYS_ADD_RULE = 445
_SYS_RESTRICT_SELF = 446
_CREATE_RULESET_VERSION = 1
_RULE_PATH_BENEATH = 1

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
REMOVE_DIR = 1 << 4
REMOVE_FILE = 1 << 5
MAKE_CHAR = 1 << 6
MAKE_DIR = 1 << 7
MAKE_REG = 1 << 8
MAKE_SOCK = 1 << 9
MAKE_FIFO = 1 << 10
MAKE_BLOCK = 1 << 11
MAKE_SYM = 1 << 12
REFER = 1 << 13  # ABI 2
TRUNCATE = 1 << 14  # ABI 3
IOCTL_DEV = 1 << 15  # ABI 5
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}
_FS_LATEST = (1 << 16) - 1
#: Rights that make sense on a file (the kernel refuses the others on a non-directory).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV
SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

READ_ONLY = READ_FILE | READ_DIR
READ_EXEC = READ_ONLY | EXECUTE
#: The workdir: everything but executing files and creating device nodes.
READ_WRITE = _FS_LATEST & ~(EXECUTE | MAKE_CHAR | MAKE_BLOCK)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64),
                ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def abi_version() -> int:
    """The kernel's Landlock ABI, 0 when the syscalls are missing or Landlock is disabled."""
    version = _libc.syscall(_SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                            ctypes.c_uint32(_CREATE_RULESET_VERSION))
    return max(0, int(version))


def handled_fs(abi: int) -> int:
    return _FS_BY_ABI.get(abi, _FS_LATEST)


def _attr_size(abi: int) -> int:
    if abi >= 6:
        return 24
    if abi >= 4:
        return 16
    return 8


def _fail(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"landlock {what}: {os.strerror(err)}")


class Plan:
    """Every execution's ruleset minus its own workdir and /proc entry, kept ready in the zygote.

    The zygote opens the read-only paths once (O_PATH, kept open) and keeps a *spare* ruleset
    holding their rules. A child forked on request inherits the spare, adds its workdir and
    its /proc/<pid>, and restricts itself: two rules instead of thirty; the zygote then drops
    its reference to that spare (now the child's) and builds the next one. A spare execution
    child builds its own while it waits (`own_spare`), so the zygote does not rebuild after
    forking one: it is free sooner for the exit of the execution that runs meanwhile.
    """

    def __init__(self, abi: int, rules: dict[str, int]) -> None:
        self.abi = abi
        self.handled = handled_fs(abi)
        self._rules: list[_PathBeneathAttr] = []
        self._spare = -1
        for path, access in rules.items():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # absent on this host: nothing to allow
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                access &= FILE_RIGHTS
            self._rules.append(_PathBeneathAttr(access & self.handled, fd))

    def prepare(self) -> None:
        """Build the spare ruleset (static rules only) if there is none."""
        if self._spare >= 0:
            return
        attr = _RulesetAttr(self.handled, 0, 0)
        if self.abi >= 6:
            attr.scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        ruleset = _libc.syscall(_SYS_CREATE_RULESET, ctypes.byref(attr),
                                ctypes.c_size_t(_attr_size(self.abi)), ctypes.c_uint32(0))
        if ruleset < 0:
            raise _fail("create_ruleset")
        try:
            for rule in self._rules:
                _add_rule(ruleset, rule)
        except BaseException:
            os.close(ruleset)
            raise
        self._spare = ruleset

    def fds(self) -> set[int]:
        """Every descriptor the plan holds: the O_PATH fds of its paths and the spare ruleset."""
        held = {rule.parent_fd for rule in self._rules}
        if self._spare >= 0:
            held.add(self._spare)
        return held

    def handoff(self) -> None:
        """In the zygote after a fork: the spare belongs to the child now; make another."""
        if self._spare >= 0:
            os.close(self._spare)
            self._spare = -1
        self.prepare()

    def own_spare(self) -> None:
        """In a forked process that is to restrict itself later (a spare execution child): let
        go of the inherited spare ruleset, which is the zygote's too (a rule added here would be
        in the zygote's), and build one of this process's own, while nobody waits."""
        inherited, self._spare = self._spare, -1
        self.prepare()
        if inherited >= 0:  # on the inherited number: low numbers are the execution's pipes'
            os.dup2(self._spare, inherited, inheritable=False)
            os.close(self._spare)
            self._spare = inherited

    def restrict(self, writable: str) -> None:
        """Confine this process (and everything it forks or execs) to the plan, `writable`
        read-write, and its own /proc/<pid> read-only."""
        self.prepare()
        ruleset, self._spare = self._spare, -1
        try:
            _allow(ruleset, writable, READ_WRITE & self.handled)
            # /proc/self resolves to this process's own /proc/<pid> directory.
            _allow(ruleset, "/proc/self", READ_ONLY)
            if _libc.syscall(_SYS_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)):
                raise _fail("restrict_self")
        finally:
            os.close(ruleset)


def _add_rule(ruleset: int, rule: _PathBeneathAttr) -> None:
    if _libc.syscall(_SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(_RULE_PATH_BENEATH),
                     ctypes.byref(rule), ctypes.c_uint32(0)):
        raise _fail(f"add_rule (fd {rule.parent_fd})")


def _allow(ruleset: int, path: str, access: int) -> None:
    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    try:
        _add_rule(ruleset, _PathBeneathAttr(access, fd))
    finally:
        os.close(fd)
