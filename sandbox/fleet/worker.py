"""`skill-sandbox worker`: one Celery worker process that owns one `Sandbox`.

Celery's default prefork pool would fork this process — the supervisor, with its config,
secrets and other tenants' requests in memory — which this project never does; so the worker
runs Celery's `threads` pool (tasks in threads of this process, up to `max_concurrency`) or
`solo` (one at a time), and refuses `prefork`.

Delivery is at most once (see `sandbox.fleet.protocol`): Celery acknowledges a message when a
thread takes it (`acks_late=False`), and before running it the worker claims the delivery in
Redis with `SET NX`; a delivery someone else claimed (a duplicate, or one its client gave up
on) is dropped unrun. The claim names this worker, and this worker's heartbeat key (refreshed
by a thread, with a TTL) says it is alive: a client whose worker's heartbeat vanished knows
its request died with the worker and answers it with a failure instead of waiting.

A client that cancels a delivery this worker claimed sets its cancel key and publishes its id;
a listener thread here cancels the execution in the sandbox (retrying until the sandbox has
registered it), and the worker answers `canceled` as for any execution.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from sandbox.execlog.records import DEFAULT_MAX_OUTPUT_BYTES, ExecutionLogger, ExecutionLogRecord
from sandbox.execution import TIMEOUT_ERROR
from sandbox.fleet.protocol import (
    DEFAULT_GROUP,
    DEFAULT_HEARTBEAT_TTL,
    DEFAULT_PREFIX,
    KEEP_AFTER_DEADLINE,
    TASK_NAME,
    Envelope,
    Keys,
    SkillRoute,
    WorkerInfo,
    decode_envelope,
    decode_route,
    default_node,
    encode,
    live_workers,
    queue_name,
    text,
)
from worker.protocol import ErrorKind, ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    import redis
    from celery import Celery

    from sandbox.daemon.config import DaemonConfig
    from sandbox.plans import ExecutionContext, ExecutionPlan
    from sandbox.sandbox import Sandbox
    from worker.protocol import ExecutionRequest

_log = logging.getLogger("sandbox.fleet")
Pool = Literal["threads", "solo"]
#: Seconds between a cancel listener's looks at Redis (and retries of a cancel the sandbox
#: could not take yet: the execution was claimed but not yet started).
CANCEL_RETRY = 0.1
#: Seconds after which Redis's transport gives an unacknowledged (prefetched, unstarted)
#: message back to the queue, e.g. one held by a worker that died. Started ones are
#: acknowledged and never given back; a claimed delivery given back is dropped anyway.
DEFAULT_VISIBILITY_TIMEOUT = 10.0


def make_celery(broker: str, *, visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
                name: str = "skill-sandbox") -> Celery:
    """The Celery app both sides use: JSON only, no result backend (answers go through our
    own Redis keys), acknowledged on start, one message prefetched per thread."""
    from celery import Celery

    app = Celery(name, broker=broker, set_as_current=False)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True, task_acks_late=False, task_reject_on_worker_lost=False,
        # One message prefetched per thread. (`worker_disable_prefetch` would leave none
        # waiting in a worker that may die, but with the threads pool it stalls the consumer
        # for its polling interval: 2/s instead of 70/s measured here.) A prefetched message
        # is unacknowledged until its thread starts it: if its worker dies first, Redis's
        # transport gives it back after `visibility_timeout`, swept every few seconds. A
        # healthy worker's message that waits longer is given back too and delivered twice:
        # the claim key drops the second copy, so a short timeout is safe.
        worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
        broker_transport_options={"visibility_timeout": visibility_timeout,
                                  "unacked_restore_interval": 2,
                                  "unacked_restore_throttle": 1},
        worker_hijack_root_logger=False, worker_send_task_events=False,
        task_default_queue=queue_name(DEFAULT_GROUP),
    )
    return app


class NodeLogger:
    """Stamps the node's name on every execution-log record, then hands it on: the log stays
    per node, and a record copied off it still says where it ran."""

    def __init__(self, inner: ExecutionLogger, node: str) -> None:
        self.inner = inner
        self.node = node
        self.max_output_bytes = getattr(inner, "max_output_bytes", DEFAULT_MAX_OUTPUT_BYTES)

    def log_step(self, record: ExecutionLogRecord) -> None:
        if not record.node:
            record.node = self.node
        self.inner.log_step(record)

    def log_plan_start(self, ec: ExecutionContext, plan: ExecutionPlan) -> None:
        self.inner.log_plan_start(ec, plan)

    def log_plan_end(self, ec: ExecutionContext, error: str | None,
                     status: ExecutionStatus) -> None:
        self.inner.log_plan_end(ec, error, status)


class WorkerMetrics:
    """Prometheus metrics of one worker, served on 127.0.0.1 only (`--metrics-port`): scrape
    each host's worker locally (a node exporter's proxy, or an agent on the host). Needs
    prometheus-client (the `daemon` extra)."""

    def __init__(self, node: str, port: int) -> None:
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.registry = CollectorRegistry()
        self.executions = Counter(
            "skill_sandbox_fleet_executions", "executions answered by this worker",
            ["skill_id", "status"], registry=self.registry).labels
        self.dropped = Counter("skill_sandbox_fleet_dropped_deliveries",
                               "deliveries dropped unrun: already claimed (duplicate or "
                               "abandoned by their client)", registry=self.registry)
        self.expired = Counter("skill_sandbox_fleet_expired_in_queue",
                               "requests answered timeout unrun: their deadline passed in "
                               "the queue", registry=self.registry)
        self.inflight = Gauge("skill_sandbox_fleet_inflight", "executions running now",
                              registry=self.registry)
        self.seconds = Histogram("skill_sandbox_fleet_execution_seconds",
                                 "time from claim to answer", registry=self.registry)
        self.info = Gauge("skill_sandbox_fleet_worker_info", "this worker (value 1)",
                          ["node"], registry=self.registry)
        self.info.labels(node).set(1)
        self.server, self.thread = start_http_server(port, addr="127.0.0.1",
                                                     registry=self.registry)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5.0)


class FleetWorker:
    """The part of a worker that is not Celery: claims, answers, heartbeat, registration.

    `handle` is the task body; it runs in Celery's threads and never raises for anything a
    request or a skill does — every claimed delivery gets exactly one answer.
    """

    def __init__(self, sandbox: Sandbox, client: redis.Redis, *, node: str | None = None,
                 group: str = DEFAULT_GROUP, prefix: str = DEFAULT_PREFIX,
                 heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
                 metrics: WorkerMetrics | None = None) -> None:
        self.sandbox = sandbox
        self.metrics = metrics
        self.redis = client
        self.node = node or default_node()
        self.group = group
        self.queue = queue_name(group)
        self.keys = Keys(prefix)
        self.heartbeat_ttl = heartbeat_ttl
        self.worker_id = f"{self.node}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.info = WorkerInfo(worker_id=self.worker_id, node=self.node, pid=os.getpid(),
                               group=group, queue=self.queue,
                               skills=sorted(skill.id for skill in sandbox.skills()),
                               concurrency=sandbox.max_concurrency, started=time.time())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self._listener: threading.Thread | None = None
        #: deliveries this worker has taken and not answered yet -> their request ids
        self._running: dict[str, str] = {}
        #: of those, the ones a client cancelled that the sandbox has not confirmed yet
        self._to_cancel: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Say we are alive, publish where our skills are routed, and keep saying it.

        A skill belongs to one group: one whose route names another queue that a live worker
        serves with it is left there (routing it here would starve that group's workers of
        it, or strand it on a queue nobody reads once this worker goes), and logged."""
        taken = self._routed_elsewhere()
        for skill_id, queue in sorted(taken.items()):
            _log.error("skill %s is routed to %s, served by a live worker there: not routed to "
                       "%s as well (a skill belongs to one group; load it in one)", skill_id,
                       queue, self.queue)
        with self._lock:
            self.info.unrouted = sorted(taken)
        self.beat()
        routes = {skill.id: encode(SkillRoute(queue=self.queue,
                                              idempotent=skill.manifest.idempotent))
                  for skill in self.sandbox.skills() if skill.id not in taken}
        pipe = self.redis.pipeline()
        pipe.sadd(self.keys.workers, self.worker_id)
        if routes:
            pipe.hset(self.keys.skills, mapping=routes)  # type: ignore[arg-type]
        pipe.execute()
        self._beat = threading.Thread(target=self._beat_loop, name="fleet-heartbeat",
                                      daemon=True)
        self._beat.start()
        self._listener = threading.Thread(target=self._cancel_loop, name="fleet-cancels",
                                          daemon=True)
        self._listener.start()

    def _routed_elsewhere(self) -> dict[str, str]:
        """Our skills whose route names another queue with a live worker holding them."""
        ours = [skill.id for skill in self.sandbox.skills()]
        if not ours:
            return {}
        current = self.redis.hmget(self.keys.skills, ours)
        alive, _gone = live_workers(self.redis, self.keys)
        taken = {}
        for skill_id, data in zip(ours, current, strict=True):
            if data is None:
                continue
            queue = decode_route(data).queue
            if queue != self.queue and any(worker.queue == queue and skill_id in worker.skills
                                           and worker.worker_id != self.worker_id
                                           for worker in alive):
                taken[skill_id] = queue
        return taken

    def set_draining(self) -> None:
        with self._lock:
            self.info.draining = True
        self.beat()

    def stop(self) -> None:
        """Stop the heartbeat and leave the fleet (after the drain: nothing runs here now)."""
        self._stop.set()
        for thread in (self._beat, self._listener):
            if thread is not None:
                thread.join(timeout=5.0)
        try:
            pipe = self.redis.pipeline()
            pipe.delete(self.keys.worker(self.worker_id))
            pipe.srem(self.keys.workers, self.worker_id)
            pipe.execute()
        except Exception:  # noqa: BLE001 - Redis gone at exit: the TTL cleans up instead
            _log.warning("could not deregister worker %s from Redis", self.worker_id)

    def beat(self) -> None:
        with self._lock:
            payload = encode(self.info)
        self.redis.set(self.keys.worker(self.worker_id), payload,
                       px=int(self.heartbeat_ttl * 1000))

    def _beat_loop(self) -> None:
        period = self.heartbeat_ttl / 3
        while not self._stop.wait(period):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a Redis hiccup: try again next period
                _log.warning("heartbeat of %s failed; retrying", self.worker_id, exc_info=True)

    # -- cancellation ---------------------------------------------------------------------

    def _cancel_loop(self) -> None:
        """Listen for cancelled deliveries until stopped; resubscribe after a Redis hiccup and
        then look up the cancel keys of what runs here (a message sent meanwhile is lost)."""
        pubsub = None
        while not self._stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self.redis.pubsub(  # type: ignore[no-untyped-call]
                        ignore_subscribe_messages=True)
                    pubsub.subscribe(self.keys.cancels)
                    with self._lock:
                        running = list(self._running)
                    for delivery in running:
                        if self.redis.exists(self.keys.cancel(delivery)):
                            self.request_cancel(delivery)
                message = pubsub.get_message(timeout=CANCEL_RETRY)
                if message is not None and message.get("type") == "message":
                    self.request_cancel(text(message["data"]))
                self._cancel_pending()
            except Exception:  # noqa: BLE001 - Redis gone for a moment: listen again
                _log.warning("cancel listener of %s lost Redis; reconnecting", self.worker_id,
                             exc_info=True)
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                pubsub = None
                self._stop.wait(CANCEL_RETRY)
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def request_cancel(self, delivery: str) -> None:
        """Cancel `delivery` if it runs here (every worker hears every cancel)."""
        with self._lock:
            if delivery in self._running:
                self._to_cancel.add(delivery)
        self._cancel_pending()

    def _cancel_pending(self) -> None:
        """A delivery claimed but not yet in the sandbox's hands cannot be cancelled there:
        it stays pending, and is tried again every `CANCEL_RETRY` until it can."""
        with self._lock:
            pending = [(delivery, self._running.get(delivery)) for delivery in self._to_cancel]
        for delivery, request_id in pending:
            if request_id is None or self.sandbox.cancel(request_id):
                with self._lock:
                    self._to_cancel.discard(delivery)
                if request_id is not None:
                    _log.info("cancelled delivery %s of request %s at its client's request",
                              delivery, request_id)

    # -- the task -------------------------------------------------------------------------

    def handle(self, payload: str) -> None:
        try:
            envelope = decode_envelope(payload)
        except msgspec.DecodeError:
            _log.error("dropped an undecodable fleet message (%d bytes)", len(payload))
            return
        claim = self.keys.claim(envelope.delivery)
        keep = max(1, int(envelope.expires - time.time() + KEEP_AFTER_DEADLINE))
        with self._lock:  # before the claim: a cancel that follows it finds the delivery here
            self._running[envelope.delivery] = envelope.request.request_id
        try:
            self._claim_and_answer(envelope, claim, keep)
        finally:
            with self._lock:
                del self._running[envelope.delivery]
                self._to_cancel.discard(envelope.delivery)

    def _claim_and_answer(self, envelope: Envelope, claim: str, keep: int) -> None:
        if not self.redis.set(claim, self.worker_id, nx=True, ex=keep):
            # Delivered twice, or its client gave up: whoever holds the claim answers it.
            with self._lock:
                self.info.dropped += 1
            if self.metrics is not None:
                self.metrics.dropped.inc()
            _log.info("dropped delivery %s of request %s: already claimed by %s",
                      envelope.delivery, envelope.request.request_id,
                      self.redis.get(claim))
            return
        with self._lock:
            self.info.inflight += 1
        claimed = time.monotonic()
        if self.metrics is not None:
            self.metrics.inflight.inc()
        try:
            result = self._run(envelope.request, envelope.expires)
        except Exception as exc:  # noqa: BLE001 - the claim promised an answer: give one
            _log.exception("fleet worker failed running %s", envelope.request.request_id)
            result = ExecutionResult(
                status=ExecutionStatus.FAILED, error_kind=ErrorKind.WORKER_FAILURE,
                error=f"runtime: worker failure: {type(exc).__name__}: {exc}",
                request_id=envelope.request.request_id, skill_id=envelope.request.skill_id)
        finally:
            with self._lock:
                self.info.inflight -= 1
                self.info.executed += 1
            if self.metrics is not None:
                self.metrics.inflight.dec()
        result = msgspec.structs.replace(result, node=self.node)
        if self.metrics is not None:
            self.metrics.executions(result.skill_id, result.status.value).inc()
            self.metrics.seconds.observe(time.monotonic() - claimed)
        key = self.keys.result(envelope.delivery)
        pipe = self.redis.pipeline()
        pipe.rpush(key, encode(result))
        pipe.expire(key, keep)
        pipe.execute()

    def _run(self, request: ExecutionRequest, expires: float) -> ExecutionResult:
        """Run it with what is left of its deadline; one that expired in the queue is not run.
        A request without a timeout runs with its skill's own, capped by the deadline."""
        left = expires - time.time()
        if left <= 0:
            if self.metrics is not None:
                self.metrics.expired.inc()
            return ExecutionResult(
                status=ExecutionStatus.TIMEOUT, error_kind=ErrorKind.TIMEOUT,
                error=f"{TIMEOUT_ERROR}: its deadline passed while it waited in the queue; "
                      "not run", request_id=request.request_id, skill_id=request.skill_id)
        timeout = request.timeout
        if timeout is None or timeout > 0:  # a non-positive one is rejected by the sandbox
            skill = self.sandbox.get_skill(request.skill_id)
            own = skill.manifest.limits.timeout if skill is not None else left
            timeout = min(left, own if timeout is None else timeout)
        return self.sandbox.execute(msgspec.structs.replace(request, timeout=timeout))


