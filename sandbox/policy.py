"""Execution policy: which tenant may run what, how often, how much at once.

Evaluated by `Sandbox.execute` after the input is validated and before the circuit breaker and
any worker: a denial is a `rejected` result with `runtime: policy rejected execution: <reason>`.

A policy is anything with `check(request, skill) -> None | reason`; if it also has
`release(request, skill)`, the sandbox calls it once after every execution `check` admitted
(that is how `Policy` counts executions in flight). `Policy` is the built-in one, a pydantic
model loadable from TOML or YAML:

    max_input_bytes = 1048576        # defaults for every tenant
    max_timeout = 60

    default_scope = "shared"         # or "per_tenant" (see below)

    [default]                        # tenants not listed below
    allowed_skills = ["examples/*"]
    max_concurrent = 4
    rate_limit = { rate = 5, burst = 10 }

    [tenants.acme]
    allowed_skills = ["*"]
    network = true                   # may run skills whose manifest allows network

`tenant_id` is chosen by the caller, so `[default]`'s limits are only a limit if rotating ids
does not escape them. `default_scope` says how they apply to tenants not listed under
`[tenants]` (including the anonymous tenant ""):

- `"shared"` (the default): one aggregate `max_concurrent` and one token bucket for all of
  them together: ten fresh ids with `burst = 2` get 2 executions, not 10.
- `"per_tenant"`: each id gets its own counter and bucket (for callers that authenticate
  tenant ids before they reach the sandbox).

Listed tenants always have their own. State is bounded: a tenant's in-flight count is dropped
at zero and its bucket once it has refilled to `burst` (it then behaves exactly like a fresh
one), so idle tenants cost nothing; with `per_tenant`, the buckets alive at once are at most
the ids seen within one refill time (`burst / rate` seconds).
"""

from __future__ import annotations

import fnmatch
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from sandbox.errors import PolicyError as PolicyError  # raised here; defined with the others
from sandbox.skill import Skill
from sandbox.validation import describe
from worker.protocol import ExecutionRequest


class ExecutionPolicy(Protocol):
    def check(self, request: ExecutionRequest, skill: Skill) -> str | None: ...


class RateLimit(BaseModel):
    """Token bucket: `rate` executions per second on average, bursts of up to `burst`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: float = Field(gt=0, description="tokens added per second")
    burst: int = Field(default=1, ge=1, description="bucket size")


class TenantPolicy(BaseModel):
    """What one tenant may do. Unset limits fall back to the policy-wide value (or none)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allowed_skills: list[str] = Field(default_factory=lambda: ["*"],
                                      description="glob patterns over skill ids")
    denied_skills: list[str] = Field(default_factory=list,
                                     description="glob patterns that win over allowed_skills")
    max_concurrent: int | None = Field(default=None, ge=1)
    rate_limit: RateLimit | None = None
    max_input_bytes: int | None = Field(default=None, ge=0)
    max_timeout: float | None = Field(default=None, gt=0,
                                      description="largest requested timeout, s")
    network: bool = Field(default=False,
                          description="may run skills with permissions.network = true")


@dataclass
class _Bucket:
    tokens: float
    updated: float
    limit: RateLimit

    def full(self, now: float) -> bool:
        """Refilled to `burst` by `now`: indistinguishable from a fresh bucket."""
        return self.tokens + (now - self.updated) * self.limit.rate >= self.limit.burst


#: The state key of every tenant under a shared `[default]` (no tenant id is None).
_SHARED: None = None
#: How often (seconds) full buckets are dropped, at most; and a size that forces a sweep.
_SWEEP_INTERVAL = 1.0
_SWEEP_SIZE = 4096
#: Seconds past a request's timeout its in-flight hold may stay unreleased before it stops
#: counting (a store that outlives a crashed releaser).
_HOLD_MARGIN = 60.0


#: Why `PolicyState.admit` refused: too many in flight (with the count), or out of tokens.
Refusal = tuple[Literal["concurrent", "rate"], int]


