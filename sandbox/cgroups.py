"""Per-execution cgroups: the tree's real process and memory caps, its peak memory, the CPU of
every process it ever had (reaped or not), and a way to find and kill every process of an
execution — `setsid` escapees and double forks included — whatever it did.

Two backends with one shape, chosen once at start-up (`CgroupRoot.create`): cgroup v1 (`pids`,
`memory` and, where the host has it, `cpuacct` hierarchies: `ExecutionCgroup`) when the host
mounts those, else cgroup v2 in the supervisor's delegated subtree (`ExecutionCgroupV2`). The
rest of the supervisor sees an `ExecutionGroup` and does not care which.

The supervisor owns their life: `CgroupRoot` makes one parent per `Sandbox` under the
supervisor's own cgroups (so limits set above it still apply), `ExecutionCgroup` one child per
concurrent execution with a random name (pid-derived names collide across PID namespaces),
reused only once emptied *and* uncharged (a charge left behind: tmpfs or shm pages, page
cache, kernel memory still held, would count against the next execution's limit). The
zygote moves each execution child into them right after the fork; the child waits for that
before it runs anything else.

On cgroup v2 (the unified hierarchy of systemd hosts and containers) the supervisor works under
its own cgroup, which must be delegated to it (systemd `Delegate=yes`, `systemd-run --scope -p
Delegate=yes`, a container's cgroup namespace): v2 allows processes only in leaves once
controllers are enabled for children, so the processes of that cgroup are moved into a leaf
(`supervisor`) beside the per-`Sandbox` parents. Each execution gets a fresh cgroup with
`memory.max`, `memory.swap.max = 0`, `pids.max`, `memory.oom.group = 1` (and `cpu.max` for a
skill's `cpus`); `cgroup.kill` (5.14+) kills it whole; `memory.peak` (5.19+) or the sampled
`memory.current`, `cpu.stat` and `memory.events`/`pids.events` give the figures and verdicts.
v2 groups are never reused: their peak cannot be reset (before 6.12), and making one costs
about as much as checking one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

CONTROLLERS = ("pids", "memory")
#: Used when the host has them, not required: without `cpuacct` an execution's CPU is what wait4
#: and the tree watch see (orphans' and unreaped zombies' CPU can slip through).
OPTIONAL_CONTROLLERS = ("cpuacct",)
_UNLIMITED = 1 << 63
#: What an emptied memory cgroup may still hold and be reused: a few kernel objects stay
#: charged after every execution (4-12 KB measured here, force_empty does not free them). The
#: next execution's own charge is measured from that baseline; its limit is memory_mb in all,
#: so it gets at most this much less than memory_mb, never more, and leftovers cannot pile up.
#: (Page cache and the kernel's per-CPU charge stock may add to the baseline: `uncharged`.)
RESIDUE_BYTES = 64 << 10
KILL_DEADLINE = 2.0


def _read(path: str) -> str:
    """A whole (small) cgroup or proc file; raw fd I/O is ~8x cheaper than a text `open()`,
    and several of these run for every execution."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


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
            for controller in (*CONTROLLERS, *OPTIONAL_CONTROLLERS):
                if controller in options:  # co-mounted ones (cpu,cpuacct) share a directory
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


def _counter(path: str, key: str) -> int:
    """The value of `key` in a flat-keyed cgroup file (pids.events, memory.oom_control)."""
    return _counters(path, key)[0]


def _counters(path: str, *keys: str) -> list[int]:
    """The values of `keys` in a flat-keyed cgroup file, read once (0 for a missing one)."""
    try:
        text = _read(path)
    except OSError:
        return [0] * len(keys)
    found: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in keys:
            found[name] = int(value)
    return [found.get(key, 0) for key in keys]


def _number(path: str) -> int:
    try:
        return int(_read(path))
    except (OSError, ValueError):
        return 0


