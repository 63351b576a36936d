"""What this host can isolate with, which layers a `Sandbox` will use, and the `doctor` report.

`detect()` reads the host once per process: kernel, architecture, root or not, Landlock ABI,
cgroup hierarchies and whether they are writable, and — by trying them for real in a fresh
interpreter (`worker.probe`) — seccomp, mount/network/PID/user namespaces and the uid switch.
`plan_layers()` turns that and the operator's `IsolationConfig` into the mechanisms to use;
`capability_report()` says, layer by layer, what is active and why anything is not. A layer the
host lacks is reported, never silently dropped; one listed in `IsolationConfig.required` makes
the `Sandbox` refuse to start instead.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field

from sandbox import cgroups
from sandbox.errors import SandboxError
from worker.protocol import ZygoteSettings

#: Mechanisms an operator can require or disable by name.
MECHANISMS = ("uid", "userns", "mountns", "netns", "ipcns", "pidns", "landlock", "seccomp",
              "cgroups")
_PROBE_TIMEOUT = 20.0
#: Set to 1 in the supervisor's environment to derive a profile: calls off the seccomp
#: allow-list are allowed and logged by the kernel (audit type 1326) instead of refused.
SECCOMP_AUDIT_ENV = "SKILL_SANDBOX_SECCOMP_AUDIT"


class IsolationUnavailable(SandboxError):
    """A layer listed in `IsolationConfig.required` is not available on this host."""


@dataclass(frozen=True)
class IsolationConfig:
    """The operator's choices; the defaults use every layer the host has.

    `uid_base`/`uid_count`: the pool of uids (and equal gids) executions run as when the
    supervisor is root — one per concurrent execution, so executions cannot signal or read each
    other. Pick a range no real account or container uses. `workdir_mb`: size of each
    execution's tmpfs workdir. `read_only`: more paths every skill may read. `disabled` and
    `required`: mechanism names from `MECHANISMS`. `trusted_preload`: the modules (with their
    submodules) a skill's manifest may name in `preload`; a preload is imported in the skill's
    zygote, as root and before the per-execution layers, so only the operator can allow one.
    """

    uid_base: int = 1_000_000_000
    uid_count: int = 1024
    workdir_mb: int = 64
    read_only: tuple[str, ...] = ()
    disabled: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    trusted_preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for which in ("disabled", "required"):
            unknown = sorted(set(getattr(self, which)) - set(MECHANISMS))
            if unknown:
                raise ValueError(f"IsolationConfig.{which}: unknown mechanism(s) "
                                 f"{', '.join(unknown)}; known: {', '.join(MECHANISMS)}")
        clash = sorted(set(self.disabled) & set(self.required))
        if clash:
            raise ValueError(f"IsolationConfig: {', '.join(clash)} both required and disabled")
        if not 0 < self.uid_base < 2**32 - 1 - self.uid_count or self.uid_count < 1:
            raise ValueError(f"IsolationConfig: uid_base={self.uid_base}, uid_count="
                             f"{self.uid_count} is not a valid range of unprivileged uids")
        if self.workdir_mb < 1:
            raise ValueError(f"IsolationConfig.workdir_mb must be at least 1, got "
                             f"{self.workdir_mb}")
        for path in self.read_only:
            if not os.path.isabs(path):
                raise ValueError(f"IsolationConfig.read_only: {path!r} is not an absolute path")
        for name in self.trusted_preload:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"IsolationConfig.trusted_preload: {name!r} is not a module name")

    def untrusted_preloads(self, preload: list[str]) -> list[str]:
        """The modules of `preload` that are neither in `trusted_preload` nor beneath one."""
        return [name for name in preload
                if not any(name == trusted or name.startswith(trusted + ".")
                           for trusted in self.trusted_preload)]


@dataclass(frozen=True)
class HostInfo:
    """Facts about the host, as detected; `probes` maps a mechanism to "" (works) or why not."""

    kernel: str
    arch: str
    euid: int
    landlock_abi: int
    probes: dict[str, str]
    cgroup_v1: dict[str, str]
    cgroup_v1_problem: str
    cgroup_v2: str
    cgroup_v2_subtree: cgroups.V2Subtree | None = None

    def works(self, mechanism: str) -> bool:
        return self.probes.get(mechanism, "not probed") == ""

    @property
    def cgroup_version(self) -> int:
        """The cgroup version a `Sandbox` drives here (as `CgroupRoot.create` picks it): v1
        where the host mounts v1 pids and memory hierarchies, else v2."""
        if all(name in self.cgroup_v1 for name in cgroups.CONTROLLERS):
            return 1
        return 2 if self.cgroup_v2 else 0

    @property
    def cgroup_problem(self) -> str:
        """Why the chosen cgroup version cannot be used here ("" if it can)."""
        if self.cgroup_version == 1:
            return self.cgroup_v1_problem
        if self.cgroup_version == 2 and self.cgroup_v2_subtree is not None:
            return self.cgroup_v2_subtree.problem
        return self.cgroup_v1_problem or "no cgroup hierarchy mounted"

    def kernel_at_least(self, major: int, minor: int) -> bool:
        try:
            version = tuple(int(part) for part in self.kernel.split("-")[0].split(".")[:2])
        except ValueError:
            return False
        return version >= (major, minor)


@dataclass(frozen=True)
class IsolationPlan:
    """The mechanisms a `Sandbox` uses, and for each one it does not, the reason."""

    config: IsolationConfig
    uid: bool
    mountns: bool
    netns: bool
    landlock_abi: int
    seccomp: bool
    cgroups: bool
    ipcns: bool = False
    #: Not root: the zygote's own user namespace (which lets it create the others), and one
    #: nested per execution in which RLIMIT_NPROC counts that execution's tasks alone.
    userns: bool = False
    userns_nproc: bool = False
    #: Each execution pid 1 of a PID namespace of its own (`worker.pidns`).
    pidns: bool = False
    off: dict[str, str] = field(default_factory=dict)

    def zygote_settings(self, network: bool, workdir_root: str) -> ZygoteSettings:
        """The layers of a skill's zygote (`network`: the skill's permission)."""
        return ZygoteSettings(
            network=network,
            drop_uid=self.uid,
            user_ns=self.userns,
            execution_user_ns=self.userns_nproc,
            mount_ns=self.mountns,
            net_ns=self.netns and not network,
            ipc_ns=self.ipcns,
            pid_ns=self.pidns,
            seccomp=self.seccomp,
            # A netns hides no pathname socket: the socket rules hold with or without one.
            seccomp_network=self.seccomp and not network,
            seccomp_audit=self.seccomp and os.environ.get(SECCOMP_AUDIT_ENV) == "1",
            landlock_abi=self.landlock_abi,
            workdir_root=workdir_root,
            read_only=list(self.config.read_only),
        )

    @property
    def workdir_bytes(self) -> int:
        return self.config.workdir_mb << 20 if self.mountns else 0


@dataclass(frozen=True)
class Layer:
    name: str
    status: str  # "active" | "fallback" | "unavailable"
    detail: str


@dataclass(frozen=True)
class CapabilityReport:
    host: HostInfo
    layers: list[Layer]

    @property
    def all_active(self) -> bool:
        return all(layer.status == "active" for layer in self.layers)

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)


def _probe(uid: int) -> dict[str, str]:
    """Run `worker.probe` in a fresh interpreter (never fork the threaded supervisor)."""
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-B", "-m", "worker.probe", str(uid)],
            capture_output=True, text=True, timeout=_PROBE_TIMEOUT, check=False,
            env={"PATH": "/usr/bin:/bin"}, cwd="/",
        )
        results: dict[str, str] = json.loads(done.stdout)
        return results
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        reason = f"the probe failed: {exc}"
        return {name: reason for name in (*MECHANISMS, "setuid", "userns_nproc")}


def _cgroup_facts() -> tuple[dict[str, str], str, str]:
    try:
        v1 = cgroups.v1_hierarchies()
    except OSError as exc:
        v1, problem = {}, f"cannot read the cgroup hierarchy: {exc}"
    else:
        missing = [name for name in cgroups.CONTROLLERS if name not in v1]
        problem = f"no cgroup v1 hierarchy for {', '.join(missing)}" if missing else ""
    if not problem:
        for controller, path in v1.items():
            if controller not in cgroups.CONTROLLERS:
                continue  # optional (cpuacct): used if it works, see CgroupRoot.create
            probe = os.path.join(path, f"skill-sandbox-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
                os.rmdir(probe)
            except OSError as exc:
                problem = f"{path} is not writable ({exc.strerror}) for {controller}"
                break
    return v1, problem, cgroups.v2_mount()


@functools.lru_cache(maxsize=4)
def detect(uid: int = IsolationConfig.uid_base) -> HostInfo:
    """The host's isolation facts (cached: the kernel does not change under a process)."""
    from worker import landlock

    v1, problem, v2 = _cgroup_facts()
    return HostInfo(kernel=platform.release(), arch=platform.machine(), euid=os.geteuid(),
                    landlock_abi=landlock.abi_version(), probes=_probe(uid), cgroup_v1=v1,
                    cgroup_v1_problem=problem, cgroup_v2=v2,
                    cgroup_v2_subtree=cgroups.v2_subtree() if v2 else None)


