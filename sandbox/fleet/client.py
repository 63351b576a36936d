"""`FleetClient`: the `Sandbox` API over a fleet of Celery workers, so code switches with one
line:

    sandbox = Sandbox(skills)                                  # in-process
    sandbox = SandboxClient()                                  # one daemon, over HTTP
    sandbox = FleetClient("redis://10.0.0.7:6379/0")           # the fleet

    result = sandbox.execute(ExecutionRequest(skill_id="examples/echo", input=b'{"x": 1}'))

Every outcome is an `ExecutionResult`, with `node` naming the host that ran it. The request's
timeout (or the client's `timeout` when it has none) covers the whole trip: queueing, running
and answering. What the client answers without a worker's word, always as a result:

- `rejected` / `skill_not_loaded`: no worker ever registered the skill;
- `timeout`: no worker took it before its deadline (the client then claims the delivery
  itself, so it can never run later), or its worker did not answer in time;
- `failed` / `worker_failure`: the worker that took it died mid-run (its heartbeat vanished).
  At most once: it is not run again — unless the skill's manifest says `idempotent = true`,
  in which case it is sent again (a new delivery) while its deadline allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from sandbox.client import _input_problem
from sandbox.errors import SkillNotLoaded
from sandbox.execution import CANCELED_ERROR, TIMEOUT_ERROR, WORKER_ERROR
from sandbox.fleet.protocol import (
    ABANDONED,
    DEFAULT_PREFIX,
    KEEP_AFTER_DEADLINE,
    TASK_NAME,
    Envelope,
    Keys,
    SkillRoute,
    decode_result,
    decode_route,
    encode,
    live_workers,
    text,
)
from sandbox.llm import Generation, LLMError, LLMProvider, as_provider
from sandbox.llm import call as call_llm
from sandbox.planrun import arun_plan, run_plan
from sandbox.plans import ExecutionContext, ExecutionPlan, StepResult
from sandbox.tools import ToolRegistry, ToolRunner
from worker.protocol import ErrorKind, ExecutionRequest, ExecutionResult, ExecutionStatus

if TYPE_CHECKING:
    from sandbox.execlog.records import ExecutionLogger, StepInfo
    from sandbox.skill import Skill

_log = logging.getLogger("sandbox.fleet")
DEFAULT_TIMEOUT = 300.0
#: Seconds beyond a request's deadline the client waits for its worker's answer to arrive.
ANSWER_GRACE = 5.0
#: How often (seconds) a waiting client looks at its worker's heartbeat.
POLL = 0.5


@dataclass(frozen=True)
class _Died:
    worker_id: str


def node_of(worker_id: str) -> str:
    """The node part of a worker id (`node.pid.random`)."""
    return worker_id.rsplit(".", 2)[0]


class FleetClient:
    """Sends executions to the fleet's workers and waits for their answers. Thread-safe.

    `broker`: the Redis URL the workers use (default: `SKILL_SANDBOX_BROKER`); `redis_url`
    where the fleet's keys live, if another Redis (default: the broker). `timeout`: deadline of
    a request that has none. `max_attempts`: sends of an idempotent skill's request whose
    worker died (others are sent once). Plans run here, their skill steps on the fleet; tools
    registered here and the `llm` provider run in this process, as with `Sandbox`.
    """

    def __init__(self, broker: str | None = None, *, redis_url: str | None = None,
                 prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_TIMEOUT,
                 max_attempts: int = 3, answer_grace: float = ANSWER_GRACE,
                 poll: float = POLL, llm: LLMProvider | Callable[..., Any] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        import redis

        from sandbox.fleet.worker import make_celery

        env = os.environ if env is None else env
        broker = broker or env.get("SKILL_SANDBOX_BROKER")
        if not broker:
            raise ValueError("no broker: pass FleetClient('redis://HOST:PORT/DB') or set "
                             "SKILL_SANDBOX_BROKER")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        self.broker = broker
        self.keys = Keys(prefix)
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.answer_grace = answer_grace
        self.poll = poll
        self.llm = as_provider(llm)
        self.tools = ToolRegistry()
        self.logger: ExecutionLogger | None = None  # executions are logged on their node
        self.app = make_celery(broker)
        self.redis = redis.Redis.from_url(redis_url or broker)
        #: request id -> the abandon events of this client's executions waiting under it
        self._waiting: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = False

    # -- the `Sandbox` shape --------------------------------------------------------------

    def execute(self, request: ExecutionRequest, *,
                step: StepInfo | None = None) -> ExecutionResult:
        """Run one execution on the fleet; every outcome is a result, as in-process."""
        return self._execute(request, threading.Event())

    async def aexecute(self, request: ExecutionRequest, *,
                       step: StepInfo | None = None) -> ExecutionResult:
        """`execute` for asyncio. Cancelling the awaiting task cancels the request (`cancel`)
        and waits for that to be settled before `CancelledError` propagates."""
        abandon = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self._execute, request, abandon))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            abandon.set()
            await asyncio.wait([task])
            raise

    def execute_plan(self, plan: ExecutionPlan,
                     ec: ExecutionContext | None = None) -> list[StepResult]:
        """Run the plan here, each skill step on the fleet (see `Sandbox.execute_plan`)."""
        return run_plan(self, plan, ec or ExecutionContext(assistant_id=plan.assistant_id))

    async def aexecute_plan(self, plan: ExecutionPlan,
                            ec: ExecutionContext | None = None) -> list[StepResult]:
        return await arun_plan(self, plan, ec or ExecutionContext(assistant_id=plan.assistant_id))

    def can_execute(self, skill_id: str) -> bool:
        return self._route(skill_id) is not None

    def get_skill(self, skill_id: str) -> Skill | None:
        """Skills live on the workers: the client holds none (plans then pass their time left
        as each step's timeout, and the worker caps it by the skill's own)."""
        return None

    def cancel(self, request_id: str) -> bool:
        """Cancel this client's executions of `request_id`: one still queued never runs; one a
        worker runs is killed there, and answered `canceled` by that worker. False if none of
        this client's executions waits under that id."""
        with self._lock:
            events = list(self._waiting.get(request_id, ()))
        for event in events:
            event.set()
        return bool(events)

    def register_tool(self, name: str, tool: Callable[..., Any] | ToolRunner) -> None:
        self.tools.register(name, tool)

    def has_tool(self, name: str) -> bool:
        return name in self.tools

    def generate(self, prompt: str, *, deadline: float, max_tokens: int | None = None,
                 canceled: Callable[[], bool] = lambda: False) -> Generation:
        if self.llm is None:
            raise LLMError("no LLM provider is configured (FleetClient(llm=...))")
        return call_llm(self.llm, prompt, deadline=deadline, max_tokens=max_tokens,
                        canceled=canceled)

    # -- the fleet ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Live workers (from their heartbeats), skills and where they are routed, and how many
        messages wait in each queue."""
        workers, gone = live_workers(self.redis, self.keys)
        if gone:  # heartbeats expired: they left without saying so (killed)
            self.redis.srem(self.keys.workers, *gone)
        routes = {text(key): decode_route(value)
                  for key, value in self.redis.hgetall(self.keys.skills).items()}
        queues = sorted({route.queue for route in routes.values()} |
                        {worker.queue for worker in workers})
        depths = {queue: int(self.redis.llen(queue)) for queue in queues}
        return {
            "workers": [{"worker_id": w.worker_id, "node": w.node, "pid": w.pid,
                         "queue": w.queue, "skills": w.skills, "concurrency": w.concurrency,
                         "inflight": w.inflight, "executed": w.executed, "dropped": w.dropped,
                         "draining": w.draining, "unrouted": w.unrouted,
                         "up_s": round(time.time() - w.started, 1)}
                        for w in workers],
            # `workers`: live ones on the routed queue; `unrouted_on`: queues whose live
            # workers hold the skill too but never get its requests (it is another group's)
            "skills": {skill_id: {"queue": route.queue, "idempotent": route.idempotent,
                                  "workers": sum(1 for w in workers if skill_id in w.skills
                                                 and w.queue == route.queue),
                                  "unrouted_on": sorted({w.queue for w in workers
                                                         if skill_id in w.skills
                                                         and w.queue != route.queue})}
                       for skill_id, route in sorted(routes.items())},
            "queues": depths,
        }

    def _route(self, skill_id: str) -> SkillRoute | None:
        data = self.redis.hget(self.keys.skills, skill_id)
        return None if data is None else decode_route(data)

    def _execute(self, request: ExecutionRequest, abandon: threading.Event) -> ExecutionResult:
        with self._lock:
            self._waiting.setdefault(request.request_id, []).append(abandon)
        try:
            return self._send(request, abandon)
        finally:
            with self._lock:
                events = self._waiting[request.request_id]
                events.remove(abandon)
                if not events:
                    del self._waiting[request.request_id]

    def _send(self, request: ExecutionRequest, abandon: threading.Event) -> ExecutionResult:
        problem = _input_problem(request)
        if problem is not None:
            return problem
        route = self._route(request.skill_id)
        if route is None:
            return _answer(request, ExecutionStatus.REJECTED, ErrorKind.SKILL_NOT_LOADED,
                           f"{SkillNotLoaded.message}: no fleet worker holds it")
        budget = request.timeout if request.timeout is not None else self.timeout
        expires = time.time() + budget
        attempts = self.max_attempts if route.idempotent else 1
        for attempt in range(attempts):
            delivery = uuid.uuid4().hex
            envelope = Envelope(request=request, delivery=delivery, expires=expires,
                                attempt=attempt)
            self.app.send_task(TASK_NAME, args=[encode(envelope)], queue=route.queue)
            outcome = self._wait(request, delivery, expires, budget, abandon)
            if isinstance(outcome, ExecutionResult):
                return outcome
            node = node_of(outcome.worker_id)
            if attempt + 1 < attempts and time.time() < expires:
                _log.warning("worker %s died running idempotent %s (request %s): sending it "
                             "again", outcome.worker_id, request.skill_id, request.request_id)
                continue
            retried = f" after {attempt + 1} attempts" if attempts > 1 else \
                " (at most once: not run again; the skill is not idempotent)"
            return _answer(request, ExecutionStatus.FAILED, ErrorKind.WORKER_FAILURE,
                           f"{WORKER_ERROR}: fleet worker {outcome.worker_id} on node {node} "
                           f"died while running it{retried}", node=node)
        raise AssertionError("unreachable")  # pragma: no cover

    def _wait(self, request: ExecutionRequest, delivery: str, expires: float, budget: float,
              abandon: threading.Event) -> ExecutionResult | _Died:
        """The answer, or the worker that died holding the claim. Past the deadline (plus the
        grace an answer needs to arrive) the client claims the delivery itself: if it wins, no
        worker can ever run it; if a worker holds it, that worker overran."""
        claim, key = self.keys.claim(delivery), self.keys.result(delivery)
        deadline = expires + self.answer_grace
        while not abandon.is_set():
            left = deadline - time.time()
            if left <= 0:
                break
            item = self.redis.blpop([key], timeout=max(0.01, min(self.poll, left)))
            if item is not None:
                return decode_result(item[1])
            holder = text(self.redis.get(claim))
            if not holder or holder == ABANDONED:
                continue
            if not self.redis.exists(self.keys.worker(holder)):
                late = self.redis.lpop(key)  # it answered just before it went
                if isinstance(late, bytes):
                    return decode_result(late)
                return _Died(holder)
        keep = int(KEEP_AFTER_DEADLINE)
        if self.redis.set(claim, ABANDONED, nx=True, ex=keep):
            if abandon.is_set():
                return _answer(request, ExecutionStatus.CANCELED, ErrorKind.CANCELED,
                               CANCELED_ERROR)
            return _answer(request, ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                           f"{TIMEOUT_ERROR}: no fleet worker took it within {budget:g}s "
                           "(queued); it will not run")
        who = text(self.redis.get(claim)) or "?"
        if abandon.is_set():
            return self._cancel_remote(request, delivery, who)
        late = self.redis.lpop(key)
        if isinstance(late, bytes):
            return decode_result(late)
        return _answer(request, ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                       f"{TIMEOUT_ERROR}: fleet worker {who} took it but gave no answer within "
                       f"{budget:g}s", node=node_of(who))

    def _cancel_remote(self, request: ExecutionRequest, delivery: str,
                       who: str) -> ExecutionResult:
        """Tell the worker that claimed `delivery` to kill it, and wait (a grace) for its
        answer: `canceled` from that worker, or what it had already finished with. The key
        outlives a missed message (the worker looks for it after each reconnect)."""
        keep = int(KEEP_AFTER_DEADLINE)
        pipe = self.redis.pipeline()
        pipe.set(self.keys.cancel(delivery), "1", ex=keep)
        pipe.publish(self.keys.cancels, delivery)
        pipe.execute()
        item = self.redis.blpop([self.keys.result(delivery)],
                                timeout=max(1, math.ceil(self.answer_grace)))
        if item is not None:
            return decode_result(item[1])
        if self.redis.exists(self.keys.worker(who)):
            error = (f"{CANCELED_ERROR} (worker {who} was told to stop it and did not answer "
                     f"within {self.answer_grace:g}s)")
        else:
            error = f"{CANCELED_ERROR} (worker {who}, which had taken it, is gone)"
        return _answer(request, ExecutionStatus.CANCELED, ErrorKind.CANCELED, error,
                       node=node_of(who))

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.app.close()
        self.redis.close()
        self.tools.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _answer(request: ExecutionRequest, status: ExecutionStatus, kind: ErrorKind, error: str,
            node: str = "") -> ExecutionResult:
    return ExecutionResult(status=status, error_kind=kind, error=error,
                           request_id=request.request_id, skill_id=request.skill_id, node=node)