class ExecutionGroup(Protocol):
    """What the supervisor uses of one execution's cgroup(s), whichever the backend."""

    killed: int
    #: Whether an emptied, uncharged group may serve a later execution (v1 only).
    reusable: bool

    @property
    def directories(self) -> list[str]: ...
    @property
    def procs_files(self) -> list[str]: ...
    @property
    def has_cpu(self) -> bool: ...
    @property
    def exact_peak(self) -> bool:
        """Whether `peak_memory_bytes` is the kernel's own peak (else: the largest sample)."""
    def begin(self, max_tasks: int, memory_bytes: int, cpus: float = 0.0) -> None: ...
    def kill_all(self, deadline: float = KILL_DEADLINE) -> bool: ...
    def pids_limit_hit(self) -> bool: ...
    def oom_killed(self) -> bool: ...
    def members(self) -> list[int]: ...
    def memory_bytes(self) -> int: ...
    def cpu_seconds(self) -> float: ...
    def uncharged(self) -> bool: ...
    def peak_memory_bytes(self) -> int: ...
    def remove(self) -> bool: ...


@dataclass
class ExecutionCgroup:
    """One execution's v1 `pids`, `memory` and (optional, "" without) `cpuacct` cgroups.

    Emptied groups with no charge left are reused by later executions (a memory cgroup costs
    ~0.1 ms to make and remove): counters are read as differences from `begin`, and the peak is
    reset there.
    """

    pids: str
    memory: str
    cpuacct: str = ""
    limits: tuple[int, int] = (0, _UNLIMITED)  # a new cgroup's: no limits yet
    killed: int = 0  # processes `kill_all` had to kill in this execution
    _limit_events: int = 0
    _oom_kills: int = 0
    _usage: int = 0
    _cpu_ns: int = 0
    reusable = True
    exact_peak = True  # memory.max_usage_in_bytes, reset by `begin`

    @property
    def directories(self) -> list[str]:
        """Each distinct cgroup directory (a hierarchy may carry several controllers)."""
        return list(dict.fromkeys(path for path in (self.pids, self.memory, self.cpuacct) if path))

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(path, "cgroup.procs") for path in self.directories]

    def begin(self, max_tasks: int, memory_bytes: int, cpus: float = 0.0) -> None:
        """Set the limits (if they differ from the last execution's) and the baselines. v1
        has no CPU bandwidth limit here: `cpus` is not enforced (the doctor says so)."""
        if self.limits != (max_tasks, memory_bytes):
            _write(os.path.join(self.pids, "pids.max"), str(max_tasks))
            # v1 wants limit <= memsw.limit at every step: raise memsw first, lower it last.
            files = ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
            if memory_bytes > self.limits[1]:
                files.reverse()
            for name in files:
                path = os.path.join(self.memory, name)
                if name == files[0] or os.path.exists(path):  # memsw: only with swap accounting
                    _write(path, str(memory_bytes))
            self.limits = (max_tasks, memory_bytes)
        self._limit_events = _counter(os.path.join(self.pids, "pids.events"), "max")
        self._oom_kills = _counter(os.path.join(self.memory, "memory.oom_control"), "oom_kill")
        # Resets the peak to the current charge: what earlier executions left cached.
        _write(os.path.join(self.memory, "memory.max_usage_in_bytes"), "0")
        self._usage = _number(os.path.join(self.memory, "memory.usage_in_bytes"))
        if self.cpuacct:
            self._cpu_ns = _number(os.path.join(self.cpuacct, "cpuacct.usage"))
        self.killed = 0

    def kill_all(self, deadline: float = KILL_DEADLINE) -> bool:
        """Kill every process in the execution until none is left; False if some outlived the
        deadline (they stay capped, and the group is retried later)."""
        end = time.monotonic() + deadline
        while True:
            members = _procs(self.pids)  # a process leaves it only by root's hand
            if not members:
                return True
            if time.monotonic() > end:
                return False
            for pid in members:
                _kill_member(pid, self.pids)
            self.killed += len(members)
            time.sleep(0.001)

    def pids_limit_hit(self) -> bool:
        """Whether a fork or thread was refused for the pids limit during this execution."""
        return _counter(os.path.join(self.pids, "pids.events"), "max") > self._limit_events

    def oom_killed(self) -> bool:
        oom_kills = _counter(os.path.join(self.memory, "memory.oom_control"), "oom_kill")
        return oom_kills > self._oom_kills

    def members(self) -> list[int]:
        """The pids of every process of the execution still alive (or not yet reaped)."""
        return _procs(self.pids)

    def memory_bytes(self) -> int:
        """Everything charged to the execution now: anonymous and shared memory, memfd, tmpfs
        files (its workdir's too), page cache, kernel memory — what `memory_mb` limits."""
        usage = _number(os.path.join(self.memory, "memory.usage_in_bytes"))
        return max(0, usage - self._usage)

    def cpu_seconds(self) -> float:
        """CPU used by every process the execution ever had — reaped, orphaned, zombie or
        killed — since `begin` (cpuacct); 0.0 without cpuacct (see `has_cpu`)."""
        if not self.cpuacct:
            return 0.0
        used = _number(os.path.join(self.cpuacct, "cpuacct.usage")) - self._cpu_ns
        return max(0, used) / 1e9

    @property
    def has_cpu(self) -> bool:
        return bool(self.cpuacct)

    def uncharged(self) -> bool:
        """Whether the emptied group holds no charge that could hurt another execution: the
        condition for handing it on. Its usage counter alone says little: it also holds the
        per-CPU charge stock the kernel pre-charges in batches (up to 256 KB a CPU, measured
        28-434 KB here after every execution) and clean page cache, which the kernel reclaims
        under the next execution's limit before any OOM kill. What counts is what cannot be
        reclaimed: anonymous and shmem pages (tmpfs, SysV shm, memfd someone still holds; no
        swap here) and kernel memory. Only when that is over `RESIDUE_BYTES` (or unknown) is
        the kernel asked to reclaim and drain (force_empty, ~1.3 ms: too dear for every
        execution) and the usage itself judged."""
        stat = os.path.join(self.memory, "memory.stat")
        kmem = os.path.join(self.memory, "memory.kmem.usage_in_bytes")
        if os.path.exists(kmem):
            held = sum(_counters(stat, "rss", "shmem")) + _number(kmem)
            if held <= RESIDUE_BYTES:
                return True
        with contextlib.suppress(OSError):  # v1 only, and only without members
            _write(os.path.join(self.memory, "memory.force_empty"), "0")
        return _number(os.path.join(self.memory, "memory.usage_in_bytes")) <= RESIDUE_BYTES

    def peak_memory_bytes(self) -> int:
        """The most memory charged to this execution at once, files in its tmpfs included."""
        peak = _number(os.path.join(self.memory, "memory.max_usage_in_bytes"))
        return max(0, peak - self._usage)

    def remove(self) -> bool:
        removed = True
        for directory in self.directories:
            try:
                os.rmdir(directory)
            except FileNotFoundError:
                pass
            except OSError:
                removed = False
        return removed


