"""Tree accounting from outside the execution: CPU, memory and process counts via psutil.

Per-process rlimits cannot see a tree (a fork gets a fresh RLIMIT_CPU budget, each process its
own RLIMIT_DATA); this sums the whole tree so the supervisor can kill it at the tree's limit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class TreeSample:
    cpu_seconds: float
    memory_bytes: int  # unique (private) memory of every process in the tree
    tasks: int  # processes plus their extra threads


class TreeWatch:
    """Samples one execution's process tree.

    Without a cgroup the tree is found through psutil (`children(recursive=True)` scans every
    process of the host, ~0.7 ms here); with one, `members` and `memory` read the execution's
    cgroup instead — a few small files — and the kernel's charge is the memory figure.
    """

    def __init__(self, pid: int, members: Callable[[], list[int]] | None = None,
                 memory: Callable[[], int] | None = None) -> None:
        self.pid = pid
        self._root = psutil.Process(pid)
        self._known: dict[int, psutil.Process] = {pid: self._root}
        self._members = members
        self._memory = memory
        self.peak_memory_bytes = 0
        self.peak_cpu_seconds = 0.0

    def _processes(self) -> list[psutil.Process]:
        if self._members is None:
            return [self._root, *self._root.children(recursive=True)]
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
        cpu = 0.0
        memory = 0
        tasks = 0
        for index, process in enumerate(members):
            process = self._known.setdefault(process.pid, process)
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    cpu += times.user + times.system
                    if index == 0:  # reaped descendants are charged to the root
                        cpu += times.children_user + times.children_system
                    if self._memory is None:
                        memory += process.memory_full_info().uss
                    tasks += process.num_threads()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue
        if self._memory is not None:
            memory = self._memory()
        self.peak_memory_bytes = max(self.peak_memory_bytes, memory)
        self.peak_cpu_seconds = max(self.peak_cpu_seconds, cpu)
        return TreeSample(cpu, memory, tasks)
