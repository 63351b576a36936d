"""Tree accounting from outside the execution: CPU, memory and process counts via psutil.

Per-process rlimits cannot see a tree (a fork gets a fresh RLIMIT_CPU budget, each process its
own RLIMIT_DATA); this sums the whole tree so the supervisor can kill it at the tree's limit.

CPU is cumulative: a process that is gone keeps its last sample, so CPU burnt by descendants
nobody reaps (zombies, processes killed by the skill, orphans reparented to the zygote once
seen) is not forgotten when they go. With a cgroup's CPU figure (cpuacct) that is used instead:
it also holds processes that lived less than one sampling interval, which the samples miss.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class TreeSample:
    cpu_seconds: float
    memory_bytes: int  # every page charged to the execution (see TreeWatch)
    tasks: int  # processes plus their extra threads


@dataclass
class _Seen:
    """The last sample of one process (kept after it is gone)."""

    own: float  # its own user + system CPU
    reaped: float  # CPU of the descendants it reaped (the kernel's children times)
    ppid: int
    alive: bool


class TreeWatch:
    """Samples one execution's process tree.

    Without a cgroup the tree is found through psutil (`children(recursive=True)` scans every
    process of the host, ~0.7 ms here), and memory is the sum of each process's PSS (shared
    pages split between the processes that map them, so `MAP_SHARED` memory counts once, not
    zero times as with USS) plus the size of the memfd files they hold; with one, `members`
    and `memory` read the execution's cgroup instead — a few small files — and the kernel's
    charge is the memory figure, and `cpu` (the cgroup's cpuacct) the CPU figure.
    """

    def __init__(self, pid: int, members: Callable[[], list[int]] | None = None,
                 memory: Callable[[], int] | None = None,
                 cpu: Callable[[], float] | None = None) -> None:
        self.pid = pid
        self._root = psutil.Process(pid)
        self._known: dict[int, psutil.Process] = {pid: self._root}
        self._seen: dict[int, _Seen] = {}
        self._members = members
        self._memory = memory
        self._cpu = cpu
        self.peak_memory_bytes = 0
        self.peak_cpu_seconds = 0.0

    def _processes(self) -> list[psutil.Process]:
        if self._members is None:
            tree = [self._root, *self._root.children(recursive=True)]
            in_tree = {process.pid for process in tree}
            # Seen earlier, since reparented out of the tree (orphans go to the zygote).
            return tree + [process for pid, process in self._known.items()
                           if pid not in in_tree and self._seen.get(pid, _GONE).alive
                           and process.is_running()]
        processes = [self._root]
        for pid in self._members():
            if pid == self.pid:
                continue
            process = self._known.get(pid)
            if process is None:
                try:
                    process = psutil.Process(pid)
                except psutil.NoSuchProcess:
                    continue
            processes.append(process)
        return processes

    def sample(self) -> TreeSample | None:
        """One reading of the tree, or None once the root is gone."""
        try:
            members = self._processes()
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return None
        for record in self._seen.values():
            record.alive = False
        memory = 0
        tasks = 0
        memfds: set[tuple[int, int]] = set()
        for process in members:
            known = self._known.get(process.pid)
            if known is None or (known is not process and not known.is_running()):
                self._known[process.pid] = known = process  # new, or a recycled pid
            try:
                with known.oneshot():
                    times = known.cpu_times()
                    zombie = known.status() == psutil.STATUS_ZOMBIE
                    self._seen[known.pid] = _Seen(
                        times.user + times.system, times.children_user + times.children_system,
                        known.ppid(), alive=not zombie)
                    if zombie:
                        continue
                    if self._memory is None:
                        memory += known.memory_full_info().pss
                        memory += _memfd_bytes(known.pid, memfds)
                    tasks += known.num_threads()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        if self._memory is not None:
            memory = self._memory()
        cpu = self._cpu() if self._cpu is not None else self._cumulative_cpu()
        self.peak_memory_bytes = max(self.peak_memory_bytes, memory)
        self.peak_cpu_seconds = max(self.peak_cpu_seconds, cpu)
        return TreeSample(cpu, memory, tasks)

    def _cumulative_cpu(self) -> float:
        """CPU of every process seen, each counted once.

        A process's reaped-children time already holds the descendants it reaped, which may
        also have been sampled: for each process count its own time, its live children's
        totals, and the larger of its reaped time and its dead children's totals. Whoever is
        not under a seen parent (the root, orphans) is summed on its own.
        """
        children: dict[int, list[int]] = {}
        for pid, record in self._seen.items():
            if record.ppid in self._seen and record.ppid != pid:
                children.setdefault(record.ppid, []).append(pid)
        done: set[int] = set()

        def total(pid: int) -> float:
            done.add(pid)
            record = self._seen[pid]
            alive = dead = 0.0
            for child in children.get(pid, ()):
                if child in done:  # a cycle through a recycled pid: count it once
                    continue
                if self._seen[child].alive:
                    alive += total(child)
                else:
                    dead += total(child)
            return record.own + max(record.reaped, dead) + alive

        cpu = 0.0
        for pid, record in self._seen.items():
            if record.ppid not in self._seen and pid not in done:
                cpu += total(pid)
        for pid in self._seen:  # anything left sits in a ppid cycle (recycled pids)
            if pid not in done:
                cpu += total(pid)
        return cpu


_GONE = _Seen(0.0, 0.0, 0, alive=False)


def _memfd_bytes(pid: int, counted: set[tuple[int, int]]) -> int:
    """The size of the memfd files `pid` holds open that are not counted yet (`counted`: their
    (device, inode)): memory in no mapping, so in no process's PSS."""
    total = 0
    directory = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(directory)
    except OSError:
        return 0
    for fd in fds:
        path = f"{directory}/{fd}"
        try:
            if not os.readlink(path).startswith("/memfd:"):
                continue
            info = os.stat(path)
        except OSError:
            continue
        if (info.st_dev, info.st_ino) not in counted:
            counted.add((info.st_dev, info.st_ino))
            total += info.st_blocks * 512
    return total