def _kill_tree(directory: str, end: float, counted: Callable[[int], None]) -> bool:
    """SIGKILL every member of `directory` until none is left or `end` passes."""
    while True:
        members = _procs(directory)  # a process leaves it only by root's hand
        if not members:
            return True
        if time.monotonic() > end:
            return False
        for pid in members:
            _kill_member(pid, directory)
        counted(len(members))
        time.sleep(0.001)


@dataclass
class ExecutionCgroupV2:
    """One execution's cgroup v2: a fresh leaf under the `Sandbox`'s parent, never reused.

    `memory.max` is memory_mb (every charged kind of memory, as on v1), `memory.swap.max` 0 (a
    limit that swap could stretch is no limit), `memory.oom.group` 1 (an OOM kills the whole
    execution, not a random member of it), `pids.max` the process cap, `cpu.max` the skill's CPU
    share when it has one and the `cpu` controller is delegated.
    """

    path: str
    limits: tuple[int, int, float] = (0, _UNLIMITED, 0.0)
    killed: int = 0
    _limit_events: int = 0
    _oom_events: tuple[int, int] = (0, 0)
    _max_events: int = 0
    _usage: int = 0
    _cpu_us: int = 0
    _sampled_peak: int = 0
    reusable = False  # memory.peak cannot be reset before 6.12: a fresh group is a clean one

    @property
    def pids(self) -> str:
        return self.path

    @property
    def memory(self) -> str:
        return self.path

    @property
    def directories(self) -> list[str]:
        return [self.path]

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(self.path, "cgroup.procs")]

    @property
    def has_cpu(self) -> bool:
        return True  # cpu.stat's usage_usec is in every v2 cgroup, controller or not

    @property
    def exact_peak(self) -> bool:
        return _exists(os.path.join(self.path, "memory.peak"))

    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def begin(self, max_tasks: int, memory_bytes: int, cpus: float = 0.0) -> None:
        if self.limits == (0, _UNLIMITED, 0.0):  # a new group: once for its life
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap file
                _write(self._file("memory.swap.max"), "0")
            _write(self._file("memory.oom.group"), "1")
        if self.limits != (max_tasks, memory_bytes, cpus):
            _write(self._file("pids.max"), str(max_tasks))
            _write(self._file("memory.max"), str(memory_bytes))
            if cpus > 0 or self.limits[2] > 0:
                _write(self._file("cpu.max"), cpu_max(cpus))
            self.limits = (max_tasks, memory_bytes, cpus)
        self._limit_events = _counter(self._file("pids.events"), "max")
        self._oom_events = tuple(_counters(self._file("memory.events"),  # type: ignore[assignment]
                                           "oom", "oom_kill"))
        self._max_events = _counter(self._file("memory.events"), "max")
        self._usage = _number(self._file("memory.current"))
        self._sampled_peak = 0
        self._cpu_us = _counter(self._file("cpu.stat"), "usage_usec")
        self.killed = 0

    def kill_all(self, deadline: float = KILL_DEADLINE) -> bool:
        """`cgroup.kill` (5.14+) kills every member at once, forks in flight included; without
        it, SIGKILL each member until none is left. False if some outlived the deadline."""
        end = time.monotonic() + deadline
        members = _procs(self.path)
        if not members:
            return True
        with contextlib.suppress(FileNotFoundError):  # older kernel: one by one, below
            _write(self._file("cgroup.kill"), "1")
            self.killed += len(members)
            while time.monotonic() <= end and _procs(self.path):
                time.sleep(0.001)  # dying: they leave cgroup.procs as they exit
        return _kill_tree(self.path, end, self._count_killed)

    def _count_killed(self, count: int) -> None:
        self.killed += count

    def pids_limit_hit(self) -> bool:
        return _counter(self._file("pids.events"), "max") > self._limit_events

    def oom_killed(self) -> bool:
        """An OOM in the group (the kernel found nothing to reclaim under memory.max), whether
        it killed (oom_kill) or made an allocation fail (oom)."""
        oom, oom_kill = _counters(self._file("memory.events"), "oom", "oom_kill")
        return oom > self._oom_events[0] or oom_kill > self._oom_events[1]

    def members(self) -> list[int]:
        return _procs(self.path)

    def memory_bytes(self) -> int:
        """Everything charged to the execution now (as on v1); each reading also counts as a
        sample of the peak where the kernel keeps none (before 5.19)."""
        usage = max(0, _number(self._file("memory.current")) - self._usage)
        self._sampled_peak = max(self._sampled_peak, usage)
        return usage

    def cpu_seconds(self) -> float:
        used = _counter(self._file("cpu.stat"), "usage_usec") - self._cpu_us
        return max(0, used) / 1e6

    def uncharged(self) -> bool:
        return False  # never reused (see `reusable`)

    def peak_memory_bytes(self) -> int:
        """`memory.peak` where the kernel has it (5.19+); before, the largest of the samples
        and the charge now — and the limit itself if the group ever reached it (memory.events
        `max`: the kernel had to reclaim at memory.max), since samples can miss a spike."""
        peak = _number(self._file("memory.peak"))
        if peak:
            return max(0, peak - self._usage)
        self.memory_bytes()
        if _counter(self._file("memory.events"), "max") > self._max_events:
            self._sampled_peak = max(self._sampled_peak, self.limits[1])
        return self._sampled_peak

    def remove(self) -> bool:
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            pass
        except OSError:
            return False
        return True