def _hidden_interpreter() -> str:
    """The interpreter directory an unprivileged uid cannot reach (pyenv under /root), or ""."""
    from worker.namespaces import hidden_ancestor

    for prefix in {sys.base_prefix, sys.prefix}:
        path = os.path.realpath(prefix)
        if hidden_ancestor(path + "/bin"):
            return path
    return ""


def plan_layers(host: HostInfo, config: IsolationConfig) -> IsolationPlan:
    """Which mechanisms to use; raises `IsolationUnavailable` if a required one is off."""
    off: dict[str, str] = {}
    root = host.euid == 0

    def usable(name: str, works: bool, reason: str) -> bool:
        if name in config.disabled:
            off[name] = "disabled by IsolationConfig"
        elif not works:
            off[name] = reason
        return name not in off

    not_root = f"the supervisor is not root (euid {host.euid})"
    uid = usable("uid", root and host.works("setuid"),
                 not_root if not root else f"setresuid failed: {host.probes.get('setuid')}")
    # An ordinary user creates the other namespaces inside a user namespace of its own (the
    # probes ran them there); root needs none: its executions have uids of their own.
    userns = usable("userns", not root and host.works("userns"),
                    "not needed as root: each execution has its own uid" if root
                    else f"unprivileged user namespaces are not allowed here "
                         f"({host.probes.get('userns', 'not probed')}): check the sysctls "
                         "user.max_user_namespaces and kernel.unprivileged_userns_clone, and "
                         "AppArmor's kernel.apparmor_restrict_unprivileged_userns")
    userns_nproc = userns and host.works("userns_nproc")
    if userns and not userns_nproc:
        off["userns_nproc"] = host.probes.get("userns_nproc", "not probed")
    namespace_owner = root or userns
    no_owner = f"{not_root}, and {off.get('userns')}"

    def namespace(name: str) -> bool:
        return usable(name, namespace_owner and host.works(name),
                      no_owner if not namespace_owner else host.probes.get(name, "not probed"))

    mountns, netns, ipcns = namespace("mountns"), namespace("netns"), namespace("ipcns")
    pidns = namespace("pidns")
    landlock_ok = usable("landlock", host.landlock_abi > 0 and host.works("landlock"),
                         "the kernel has no Landlock (5.13+, CONFIG_SECURITY_LANDLOCK, "
                         "landlock in lsm=)" if not host.landlock_abi
                         else host.probes.get("landlock", ""))
    if uid and not mountns:  # nothing can expose an interpreter under a 0700 home: say so
        hidden = _hidden_interpreter()
        uid = usable("uid", not hidden, f"{hidden} is not reachable by other uids and the "
                                        "mount namespace that would expose it is off")
    seccomp = usable("seccomp", host.works("seccomp"), host.probes.get("seccomp", ""))
    # v1: root only. v2: whoever the subtree is delegated to (a user's systemd session too).
    v1_root = host.cgroup_version != 1 or root
    cgroup_ok = usable("cgroups", v1_root and not host.cgroup_problem,
                       not_root if not v1_root else host.cgroup_problem)
    plan = IsolationPlan(config=config, uid=uid, mountns=mountns, netns=netns,
                         landlock_abi=host.landlock_abi if landlock_ok else 0, seccomp=seccomp,
                         cgroups=cgroup_ok, ipcns=ipcns, userns=userns,
                         userns_nproc=userns_nproc, pidns=pidns, off=off)
    missing = sorted(name for name in config.required if name in off)
    if missing:
        raise IsolationUnavailable("required isolation unavailable: " + "; ".join(
            f"{name}: {off[name]}" for name in missing))
    return plan


