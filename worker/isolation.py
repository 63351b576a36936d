"""Kernel-level containment applied inside the worker processes.

`apply_zygote_layers` runs once in the zygote (everything a fork inherits); `apply_child_layers`
runs in each execution child after the fork and before any skill code. Each layer is a few
syscalls through ctypes: this module imports nothing heavy.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
from typing import Any

from worker.protocol import ForkCommand, SkillCode

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_MB = 1 << 20


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def max_fd() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 16


def become_subreaper() -> None:
    """Orphans of an execution reparent to the zygote, which kills them, instead of to init."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (the zygote) dies; exit now if it already has."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)


def apply_zygote_layers(settings: dict[str, Any]) -> None:
    """Layers every execution inherits: no privilege gain through exec, no core dumps."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _data_baseline_bytes() -> int:
    """The process's data segment now: the memory limit is granted on top of it."""
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmData:"):
                return int(line.split()[1]) * 1024
    return 0


def _set_limit(which: int, soft: int, hard: int | None = None) -> None:
    _, current_hard = resource.getrlimit(which)
    hard = soft if hard is None else hard
    if current_hard != resource.RLIM_INFINITY:
        hard = min(hard, current_hard)
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))


def apply_rlimits(command: ForkCommand) -> None:
    """Per-process ceilings; the supervisor's tree accounting covers what they cannot."""
    limits = command.limits
    cpu_seconds = max(1, math.ceil(limits.cpu_time))
    # SIGXCPU at the soft limit (catchable), SIGKILL one second later (not).
    _set_limit(resource.RLIMIT_CPU, cpu_seconds, cpu_seconds + 1)
    _set_limit(resource.RLIMIT_DATA, _data_baseline_bytes() + limits.memory_mb * _MB)
    _set_limit(resource.RLIMIT_FSIZE, limits.max_file_bytes)
    _set_limit(resource.RLIMIT_NOFILE, limits.max_open_files)
    _set_limit(resource.RLIMIT_CORE, 0)
    # No RLIMIT_NPROC: root ignores it and, for anyone else, it counts every process and thread
    # of the uid host-wide. The process cap is the supervisor's tree watch (and a pids cgroup).


def apply_child_layers(command: ForkCommand, code: SkillCode) -> None:
    """Per-execution layers, applied after the fork and before any skill code runs."""
    os.umask(0o077)
    apply_rlimits(command)
