"""The daemon's state and behaviour, independent of HTTP: one `Sandbox`, its skills, admission
(draining, queue bound, duplicate request ids), reload, the zygote watchdog, and what operators
see (status, metrics, logs).

Everything that can block (loading skills, starting zygotes, closing) runs in a thread, so the
event loop keeps answering health checks while a reload or a drain is under way.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sandbox.capabilities import IsolationUnavailable
from sandbox.circuit import InMemoryCircuitBreaker
from sandbox.daemon import jsonlog, logquery, sweep
from sandbox.daemon.config import ConfigError, DaemonConfig
from sandbox.daemon.metrics import Metrics, Snapshot
from sandbox.daemon.reloadable import ReloadablePolicy
from sandbox.daemon.skills import Found, discover
from sandbox.errors import SkillLoadError
from sandbox.execlog import RecordLogger
from sandbox.policy import Policy, PolicyError
from sandbox.sandbox import Sandbox
from sandbox.skill import Skill
from sandbox.tools import HttpToolRunner
from worker.protocol import ExecutionResult, ExecutionStatus

log = jsonlog.get_logger("service")

#: Settings a running daemon cannot change; a reload that sees them changed says so.
RESTART_ONLY = ("socket", "tcp", "max_concurrency", "workdir_root", "execution_log",
                "max_body_bytes", "tools", "circuit", "isolation", "header_timeout",
                "body_timeout", "keepalive_timeout", "max_connections", "base_zygote")


def load_policy(config: DaemonConfig) -> Policy | None:
    if config.policy is None:
        return None
    try:
        return Policy.from_file(config.policy)
    except PolicyError as exc:
        raise ConfigError(f"field 'policy': {exc}") from None


class Refused(Exception):
    """The daemon will not take this request now; `code` is the HTTP status to answer."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


@dataclass
class ReloadReport:
    added: list[str] = field(default_factory=list)
    reloaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    restart_needed: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, list[str]]:
        return {"added": self.added, "reloaded": self.reloaded, "unchanged": self.unchanged,
                "removed": self.removed, "errors": self.errors,
                "restart_needed": self.restart_needed}


def skill_summary(skill: Skill) -> dict[str, Any]:
    manifest = skill.manifest
    return {
        "id": skill.id, "version": manifest.version, "name": manifest.name,
        "description": manifest.description, "kind": manifest.kind,
        "isolation": manifest.isolation, "entrypoint": manifest.entrypoint,
        "command": manifest.command, "path": str(skill.path),
        "manifest": str(skill.manifest_path),
        "limits": manifest.limits.model_dump(),
        "permissions": {"network": manifest.permissions.network,
                        "env": sorted(manifest.permissions.env)},
        "input_schema": manifest.input_schema, "output_schema": manifest.output_schema,
        "runnable": not skill.not_runnable, "not_runnable": skill.not_runnable,
    }