# -- the process ---------------------------------------------------------------------------------


def build_sandbox(config: DaemonConfig, node: str, *, breaker: Any = None,
                  policy: Any = None) -> tuple[Sandbox, list[str], Any]:
    """A `Sandbox` with the config's skills, isolation and execution log (stamped with the
    node). Returns it, the skill directories that failed to load, and the log to close."""
    from sandbox.daemon.config import ConfigError
    from sandbox.daemon.logquery import open_logger
    from sandbox.daemon.skills import discover
    from sandbox.sandbox import Sandbox

    log = None
    if config.execution_log:
        try:
            log = open_logger(config.execution_log)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"field 'execution_log': cannot open {config.execution_log}: "
                              f"{exc}") from None
    sandbox = Sandbox(max_concurrency=config.max_concurrency,
                      workdir_root=str(config.workdir_root) if config.workdir_root else None,
                      policy=policy, circuit_breaker=breaker if breaker is not None else False,
                      logger=NodeLogger(log, node) if log is not None else None,
                      isolation=config.isolation.to_config(),
                      max_zygotes=config.max_zygotes or None,
                      max_wasm_compiles=config.max_wasm_compiles or None,
                      zygote_idle_ttl=config.zygote_idle_ttl or None,
                      base_zygote=config.base_zygote)
    found = discover(config.skills, config.limits)
    errors = list(found.errors)
    for item in found.skills.values():
        try:
            sandbox.load_skill(item.skill)
        except Exception as exc:  # noqa: BLE001 - one broken skill does not stop the worker
            errors.append(f"{item.skill.id}: {exc}")
    return sandbox, errors, log