def capability_report(host: HostInfo, plan: IsolationPlan) -> CapabilityReport:
    """Layer by layer: active, on a fallback, or unavailable — with the mechanism or reason."""
    config, off = plan.config, plan.off
    layers = [Layer("hygiene", "active" if host.works("no_new_privs") else "unavailable",
                    "no_new_privs; environment scrubbed to an allow-list plus the manifest's "
                    "env; every fd closed but the execution's pipes; RLIMIT_CORE=0; umask 077")]
    if plan.uid:
        layers.append(Layer("identity", "active",
                            f"each concurrent execution runs as its own uid/gid (pool of "
                            f"{config.uid_count} from {config.uid_base}, each leased host-wide "
                            "while it runs), no groups, no capabilities"))
    elif plan.userns:
        shared = ("" if plan.landlock_abi >= 6 else
                  "; they share that uid, and without Landlock ABI 6 (Linux 6.12) nothing "
                  "keeps one from signalling another")
        layers.append(Layer("identity", "fallback",
                            "executions run as the supervisor's uid, each in a user namespace "
                            f"of its own (no uid pool: {off['uid']}){shared}"))
    else:
        layers.append(Layer("identity", "unavailable",
                            f"executions run as the supervisor's uid: {off['uid']}; no user "
                            f"namespace: {off['userns']}"))
    hidden = []
    if plan.pidns:
        hidden.append("a PID namespace per execution: no process outside its own tree can be "
                      "named, so none can be signalled, traced or opened by pidfd, and what it "
                      "leaves behind dies with it")
    if plan.uid:
        hidden.append("own uid (no /proc/<pid>/environ or mem of, or signals to, the "
                      "supervisor and zygote)")
    if plan.landlock_abi:
        hidden.append("Landlock limits /proc to the execution's own pid")
    if plan.landlock_abi >= 6:
        hidden.append("Landlock scopes signals and abstract unix sockets to the execution")
    if plan.seccomp:
        hidden.append("seccomp refuses ptrace, process_vm_*, pidfd_getfd")
    if not plan.pidns:
        hidden.append(f"no PID namespace per execution ({off['pidns']})")
    # Signals need a PID namespace, an own uid or Landlock's signal scope (ABI 6): with none,
    # an execution running as the supervisor's uid can kill it and every process of that user.
    signals_held = plan.pidns or plan.uid or plan.landlock_abi >= 6
    if not signals_held:
        hidden.append("NOT signals: executions run as the supervisor's uid, in no PID namespace "
                      "of their own, and Landlock "
                      f"{'ABI ' + str(plan.landlock_abi) if plan.landlock_abi else 'is off'} "
                      "cannot scope them (ABI 6, Linux 6.12): an execution can signal the "
                      "supervisor and every process of its user; allow unprivileged user "
                      "namespaces, run the supervisor as root (own uid per execution) or on a "
                      "newer kernel")
    layers.append(Layer("supervisor hidden",
                        "active" if signals_held and plan.seccomp and plan.pidns
                        else "fallback" if hidden else "unavailable",
                        "; ".join(hidden)))
    if plan.seccomp:
        from worker import seccomp

        sizes = ", ".join(f"{name} profile {len(seccomp.allowed_calls(name))} syscalls"
                          for name in seccomp.PROFILES)
        layers.append(Layer("seccomp", "active",
                            f"allow-list per runtime profile ({sizes}), inherited from the "
                            "zygote: calls off the list fail with ENOSYS, "
                            f"{len(seccomp.DENIED)} known-dangerous ones (ptrace, mount, bpf, "
                            "kexec, modules, keyctl, userfaultfd, unshare/setns, io_uring, SysV "
                            "IPC, mq_*, inotify, ...) with EPERM; clone without namespace flags "
                            "or CLONE_PARENT; no channels between executions through flock, "
                            "dnotify, page-cache eviction or RWF_NOWAIT reads; prlimit of its "
                            "own process only; socket families: AF_UNIX stream/seqpacket only, "
                            "connect and bind denied without network = true, "
                            "AF_UNIX/INET/INET6/NETLINK_ROUTE with it"))
    else:
        layers.append(Layer("seccomp", "unavailable", off["seccomp"]))
    host_sockets = ("host Unix sockets (pathname and abstract): seccomp allows only AF_UNIX "
                    "stream/seqpacket sockets and denies connect() and bind() without "
                    "network = true")
    if plan.landlock_abi >= 6:
        host_sockets += "; Landlock scopes abstract sockets to the execution"
    if plan.netns:
        layers.append(Layer("network",
                            "active" if plan.seccomp else "fallback",
                            "skills without network = true get a network namespace of their "
                            "own (no interface up); " + (host_sockets if plan.seccomp else
                                                        "off for host Unix sockets (a netns "
                                                        "does not hide pathname sockets), "
                                                        f"because there is no seccomp: "
                                                        f"{off['seccomp']}")))
    elif plan.seccomp:
        layers.append(Layer("network", "fallback",
                            f"seccomp limits socket() to AF_UNIX stream/seqpacket (no netns: "
                            f"{off['netns']}); {host_sockets}"))
    else:
        layers.append(Layer("network", "unavailable",
                            f"no netns ({off['netns']}) and no seccomp ({off['seccomp']}): "
                            "host Unix sockets are reachable too"))
    ipc = []
    if plan.seccomp:
        ipc.append("seccomp refuses SysV IPC (shm*, msg*, sem*) and POSIX mq_* with EPERM")
    if plan.ipcns:
        ipc.append("an IPC namespace per zygote" + ("" if plan.seccomp else
                                                    ", its SysV objects removed after each "
                                                    "execution"))
    else:
        ipc.append(f"no IPC namespace ({off['ipcns']})")
    layers.append(Layer("ipc", "active" if plan.seccomp and plan.ipcns
                        else "fallback" if plan.seccomp or plan.ipcns else "unavailable",
                        "; ".join(ipc) if plan.seccomp or plan.ipcns
                        else f"off, because there is neither seccomp ({off['seccomp']}) nor "
                             f"an IPC namespace ({off['ipcns']}): SysV objects and POSIX "
                             "queues are shared with the host"))
    files = []
    if plan.landlock_abi:
        files.append(f"Landlock ABI {plan.landlock_abi}: read-only interpreter, site-packages, "
                     "skill and system paths, read-write only the workdir")
    if plan.mountns:
        files.append(f"mount namespace: read-only view, hidden paths exposed read-only, "
                     f"{config.workdir_mb} MB tmpfs workdir per execution")
    status = "active" if plan.landlock_abi and plan.mountns else "fallback" if files \
        else "unavailable"
    if not plan.landlock_abi:
        files.append(f"no Landlock ({off['landlock']}): files any user may read stay readable")
    if not plan.mountns:
        files.append(f"no mount namespace ({off['mountns']}): workdir on the host disk, "
                     "RLIMIT_FSIZE only")
    layers.append(Layer("filesystem", status, "; ".join(files)))
    if plan.cgroups and host.cgroup_version == 2:
        layers.append(Layer("processes", "active", _v2_detail(host)))
    elif plan.cgroups:
        cpu = ("cpuacct: the CPU of every process it ever had" if "cpuacct" in host.cgroup_v1
               else "no cpuacct hierarchy: CPU from wait4 and the tree watch")
        layers.append(Layer("processes", "active",
                            "cgroup v1 per execution: pids.max, memory limit (memory_mb, every "
                            f"kind of memory) and peak, {cpu}, every process killed at the end; "
                            "subreaper sweep as a backstop; a skill's limits.cpus is not "
                            "enforced (v1)"))
    else:
        layers.append(Layer("processes", "fallback",
                            f"no cgroups ({off['cgroups']}): {_process_cap(plan)}; "
                            "process-group kill, subreaper sweep and psutil tree watch"))
    return CapabilityReport(host=host, layers=layers)


