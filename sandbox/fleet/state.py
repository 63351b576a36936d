"""The fleet's control state in Redis: circuit breaker per skill and policy counters per tenant,
shared by every worker and kept across restarts (of workers; of Redis too, with its AOF on).

Only the stores live here; the logic is the single-host one (`StoredCircuitBreaker`,
`Policy`), so a fleet and a single host decide alike:

- `RedisCircuitStore`: one JSON document per skill, read-modified-written under `WATCH`
  (optimistic: a write that raced another is retried on fresh state). Times are wall-clock
  seconds (hosts' clocks must agree within a fraction of the cooldown: NTP).
- `RedisPolicyState`: one Lua script per admission, so the concurrency check, the token
  bucket and the in-flight hold happen at once on the server, timed by Redis's own clock.
  Holds are members of a sorted set scored by when they stop counting, so a worker killed
  between admit and release leaks nothing beyond its request's timeout (+ a margin).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from sandbox.circuit import CircuitState, StoredCircuitBreaker, _Bucket, _Circuit
from sandbox.fleet.protocol import text
from sandbox.policy import Policy, RateLimit, Refusal

if TYPE_CHECKING:
    import redis

    from sandbox.daemon.config import DaemonConfig

T = TypeVar("T")
#: Retries of an optimistic circuit update that keeps racing (then it fails loudly).
_MAX_RACES = 100


class _StoredCircuit(msgspec.Struct, array_like=True):
    state: str
    consecutive_failures: int
    opened_at: float
    probes: list[float]
    buckets: list[tuple[float, int, int]]
    times_opened: int
    last_reason: str


def _dump(circuit: _Circuit) -> bytes:
    return msgspec.json.encode(_StoredCircuit(
        state=circuit.state.value, consecutive_failures=circuit.consecutive_failures,
        opened_at=circuit.opened_at, probes=list(circuit.probes),
        buckets=[(b.start, b.successes, b.failures) for b in circuit.buckets],
        times_opened=circuit.times_opened, last_reason=circuit.last_reason))


def _load(data: bytes | None) -> _Circuit:
    if data is None:
        return _Circuit()
    stored = msgspec.json.decode(data, type=_StoredCircuit)
    return _Circuit(state=CircuitState(stored.state),
                    consecutive_failures=stored.consecutive_failures,
                    opened_at=stored.opened_at, probes=deque(stored.probes),
                    buckets=deque(_Bucket(start, ok, bad) for start, ok, bad in stored.buckets),
                    times_opened=stored.times_opened, last_reason=stored.last_reason)


class RedisCircuitStore:
    """Circuits as Redis keys `{prefix}:circuit:{skill_id}` (and the set of them)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self.index = f"{prefix}:circuits"

    def _key(self, skill_id: str) -> str:
        return f"{self.prefix}:circuit:{skill_id}"

    def update(self, skill_id: str, change: Callable[[_Circuit], T]) -> T:
        import redis

        key = self._key(skill_id)
        with self.redis.pipeline() as pipe:
            for _ in range(_MAX_RACES):
                try:
                    pipe.watch(key)  # type: ignore[no-untyped-call]
                    raw = pipe.get(key)
                    before = raw if isinstance(raw, bytes) else None
                    circuit = _load(before)
                    answer = change(circuit)
                    after = _dump(circuit)
                    if after == before:  # nothing changed: no write, no race to lose
                        pipe.unwatch()
                        return answer
                    pipe.multi()
                    pipe.set(key, after)
                    pipe.sadd(self.index, skill_id)
                    pipe.execute()
                    return answer
                except redis.WatchError:
                    continue
        raise RuntimeError(f"circuit of {skill_id}: {_MAX_RACES} racing updates in a row")

    def skill_ids(self) -> list[str]:
        return sorted(text(member) for member in self.redis.smembers(self.index))

    def delete(self, skill_id: str) -> None:
        pipe = self.redis.pipeline()
        pipe.delete(self._key(skill_id))
        pipe.srem(self.index, skill_id)
        pipe.execute()