def run_worker(config: DaemonConfig, *, broker: str, redis_url: str | None = None,
               node: str | None = None, group: str = DEFAULT_GROUP,
               prefix: str = DEFAULT_PREFIX, pool: Pool = "threads",
               heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
               visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
               shared_state: bool = True, loglevel: str = "INFO",
               ready_file: Path | None = None, metrics_port: int | None = None) -> int:
    """Run a worker until SIGTERM/SIGINT (Celery's warm shutdown: stop taking messages, let
    the running ones finish, give unstarted prefetched ones back to the queue); then leave
    the fleet and close the sandbox. Returns the exit code."""
    import redis as redis_lib

    if pool not in ("threads", "solo"):
        raise ValueError(f"pool {pool!r}: only 'threads' or 'solo' (prefork would fork the "
                         "supervisor)")
    node = node or default_node()
    client = redis_lib.Redis.from_url(redis_url or broker)
    breaker = policy = None
    if shared_state:
        from sandbox.fleet.state import shared_breaker, shared_policy

        breaker = shared_breaker(config, client, prefix) if config.circuit.enabled else None
        policy = shared_policy(config, client, prefix)
    sandbox, errors, log = build_sandbox(config, node, breaker=breaker, policy=policy)
    for error in errors:
        _log.error("skill not loaded: %s", error)
    metrics = WorkerMetrics(node, metrics_port) if metrics_port is not None else None
    fleet = FleetWorker(sandbox, client, node=node, group=group, prefix=prefix,
                        heartbeat_ttl=heartbeat_ttl, metrics=metrics)
    app = make_celery(broker, visibility_timeout=visibility_timeout)

    @app.task(name=TASK_NAME, ignore_result=True, acks_late=False)  # type: ignore[untyped-decorator,unused-ignore]
    def execute(payload: str) -> None:
        fleet.handle(payload)

    from celery import signals

    def on_shutdown(**_: Any) -> None:
        fleet.set_draining()

    signals.worker_shutting_down.connect(on_shutdown, weak=False)
    if ready_file is not None:
        def on_ready(**_: Any) -> None:
            ready_file.write_text(fleet.worker_id, encoding="utf-8")

        signals.worker_ready.connect(on_ready, weak=False)
    concurrency = 1 if pool == "solo" else sandbox.max_concurrency
    try:
        fleet.start()
        worker = app.Worker(pool_cls=pool, concurrency=concurrency, queues=[fleet.queue],
                            hostname=f"{fleet.worker_id}@{node}", loglevel=loglevel,
                            without_gossip=True, without_mingle=True, without_heartbeat=True,
                            optimization="fair")
        worker.start()
        return int(getattr(worker, "exitcode", 0) or 0)
    finally:
        fleet.stop()
        if metrics is not None:
            metrics.close()
        sandbox.close()
        if log is not None:
            log.close()
        client.close()