def _process_cap(plan: IsolationPlan) -> str:
    """How the process cap holds without cgroups."""
    if plan.uid:
        return "RLIMIT_NPROC of each execution's own uid caps its tree before it grows"
    if plan.userns_nproc:
        return ("RLIMIT_NPROC in each execution's own user namespace caps its tree before it "
                "grows")
    reason = plan.off.get("userns_nproc") or plan.off.get("userns", "")
    return (f"no per-execution RLIMIT_NPROC ({reason}): the tree watch kills a tree only after "
            "it has grown past max_processes")


def _v2_detail(host: HostInfo) -> str:
    """The processes layer on cgroup v2, with what this kernel lacks and what stands in."""
    subtree = host.cgroup_v2_subtree
    assert subtree is not None
    kill = ("cgroup.kill kills the whole tree at once" if host.kernel_at_least(5, 14)
            else "no cgroup.kill before Linux 5.14: members killed one by one until none is left")
    peak = ("memory.peak" if host.kernel_at_least(5, 19)
            else "no memory.peak before Linux 5.19: peak from sampled memory.current, and the "
                 "limit itself once reached (memory.events max)")
    cpus = ("limits.cpus as cpu.max" if "cpu" in subtree.delegated
            else "limits.cpus not enforced: the cpu controller is not delegated")
    return (f"cgroup v2 per execution under {subtree.base} (delegated: "
            f"{' '.join(subtree.delegated)}): memory.max (memory_mb, every kind of memory), "
            f"memory.swap.max 0, memory.oom.group, pids.max; {kill}; {peak}; CPU from cpu.stat; "
            f"{cpus}; subreaper sweep as a backstop")


