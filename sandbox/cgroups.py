"""Per-execution cgroups (v1 `pids` and `memory`): the tree's real process and memory caps, its
peak memory, and a way to find and kill every process of an execution — `setsid` escapees and
double forks included — whatever it did.

The supervisor owns their life: `CgroupRoot` makes one parent per `Sandbox` under the
supervisor's own cgroups (so limits set above it still apply), `ExecutionCgroup` one child per
execution with a random name (pid-derived names collide across PID namespaces). The execution
child joins them itself, while still root, before any skill code runs.

cgroup v2 is detected and reported by `sandbox.capabilities` but not driven here.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from dataclasses import dataclass

CONTROLLERS = ("pids", "memory")
KILL_DEADLINE = 2.0


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def v1_hierarchies() -> dict[str, str]:
    """controller → the directory of this process's own cgroup in that v1 hierarchy."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup":
                continue
            options = set(fields[separator + 3].split(","))
            for controller in CONTROLLERS:
                if controller in options:
                    mounts.setdefault(controller, fields[4])
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            _, names, path = line.rstrip("\n").split(":", 2)
            for controller in names.split(","):
                if controller in mounts:
                    own[controller] = os.path.join(mounts[controller], path.lstrip("/"))
    return own


def _procs(directory: str) -> list[int]:
    try:
        return [int(pid) for pid in _read(os.path.join(directory, "cgroup.procs")).split()]
    except FileNotFoundError:
        return []


def _kill_member(pid: int, directory: str) -> None:
    """SIGKILL `pid` if it is still in `directory`'s cgroup: the pidfd pins the process, so a
    recycled pid is never signalled."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return
    try:
        relative = "/" + "/".join(directory.split("/")[-2:])  # <sandbox parent>/<execution>
        try:
            membership = _read(f"/proc/{pid}/cgroup")
        except OSError:
            return
        if not any(line.endswith(relative) for line in membership.splitlines()):
            return
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    finally:
        os.close(pidfd)


@dataclass
class ExecutionCgroup:
    """One execution's `pids` and `memory` cgroups."""

    pids: str
    memory: str

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(self.pids, "cgroup.procs"), os.path.join(self.memory, "cgroup.procs")]

    def kill_all(self, deadline: float = KILL_DEADLINE) -> bool:
        """Kill every process in the execution until none is left; False if some outlived the
        deadline (they stay capped, and `remove` is retried by the root)."""
        end = time.monotonic() + deadline
        while True:
            members = _procs(self.pids)  # a process leaves it only by root's hand
            if not members:
                return True
            if time.monotonic() > end:
                return False
            for pid in members:
                _kill_member(pid, self.pids)
            time.sleep(0.001)

    def pids_limit_hit(self) -> bool:
        """Whether a fork or thread was refused for the pids limit."""
        try:
            events = _read(os.path.join(self.pids, "pids.events"))
        except OSError:
            return False
        return any(line.split()[1] != "0" for line in events.splitlines()
                   if line.startswith("max "))

    def oom_killed(self) -> bool:
        try:
            control = _read(os.path.join(self.memory, "memory.oom_control"))
        except OSError:
            return False
        return any(line.split()[1] != "0" for line in control.splitlines()
                   if line.startswith("oom_kill "))

    def peak_memory_bytes(self) -> int:
        try:
            return int(_read(os.path.join(self.memory, "memory.max_usage_in_bytes")))
        except (OSError, ValueError):
            return 0

    def remove(self) -> bool:
        removed = True
        for directory in (self.pids, self.memory):
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


class CgroupRoot:
    """The per-`Sandbox` parent cgroups; `new_execution` makes the per-execution children."""

    def __init__(self, parents: dict[str, str]) -> None:
        self.parents = parents
        self._stale: list[ExecutionCgroup] = []

    @classmethod
    def create(cls) -> CgroupRoot:
        """Make the parents (raises OSError when the hierarchy is missing or not writable)."""
        own = v1_hierarchies()
        missing = [controller for controller in CONTROLLERS if controller not in own]
        if missing:
            raise OSError(f"no cgroup v1 hierarchy for {', '.join(missing)}")
        name = f"skill-sandbox-{secrets.token_hex(6)}"
        parents: dict[str, str] = {}
        try:
            for controller in CONTROLLERS:
                path = os.path.join(own[controller], name)
                os.mkdir(path, 0o755)
                parents[controller] = path
        except OSError:
            for path in parents.values():
                os.rmdir(path)
            raise
        return cls(parents)

    def new_execution(self, max_tasks: int, memory_bytes: int) -> ExecutionCgroup:
        self._retry_stale()
        name = secrets.token_hex(8)
        group = ExecutionCgroup(os.path.join(self.parents["pids"], name),
                                os.path.join(self.parents["memory"], name))
        os.mkdir(group.pids, 0o755)
        try:
            os.mkdir(group.memory, 0o755)
            _write(os.path.join(group.pids, "pids.max"), str(max_tasks))
            _write(os.path.join(group.memory, "memory.limit_in_bytes"), str(memory_bytes))
            with contextlib.suppress(OSError):  # only where swap accounting exists
                _write(os.path.join(group.memory, "memory.memsw.limit_in_bytes"),
                       str(memory_bytes))
        except OSError:
            group.remove()
            raise
        return group

    def finish(self, group: ExecutionCgroup) -> None:
        """Kill what is left and remove the cgroups; leftovers are retried later."""
        group.kill_all()
        if not group.remove():
            self._stale.append(group)

    def _retry_stale(self) -> None:
        stale, self._stale = self._stale, []
        for group in stale:
            group.kill_all(deadline=0.0)
            if not group.remove():
                self._stale.append(group)

    def close(self) -> None:
        """Remove every cgroup this root made (their processes are killed first)."""
        self._retry_stale()
        for group in self._stale:
            group.kill_all()
            group.remove()
        for path in self.parents.values():
            for child in os.listdir(path):
                full = os.path.join(path, child)
                if os.path.isdir(full):
                    ExecutionCgroup(full, full).kill_all()
                    with contextlib.suppress(OSError):
                        os.rmdir(full)
            with contextlib.suppress(OSError):
                os.rmdir(path)
