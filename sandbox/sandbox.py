"""`Sandbox`: load skills, execute them in isolated workers, return what happened and its cost.

Admission (skill loaded, input valid, policy, circuit breaker) happens before any worker is
touched; a concurrency slot bounds how many executions run at once (callers beyond it queue,
within their own deadline); each execution is a fresh fork of the skill's zygote.

Zygotes follow the hot set, not the catalogue: loading a skill starts no process; its zygote
boots on first use (or at load with `warm=True`) and is evicted when idle — least recently used
beyond `max_zygotes`, or unused for `zygote_idle_ttl` seconds — never while an execution uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

import psutil

from sandbox import declarative
from sandbox.capabilities import (
    CapabilityReport,
    IsolationConfig,
    capability_report,
    detect,
    plan_layers,
)
from sandbox.cgroups import CgroupRoot, CgroupTickets
from sandbox.circuit import CircuitBreaker, InMemoryCircuitBreaker
from sandbox.control import admission_error, log_execution, settle
from sandbox.errors import InvalidInput, SkillCodeInvalid, SkillLoadError, SkillNotLoaded
from sandbox.execlog.records import ExecutionLogger, StepInfo
from sandbox.execution import CANCELED_ERROR, TIMEOUT_ERROR, WORKER_ERROR, Execution, ExecutionSpec
from sandbox.hostcalls import HostServices
from sandbox.llm import Generation, LLMError, LLMProvider, as_provider
from sandbox.llm import call as call_llm
from sandbox.planrun import arun_plan, run_plan
from sandbox.plans import ExecutionContext, ExecutionPlan, StepResult
from sandbox.skill import Skill
from sandbox.tools import ToolRegistry, ToolRunner
from sandbox.uidpool import UidPool, UidPoolExhausted
from sandbox.wasmcache import CompiledModules
from sandbox.zygote import BASE_ENV, BaseZygotes, ZygoteDied, ZygoteProcess
from worker.protocol import (
    ErrorKind,
    ExecutionIsolation,
    ExecutionRequest,
    ExecutionResult,
    ExecutionStatus,
    Limits,
    ZygoteSettings,
)

if TYPE_CHECKING:  # the built-in `Policy` (pydantic, YAML) is loaded by whoever makes one
    from sandbox.policy import ExecutionPolicy

_log = logging.getLogger("sandbox")
SKILL_NOT_LOADED = SkillNotLoaded.message
INVALID_INPUT = InvalidInput.message
#: How often a caller queued for a concurrency slot checks whether it was cancelled.
_QUEUE_POLL = 0.05
#: Defaults for the zygote budget: live zygotes at most (least recently used beyond it are
#: evicted), and seconds a zygote may sit unused before it is evicted.
DEFAULT_MAX_ZYGOTES = 64
#: WASM modules compiled at once by booting zygotes (`max_wasm_compiles`'s default).
DEFAULT_MAX_WASM_COMPILES = min(4, os.cpu_count() or 1)
DEFAULT_ZYGOTE_IDLE_TTL = 600.0
#: `cold`: never started; `warm`: started (alive, or died and restarted on next use);
#: `evicted`: stopped by the sandbox while idle, started again on next use.
ZygoteState = Literal["cold", "warm", "evicted"]


class _CancelToken:
    """Set by `Sandbox.cancel` or a cancelled `aexecute`; a pipe so the poll loop wakes on it."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.canceled = False

    def cancel(self) -> None:
        if not self.canceled:
            self.canceled = True
            with contextlib.suppress(OSError):
                os.write(self.write_fd, b"x")

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@dataclass
class _Loaded:
    """A skill and its zygote, with a count of the executions using it right now.

    `inflight` is the use count eviction respects: a request takes it (under `idle`) before it
    looks at the zygote, and the eviction pass stops a zygote only while holding `idle` with
    the count at zero, so a zygote is never stopped under a request about to fork from it.
    `restart_lock` makes one thread boot the zygote while the others for the same skill wait.
    """

    skill: Skill
    zygote: ZygoteProcess
    inflight: int = 0
    idle: threading.Condition = field(default_factory=threading.Condition)
    restart_lock: threading.Lock = field(default_factory=threading.Lock)
    state: ZygoteState = "cold"
    #: monotonic and wall-clock time of the last use (0: never used)
    last_used: float = 0.0
    last_used_wall: float = 0.0
    cold_starts: int = 0
    evictions: int = 0
    #: boots of a zygote that had died (not an eviction): crashes healed
    restarts: int = 0
    #: The boot under way (`Sandbox._zygote_by`): callers wait for it until their own
    #: deadline; a boot that outlives them goes on for the next request.
    boot: Future[SkillLoadError | None] | None = None

    def mark_used(self) -> None:
        """Now is its last use (the LRU order and the idle clock read it)."""
        self.last_used, self.last_used_wall = time.monotonic(), time.time()


def _limits_for(skill: Skill, request: ExecutionRequest) -> Limits:
    configured = skill.manifest.limits
    timeout = configured.timeout if request.timeout is None else request.timeout
    return Limits(
        timeout=timeout, cpu_time=configured.cpu_time, memory_mb=skill.process_memory_mb,
        max_processes=configured.max_processes, max_output_bytes=configured.max_output_bytes,
        max_file_bytes=configured.max_file_bytes, max_open_files=configured.max_open_files,
    )