def report(config: IsolationConfig | None = None) -> CapabilityReport:
    config = config or IsolationConfig()
    host = detect(config.uid_base)
    try:
        plan = plan_layers(host, config)
    except IsolationUnavailable:
        plan = plan_layers(host, IsolationConfig(
            uid_base=config.uid_base, uid_count=config.uid_count, workdir_mb=config.workdir_mb,
            read_only=config.read_only, disabled=config.disabled))
    return capability_report(host, plan)


def _cgroup_fact(host: HostInfo) -> str:
    """Which cgroup version is driven, where, and — on v2 — which controllers were delegated."""
    version = host.cgroup_version
    v1 = ("v1 " + ", ".join(f"{name} at {path}" for name, path in sorted(host.cgroup_v1.items()))
          if host.cgroup_v1 else "no v1")
    if version == 1:
        v1 += "; " + ("writable, used" if not host.cgroup_v1_problem else host.cgroup_v1_problem)
    subtree = host.cgroup_v2_subtree
    if not host.cgroup_v2:
        return f"{v1}; no v2"
    v2 = f"v2 at {host.cgroup_v2}"
    if subtree is not None and subtree.base:
        v2 += (f", own subtree {subtree.base}, delegated controllers: "
               f"{' '.join(subtree.delegated) or 'none'}")
    if version == 1:
        return f"{v1}; {v2} (not used: v1 is)"
    return f"{v1}; {v2}; " + (host.cgroup_problem or "writable, used")