class RedisCircuitBreaker(StoredCircuitBreaker):
    """The circuit breaker for a fleet: state in Redis, time from the wall clock."""

    def __init__(self, client: redis.Redis, prefix: str, **options: Any) -> None:
        options.setdefault("clock", time.time)
        super().__init__(RedisCircuitStore(client, prefix), **options)


_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local inflight = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[1])
if max >= 0 and inflight >= max then return {1, inflight} end
local rate = tonumber(ARGV[2])
if rate > 0 then
  local burst = tonumber(ARGV[3])
  local b = redis.call('HMGET', KEYS[2], 'tokens', 'updated')
  local tokens = tonumber(b[1]) or burst
  local updated = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
  local ttl = math.ceil(burst / rate * 1000) + 1000
  if tokens < 1 then
    redis.call('HSET', KEYS[2], 'tokens', tostring(tokens), 'updated', tostring(now))
    redis.call('PEXPIRE', KEYS[2], ttl)
    return {2, inflight}
  end
  redis.call('HSET', KEYS[2], 'tokens', tostring(tokens - 1), 'updated', tostring(now))
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local hold_ttl = tonumber(ARGV[5])
redis.call('ZADD', KEYS[1], now + hold_ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], math.ceil(hold_ttl * 1000) + 1000)
return {0, inflight + 1}
"""


class RedisPolicyState:
    """`Policy`'s counters in Redis: `{prefix}:policy:inflight:{who}` (sorted set of holds)
    and `{prefix}:policy:bucket:{who}` (hash: tokens, updated), `who` being `t:{tenant}` or
    `shared` for the unlisted tenants' shared `[default]`. Keys expire once idle."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.redis = client
        self.prefix = prefix
        self._admit = client.register_script(_ADMIT)

    def _keys(self, key: str | None) -> tuple[str, str]:
        who = "shared" if key is None else f"t:{key}"
        return (f"{self.prefix}:policy:inflight:{who}", f"{self.prefix}:policy:bucket:{who}")

    def admit(self, key: str | None, max_concurrent: int | None, rate: RateLimit | None,
              hold: str, hold_ttl: float) -> Refusal | None:
        inflight_key, bucket_key = self._keys(key)
        code, inflight = self._admit(
            keys=[inflight_key, bucket_key],
            args=[-1 if max_concurrent is None else max_concurrent,
                  0 if rate is None else rate.rate, 1 if rate is None else rate.burst,
                  hold, hold_ttl])
        if code == 1:
            return "concurrent", int(inflight)
        if code == 2:
            return "rate", int(inflight)
        return None

    def release(self, key: str | None, hold: str) -> None:
        self.redis.zrem(self._keys(key)[0], hold)

    def inflight(self, key: str | None) -> int:
        inflight_key = self._keys(key)[0]
        self.redis.zremrangebyscore(inflight_key, "-inf", time.time())
        return int(self.redis.zcard(inflight_key))

    def tracked(self) -> int:
        return sum(1 for _ in self.redis.scan_iter(f"{self.prefix}:policy:*"))


def shared_breaker(config: DaemonConfig, client: redis.Redis,
                   prefix: str) -> RedisCircuitBreaker:
    """The config's `[circuit]` settings over the fleet's Redis."""
    return RedisCircuitBreaker(client, prefix,
                               failure_threshold=config.circuit.failure_threshold,
                               cooldown=config.circuit.cooldown)


def shared_policy(config: DaemonConfig, client: redis.Redis, prefix: str) -> Policy | None:
    """The config's policy file, its counters in the fleet's Redis (None without one)."""
    from sandbox.daemon.config import ConfigError
    from sandbox.policy import PolicyError

    if config.policy is None:
        return None
    try:
        policy = Policy.from_file(config.policy)
    except PolicyError as exc:
        raise ConfigError(f"field 'policy': {exc}") from None
    return policy.with_state(RedisPolicyState(client, prefix))