def _make_traversable(root: str, owned: bool) -> None:
    """Execution uids pass through the workdir root to their own (0700) workdirs."""
    os.makedirs(root, mode=0o711, exist_ok=True)
    mode = os.stat(root).st_mode
    if mode & 0o001:
        return
    if not owned:
        raise ValueError(f"workdir_root {root} (mode {mode & 0o777:04o}) must be traversable "
                         "by the execution uids (o+x) when executions drop root")
    os.chmod(root, 0o711)


class Sandbox:
    """Runs untrusted skills. Thread- and task-safe; use as a context manager or call `close()`.

    `max_concurrency` bounds simultaneous executions (default: the CPU count); callers beyond
    it wait for a slot within their own timeout.

    Control: `policy` (any object with `check(request, skill) -> None | reason`, e.g.
    `Policy`) is asked before any worker is touched; `circuit_breaker` defaults to an
    `InMemoryCircuitBreaker` (pass `False` to run without one); `logger` (an
    `ExecutionLogger`, e.g. `SqliteExecutionLogger`) records every execution and plan step.
    The sandbox does not close the logger: its owner does.

    `prefork` (default on): each zygote keeps one spare child forked, set up and already in the
    next execution's cgroups, so a request skips the fork and the cgroup join (milliseconds on
    cgroup v1 after an idle moment); off, every execution is forked on request.

    Zygotes are lazy: a loaded skill's zygote boots on its first execution (that request's
    deadline covers the boot), or at load when `warm` (here, for every skill; or per
    `load_skill(warm=True)`). At most `max_zygotes` run at once (None: no bound): starting one
    more evicts the least recently used idle one; one unused for `zygote_idle_ttl` seconds
    (None: never) is evicted too. The bound is soft: zygotes with executions in flight are
    never evicted, so under a burst across more skills than the bound, more may run for a
    while. An evicted skill's next request boots it again, transparently.

    The queue, for an embedder's metrics: `queued` is how many callers wait for a slot right
    now, and `on_slot_wait`, if given, is called with the seconds a caller waited (0.0 when a
    slot was free) each time one gets a slot; a caller that gives up in the queue (timeout,
    cancel) is not reported. It runs in the caller's thread while the slot is held, so keep it
    quick (e.g. a histogram's `observe`); if it raises, the error is logged and the execution
    goes on.

    `zygote_start_timeout` (30 s): how long a skill's zygote may take to start its interpreter
    and preload its modules before loading the skill fails. Raise it on a much slower host (an
    emulated VM starting many zygotes at once takes longer than that).

    `llm`: the LLM provider declarative skills and plans' `llm` steps call (an
    `OpenAICompatibleProvider`, any object with `generate`, or a trusted callable
    `fn(prompt)` / `fn(prompt, call)`; see `sandbox.llm`). The call is made here, in the
    supervisor; without one, a declarative skill fails naming the missing provider. The sandbox
    does not close it: its owner does. The same provider answers the `llm_generate` host calls
    of skills granted `llm:generate`; their `http_fetch` calls (`http:fetch`) go to the tool
    registered as `http_fetch` (`register_tool`; see `sandbox.hostcalls`).

    `base_zygote` (default on): a skill's zygote is forked from a shared base interpreter
    (`worker.base`, one per runtime profile, holding only the worker runtime and stdlib
    modules, never a skill's code or data), then boots and applies its layers as an exec'd one
    does: a cold start costs a fork instead of an interpreter start. Off, or when the base
    cannot be started, every zygote is a freshly exec'd interpreter.

    `max_wasm_compiles` (None: min(4, CPUs)): zygotes of WASM skills booting at once. Each
    compiles its module as it boots (seconds of CPU for a Go module, up to 1 GiB of memory), so
    a burst of first requests across many WASM skills compiles a few at a time, each request
    waiting for its skill's turn within its own deadline, instead of all at once.
    """

    def __init__(self, skills: Iterable[Skill | str | os.PathLike[str]] = (), *,
                 max_concurrency: int | None = None, workdir_root: str | None = None,
                 tail_bytes: int = 8192, policy: ExecutionPolicy | None = None,
                 circuit_breaker: CircuitBreaker | bool | None = None,
                 logger: ExecutionLogger | None = None,
                 isolation: IsolationConfig | None = None, prefork: bool = True,
                 on_slot_wait: Callable[[float], None] | None = None,
                 zygote_start_timeout: float = 30.0,
                 warm: bool = False, max_zygotes: int | None = DEFAULT_MAX_ZYGOTES,
                 zygote_idle_ttl: float | None = DEFAULT_ZYGOTE_IDLE_TTL,
                 base_zygote: bool = True,
                 llm: LLMProvider | Callable[..., Any] | None = None,
                 max_wasm_compiles: int | None = None) -> None:
        self.prefork = prefork
        self.llm = as_provider(llm)
        self._bases = BaseZygotes(zygote_start_timeout) if base_zygote else None
        self.on_slot_wait = on_slot_wait
        self._queued = 0
        self.zygote_start_timeout = zygote_start_timeout
        if max_zygotes is not None and max_zygotes < 1:
            raise ValueError(f"max_zygotes must be at least 1 (or None), got {max_zygotes}")
        if zygote_idle_ttl is not None and not zygote_idle_ttl > 0:
            raise ValueError(f"zygote_idle_ttl must be positive (or None), got {zygote_idle_ttl}")
        if max_wasm_compiles is not None and max_wasm_compiles < 1:
            raise ValueError(f"max_wasm_compiles must be at least 1 (or None), got "
                             f"{max_wasm_compiles}")
        self._compiles = threading.BoundedSemaphore(max_wasm_compiles
                                                    or DEFAULT_MAX_WASM_COMPILES)
        self._modules = CompiledModules()
        self.warm = warm
        self.max_zygotes = max_zygotes
        self.zygote_idle_ttl = zygote_idle_ttl
        self.max_concurrency = max_concurrency or os.cpu_count() or 1
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        # Isolation layers: what the host supports, minus what the operator disabled (raises
        # IsolationUnavailable when a required one is missing). See sandbox.capabilities.
        self.isolation = isolation or IsolationConfig()
        self._host = detect(self.isolation.uid_base)
        self._plan = plan_layers(self._host, self.isolation)
        self._uids = (UidPool.shared(self.isolation.uid_base, self.isolation.uid_count)
                      if self._plan.uid else None)
        # Our own folder unless one is given: removed again by close(), never shared with
        # another Sandbox that might still be using it.
        self._owns_workdir_root = workdir_root is None
        self.workdir_root = workdir_root or tempfile.mkdtemp(
            prefix=f"skill-sandbox-{os.getpid()}-")
        if self._plan.uid:  # execution uids must reach their workdirs inside it
            _make_traversable(self.workdir_root, self._owns_workdir_root)
        self._cgroups = self._make_cgroups()
        self.tail_bytes = tail_bytes
        self.policy = policy
        self.circuit_breaker: CircuitBreaker | None = None
        if circuit_breaker is None or circuit_breaker is True:
            self.circuit_breaker = InMemoryCircuitBreaker()
        elif circuit_breaker is not False:
            self.circuit_breaker = circuit_breaker
        self.logger = logger
        self.tools = ToolRegistry()
        self._skills: dict[str, _Loaded] = {}
        #: skills whose zygote is (or was last seen) running, least recently used first
        self._live: OrderedDict[str, _Loaded] = OrderedDict()
        self.cold_starts = 0
        self.evictions = 0
        self._reaper: threading.Thread | None = None
        self._stop_reaper = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._tokens: dict[str, _CancelToken] = {}
        self._executor = ThreadPoolExecutor(max_workers=2 * self.max_concurrency + 2,
                                            thread_name_prefix="sandbox-exec")
        self._closed = False
        try:
            for skill in skills:
                self.load_skill(skill)
        except BaseException:
            self.close()
            raise

    # -- skills ---------------------------------------------------------------------------

    def load_skill(self, skill: Skill | str | os.PathLike[str], *,
                   warm: bool | None = None) -> Skill:
        """Load (or reload) a skill; raises `SkillLoadError`. Its zygote starts on first use,
        or now when `warm` (default: the sandbox's `warm`), so a skill that cannot boot raises
        here; a reloaded skill whose old zygote was running is started again at once."""
        if not isinstance(skill, Skill):
            skill = Skill.from_dir(Path(skill))
        self._check_open()
        code = skill.code()
        untrusted = [] if code.spawn else self.isolation.untrusted_preloads(
            list(skill.manifest.preload))
        if untrusted:  # a fresh interpreter per execution (spawn) imports them under its layers
            raise SkillLoadError(
                f"{skill.id}: preload {', '.join(map(repr, untrusted))} is not trusted by the "
                "operator: preloads are imported in the zygote as root, before the execution's "
                "layers; allow a module with IsolationConfig(trusted_preload=...) (daemon: "
                "[isolation] trusted_preload)")
        tickets = None
        if self._cgroups is not None:
            # Exactly memory_mb: every page charged to the execution counts (anonymous, shared,
            # memfd, its tmpfs workdir's files); the workdir's size cap is its disk quota.
            limits = skill.manifest.limits
            tickets = CgroupTickets(self._cgroups, limits.max_processes,
                                    skill.process_memory_mb << 20,
                                    limits.cpus or 0.0)
        cpus = skill.manifest.limits.cpus
        if cpus and (self._cgroups is None or not self._cgroups.cpu_limits):
            _log.warning("%s: limits.cpus = %g is not enforced on this host: it needs cgroup "
                         "v2 with the cpu controller delegated (see `doctor`)", skill.id, cpus)
        zygote = ZygoteProcess(skill.id, code, list(skill.manifest.preload),
                               self._isolation_for(skill), cgroups=tickets,
                               prefork=self.prefork, start_timeout=self.zygote_start_timeout,
                               bases=self._bases, modules=self._modules)
        loaded = _Loaded(skill=skill, zygote=zygote)
        with self._lock:
            previous = self._skills.get(skill.id)
        if warm is None:
            warm = self.warm or (previous is not None and previous.state == "warm")
        if skill.not_runnable:  # nothing to boot: its executions fail saying why
            warm = False
        if warm:  # boot before it is visible: a skill that cannot boot is not loaded
            problem = self._ensure_zygote(loaded)
            if problem is not None:
                raise problem
        with self._lock:
            closed = self._closed
            if not closed:
                previous = self._skills.get(skill.id)
                self._skills[skill.id] = loaded
                self._live.pop(skill.id, None)
                if loaded.state == "warm":
                    self._live[skill.id] = loaded
        if closed:
            loaded.zygote.stop(timeout=2.0)
            self._check_open()
        if previous is not None:
            self._retire(previous)
        if warm:
            self._evict_over_budget(keep=loaded)
        return skill

    def unload_skill(self, skill_id: str) -> None:
        """Stop accepting executions of the skill; in-flight ones finish, then its zygote stops."""
        with self._lock:
            loaded = self._skills.pop(skill_id, None)
            if loaded is not None and self._live.get(skill_id) is loaded:
                del self._live[skill_id]
        if loaded is None:
            raise KeyError(f"skill {skill_id!r} is not loaded")
        self._retire(loaded)
        self._modules.forget(skill_id)

    def _retire(self, loaded: _Loaded) -> None:
        deadline = time.monotonic() + loaded.skill.manifest.limits.timeout + 10
        with loaded.idle:
            while loaded.inflight and time.monotonic() < deadline:
                loaded.idle.wait(timeout=max(0.0, deadline - time.monotonic()))
        loaded.zygote.stop()

    def can_execute(self, skill_id: str) -> bool:
        with self._lock:
            return not self._closed and skill_id in self._skills

    def skills(self) -> list[Skill]:
        with self._lock:
            return [loaded.skill for loaded in self._skills.values()]

    def get_skill(self, skill_id: str) -> Skill | None:
        with self._lock:
            loaded = self._skills.get(skill_id)
        return loaded.skill if loaded else None

    def zygote_info(self, skill_id: str, *, start: bool = True) -> dict[str, Any]:
        """The zygote's pid, RSS at boot, how many times it was started and its state (for
        operators and tests). `start`: boot a cold or evicted zygote first, as its next
        execution would, so the pid is a live one; False only reads (pid 0 if never started).
        A zygote that cannot boot is reported with `alive` False."""
        with self._lock:
            loaded = self._skills[skill_id]
        if start and loaded.state != "warm":
            self._ensure_zygote(loaded)
            self._evict_over_budget(keep=loaded)
        zygote = loaded.zygote
        return {"pid": zygote.pid, "rss_kb": zygote.rss_kb, "starts": zygote.starts,
                "from_base": zygote.from_base, "wasm_module": zygote.wasm_module,
                "alive": zygote.alive(), "inflight": loaded.inflight,
                "state": "not-runnable" if loaded.skill.not_runnable else loaded.state,
                "restarts": loaded.restarts}

    def ensure_zygote(self, skill_id: str, *, crashed_only: bool = False) -> str:
        """Start the skill's zygote if it is not running (cold, evicted, or died), so a
        watchdog can heal it between executions or an operator warm it ahead (instead of the
        next caller paying the boot); '' when it is up, else why it is not. `crashed_only`
        (a watchdog's call): restart a zygote that was running and died, start no other."""
        with self._lock:
            loaded = self._skills[skill_id]
        problem = self._ensure_zygote(loaded, crashed_only=crashed_only)
        self._evict_over_budget(keep=loaded)
        return str(problem) if problem is not None else ""

    def skill_state(self, skill_id: str) -> dict[str, Any]:
        """What a skill costs right now: `state` (cold / warm / evicted, or not-runnable with
        the reason in `not_runnable`: a WASM skill with Go sources and no module), `alive`,
        `last_used` (Unix time, None if never used), the zygote's `pid` and its
        memory now (`rss_kb`, `pss_kb`: 0 unless running), `inflight`, and counts of `starts`,
        `cold_starts`, `evictions` and crash `restarts`. Reads only: it starts nothing."""
        with self._lock:
            loaded = self._skills[skill_id]
        zygote = loaded.zygote
        alive = zygote.alive()
        rss_kb = pss_kb = 0
        if alive and zygote.pid:
            try:  # the zygote's own memory (its spare and executions are separate processes)
                memory = psutil.Process(zygote.pid).memory_full_info()
                rss_kb, pss_kb = memory.rss >> 10, getattr(memory, "pss", 0) >> 10
            except psutil.Error:
                alive = False
        return {"state": "not-runnable" if loaded.skill.not_runnable else loaded.state,
                "alive": alive, "not_runnable": loaded.skill.not_runnable,
                "last_used": loaded.last_used_wall or None,
                "pid": zygote.pid if alive else 0, "rss_kb": rss_kb, "pss_kb": pss_kb,
                "inflight": loaded.inflight, "starts": zygote.starts,
                "cold_starts": loaded.cold_starts, "evictions": loaded.evictions,
                "restarts": loaded.restarts}

    def skills_state(self) -> dict[str, dict[str, Any]]:
        """`skill_state` of every loaded skill, by id."""
        states = {}
        for skill in self.skills():
            with contextlib.suppress(KeyError):  # unloaded meanwhile
                states[skill.id] = self.skill_state(skill.id)
        return states

    def base_zygote_pids(self) -> list[int]:
        """The shared base zygotes running now (none when `base_zygote` is off)."""
        return self._bases.pids() if self._bases is not None else []

    def live_zygotes(self) -> int:
        """How many zygotes run now (started and not evicted or stopped)."""
        with self._lock:
            live = list(self._live.values())
        return sum(1 for loaded in live if loaded.zygote.alive())

    # -- zygote budget --------------------------------------------------------------------

    def evict_idle(self) -> list[str]:
        """Evict zygotes unused for `zygote_idle_ttl` seconds (the sandbox's own thread calls
        this periodically; callers may too). Returns the skill ids evicted."""
        ttl = self.zygote_idle_ttl
        if ttl is None:
            return []
        cutoff = time.monotonic() - ttl
        with self._lock:
            stale = [loaded for loaded in self._live.values() if loaded.last_used <= cutoff]
        return [loaded.skill.id for loaded in stale
                if self._evict(loaded, lambda item: item.last_used <= cutoff)]

    def _evict_over_budget(self, keep: _Loaded | None = None) -> None:
        """Evict least recently used idle zygotes until at most `max_zygotes` run (`keep`, the
        one just started for a caller, is never chosen)."""
        bound = self.max_zygotes
        if bound is None:
            return
        with self._lock:
            excess = len(self._live) - bound
            candidates = [loaded for loaded in self._live.values() if loaded is not keep]
        for loaded in candidates:  # oldest first; busy ones are skipped, not waited for
            if excess <= 0:
                return
            if self._evict(loaded, lambda item: True):
                excess -= 1

    def _evict(self, loaded: _Loaded, still: Callable[[_Loaded], bool]) -> bool:
        """Stop `loaded`'s zygote if nothing uses it and `still(loaded)` holds (re-checked under
        the locks: a request may have come meanwhile). A zygote being started is left alone."""
        if not loaded.restart_lock.acquire(blocking=False):
            return False
        try:
            with loaded.idle:  # a request takes `inflight` under this lock before forking
                if loaded.inflight or loaded.state != "warm" or not still(loaded):
                    return False
                # `evicted` before the stop: a watchdog must never see it warm and dead
                loaded.state = "evicted"
                loaded.evictions += 1
                loaded.zygote.stop(timeout=2.0)
            with self._lock:
                if self._live.get(loaded.skill.id) is loaded:
                    del self._live[loaded.skill.id]
                self.evictions += 1
        finally:
            loaded.restart_lock.release()
        _log.debug("evicted the zygote of %s", loaded.skill.id)
        return True

    def _start_reaper(self) -> None:
        """The thread that applies `zygote_idle_ttl`, started with the first zygote."""
        with self._lock:
            if self._reaper is not None or self._closed or self.zygote_idle_ttl is None:
                return
            self._reaper = threading.Thread(target=self._reap_idle, name="sandbox-zygote-reaper",
                                            daemon=True)
            self._reaper.start()

    def _reap_idle(self) -> None:
        while True:
            ttl = self.zygote_idle_ttl
            period = min(max((ttl or 60.0) / 4, 0.05), 30.0)
            if self._stop_reaper.wait(period):
                return
            try:
                self.evict_idle()
            except Exception:  # noqa: BLE001 pragma: no cover - keep evicting later
                _log.exception("evicting idle zygotes failed")

    def _isolation_for(self, skill: Skill) -> ZygoteSettings:
        return self._plan.zygote_settings(skill.manifest.permissions.network, self.workdir_root)

    def capabilities(self) -> CapabilityReport:
        """The isolation layers this sandbox applies, each active / fallback / unavailable
        with its mechanism or the reason (`sandbox.capabilities.format_report` prints it)."""
        return capability_report(self._host, self._plan)

    def _make_cgroups(self) -> CgroupRoot | None:
        if not self._plan.cgroups:
            return None
        try:
            return CgroupRoot.create()
        except OSError as exc:  # detected as writable, yet not: say so in the report
            self._plan = dataclasses.replace(
                self._plan, cgroups=False, off={**self._plan.off, "cgroups": str(exc)})
            return None

    # -- executing ------------------------------------------------------------------------

    def execute(self, request: ExecutionRequest, *,
                step: StepInfo | None = None) -> ExecutionResult:
        """Run one execution to its end. Every outcome is a result: nothing a skill does
        raises here. `step` names the plan step it belongs to, for the execution log."""
        token = self._register_token(request.request_id)
        try:
            return self._execute(request, token, step)
        finally:
            self._release_token(request.request_id, token)

    async def aexecute(self, request: ExecutionRequest, *,
                       step: StepInfo | None = None) -> ExecutionResult:
        """`execute` for asyncio. Cancelling the awaiting task kills the execution and reaps it
        before `CancelledError` propagates."""
        token = self._register_token(request.request_id)
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._execute, request, token, step)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            token.cancel()
            await asyncio.wait([future])
            raise
        finally:
            if future.done():
                self._release_token(request.request_id, token)
            else:
                future.add_done_callback(
                    lambda _: self._release_token(request.request_id, token))

    def cancel(self, request_id: str) -> bool:
        """Cancel a running or queued execution by request id; its result says `canceled`."""
        with self._lock:
            token = self._tokens.get(request_id)
        if token is None:
            return False
        token.cancel()
        return True

    def _register_token(self, request_id: str) -> _CancelToken:
        token = _CancelToken()
        with self._lock:
            self._tokens[request_id] = token
        return token

    def _release_token(self, request_id: str, token: _CancelToken) -> None:
        with self._lock:
            if self._tokens.get(request_id) is token:
                del self._tokens[request_id]
        token.close()

    def _execute(self, request: ExecutionRequest, token: _CancelToken,
                 step: StepInfo | None = None) -> ExecutionResult:
        result = self._admit_and_run(request, token)
        log_execution(self.logger, request, result, step)
        return result

    def _admit_and_run(self, request: ExecutionRequest, token: _CancelToken) -> ExecutionResult:
        """Admission in order — skill loaded, input, policy, circuit breaker — then the run.
        A rejection never touches a worker; whatever is admitted is settled exactly once."""
        started = time.monotonic()

        def early(status: ExecutionStatus, kind: ErrorKind, error: str) -> ExecutionResult:
            return ExecutionResult(status=status, error=error, request_id=request.request_id,
                                   skill_id=request.skill_id, error_kind=kind,
                                   duration=time.monotonic() - started)

        with self._lock:
            loaded = None if self._closed else self._skills.get(request.skill_id)
        if loaded is None:
            return early(ExecutionStatus.REJECTED, ErrorKind.SKILL_NOT_LOADED, SKILL_NOT_LOADED)
        skill = loaded.skill
        if skill.not_runnable:  # a configuration problem: neither policy nor circuit is asked
            return early(ExecutionStatus.FAILED, ErrorKind.SKILL_FAILED,
                         f"skill not runnable: {skill.not_runnable}")
        if request.timeout is not None and not request.timeout > 0:
            return early(ExecutionStatus.REJECTED, ErrorKind.INVALID_INPUT,
                         f"{INVALID_INPUT}: timeout must be positive, got {request.timeout}")
        problem = skill.input_problem(request.input)
        if problem:
            return early(ExecutionStatus.REJECTED, ErrorKind.INVALID_INPUT,
                         f"{INVALID_INPUT}: {problem}")
        rejection = admission_error(self.policy, self.circuit_breaker, request, skill)
        if rejection is not None:
            return early(ExecutionStatus.REJECTED, *rejection)
        result: ExecutionResult | None = None
        try:
            if skill.manifest.kind == "declarative":  # no worker: the supervisor asks the LLM
                limits = _limits_for(skill, request)
                result = declarative.run(skill, self.llm, request, limits, started,
                                         started + limits.timeout, lambda: token.canceled)
            else:
                result = self._run_in_slot(request, token, loaded, started, early)
            return result
        finally:
            settle(self.policy, self.circuit_breaker, request, skill, result)

    def _run_in_slot(self, request: ExecutionRequest, token: _CancelToken, loaded: _Loaded,
                     started: float,
                     early: Callable[[ExecutionStatus, ErrorKind, str], ExecutionResult]
                     ) -> ExecutionResult:
        limits = _limits_for(loaded.skill, request)
        deadline = started + limits.timeout  # every wait below spends from this one budget
        waited = self._acquire_slot(token, deadline)
        if waited is None:
            if token.canceled:
                return early(ExecutionStatus.CANCELED, ErrorKind.CANCELED, CANCELED_ERROR)
            return early(ExecutionStatus.TIMEOUT, ErrorKind.NO_SLOT,
                         f"{TIMEOUT_ERROR}: no execution slot free within {limits.timeout:g}s")
        try:
            self._report_slot_wait(waited)
            if token.canceled:
                return early(ExecutionStatus.CANCELED, ErrorKind.CANCELED, CANCELED_ERROR)
            with loaded.idle:
                loaded.inflight += 1
                loaded.mark_used()
            try:
                return self._run(loaded, request, limits, token, started, deadline, early)
            finally:
                with loaded.idle:
                    loaded.inflight -= 1
                    # idle from when it ends: a long execution does not make it look stale
                    loaded.mark_used()
                    loaded.idle.notify_all()
                bound = self.max_zygotes  # over it after a burst: trim back once idle
                if bound is not None and len(self._live) > bound:
                    self._evict_over_budget(keep=loaded)
        finally:
            self._slots.release()

    @property
    def queued(self) -> int:
        """How many callers wait for a concurrency slot right now."""
        return self._queued

    def _acquire_slot(self, token: _CancelToken, deadline: float) -> float | None:
        """Wait for a concurrency slot until `deadline` (monotonic): the seconds waited, or
        None without a slot. A queued caller that cancels stops waiting at once instead of when
        a slot frees."""
        if self._slots.acquire(blocking=False):
            return 0.0
        started = time.monotonic()
        with self._lock:
            self._queued += 1
        try:
            while not token.canceled:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if self._slots.acquire(timeout=min(left, _QUEUE_POLL)):
                    return time.monotonic() - started
            return None
        finally:
            with self._lock:
                self._queued -= 1

    def _report_slot_wait(self, seconds: float) -> None:
        """Tell the embedder's observer; its failure is its own, not the execution's."""
        if self.on_slot_wait is None:
            return
        try:
            self.on_slot_wait(seconds)
        except Exception:  # noqa: BLE001 - a broken observer must not fail the execution
            _log.exception("on_slot_wait observer raised; the execution goes on")

    def _run(self, loaded: _Loaded, request: ExecutionRequest, limits: Limits,
             token: _CancelToken, arrived: float, deadline: float,
             early: Callable[[ExecutionStatus, ErrorKind, str], ExecutionResult]
             ) -> ExecutionResult:
        """Fork and run it; `deadline` (monotonic) was fixed at `arrived`, and the waits here
        (zygote restart, an execution uid) spend from it too. `early` answers without a run."""
        skill = loaded.skill

        def worker_failure(detail: str) -> ExecutionResult:
            return early(ExecutionStatus.FAILED, ErrorKind.WORKER_FAILURE,
                         f"{WORKER_ERROR}: {detail}")

        for attempt in range(2):
            cold = loaded.state != "warm"
            problem = self._zygote_by(loaded, deadline, token)
            if problem is ExecutionStatus.CANCELED:
                return early(ExecutionStatus.CANCELED, ErrorKind.CANCELED, CANCELED_ERROR)
            if problem is ExecutionStatus.TIMEOUT:
                return early(ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                             f"{TIMEOUT_ERROR} after {limits.timeout:g}s: the skill's zygote "
                             "was still starting (it goes on starting for the next request)")
            if isinstance(problem, SkillCodeInvalid):  # its own code does not compile
                return early(ExecutionStatus.FAILED, ErrorKind.SKILL_FAILED, str(problem))
            if problem is not None:
                return worker_failure(str(problem))
            if cold:  # this request started one more zygote: keep to the budget
                self._evict_over_budget(keep=loaded)
            if time.monotonic() >= deadline:  # a zygote restart took what was left
                return early(ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                             f"{TIMEOUT_ERROR} after {limits.timeout:g}s")
            try:
                uid = (self._uids.acquire(max(0.0, deadline - time.monotonic()))
                       if self._uids is not None else -1)
            except UidPoolExhausted as exc:
                return worker_failure(str(exc))
            isolation = ExecutionIsolation(uid=uid, gid=uid, disk_bytes=self._plan.workdir_bytes)
            spec = ExecutionSpec(
                skill=skill, zygote=loaded.zygote, exec_id=uuid.uuid4().hex,
                request_id=request.request_id, tenant_id=request.tenant_id,
                user_id=request.user_id, input=request.input, limits=limits,
                env={**BASE_ENV, **skill.manifest.permissions.env},
                isolation=isolation, workdir_root=self.workdir_root,
                tail_bytes=self.tail_bytes, cancel_fd=token.read_fd,
                arrived=arrived, deadline=deadline,
                host=HostServices(self.generate, self.tools),
            )
            try:
                return Execution(spec).run()
            except ZygoteDied as exc:
                if attempt:
                    return worker_failure(str(exc))
            except Exception as exc:  # noqa: BLE001 - e.g. no fd left for its pipes: a result
                _log.exception("execution of %s failed in the supervisor", skill.id)
                return worker_failure(f"{type(exc).__name__}: {exc}")
            finally:
                if self._uids is not None:
                    self._uids.release(uid)
        raise AssertionError("unreachable")  # pragma: no cover

    def _zygote_by(self, loaded: _Loaded, deadline: float, token: _CancelToken
                   ) -> SkillLoadError | ExecutionStatus | None:
        """`_ensure_zygote` within a request's deadline. A boot (a cold start, a restart after a
        crash; a WASM module's compile can take seconds) runs in a thread of its own that every
        request for the skill waits on, each until its own deadline or cancel
        (`ExecutionStatus.TIMEOUT` / `CANCELED`): no caller waits past its timeout, and a boot
        that outlives its callers still finishes for the next request."""
        if loaded.state == "warm" and loaded.zygote.alive():
            return self._ensure_zygote(loaded)
        with self._lock:
            boot = loaded.boot
            if boot is None or boot.done():
                boot = loaded.boot = Future()
                threading.Thread(target=self._boot, args=(loaded, boot), daemon=True,
                                 name=f"boot {loaded.skill.id}").start()
        while not token.canceled:
            left = deadline - time.monotonic()
            if left <= 0:
                return ExecutionStatus.TIMEOUT
            try:
                return boot.result(timeout=min(left, _QUEUE_POLL))
            except TimeoutError:
                continue
        return ExecutionStatus.CANCELED

    def _boot(self, loaded: _Loaded, boot: Future[SkillLoadError | None]) -> None:
        try:
            boot.set_result(self._ensure_zygote(loaded))
        except BaseException as exc:  # noqa: BLE001 - handed to every waiting caller
            boot.set_exception(exc)

    def _ensure_zygote(self, loaded: _Loaded,
                       crashed_only: bool = False) -> SkillLoadError | None:
        """Start a cold or evicted zygote, restart a dead one; one thread boots it while the
        others for the same skill wait on `restart_lock`. A zygote that cannot boot is
        reported (the error, None when it runs), not retried forever."""
        if loaded.skill.manifest.kind == "declarative":  # runs in the supervisor: no zygote
            return None
        if loaded.skill.not_runnable:  # e.g. Go sources and no module: nothing to boot
            return SkillLoadError(loaded.skill.not_runnable)
        if loaded.state == "warm" and loaded.zygote.alive():
            self._touch(loaded)
            return None
        with loaded.restart_lock:
            if loaded.state == "warm" and loaded.zygote.alive():
                self._touch(loaded)
                return None
            if self._closed:  # close() stops zygotes under this lock: start none after it
                return SkillLoadError(f"{loaded.skill.id}: the sandbox is closed")
            if crashed_only and loaded.state != "warm":  # evicted meanwhile: not down
                return None
            crashed = loaded.state == "warm"
            loaded.zygote.stop(timeout=1.0)
            compiling = (self._compiles if loaded.skill.manifest.kind == "wasm"
                         else contextlib.nullcontext())
            try:
                with compiling:
                    loaded.zygote.start()
            except SkillLoadError as exc:
                return exc
            if crashed:
                loaded.restarts += 1
            else:
                loaded.cold_starts += 1
            loaded.state = "warm"
            if not loaded.last_used:  # the idle clock starts at boot
                loaded.mark_used()
            with self._lock:
                if not crashed:
                    self.cold_starts += 1
                if self._skills.get(loaded.skill.id) is loaded:  # else load_skill adds it
                    self._live[loaded.skill.id] = loaded
                    self._live.move_to_end(loaded.skill.id)
        self._start_reaper()
        return None

    def _touch(self, loaded: _Loaded) -> None:
        """Mark the zygote most recently used (for the LRU choice)."""
        with self._lock:
            if self._live.get(loaded.skill.id) is loaded:
                self._live.move_to_end(loaded.skill.id)

    # -- plans and tools ------------------------------------------------------------------

    def generate(self, prompt: str, *, deadline: float, max_tokens: int | None = None,
                 canceled: Callable[[], bool] = lambda: False) -> Generation:
        """Ask the configured LLM provider (`llm`) for `prompt`'s completion by `deadline`
        (monotonic): `(text, tokens)`. Raises `LLMError` naming what failed (no provider, HTTP
        status and the provider's message, a malformed response), `LLMTimeout` past the
        deadline, `LLMCanceled` once `canceled()` is true. For plans' `llm` steps and host
        calls of skills (a WASM skill's `llm_generate`): the key stays in this process."""
        if self.llm is None:
            raise LLMError("no LLM provider is configured (Sandbox(llm=...); daemon: the [llm] "
                           "section)")
        return call_llm(self.llm, prompt, deadline=deadline, max_tokens=max_tokens,
                        canceled=canceled)

    def register_tool(self, name: str, tool: Callable[..., Any] | ToolRunner) -> None:
        """Make `tool` callable from `tool` steps: a trusted callable `fn(arguments)` or
        `fn(arguments, ctx)`, sync or async, or a `ToolRunner` such as `HttpToolRunner`."""
        self.tools.register(name, tool)

    def has_tool(self, name: str) -> bool:
        return name in self.tools

    def execute_plan(self, plan: ExecutionPlan,
                     ec: ExecutionContext | None = None) -> list[StepResult]:
        """Run the plan's steps in order; return their results, or raise `InvalidPlan` (before
        any step) or `PlanFailed` (carrying the failing step's result). See `sandbox.planrun`."""
        return run_plan(self, plan, ec or ExecutionContext(assistant_id=plan.assistant_id))

    async def aexecute_plan(self, plan: ExecutionPlan,
                            ec: ExecutionContext | None = None) -> list[StepResult]:
        return await arun_plan(self, plan, ec or ExecutionContext(assistant_id=plan.assistant_id))

    # -- lifecycle ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this Sandbox is closed")

    def close(self) -> None:
        """Kill every execution and zygote, reap them, and refuse new work. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loaded = list(self._skills.values())
            self._skills.clear()
            self._live.clear()
            tokens = list(self._tokens.values())
            reaper = self._reaper
        self._stop_reaper.set()
        if reaper is not None:
            reaper.join(timeout=10.0)
        for token in tokens:
            token.cancel()
        for item in loaded:
            with item.restart_lock:  # a boot under way finishes first, then is stopped
                item.zygote.stop(timeout=2.0)
        if self._bases is not None:
            self._bases.close()
        self._modules.close()
        self._executor.shutdown(wait=True, cancel_futures=True)
        if self._cgroups is not None:
            self._cgroups.close()
        if self._owns_workdir_root:
            shutil.rmtree(self.workdir_root, ignore_errors=True)
        self.tools.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