class Service:
    """Owns the `Sandbox`. Build it, `await start()`, serve, `await drain()`, `await close()`."""

    def __init__(self, config: DaemonConfig,
                 reread_config: Callable[[], DaemonConfig] | None = None) -> None:
        self.config = config
        self._reread_config = reread_config
        self.policy = ReloadablePolicy(load_policy(config))
        self.breaker = InMemoryCircuitBreaker(
            failure_threshold=config.circuit.failure_threshold,
            cooldown=config.circuit.cooldown) if config.circuit.enabled else None
        self.execution_log: RecordLogger | None = None
        if config.execution_log:
            try:
                self.execution_log = logquery.open_logger(config.execution_log)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"field 'execution_log': cannot open {config.execution_log}: "
                                  f"{exc}") from None
        self.swept = sweep.sweep_workdirs(config.workdir_root)
        self.metrics = Metrics(self.snapshot, loaded=self._loaded)
        try:
            self.llm = config.llm.to_provider()
        except ValueError as exc:
            if self.execution_log is not None:
                self.execution_log.close()
            raise ConfigError(f"field 'llm': {exc}") from None
        try:
            self.sandbox = Sandbox(llm=self.llm, max_concurrency=config.max_concurrency,
                                   workdir_root=str(config.workdir_root)
                                   if config.workdir_root else None,
                                   policy=self.policy,
                                   circuit_breaker=self.breaker or False,
                                   logger=self.execution_log,
                                   isolation=config.isolation.to_config(),
                                   max_zygotes=config.max_zygotes or None,
                                   max_wasm_compiles=config.max_wasm_compiles or None,
                                   zygote_idle_ttl=config.zygote_idle_ttl or None,
                                   base_zygote=config.base_zygote,
                                   on_slot_wait=self.metrics.queue_wait.observe)
        except BaseException as exc:
            if self.execution_log is not None:
                self.execution_log.close()
            if self.llm is not None:
                self.llm.close()
            if isinstance(exc, IsolationUnavailable):
                raise ConfigError(f"field 'isolation.required': {exc}") from None
            raise
        runners: dict[str, HttpToolRunner] = {}
        try:
            for name, url in config.tools.items():
                if url not in runners:
                    runners[url] = HttpToolRunner(url)
                self.sandbox.register_tool(name, runners[url])
        except ValueError as exc:
            self.sandbox.close()
            if self.execution_log is not None:
                self.execution_log.close()
            if self.llm is not None:
                self.llm.close()
            raise ConfigError(f"field 'tools': {exc}") from None
        self.started_at = time.time()
        self.draining = False
        self.inflight: set[str] = set()
        self.skill_errors: list[str] = []
        self.listening: dict[str, str] = {}
        self._fingerprints: dict[str, str] = {}
        self._starts: dict[str, int] = {}
        self._restart_failures: dict[str, int] = {}
        self._next_restart: dict[str, float] = {}
        self._reload_lock = asyncio.Lock()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._retired_llms: list[Any] = []
        self._token = config.bearer_token()
        self._token_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> ReloadReport:
        if self.swept.removed or self.swept.errors:
            jsonlog.event(log, logging.WARNING if self.swept.errors else logging.INFO,
                          "swept leftover workdirs", removed=self.swept.removed,
                          errors=self.swept.errors or None)
        report = await self.reload(reread=False)
        return report

    def _loaded(self, skill_id: str) -> bool:
        sandbox = getattr(self, "sandbox", None)
        return sandbox is not None and sandbox.get_skill(skill_id) is not None

    async def drain(self, grace: float) -> bool:
        """Refuse new work and wait up to `grace` seconds for in-flight executions to finish;
        False if some were still running (the caller then closes, which cancels them)."""
        self.draining = True
        if self.inflight:
            jsonlog.event(log, logging.INFO, "draining", inflight=len(self.inflight),
                          grace_period=grace)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=grace)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Kill whatever still runs (those callers get `canceled`), stop every zygote, reap."""
        self.draining = True
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.sandbox.close)
        try:  # the cancelled executions answer their callers before the servers stop
            await asyncio.wait_for(self._idle.wait(), timeout=5.0)
        except TimeoutError:
            jsonlog.event(log, logging.ERROR, "executions did not finish after close",
                          inflight=sorted(self.inflight))
        if self.execution_log is not None:
            self.execution_log.close()
        for provider in [self.llm, *self._retired_llms]:
            if provider is not None:
                provider.close()
        if self.swept.lock_fd is not None:
            os.close(self.swept.lock_fd)
            self.swept.lock_fd = None

    # -- executing ------------------------------------------------------------------------

    def admit(self, request_id: str) -> None:
        """Take a slot in the in-flight set, or say why not. Nothing reaches a worker before."""
        if self.draining:
            raise Refused(503, "draining", "the daemon is shutting down and takes no new work")
        limit = self.sandbox.max_concurrency + self.config.max_queue
        if len(self.inflight) >= limit:
            raise Refused(429, "queue_full", f"{len(self.inflight)} executions in flight "
                          f"(max_concurrency + max_queue = {limit}); retry later")
        if request_id in self.inflight:
            raise Refused(409, "duplicate_request_id",
                          f"request_id {request_id!r} is already in flight")
        self.inflight.add(request_id)
        self._idle.clear()

    def release(self, request_id: str) -> None:
        self.inflight.discard(request_id)
        if not self.inflight:
            self._idle.set()

    def record(self, result: ExecutionResult, *, tenant_id: str = "") -> None:
        self.metrics.observe(result)
        level = logging.INFO if result.status is ExecutionStatus.SUCCESS else logging.WARNING
        usage = result.resource_usage
        jsonlog.event(log, level, "execution", request_id=result.request_id,
                      skill_id=result.skill_id, tenant_id=tenant_id, status=result.status.value,
                      duration_ms=round(result.duration * 1000, 3),
                      cpu_time_ms=usage.cpu_time_ms, memory_mb=usage.memory_mb,
                      error=result.error or None)

    def cancel(self, request_id: str) -> bool:
        return self.sandbox.cancel(request_id)

    # -- skills ---------------------------------------------------------------------------

    async def reload(self, *, force: bool = False, reread: bool = True) -> ReloadReport:
        """Re-read the config (skills dirs, limits, policy, token, log level), load new and
        changed skills, unload removed ones. In-flight executions finish on their old zygote."""
        async with self._reload_lock:
            loop = asyncio.get_running_loop()
            report = ReloadReport()
            if reread and self._reread_config is not None:
                try:
                    config = await loop.run_in_executor(None, self._reread_config)
                except ValueError as exc:
                    report.errors.append(str(exc))
                    self.metrics.reloads.labels("failed").inc()
                    jsonlog.event(log, logging.ERROR, "reload failed", error=str(exc))
                    return report
                await loop.run_in_executor(None, self._apply_config, config, report)
            report = await loop.run_in_executor(None, self._reload_skills, force, report)
            self.skill_errors = list(report.errors)
            outcome = "partial" if report.errors else "ok"
            self.metrics.reloads.labels(outcome).inc()
            jsonlog.event(log, logging.WARNING if report.errors else logging.INFO, "reload",
                          **report.as_dict())
            return report

    def _apply_config(self, config: DaemonConfig, report: ReloadReport) -> None:
        old = self.config
        report.restart_needed = [name for name in RESTART_ONLY
                                 if getattr(old, name) != getattr(config, name)]
        if report.restart_needed:
            jsonlog.event(log, logging.WARNING, "config changes need a restart",
                          fields=report.restart_needed)
        if (old.log_level, old.log_format) != (config.log_level, config.log_format):
            jsonlog.configure(config.log_level, config.log_format)
        try:
            token = config.bearer_token()
        except ValueError as exc:
            report.errors.append(f"field 'token_file': {exc} (keeping the previous token)")
        else:
            with self._token_lock:
                self._token = token
        try:
            policy = load_policy(config)
        except ConfigError as exc:
            report.errors.append(f"{exc} (keeping the previous policy)")
        else:
            current = self.policy.current
            unchanged = isinstance(current, Policy) and isinstance(policy, Policy) and \
                current.model_dump() == policy.model_dump()
            if not unchanged:  # an unchanged file keeps its rate-limit buckets and counters
                self.policy.replace(policy)
        if old.llm != config.llm and not self._replace_llm(config, report):
            config = config.model_copy(update={"llm": old.llm})  # re-tried at the next reload
        # The zygote budget applies from the next start or eviction pass; `warm` to the skills
        # loaded by this reload (a warm zygote already running stays).
        self.sandbox.max_zygotes = config.max_zygotes or None
        self.sandbox.zygote_idle_ttl = config.zygote_idle_ttl or None
        self.config = config

    def _replace_llm(self, config: DaemonConfig, report: ReloadReport) -> bool:
        """A changed `[llm]` section takes effect for the next call; calls in flight finish on
        the provider they started with, which is closed only when the daemon closes."""
        try:
            provider = config.llm.to_provider()
        except ValueError as exc:
            report.errors.append(f"field 'llm': {exc} (keeping the previous provider)")
            return False
        if self.llm is not None:
            self._retired_llms.append(self.llm)
        self.llm = self.sandbox.llm = provider
        jsonlog.event(log, logging.INFO, "llm provider replaced",
                      model=config.llm.model, base_url=config.llm.base_url)
        return True

    def bearer_token(self) -> str | None:
        with self._token_lock:
            return self._token

    def _reload_skills(self, force: bool, report: ReloadReport) -> ReloadReport:
        found = discover(self.config.skills, self.config.limits)
        report.errors.extend(found.errors)
        current = {skill.id for skill in self.sandbox.skills()}
        for skill_id, item in found.skills.items():
            if skill_id in current and not force \
                    and self._fingerprints.get(skill_id) == item.fingerprint:
                report.unchanged.append(skill_id)
                continue
            if self._load(item, report):
                (report.reloaded if skill_id in current else report.added).append(skill_id)
        for skill_id in sorted(current - set(found.skills)):
            loaded = self.sandbox.get_skill(skill_id)
            if loaded is not None and loaded.path in found.broken:
                # its directory is still there but broken now: keep the last good version
                report.unchanged.append(skill_id)
                continue
            try:
                self.sandbox.unload_skill(skill_id)
            except KeyError:
                continue
            self._fingerprints.pop(skill_id, None)
            self._starts.pop(skill_id, None)
            report.removed.append(skill_id)
        for names in (report.added, report.reloaded, report.unchanged, report.removed):
            names.sort()
        return report

    def _load(self, item: Found, report: ReloadReport) -> bool:
        warm = True if self.is_warm(item.skill.id) else None  # None: as its old zygote was
        try:
            self.sandbox.load_skill(item.skill, warm=warm)
        except SkillLoadError as exc:
            report.errors.append(str(exc))
            return False
        self._fingerprints[item.skill.id] = item.fingerprint
        self._starts[item.skill.id] = self.sandbox.zygote_info(item.skill.id,
                                                               start=False)["restarts"]
        return True

    def is_warm(self, skill_id: str) -> bool:
        """Whether the config's `warm` list names the skill (its zygote starts at load)."""
        return any(fnmatch.fnmatchcase(skill_id, pattern) for pattern in self.config.warm)

    def skill_info(self, skill_id: str) -> dict[str, Any] | None:
        skill = self.sandbox.get_skill(skill_id)
        if skill is None:
            return None
        info = skill_summary(skill)
        try:
            info["zygote"] = self.sandbox.skill_state(skill_id)
        except KeyError:
            return None
        info["circuit"] = self.circuit_state(skill_id)
        return info

    def circuit_state(self, skill_id: str) -> str | None:
        if self.breaker is None:
            return None
        return self.breaker.state(skill_id).value

    def query_log(self, filters: logquery.Filters) -> list[dict[str, Any]]:
        """Execution-log records (blocking: call it in a thread)."""
        if self.execution_log is None:
            raise LookupError("the execution log is off (config key 'execution_log')")
        return logquery.query(self.execution_log, filters)

    # -- zygote watchdog ------------------------------------------------------------------

    async def watch_zygotes(self) -> None:
        """Restart dead zygotes with exponential backoff and count every restart, whoever did
        it (this watchdog, or an execution that found its zygote gone). Only zygotes that were
        running: a cold or evicted one starts on its next execution, and is not down."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            await asyncio.sleep(self.config.zygote_check_interval)
            for skill in self.sandbox.skills():
                if self._closed or self.draining:
                    return
                try:
                    await self._check_zygote(loop, skill.id)
                except KeyError:  # unloaded meanwhile
                    continue

    async def _check_zygote(self, loop: asyncio.AbstractEventLoop, skill_id: str) -> None:
        info = self.sandbox.zygote_info(skill_id, start=False)
        if info["state"] == "warm" and not info["alive"]:
            now = time.monotonic()
            if now < self._next_restart.get(skill_id, 0.0):
                return
            jsonlog.event(log, logging.WARNING, "zygote died; restarting", skill_id=skill_id,
                          pid=info["pid"], attempt=self._restart_failures.get(skill_id, 0) + 1)
            error = await loop.run_in_executor(
                None, lambda: self.sandbox.ensure_zygote(skill_id, crashed_only=True))
            if error:
                failures = self._restart_failures.get(skill_id, 0) + 1
                self._restart_failures[skill_id] = failures
                delay = min(self.config.zygote_backoff_max, 0.5 * 2 ** failures)
                self._next_restart[skill_id] = time.monotonic() + delay
                jsonlog.event(log, logging.ERROR, "zygote restart failed", skill_id=skill_id,
                              error=error, retry_in=delay)
                return
            self._restart_failures.pop(skill_id, None)
            self._next_restart.pop(skill_id, None)
            info = self.sandbox.zygote_info(skill_id, start=False)
        restarts = info["restarts"]  # after a crash: cold starts and evictions are not counted
        seen = self._starts.get(skill_id, restarts)
        if restarts > seen:
            self.metrics.zygote_restarts.labels(skill_id).inc(restarts - seen)
            jsonlog.event(log, logging.INFO, "zygote restarted", skill_id=skill_id,
                          pid=info["pid"], starts=info["starts"])
        self._starts[skill_id] = restarts

    # -- what operators see ---------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        policy = self.policy.current
        tracked = policy.tracked_tenants() if isinstance(policy, Policy) else None
        snap = Snapshot(inflight=len(self.inflight), draining=self.draining,
                        queued=self.sandbox.queued, tenants_tracked=tracked,
                        queue_limit=self.sandbox.max_concurrency + self.config.max_queue,
                        cold_starts=self.sandbox.cold_starts, evictions=self.sandbox.evictions)
        for skill in self.sandbox.skills():
            try:
                info = self.sandbox.zygote_info(skill.id, start=False)
            except KeyError:
                continue
            snap.zygotes_up[skill.id] = bool(info["alive"])
            snap.zygotes_live += int(info["state"] == "warm" and info["alive"])
            if info["state"] == "warm" and not info["alive"]:
                snap.zygotes_down.append(skill.id)
            snap.running += int(info["inflight"])
            state = self.circuit_state(skill.id)
            if state is not None:
                snap.circuits[skill.id] = state
        return snap

    def ready(self) -> tuple[bool, list[str]]:
        """Ready when not draining and every zygote that was started is up (a cold or evicted
        one is not down: its next execution starts it)."""
        snap = self.snapshot()
        down = sorted(snap.zygotes_down)
        return (not self.draining and not down), down

    def status(self) -> dict[str, Any]:
        snap = self.snapshot()
        skills = []
        for skill in sorted(self.sandbox.skills(), key=lambda item: item.id):
            try:
                zygote = self.sandbox.zygote_info(skill.id, start=False)
            except KeyError:
                continue
            skills.append({"id": skill.id, "version": skill.manifest.version,
                           "zygote_pid": zygote["pid"], "zygote_up": zygote["alive"],
                           "zygote_state": zygote["state"],
                           "zygote_starts": zygote["starts"], "running": zygote["inflight"],
                           "circuit": self.circuit_state(skill.id)})
        return {
            "status": "draining" if self.draining else "ok",
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "inflight": snap.inflight, "running": snap.running,
            "queue_depth": snap.queued,
            "max_concurrency": self.sandbox.max_concurrency, "max_queue": self.config.max_queue,
            "listening": self.listening,
            "execution_log": self.config.execution_log or None,
            "isolation": self.isolation_layers(),
            "skills": skills, "skill_errors": self.skill_errors,
        }

    def isolation_layers(self) -> list[dict[str, str]]:
        """Each kernel layer: active, fallback (and what replaces it) or unavailable (why)."""
        return [{"name": layer.name, "status": layer.status, "detail": layer.detail}
                for layer in self.sandbox.capabilities().layers]