class PolicyState(Protocol):
    """Where `Policy` keeps its counters: executions in flight and a token bucket per key (a
    tenant id, or None for the unlisted tenants' shared `[default]`). `admit` checks both and,
    if neither refuses, takes a token and counts a hold named `hold` in flight, all at once;
    `hold_ttl` is how long the hold may stay unreleased before it stops counting (a store that
    can lose its releaser, such as Redis under a worker that died, needs it; memory ignores it).
    `MemoryPolicyState` here; `sandbox.fleet.state` keeps them in Redis for a fleet."""

    def admit(self, key: str | None, max_concurrent: int | None, rate: RateLimit | None,
              hold: str, hold_ttl: float) -> Refusal | None: ...

    def release(self, key: str | None, hold: str) -> None: ...

    def inflight(self, key: str | None) -> int: ...

    def tracked(self) -> int: ...


class MemoryPolicyState:
    """Counters in this process's memory (lost on restart), guarded by one lock.

    A key's in-flight count is dropped at zero and its bucket once it has refilled to `burst`
    (it then behaves exactly like a fresh one), so idle tenants cost nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._inflight: dict[str | None, int] = {}
        self._buckets: dict[str | None, _Bucket] = {}
        self._swept = 0.0

    def admit(self, key: str | None, max_concurrent: int | None, rate: RateLimit | None,
              hold: str, hold_ttl: float) -> Refusal | None:
        with self._lock:
            inflight = self._inflight.get(key, 0)
            if max_concurrent is not None and inflight >= max_concurrent:
                return "concurrent", inflight
            if rate is not None and not self._take_token(key, rate):
                return "rate", inflight
            self._inflight[key] = inflight + 1
        return None

    def release(self, key: str | None, hold: str) -> None:
        with self._lock:
            left = self._inflight.get(key, 0) - 1
            if left > 0:
                self._inflight[key] = left
            else:
                self._inflight.pop(key, None)

    def inflight(self, key: str | None) -> int:
        with self._lock:
            return self._inflight.get(key, 0)

    def tracked(self) -> int:
        with self._lock:
            self._sweep(self.clock(), force=True)
            return len(set(self._inflight) | set(self._buckets))

    def _sweep(self, now: float, force: bool = False) -> None:
        """Drop buckets that have refilled (called with the lock held; amortised)."""
        if not force and now - self._swept < _SWEEP_INTERVAL and \
                len(self._buckets) < _SWEEP_SIZE:
            return
        self._swept = now
        for key in [key for key, bucket in self._buckets.items() if bucket.full(now)]:
            del self._buckets[key]

    def _take_token(self, key: str | None, limit: RateLimit) -> bool:
        now = self.clock()
        self._sweep(now)
        bucket = self._buckets.get(key)
        if bucket is None or bucket.limit != limit:
            bucket = self._buckets[key] = _Bucket(tokens=float(limit.burst), updated=now,
                                                  limit=limit)
        bucket.tokens = min(float(limit.burst),
                            bucket.tokens + (now - bucket.updated) * limit.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


class Policy(BaseModel):
    """The built-in policy. Thread-safe; keeps per-tenant counters in its `PolicyState`
    (in memory unless `with_state` gives another, e.g. Redis for a fleet)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_input_bytes: int | None = Field(default=None, ge=0)
    max_timeout: float | None = Field(default=None, gt=0)
    default: TenantPolicy = TenantPolicy()
    allow_unknown_tenants: bool = Field(
        default=True, description="false: tenants not listed under [tenants] are rejected")
    default_scope: Literal["shared", "per_tenant"] = Field(
        default="shared", description="shared: [default]'s max_concurrent and rate_limit are "
        "one aggregate limit for all unlisted tenants; per_tenant: each tenant id its own")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict)

    _state: PolicyState = PrivateAttr(default_factory=MemoryPolicyState)

    def with_clock(self, clock: Callable[[], float]) -> Policy:
        """Use `clock` (monotonic seconds) for the in-memory rate limit; for tests. Returns
        self."""
        if isinstance(self._state, MemoryPolicyState):
            self._state.clock = clock
        return self

    def with_state(self, state: PolicyState) -> Policy:
        """Keep the counters in `state` (e.g. Redis, shared by a fleet). Returns self."""
        self._state = state
        return self

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        """Load a `.toml`, `.yaml` or `.yml` policy file; errors name the file and the field."""
        import yaml  # loaded for policy files only, not with the package

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read: {exc.strerror}") from None
        suffix = path.suffix.lower()
        try:
            if suffix == ".toml":
                data: Any = tomllib.loads(text)
            elif suffix in (".yaml", ".yml"):
                data = yaml.safe_load(text)
                data = {} if data is None else data
            else:
                raise PolicyError(f"{path}: unknown policy format {suffix!r} "
                                  "(use .toml, .yaml or .yml)")
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"{path}: not valid TOML: {exc}") from None
        except yaml.YAMLError as exc:
            raise PolicyError(f"{path}: not valid YAML: {exc}") from None
        return cls.from_data(data, source=str(path))

    @classmethod
    def from_data(cls, data: Any, source: str = "policy") -> Policy:
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy must be a table/mapping, "
                              f"got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyError(describe(exc, source, "(policy)")) from None

    def tenant(self, tenant_id: str) -> TenantPolicy | None:
        found = self.tenants.get(tenant_id)
        if found is not None:
            return found
        return self.default if self.allow_unknown_tenants else None

    def check(self, request: ExecutionRequest, skill: Skill) -> str | None:
        """None to admit (and count the execution in flight), or why not."""
        tenant_id = request.tenant_id
        rules = self.tenant(tenant_id)
        who = f"tenant {tenant_id!r}" if tenant_id else "the anonymous tenant"
        if rules is None:
            return f"{who} is not allowed to run skills"
        if any(fnmatch.fnmatchcase(skill.id, pattern) for pattern in rules.denied_skills) or \
                not any(fnmatch.fnmatchcase(skill.id, pattern) for pattern in rules.allowed_skills):
            return f"{who} may not run skill {skill.id!r}"
        if skill.manifest.permissions.network and not rules.network:
            return f"{who} may not run skill {skill.id!r}, which uses the network"
        max_input = _first(rules.max_input_bytes, self.max_input_bytes)
        if max_input is not None and len(request.input) > max_input:
            return (f"the input is {len(request.input)} bytes; {who} may send at most "
                    f"{max_input}")
        max_timeout = _first(rules.max_timeout, self.max_timeout)
        if max_timeout is not None and request.timeout is not None and \
                request.timeout > max_timeout:
            return (f"the requested timeout {request.timeout:g}s is above {who}'s maximum "
                    f"of {max_timeout:g}s")
        key = self._key(tenant_id)
        shared = key is _SHARED
        whose = "the unlisted tenants' shared [default]" if shared else f"{who}'s"
        hold_ttl = (request.timeout or skill.manifest.limits.timeout) + _HOLD_MARGIN
        refusal = self._state.admit(key, rules.max_concurrent, rules.rate_limit,
                                    _hold(request), hold_ttl)
        if refusal is not None:
            why, inflight = refusal
            if why == "concurrent":
                if shared:
                    return (f"{who} may not start an execution: tenants not listed under "
                            f"[tenants] already have {inflight} running (the shared [default] "
                            f"max_concurrent = {rules.max_concurrent})")
                return (f"{who} already has {inflight} executions running "
                        f"(max_concurrent = {rules.max_concurrent})")
            assert rules.rate_limit is not None
            if shared:
                return (f"{who} is over {whose} rate limit of {rules.rate_limit.rate:g}/s "
                        f"(burst {rules.rate_limit.burst})")
            return (f"{who} is over its rate limit of {rules.rate_limit.rate:g}/s "
                    f"(burst {rules.rate_limit.burst})")
        return None

    def _key(self, tenant_id: str) -> str | None:
        """Whose counters an execution uses: a listed tenant's own, else the shared
        `[default]` state or the tenant's own, by `default_scope`."""
        if tenant_id in self.tenants or self.default_scope == "per_tenant":
            return tenant_id
        return _SHARED

    def release(self, request: ExecutionRequest, skill: Skill) -> None:
        self._state.release(self._key(request.tenant_id), _hold(request))

    def inflight(self, tenant_id: str) -> int:
        """Executions in flight counted against `tenant_id` (the shared count for a tenant
        under a shared `[default]`)."""
        return self._state.inflight(self._key(tenant_id))

    def tracked_tenants(self) -> int:
        """How many tenants (or the shared default) have state now; idle ones are dropped."""
        return self._state.tracked()


def _hold(request: ExecutionRequest) -> str:
    """The name of one admitted execution's hold: the same object is checked and released
    (`Sandbox` passes it to both), while a plan's steps share one request id."""
    return f"{request.request_id}/{id(request):x}"


def _first(*values: Any) -> Any:
    return next((value for value in values if value is not None), None)