#: cpu.max's period: 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000


def cpu_max(cpus: float) -> str:
    """The `cpu.max` line for a share of `cpus` CPUs (0: no limit)."""
    if cpus <= 0:
        return f"max {CPU_PERIOD_US}"
    return f"{max(1000, round(cpus * CPU_PERIOD_US))} {CPU_PERIOD_US}"


def _exists(path: str) -> bool:
    return os.path.exists(path)


_PREFIX = "skill-sandbox-"


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _sweep_abandoned(directory: str) -> None:
    """Remove the empty cgroups of supervisors that died without `close()` (SIGKILL, crash).

    Only parents made in this PID namespace are judged (elsewhere the pid means nothing), a
    live pid keeps them, and rmdir refuses any cgroup that still holds a process.
    """
    namespace = str(_pid_namespace())
    try:
        entries = os.listdir(directory)
    except OSError:
        return
    for entry in entries:
        fields = entry[len(_PREFIX):].split("-")
        if not entry.startswith(_PREFIX) or len(fields) != 3 or fields[0] != namespace:
            continue
        try:
            os.kill(int(fields[1]), 0)
            continue  # alive (or a reused pid: leave it, a later sweep gets it)
        except ProcessLookupError:
            pass
        except (PermissionError, ValueError):
            continue
        parent = os.path.join(directory, entry)
        with contextlib.suppress(OSError):
            for child in os.listdir(parent):
                if os.path.isdir(os.path.join(parent, child)):
                    os.rmdir(os.path.join(parent, child))
            os.rmdir(parent)


