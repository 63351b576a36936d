"""What travels between fleet clients and workers, and the Redis keys they share.

A request goes out as a Celery task whose single argument is an `Envelope` (JSON, as Celery's
json serializer carries it); its answer comes back on a Redis list the client waits on, never
through Celery's result backend. The keys, under one prefix (default `sbx`):

    {prefix}:worker:{worker_id}   heartbeat of a live worker (JSON `WorkerInfo`), with a TTL
    {prefix}:workers              set of worker ids that registered (stale ones pruned on read)
    {prefix}:skills               hash skill id -> JSON `SkillRoute` (queue, idempotent)
    {prefix}:claim:{delivery}     who owns one delivery attempt: a worker id, or ABANDONED
    {prefix}:result:{delivery}    list the answer (JSON `ExecutionResult`) is pushed on
    {prefix}:cancel:{delivery}    set by a client that cancels a delivery a worker claimed
    {prefix}:cancel               channel the same client publishes the delivery id on

The claim key is the single arbiter of at-most-once: whoever sets it first (`SET NX`) decides
the delivery — a worker that wins runs it, a duplicate delivery loses and is dropped, and a
client that gives up sets it to ABANDONED so a late delivery can never run.
"""

from __future__ import annotations

import socket
from typing import Any

import msgspec

from worker.protocol import ExecutionRequest, ExecutionResult

#: The Celery task name workers register and clients send.
TASK_NAME = "skill_sandbox.execute"
DEFAULT_PREFIX = "sbx"
DEFAULT_GROUP = "default"
#: What a client writes in a claim it takes over when it stops waiting.
ABANDONED = "abandoned"
#: Seconds a worker's heartbeat key lives without a refresh; a worker refreshes it every third.
DEFAULT_HEARTBEAT_TTL = 6.0
#: Seconds results and claims are kept in Redis after the request's deadline.
KEEP_AFTER_DEADLINE = 300.0


def queue_name(group: str) -> str:
    """The Celery queue of a skill group: operators place skills on nodes by group."""
    return f"skill-sandbox.{group}"


def default_node() -> str:
    return socket.gethostname() or "node"


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """One delivery of a request. `delivery` names this attempt's claim and result keys (a
    plan's steps share one `request_id`, so the request id cannot); `expires` is the Unix time
    the caller stops waiting — queueing spends from it, and a worker that takes the request
    later answers `timeout` without running it."""

    request: ExecutionRequest
    delivery: str
    expires: float
    attempt: int = 0


class SkillRoute(msgspec.Struct, frozen=True, kw_only=True):
    """Where a skill's requests go, as its workers registered it."""

    queue: str
    idempotent: bool = False


class WorkerInfo(msgspec.Struct, kw_only=True):
    """What a worker's heartbeat says about it (`skill-sandbox fleet status` shows it)."""

    worker_id: str
    node: str
    pid: int
    group: str
    queue: str
    skills: list[str]
    concurrency: int
    started: float
    inflight: int = 0
    executed: int = 0
    dropped: int = 0
    draining: bool = False
    #: skills this worker loaded but did not route to its queue: another group's live worker
    #: had them routed already (a skill belongs to one group)
    unrouted: list[str] = []


class Keys:
    """The Redis key names under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.workers = f"{prefix}:workers"
        self.skills = f"{prefix}:skills"
        self.cancels = f"{prefix}:cancel"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def claim(self, delivery: str) -> str:
        return f"{self.prefix}:claim:{delivery}"

    def result(self, delivery: str) -> str:
        return f"{self.prefix}:result:{delivery}"

    def cancel(self, delivery: str) -> str:
        return f"{self.prefix}:cancel:{delivery}"


_ENVELOPE = msgspec.json.Decoder(Envelope)
_RESULT = msgspec.json.Decoder(ExecutionResult)
_ROUTE = msgspec.json.Decoder(SkillRoute)
_WORKER = msgspec.json.Decoder(WorkerInfo)


def text(value: object) -> str:
    """A Redis reply as text (redis-py types its replies `bytes | str`)."""
    if isinstance(value, bytes):
        return value.decode()
    return "" if value is None else str(value)


def encode(value: msgspec.Struct) -> str:
    return msgspec.json.encode(value).decode()


def decode_envelope(data: str | bytes) -> Envelope:
    return _ENVELOPE.decode(data)


def decode_result(data: str | bytes) -> ExecutionResult:
    return _RESULT.decode(data)


def decode_route(data: str | bytes) -> SkillRoute:
    return _ROUTE.decode(data)


def decode_worker(data: str | bytes) -> WorkerInfo:
    return _WORKER.decode(data)


def live_workers(client: Any, keys: Keys) -> tuple[list[WorkerInfo], list[str]]:
    """The registered workers whose heartbeat is alive, and the ids of those whose heartbeat
    expired (they left without saying so: killed)."""
    members = sorted(text(m) for m in client.smembers(keys.workers))
    raw = client.mget([keys.worker(member) for member in members]) if members else []
    alive, gone = [], []
    for member, data in zip(members, raw, strict=True):
        if data is None:
            gone.append(member)
        else:
            alive.append(decode_worker(data))
    return alive, gone