def format_report(result: CapabilityReport) -> str:
    host = result.host
    who = "root" if host.euid == 0 else f"euid {host.euid}"
    facts = [
        ("kernel", f"Linux {host.kernel} {host.arch}, running as {who}"),
        ("landlock", f"ABI {host.landlock_abi}" if host.landlock_abi else "not available"),
        *((name, "available" if host.works(name) else f"unavailable: {host.probes.get(name)}")
          for name in ("seccomp", "userns", "userns_nproc", "pidns", "netns", "ipcns",
                       "mountns", "setuid")),
        ("cgroup", _cgroup_fact(host)),
    ]
    lines = ["skill-sandbox doctor", "", "host:"]
    lines += [f"  {name:<10} {value}" for name, value in facts]
    lines += ["", "layers:"]
    width = max(len(layer.name) for layer in result.layers)
    for layer in result.layers:
        lines.append(f"  {layer.status:<12} {layer.name:<{width}}  {layer.detail}")
    lines += ["", "every layer active" if result.all_active
              else "some layers are not active: executions still run, with the others"]
    return "\n".join(lines)


def main() -> int:
    """Print the doctor report; exit status 1 when a layer is not fully active."""
    result = report()
    print(format_report(result))
    return 0 if result.all_active else 1


if __name__ == "__main__":
    sys.exit(main())
