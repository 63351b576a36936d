"""Kernel-level containment applied inside the worker processes.

Once, in the zygote (`apply_zygote_layers`): no_new_privs and no core dumps; as root, its own
mount namespace (paths the execution uids cannot reach exposed read-only, the whole view made
read-only), its own IPC namespace and, for skills without the network permission, its own
network namespace; the Landlock plan (read-only paths opened once); the seccomp allow-list of
the skill's runtime profile, which every fork inherits.

Per execution, in the zygote: `before_fork` mounts the tmpfs workdir, a `CgroupGate` moves a
child forked on request into its cgroups and then lets it go on (a pre-forked spare joins its
cgroups itself, before any request: `worker.spare`), `prepare_next` readies the next Landlock
ruleset, `release_execution` detaches the workdir after the reap; the fork itself puts the child
in a PID namespace of its own where asked (`worker.pidns`). In the child, before any skill code:
`enter_execution` (gate, own user namespace where asked, then Landlock) and `apply_child_layers`
(umask, rlimits, the execution's own uid/gid, a last seccomp filter for mount/umount2/unshare
and namespace clones). Work is done in the zygote wherever it can be: there it costs
microseconds, in a fresh fork every touched page is a copy-on-write fault.

Which layers run is the supervisor's decision (it detects what the host supports and reports
it); this module applies what the settings ask for and fails loudly when it cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import resource
import signal
import stat
import sys
from collections.abc import Iterator

from worker import landlock, namespaces, pidns, seccomp
from worker.protocol import ForkCommand, SkillCode, ZygoteSettings

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


def close_fds_except(keep: set[int]) -> None:
    """Close every descriptor but `keep`: what a forked process inherited from its parent (a
    zygote's control socket, other executions' sockets and pidfds, the base's own socket)
    must never reach the code that runs next."""
    low = 0
    for fd in sorted(keep):
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, max_fd())


def become_subreaper() -> None:
    """Orphans of an execution reparent to the zygote, which kills them, instead of to init."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


_parent_pid = 0


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent (the zygote) dies; exit now if it already has."""
    global _parent_pid
    _parent_pid = parent_pid
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _exit_if_orphaned()


def _exit_if_orphaned() -> None:
    """After (re)setting the parent-death signal: if the zygote died before, nothing will
    send it, so exit now."""
    if _parent_pid and pidns.parent_pid() != _parent_pid:
        os._exit(1)


class _Zygote:
    settings = ZygoteSettings()
    plan: landlock.Plan | None = None
    child_filter: seccomp.Filter | None = None
    #: RLIMIT_FSIZE never below this in an execution (`allow_runtime_files`).
    file_floor = 0


def allow_runtime_files(nbytes: int) -> None:
    """In the zygote: the runtime itself writes files of up to `nbytes` in each execution
    (wasmtime's memfd image of a module's initialised memory), which the skill's own
    max_file_bytes must not fail. Only for code that opens no file of its own (a WASM module
    has no preopened directory)."""
    _Zygote.file_floor = max(_Zygote.file_floor, nbytes)


#: System locations every execution may read (and, for code, execute); absent ones are skipped.
SYSTEM_CODE = ["/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin"]
SYSTEM_FILES = [
    "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
    "/etc/ssl", "/etc/ca-certificates", "/etc/pki", "/etc/resolv.conf", "/etc/hosts",
    "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf", "/etc/protocols",
    "/etc/services", "/etc/passwd", "/etc/group", "/etc/mime.types",
    "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
    "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom",
]
_NULL_DEVICE_ACCESS = landlock.READ_FILE | landlock.WRITE_FILE | landlock.TRUNCATE


#: Resolved paths of the modules the shared base zygote imported (`remember_code_paths`),
#: inherited by every zygote it forks: resolving them again is most of `code_paths`' cost.
_resolved: dict[str, str] = {}


def _realpath(path: str) -> str:
    resolved = _resolved.get(path)
    return resolved if resolved is not None else os.path.realpath(path)


def remember_code_paths() -> None:
    """In the shared base zygote, before any skill: resolve the paths of what it imported
    (the interpreter's, the worker runtime's: no skill's), so forked zygotes need not."""
    for path in _code_dirs(SkillCode(skill_dir="/", kind="python"), []):
        if os.path.exists(path):
            _resolved[path] = os.path.realpath(path)


def _code_dirs(code: SkillCode, extra: list[str]) -> set[str]:
    found = {sys.base_prefix, sys.prefix, sys.base_exec_prefix, sys.exec_prefix,
             code.skill_dir, *extra, *(entry for entry in sys.path if entry)}
    for name, module in list(sys.modules.items()):
        filename = getattr(module, "__file__", None)
        if not filename or name == "__main__":
            continue
        # Up to the top-level package's directory (a plain top-level module stays a file).
        levels = name.count(".") + os.path.basename(filename).startswith("__init__.")
        for _ in range(levels):
            filename = os.path.dirname(filename)
        found.add(filename)
    return found


def code_paths(code: SkillCode, extra: list[str]) -> list[str]:
    """Directories holding code an execution runs: the interpreter, everything on sys.path,
    every package the zygote imported (editable installs live outside sys.path) and the skill."""
    found = _code_dirs(code, extra)
    real = sorted({_realpath(path) for path in found if os.path.exists(path)}, key=len)
    kept: list[str] = []
    for path in real:  # drop paths beneath one already kept
        if not any(path == other or path.startswith(other.rstrip("/") + "/") for other in kept):
            kept.append(path)
    return kept


def apply_zygote_layers(config: ZygoteSettings, code: SkillCode | None = None) -> None:
    """Layers every execution inherits, applied once before the zygote serves."""
    _Zygote.settings = config
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    code = code or SkillCode(skill_dir="/", kind="python")
    paths = code_paths(code, config.read_only)
    readable = [path for path in paths if os.path.isdir(path)]
    reach = readable + ([config.workdir_root] if config.workdir_root else [])
    if config.user_ns:  # first: it is what lets an ordinary user create the others
        namespaces.enter_user_namespace()
    if config.mount_ns:
        namespaces.enter_mount_namespace()
        if config.drop_uid:
            namespaces.expose(reach)
        namespaces.read_only_view(["/sys/fs/cgroup"])
        if config.workdir_root:
            namespaces.cover_workdir_root(config.workdir_root)
    if config.drop_uid:  # a clear error at boot, not an odd failure in every execution
        namespaces.check_reachable(reach, readable)
    if config.net_ns:
        namespaces.unshare(namespaces.CLONE_NEWNET)
    if config.ipc_ns:
        namespaces.unshare(namespaces.CLONE_NEWIPC)
    if config.landlock_abi:
        rules = {path: landlock.READ_EXEC for path in (*SYSTEM_CODE, *paths)}
        rules.update({path: landlock.READ_ONLY for path in SYSTEM_FILES})
        rules["/dev/null"] = _NULL_DEVICE_ACCESS
        _Zygote.plan = landlock.Plan(config.landlock_abi, rules)
        _Zygote.plan.prepare()
    if config.seccomp:
        # Children mount their workdir and enter their own user namespace before they are
        # confined: they get mount/umount2/unshare denied by a small filter of their own, the
        # zygote keeps umount2 to detach the workdir. One allow-list per runtime profile
        # serves the zygote and its children: a zygote serves one skill, so nothing is
        # stacked per execution but the child filter.
        allow_mount = config.mount_ns
        profile = code.kind if code.kind in seccomp.PROFILES else "python"
        seccomp.Filter(seccomp.build_filter(config.seccomp_network, allow_mount=allow_mount,
                                            profile=profile, audit=config.seccomp_audit,
                                            allow_userns=config.execution_user_ns,
                                            allow_pidns=config.pid_ns)).install()
        if allow_mount or config.execution_user_ns or config.pid_ns:
            _Zygote.child_filter = seccomp.Filter(seccomp.build_child_filter())


_data_baseline = 0


def note_data_baseline() -> None:
    """Remember the zygote's data segment, so a child need not read /proc to learn it: at the
    fork the child's is the same."""
    global _data_baseline
    _data_baseline = _data_baseline_bytes()


#: Memory the zygote may take, above what it holds when it starts compiling, to compile the
#: skill's code (openbotstack's 3 MB Go modules: ~60 MB; a WASM data segment: ~4x its size).
COMPILE_MEMORY_MB = 1024
#: CPU seconds the zygote may spend compiling the skill's code (a 3 MB Go module: ~6 s here).
COMPILE_CPU_SECONDS = 20
#: Largest WASM module file a zygote compiles: compiling takes about four times the file (a
#: data segment is copied whole, more than once), so a larger one could not fit the budget.
MAX_WASM_BYTES = (COMPILE_MEMORY_MB << 20) // 4


class ConfinedFileError(ValueError):
    """A skill file the zygote must not read as root: outside the skill's directory, not a
    regular file, or larger than the bound (`size` set then)."""

    def __init__(self, message: str, size: int = 0) -> None:
        super().__init__(message)
        self.size = size


def read_confined(path: str, directory: str, limit: int) -> bytes:
    """The bytes of `path`, only if the opened file is a regular file that really lies in
    `directory` and holds at most `limit` bytes. The zygote reads skill files as root before
    its layers, after the supervisor checked the path at load: a symlink swapped in since must
    not make it read a host file, a FIFO stall it (O_NONBLOCK), a device fill it. OSError: it
    cannot be opened, or where it lies cannot be told (no /proc)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if not where.startswith(directory.rstrip("/") + "/"):
            raise ConfinedFileError(f"resolves to {where}, outside the skill's directory "
                                    f"{directory}")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfinedFileError("not a regular file")
        data = file.read(limit + 1) if info.st_size <= limit else b""
    if info.st_size > limit or len(data) > limit:
        size = max(info.st_size, len(data))
        raise ConfinedFileError(f"{size} bytes, more than {limit}", size)
    return data


@contextlib.contextmanager
def compile_limits() -> Iterator[None]:
    """While the zygote compiles the skill's code: RLIMIT_DATA at its data segment now plus
    `COMPILE_MEMORY_MB`, RLIMIT_CPU at its CPU time now plus `COMPILE_CPU_SECONDS` (soft limits:
    an ordinary user's zygote could not raise hard ones back). The zygote runs as the
    supervisor's user, in no cgroup and before any limit: without these, a module of a few
    hundred MB takes the host's memory, and a few KB that compile for minutes (WASM functions
    declaring 50,000 locals each) its CPU, at every cold start. Past the memory cap Python's
    compiler raises MemoryError and wasmtime aborts; past the CPU cap SIGXCPU ends the zygote
    (the supervisor names it). Either way the boot fails and nothing else does — and no core
    of that size is dumped as root (RLIMIT_CORE 0 from here on, as the layers set it anyway)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    usage = resource.getrusage(resource.RUSAGE_SELF)
    caps = {resource.RLIMIT_DATA: _data_baseline_bytes() + (COMPILE_MEMORY_MB << 20),
            resource.RLIMIT_CPU: math.ceil(usage.ru_utime + usage.ru_stime) + COMPILE_CPU_SECONDS}
    before = {which: resource.getrlimit(which) for which in caps}
    for which, cap in caps.items():
        soft, hard = before[which]
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(which, (cap, hard))
    try:
        yield
    finally:
        for which, limits in before.items():
            resource.setrlimit(which, limits)


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
    _set_limit(resource.RLIMIT_DATA,
               (_data_baseline or _data_baseline_bytes()) + limits.memory_mb * _MB)
    _set_limit(resource.RLIMIT_FSIZE, max(limits.max_file_bytes, _Zygote.file_floor))
    _set_limit(resource.RLIMIT_NOFILE, limits.max_open_files)
    _set_limit(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC only where it counts this execution's tasks alone: its own uid
    # (`drop_privileges`) or its own user namespace (`enter_execution`); elsewhere it would
    # count every process of the uid. Beyond that: the tree watch and a pids cgroup.
    if _Zygote.settings.execution_user_ns:
        _set_limit(resource.RLIMIT_NPROC, _task_cap(command))


def _task_cap(command: ForkCommand) -> int:
    """RLIMIT_NPROC of an execution: its max_processes, plus the runtime's own (the execution
    process itself and a helper thread)."""
    return command.limits.max_processes + 2


def _covers_workdirs() -> bool:
    """Whether the workdir root is this zygote's own tmpfs (`namespaces.cover_workdir_root`):
    then the zygote makes and removes each execution's directory, not the supervisor."""
    return _Zygote.settings.mount_ns and bool(_Zygote.settings.workdir_root)


def before_fork(command: ForkCommand) -> None:
    """In the zygote: make the execution's directory and mount its tmpfs workdir. A few µs
    here, where a freshly forked child would pay ~100 µs of copy-on-write faults for the same
    calls."""
    isolation = command.isolation
    if _covers_workdirs():
        with contextlib.suppress(FileExistsError):
            os.mkdir(command.workdir, 0o700)
    if _Zygote.settings.mount_ns and isolation.disk_bytes > 0:
        uid, gid = isolation.uid, isolation.gid
        owner = (uid, gid) if uid >= 0 and gid >= 0 else (os.getuid(), os.getgid())
        try:
            namespaces.mount_workdir(command.workdir, owner[0], owner[1], isolation.disk_bytes)
        except OSError:
            if _covers_workdirs():
                with contextlib.suppress(OSError):
                    os.rmdir(command.workdir)
            raise


class CgroupGate:
    """Where a child forked on request waits until the zygote has put it in its cgroups: it
    runs nothing outside them. (A spare joins its own cgroups before any request: no gate.)"""

    def __init__(self, procs_files: list[str]) -> None:
        self.procs_files = procs_files
        self._read, self._write = os.pipe2(os.O_CLOEXEC)

    def open_for(self, pid: int) -> None:
        """In the zygote, once `pid` is forked: move it into its cgroups, then let it go on (or
        kill it if the move failed)."""
        os.close(self._read)
        try:
            join_cgroups(self.procs_files, pid)
            os.write(self._write, b"1")
        except OSError:
            os.kill(pid, signal.SIGKILL)  # never runs outside its cgroups
        finally:
            os.close(self._write)

    def wait(self) -> None:
        """In the child: block until the zygote has moved it."""
        os.close(self._write)
        opened = os.read(self._read, 1)
        os.close(self._read)
        if opened != b"1":
            raise RuntimeError("the zygote could not put this execution in its cgroups")

    def discard(self) -> None:
        """In the zygote, when the fork itself failed."""
        os.close(self._read)
        os.close(self._write)


def gate_for(command: ForkCommand) -> CgroupGate | None:
    """The gate a child forked now for `command` waits at; None when it has no cgroups."""
    return CgroupGate(command.isolation.cgroups) if command.isolation.cgroups else None


def join_cgroups(procs_files: list[str], pid: int) -> None:
    """Move `pid` into each cgroup (v1 `cgroup.procs` paths). On cgroup v1 each write may wait
    for an RCU grace period (milliseconds after an idle moment): keep it off the request path
    where possible (a spare child joins its own while nobody waits)."""
    for procs in procs_files:
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)


def kept_fds() -> set[int]:
    """The zygote's own descriptors a child still needs before it is confined: the Landlock
    plan's O_PATH fds of read-only system paths and its prepared ruleset. A spare child keeps
    these (and nothing else of the zygote's) until `_place_fds` closes them."""
    return _Zygote.plan.fds() if _Zygote.plan is not None else set()


PR_SET_NAME = 15


def set_process_name(name: bytes) -> None:
    """The name `ps` shows (comm, 15 bytes at most)."""
    if _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_NAME): {os.strerror(err)}")


def own_ruleset() -> None:
    """In a spare, before it says ready: a Landlock ruleset of its own (`Plan.own_spare`)."""
    if _Zygote.plan is not None:
        _Zygote.plan.own_spare()


def prepare_next() -> None:
    """In the zygote, once the fork is reported: build the next child's Landlock ruleset."""
    if _Zygote.plan is not None:
        _Zygote.plan.handoff()


_in_own_user_namespace = False


def enter_own_user_namespace() -> None:
    """In an execution child (or a spare, ahead of its request): its own user namespace, in
    which RLIMIT_NPROC (set with the other rlimits) counts its tasks alone. Creating one costs
    ~0.3 ms (the kernel registers a sysctl table per user namespace): a spare pays it while
    nobody waits. A no-op where the settings do not ask for it, or done already."""
    global _in_own_user_namespace
    if not _Zygote.settings.execution_user_ns or _in_own_user_namespace:
        return
    namespaces.enter_execution_user_namespace()
    _in_own_user_namespace = True
    namespaces.drop_capabilities()
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # a credential change may clear it
    _exit_if_orphaned()


def enter_execution(command: ForkCommand, gate: CgroupGate | None) -> None:
    """In the child, still privileged and before the fds are placed: wait at its gate until
    the zygote has put this process in its cgroups, enter the execution's own user namespace,
    then Landlock (which needs the zygote's O_PATH fds open)."""
    if gate is not None:
        gate.wait()
    enter_own_user_namespace()
    if _Zygote.plan is not None:
        _Zygote.plan.restrict(command.workdir)


def drop_privileges(uid: int, gid: int, max_tasks: int) -> None:
    """Become the execution's own uid/gid, with no groups and no capabilities.

    RLIMIT_NPROC counts the uid's tasks host-wide, which is exactly this execution's when the
    uid is its own. A credential change clears the parent-death signal: set it again. The
    process stays dumpable so the skill can read its own /proc/self (core dumps stay off).
    """
    _set_limit(resource.RLIMIT_NPROC, max_tasks)
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _exit_if_orphaned()
    _prctl(PR_SET_DUMPABLE, 1)


def apply_child_layers(command: ForkCommand, code: SkillCode) -> None:
    """Per-execution layers, applied after the fork and before any skill code runs."""
    os.umask(0o077)
    apply_rlimits(command)
    if _Zygote.settings.drop_uid:
        uid, gid = command.isolation.uid, command.isolation.gid
        if uid < 1 or gid < 1:
            raise PermissionError(f"no unprivileged uid/gid for this execution "
                                  f"(uid={uid}, gid={gid})")
        drop_privileges(uid, gid, _task_cap(command))
    if _Zygote.child_filter is not None:
        _Zygote.child_filter.install()


#: How many workdir entries `file_limit_reached` looks at: the tree is the skill's to shape.
_WORKDIR_SCAN_ENTRIES = 256


def file_limit_reached(workdir: str, max_file_bytes: int) -> bool:
    """In the zygote, after the reap and before `release_execution`: whether a regular file in
    the workdir (links not followed; the first entries only) is `max_file_bytes` long."""
    pending, seen = [workdir], 0
    while pending and seen < _WORKDIR_SCAN_ENTRIES:
        try:
            entries = list(os.scandir(pending.pop()))
        except OSError:
            continue
        for entry in entries[:_WORKDIR_SCAN_ENTRIES - seen]:
            seen += 1
            try:
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif (entry.is_file(follow_symlinks=False)
                      and entry.stat(follow_symlinks=False).st_size >= max_file_bytes):
                    return True
            except OSError:
                continue
    return False


def release_execution(workdir: str) -> None:
    """In the zygote, after the reap: detach the execution's tmpfs (a no-op if it has none)
    and, where the IPC namespace stands alone (no seccomp refusing the calls), remove the SysV
    objects the execution made, so the next one cannot find them."""
    if _Zygote.settings.ipc_ns and not _Zygote.settings.seccomp:
        namespaces.remove_sysv_objects()
    if _Zygote.settings.mount_ns:
        # OSError: never mounted (killed early) or already gone with its directory.
        with contextlib.suppress(OSError):
            namespaces.umount(workdir)
    if _covers_workdirs():  # empty: the execution's files were on its own tmpfs, now detached
        with contextlib.suppress(OSError):
            os.rmdir(workdir)