#: v2 controllers an execution needs (`cpu` is optional: `cpu.max` for a skill's `cpus`;
#: cpu.stat's usage is there without it).
V2_CONTROLLERS = ("memory", "pids")
V2_OPTIONAL_CONTROLLERS = ("cpu",)
#: The leaf the supervisor's cgroup's own processes move into, so that controllers can be
#: enabled for its children (v2's no-internal-processes rule).
SUPERVISOR_LEAF = "skill-sandbox-supervisor"
DELEGATE_HINT = ("delegate a cgroup subtree with pids and memory to the supervisor: systemd "
                 "unit `Delegate=pids memory cpu` (deploy/skill-sandbox.service), or run it "
                 "under `systemd-run --scope -p Delegate=yes <command>`")


def v2_mount() -> str:
    """Where the cgroup v2 hierarchy is mounted ("" if it is not)."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            if fields[fields.index("-") + 1] == "cgroup2":
                return fields[4]
    return ""


@dataclass(frozen=True)
class V2Subtree:
    """The supervisor's place in the v2 hierarchy: `base` is the cgroup it works under (its
    own, or the parent of the leaf it moved itself into); `delegated` the controllers `base`
    may hand to children (its cgroup.controllers); `problem` why it cannot be used, or ""."""

    mount: str
    base: str
    delegated: tuple[str, ...]
    enabled: tuple[str, ...]
    problem: str


def v2_subtree() -> V2Subtree:
    """Read (never change) where this process would work on cgroup v2, and whether it can."""
    mount = v2_mount()
    if not mount:
        return V2Subtree("", "", (), (), "no cgroup v2 hierarchy mounted")
    own = ""
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            if line.startswith("0::"):
                own = line[3:].rstrip("\n")
    if not own or own.endswith(" (deleted)"):
        return V2Subtree(mount, "", (), (), "this process is in no cgroup v2 cgroup "
                                            f"(/proc/self/cgroup: {own or 'no 0:: line'})")
    base = os.path.join(mount, own.lstrip("/")).rstrip("/") or "/"
    if os.path.basename(base) == SUPERVISOR_LEAF:  # moved there by an earlier Sandbox
        base = os.path.dirname(base)
    try:
        delegated = tuple(_read(os.path.join(base, "cgroup.controllers")).split())
        enabled = tuple(_read(os.path.join(base, "cgroup.subtree_control")).split())
    except OSError as exc:
        return V2Subtree(mount, base, (), (), f"cannot read {base}: {exc.strerror}")
    missing = [name for name in V2_CONTROLLERS if name not in delegated]
    problem = ""
    if missing:
        problem = (f"cgroup v2: {', '.join(missing)} not delegated to {base} (it has: "
                   f"{' '.join(delegated) or 'none'}); {DELEGATE_HINT}")
    else:
        for name in ("", "cgroup.procs", "cgroup.subtree_control"):
            if not os.access(os.path.join(base, name), os.W_OK):
                problem = (f"cgroup v2: {os.path.join(base, name)} is not writable by this "
                           f"process; {DELEGATE_HINT}")
                break
    return V2Subtree(mount, base, delegated, enabled, problem)


def _enable(directory: str, controllers: tuple[str, ...], required: tuple[str, ...]) -> list[str]:
    """Enable `controllers` for the children of `directory` (one write each, so an optional
    one that fails does not take the others with it); the ones enabled. Raises for a
    required one."""
    enabled = _read(os.path.join(directory, "cgroup.subtree_control")).split()
    for name in controllers:
        if name in enabled:
            continue
        try:
            _write(os.path.join(directory, "cgroup.subtree_control"), f"+{name}")
            enabled.append(name)
        except OSError:
            if name in required:
                raise
    return [name for name in controllers if name in enabled]


def _move_into_leaf(base: str) -> None:
    """Move every process of `base` into its `SUPERVISOR_LEAF` child (made if missing): v2
    lets a cgroup with processes enable no controller for its children (the root excepted)."""
    leaf = os.path.join(base, SUPERVISOR_LEAF)
    with contextlib.suppress(FileExistsError):
        os.mkdir(leaf, 0o755)
    for pid in _procs(base):
        with contextlib.suppress(ProcessLookupError):  # gone meanwhile
            _write(os.path.join(leaf, "cgroup.procs"), str(pid))


def _v2_enable(base: str, wanted: tuple[str, ...]) -> list[str]:
    """Enable `wanted` for `base`'s children, moving its processes into a leaf first if v2's
    no-internal-processes rule refuses (EBUSY)."""
    try:
        return _enable(base, wanted, V2_CONTROLLERS)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    _move_into_leaf(base)
    return _enable(base, wanted, V2_CONTROLLERS)


class CgroupRoot:
    """The per-`Sandbox` parent cgroup(s) and a pool of emptied execution cgroups to reuse.

    `version` 1: one parent per v1 hierarchy (`parents` maps each controller to it); 2: one
    parent in the delegated v2 subtree (every controller maps to it)."""

    MAX_IDLE = 64

    def __init__(self, parents: dict[str, str], version: int = 1) -> None:
        self.parents = parents
        self.version = version
        self._idle: list[ExecutionGroup] = []
        self._stale: list[ExecutionGroup] = []
        self._lock = threading.Lock()

    @property
    def cpu_limits(self) -> bool:
        """Whether a skill's `cpus` is enforced (v2 with the `cpu` controller)."""
        return self.version == 2 and "cpu" in self.parents

    @classmethod
    def create(cls, version: int | None = None) -> CgroupRoot:
        """Make the parents (raises OSError when the hierarchy is missing or not writable).
        Without `version`: v1 where the host mounts pids and memory v1 hierarchies, else v2."""
        if version is None:
            own = v1_hierarchies()
            version = 1 if all(name in own for name in CONTROLLERS) else 2
        return cls._create_v1() if version == 1 else cls._create_v2()

    @classmethod
    def _create_v2(cls) -> CgroupRoot:
        subtree = v2_subtree()
        if subtree.problem:
            raise OSError(subtree.problem)
        wanted = tuple(name for name in (*V2_CONTROLLERS, *V2_OPTIONAL_CONTROLLERS)
                       if name in subtree.delegated)
        _v2_enable(subtree.base, wanted)
        _sweep_abandoned(subtree.base)
        path = os.path.join(subtree.base,
                            f"{_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(path, 0o755)
        try:
            enabled = _enable(path, wanted, V2_CONTROLLERS)
        except OSError:
            os.rmdir(path)
            raise
        return cls({name: path for name in enabled}, version=2)

    @classmethod
    def _create_v1(cls) -> CgroupRoot:
        own = v1_hierarchies()
        missing = [controller for controller in CONTROLLERS if controller not in own]
        if missing:
            raise OSError(f"no cgroup v1 hierarchy for {', '.join(missing)}")
        name = f"{_PREFIX}{_pid_namespace()}-{os.getpid()}-{secrets.token_hex(4)}"
        parents: dict[str, str] = {}
        made: list[str] = []
        try:
            for controller in (*CONTROLLERS, *OPTIONAL_CONTROLLERS):
                if controller not in own:
                    continue
                path = os.path.join(own[controller], name)
                if path not in made:  # co-mounted with one made already: the same directory
                    _sweep_abandoned(own[controller])
                    try:
                        os.mkdir(path, 0o755)
                    except OSError:
                        if controller in CONTROLLERS:
                            raise
                        continue  # an optional controller we may not use: go without it
                    made.append(path)
                parents[controller] = path
        except OSError:
            for path in made:
                os.rmdir(path)
            raise
        return cls(parents)

    def _group(self, name: str) -> ExecutionGroup:
        if self.version == 2:
            return ExecutionCgroupV2(os.path.join(self.parents["memory"], name))
        cpuacct = self.parents.get("cpuacct")
        return ExecutionCgroup(os.path.join(self.parents["pids"], name),
                               os.path.join(self.parents["memory"], name),
                               os.path.join(cpuacct, name) if cpuacct else "")

    def new_execution(self, max_tasks: int, memory_bytes: int,
                      cpus: float = 0.0) -> ExecutionGroup:
        with self._lock:
            group = self._idle.pop() if self._idle else None
        if group is not None:
            try:
                group.begin(max_tasks, memory_bytes, cpus)
                return group  # `finish` found it uncharged; nobody charges an empty group
            except OSError:  # e.g. a lower limit than what it still holds: start afresh
                pass
            group.remove()
        group = self._group(secrets.token_hex(8))
        made = 0
        try:
            for directory in group.directories:
                os.mkdir(directory, 0o755)
                made += 1
            group.begin(max_tasks, memory_bytes, cpus)
        except OSError:
            if made:
                group.remove()
            raise
        return group

    def finish(self, group: ExecutionGroup, reuse: bool = True) -> None:
        """Kill what is left; keep the group for reuse only if the execution ended cleanly (a
        bomb's dying processes free kernel memory for a while and would skew the next peak)
        and nothing is charged to it any more. Otherwise it is removed: on v1 a charged memory
        cgroup can be removed, its leftover charge stays with the dying group (and its parent)
        until freed, and never counts against another execution."""
        emptied = group.kill_all()
        if not emptied:
            with self._lock:
                self._stale.append(group)
            return
        if (reuse and group.reusable and not group.killed and len(self._idle) < self.MAX_IDLE
                and group.uncharged()):
            with self._lock:
                if len(self._idle) < self.MAX_IDLE:
                    self._idle.append(group)
                    return
        group.remove()

    def close(self) -> None:
        """Remove every cgroup this root made (their processes are killed first)."""
        with self._lock:
            groups, self._idle, self._stale = self._idle + self._stale, [], []
        for group in groups:
            group.kill_all()
            group.remove()
        for path in dict.fromkeys(self.parents.values()):  # co-mounted: one directory
            for child in os.listdir(path):
                full = os.path.join(path, child)
                if os.path.isdir(full):
                    stray = (ExecutionCgroupV2(full) if self.version == 2
                             else ExecutionCgroup(full, full, full))
                    stray.kill_all()
                    with contextlib.suppress(OSError):
                        os.rmdir(full)
            with contextlib.suppress(OSError):
                os.rmdir(path)


class CgroupTickets:
    """The cgroup pairs handed to one skill's zygote and not yet claimed by an execution.

    Each pair is made for the skill's limits (tasks, memory + tmpfs workdir) before the
    execution that will run in it exists: the zygote's spare child joins it while idle. A pair
    is *issued* (made and sent: with a `ForkCommand`, or alone at boot and to refill), then
    *claimed* by the execution whose child the zygote reports in it, or *released* back to the
    root (the zygote gave it back, or stopped). Thread-safe.
    """

    def __init__(self, root: CgroupRoot, max_tasks: int, memory_bytes: int,
                 cpus: float = 0.0) -> None:
        self.root = root
        self.max_tasks = max_tasks
        self.memory_bytes = memory_bytes
        self.cpus = cpus if root.cpu_limits else 0.0
        self._handed: dict[tuple[str, ...], ExecutionGroup] = {}
        self._lock = threading.Lock()

    def issue(self) -> ExecutionGroup:
        group = self.root.new_execution(self.max_tasks, self.memory_bytes, self.cpus)
        with self._lock:
            self._handed[tuple(group.procs_files)] = group
        return group

    def claim(self, procs_files: list[str]) -> ExecutionGroup | None:
        """The pair the zygote says a child runs in; None if it is not one handed to it."""
        with self._lock:
            return self._handed.pop(tuple(procs_files), None)

    def release(self, *pairs: list[str]) -> None:
        """Take back pairs the zygote will not use (their processes, if any, are killed)."""
        for procs_files in pairs:
            group = self.claim(procs_files)
            if group is not None:
                self.root.finish(group)

    def empty(self) -> bool:
        with self._lock:
            return not self._handed

    def release_all(self) -> None:
        """The zygote is gone: every pair it held comes back."""
        with self._lock:
            groups, self._handed = list(self._handed.values()), {}
        for group in groups:
            self.root.finish(group)
