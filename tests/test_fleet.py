"""The fleet: Celery workers on a real redis-server (127.0.0.1, a free port, started here), two
worker processes standing for two hosts, and `FleetClient` as the caller.

"Never run twice" is proven from the workers' own execution logs (one record per execution
the supervisor ran, stamped with the node): a request id appears in at most one record across
both nodes, and a request answered as lost with its worker appears in none.
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import psutil
import pytest

from tests.conftest import slow, wait_until_gone
from tests.fleet_util import NEEDS_REDIS, RedisServer, Worker

pytest.importorskip("celery", reason="the fleet extra (celery) is not installed")
pytest.importorskip("redis", reason="the fleet extra (redis) is not installed")

from sandbox.fleet import FleetClient
from sandbox.fleet.protocol import TASK_NAME, Envelope, Keys, encode, queue_name, text
from worker.protocol import ErrorKind, ExecutionRequest, ExecutionResult, ExecutionStatus

pytestmark = NEEDS_REDIS

SKILLS = {
    "echo": ("def run(input):\n    return input\n", ""),
    "slow": ("import time\n\ndef run(input):\n    time.sleep(input['seconds'])\n"
             "    return {'slept': input['seconds']}\n", "[limits]\ntimeout = 30\n"),
    "idem": ("import time\n\ndef run(input):\n    time.sleep(input['seconds'])\n"
             "    return {'slept': input['seconds']}\n",
             "idempotent = true\n[limits]\ntimeout = 30\n"),
    "fail": ("def run(input):\n    raise ValueError('always')\n", ""),
}


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def fleet_skills(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet-skills")
    for name, (code, extra) in SKILLS.items():
        directory = root / name
        directory.mkdir()
        (directory / "main.py").write_text(code)
        (directory / "skill.toml").write_text(
            f'id = "fleet/{name}"\nentrypoint = "main:run"\n{extra}')
    return root


@pytest.fixture
def prefix() -> str:
    """Each test its own fleet (key prefix) on the shared server."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def start_worker(redis_server: RedisServer, fleet_skills: Path, tmp_path: Path,
                 prefix: str) -> Iterator[Callable[..., Worker]]:
    started: list[Worker] = []

    def start(node: str, **options: object) -> Worker:
        worker = Worker(redis_server.url, fleet_skills, node, tmp_path, prefix,
                        **options)  # type: ignore[arg-type]
        started.append(worker)
        return worker

    yield start
    pids: set[int] = set()
    for worker in started:
        pids |= worker.tree()
        if worker.proc.poll() is None:
            worker.terminate()
    for pid in wait_until_gone(pids, timeout=10):  # left by a killed one: ours to end
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[FleetClient]:
    with FleetClient(redis_server.url, prefix=prefix, poll=0.2, answer_grace=3.0) as fleet:
        yield fleet


def request(skill: str, payload: object, timeout: float | None = 20.0) -> ExecutionRequest:
    return ExecutionRequest(skill_id=f"fleet/{skill}", input=msgspec.json.encode(payload),
                            timeout=timeout)


def executions(*workers: Worker) -> collections.Counter[str]:
    """How many times each request id was run, from the nodes' own execution logs."""
    return collections.Counter(str(record["request_id"]) for worker in workers
                               for record in worker.records())


@pytest.mark.timeout(180)
def test_many_executions_spread_over_two_workers_each_run_and_answered_once(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    a, b = start_worker("host-a"), start_worker("host-b")
    requests = [request("echo", {"n": n}) for n in range(500)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(client.execute, requests))
    assert [r.status for r in results] == [ExecutionStatus.SUCCESS] * 500, \
        [r.error for r in results if not r.ok][:3]
    assert [r.json() for r in results] == [{"n": n} for n in range(500)]
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert {r.node for r in results} == {"host-a", "host-b"}  # both hosts took work
    counts = executions(a, b)
    assert set(counts) == {r.request_id for r in requests}
    assert max(counts.values()) == 1
    by_node = {str(rec["request_id"]): rec["node"] for w in (a, b) for rec in w.records()}
    assert all(by_node[r.request_id] == r.node for r in results)  # log and result agree


@pytest.mark.timeout(120)
def test_kill_9_of_a_worker_mid_run_answers_every_request_once_and_runs_none_twice(
        start_worker: Callable[..., Worker], client: FleetClient, redis_server: RedisServer,
        prefix: str) -> None:
    a, b = start_worker("host-a"), start_worker("host-b")
    requests = [request("slow", {"seconds": 1.0}, timeout=40) for _ in range(12)]
    answers: dict[str, list[object]] = collections.defaultdict(list)
    lock = threading.Lock()

    def run(req: ExecutionRequest) -> None:
        result = client.execute(req)
        with lock:
            answers[req.request_id].append(result)

    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = [pool.submit(run, req) for req in requests]
        # wait until host-a is running some of them, then the host dies
        keys, deadline = Keys(prefix), time.monotonic() + slow(30)
        while time.monotonic() < deadline:
            holders = [client.redis.get(key) for key in client.redis.scan_iter(keys.claim("*"))]
            if sum(1 for h in holders if text(h) == a.worker_id) >= 2:
                break
            time.sleep(0.05)
        else:
            pytest.fail("host-a never claimed two requests")
        tree = a.tree()
        a.kill()
        for future in futures:
            future.result(timeout=slow(60))
    assert not wait_until_gone(tree, timeout=10), "the dead host's zygotes outlived it"

    assert set(answers) == {req.request_id for req in requests}
    assert all(len(got) == 1 for got in answers.values())  # exactly one answer each
    results = {rid: got[0] for rid, got in answers.items()}
    lost = {rid for rid, r in results.items() if not r.ok}  # type: ignore[attr-defined]
    assert lost, "no request was in flight on the killed host: the test proved nothing"
    counts = executions(a, b)
    died_with_it = set()
    for rid in lost:
        result = results[rid]
        if result.status is ExecutionStatus.TIMEOUT:  # type: ignore[attr-defined]
            # The known window (docs/deployment.md): host-a had taken the message (Celery
            # acknowledges on start) but died before claiming it. Nothing can run it any more:
            # answered at its deadline, and it never ran anywhere.
            assert "no fleet worker took it" in result.error, result  # type: ignore[attr-defined]
            assert counts[rid] == 0
            continue
        assert result.status is ExecutionStatus.FAILED, result  # type: ignore[attr-defined]
        assert result.error_kind is ErrorKind.WORKER_FAILURE  # type: ignore[attr-defined]
        assert "died while running it" in result.error  # type: ignore[attr-defined]
        assert result.node == "host-a"  # type: ignore[attr-defined]
        died_with_it.add(rid)
    assert died_with_it, "no request was answered as lost with its worker"
    assert max(counts.values(), default=0) <= 1  # none ran twice
    assert not lost & set(executions(b)), "a request lost with host-a ran again on host-b"
    for rid, result in results.items():
        if result.ok:  # type: ignore[attr-defined]
            assert counts[rid] == 1


@pytest.mark.timeout(60)
def test_a_delivery_sent_twice_runs_once(start_worker: Callable[..., Worker],
                                         client: FleetClient) -> None:
    """Celery may deliver a message twice (a restored unacknowledged message); the claim key
    makes the second delivery a no-op. The duplicate is sent by hand here."""
    a = start_worker("host-a")
    req = request("echo", {"twice": True})
    envelope = Envelope(request=req, delivery=uuid.uuid4().hex, expires=time.time() + 20)
    for _ in range(2):
        client.app.send_task(TASK_NAME, args=[encode(envelope)], queue=queue_name("default"))
    key = client.keys.result(envelope.delivery)
    item = client.redis.blpop([key], timeout=slow(20))
    assert item is not None
    deadline = time.monotonic() + slow(20)
    while time.monotonic() < deadline:  # both deliveries consumed (one ran, one dropped)
        status = client.status()
        if status["workers"] and status["workers"][0]["dropped"] >= 1 \
                and not status["queues"].get(queue_name("default")):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the duplicate was never consumed: {client.status()}")
    assert executions(a)[req.request_id] == 1
    assert client.redis.llen(key) == 0  # one answer only


@pytest.mark.timeout(60)
def test_a_request_that_expires_in_the_queue_is_answered_timeout_and_never_runs(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    a = start_worker("host-a", concurrency=1)
    blocker = threading.Thread(target=client.execute, args=(request("slow", {"seconds": 3}),))
    blocker.start()
    time.sleep(0.5)  # the only thread is busy for 3 s
    queued = request("echo", {"late": True}, timeout=1.0)
    result = client.execute(queued)
    blocker.join(timeout=slow(30))
    assert result.status is ExecutionStatus.TIMEOUT
    assert result.error_kind is ErrorKind.TIMEOUT
    time.sleep(1.0)  # the worker takes the expired message now, and must drop it
    assert executions(a)[queued.request_id] == 0


@pytest.mark.timeout(60)
def test_unknown_skill_is_rejected_without_a_worker(client: FleetClient) -> None:
    result = client.execute(request("nope", {}))
    assert result.status is ExecutionStatus.REJECTED
    assert result.error_kind is ErrorKind.SKILL_NOT_LOADED


@pytest.mark.timeout(90)
def test_idempotent_skill_is_sent_again_when_its_worker_dies(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    a = start_worker("host-a", concurrency=1)
    req = request("idem", {"seconds": 2.0}, timeout=40)
    outcome: list[object] = []
    thread = threading.Thread(target=lambda: outcome.append(client.execute(req)))
    thread.start()
    deadline = time.monotonic() + slow(20)
    while time.monotonic() < deadline and not any(
            client.redis.get(k) == a.worker_id.encode()
            for k in client.redis.scan_iter(client.keys.claim("*"))):
        time.sleep(0.05)
    a.kill()
    b = start_worker("host-b", concurrency=1)
    thread.join(timeout=slow(60))
    result = outcome[0]
    assert result.ok, result  # type: ignore[attr-defined]
    assert result.node == "host-b"  # type: ignore[attr-defined]
    assert executions(b)[req.request_id] == 1


@pytest.mark.timeout(60)
def test_sigterm_drains_the_running_execution_then_leaves_the_fleet(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    a = start_worker("host-a")
    outcome: list[object] = []
    thread = threading.Thread(
        target=lambda: outcome.append(client.execute(request("slow", {"seconds": 1.5}))))
    thread.start()
    deadline = time.monotonic() + slow(20)
    while time.monotonic() < deadline and not client.status()["workers"][0]["inflight"]:
        time.sleep(0.05)
    assert a.terminate() == 0
    thread.join(timeout=slow(20))
    assert outcome[0].ok, outcome[0]  # type: ignore[attr-defined]
    assert client.status()["workers"] == []
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                   for p in map(_process, a.tree()) if p is not None)


def _claimed_by(client: FleetClient, worker: Worker) -> None:
    """Wait until `worker` has claimed a delivery."""
    deadline = time.monotonic() + slow(20)
    while not any(client.redis.get(key) == worker.worker_id.encode()
                  for key in client.redis.scan_iter(client.keys.claim("*"))):
        if time.monotonic() > deadline:
            pytest.fail(f"{worker.node} never claimed the request")
        time.sleep(0.02)


@pytest.mark.timeout(90)
def test_cancel_kills_the_execution_on_its_worker_which_answers_canceled(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    a = start_worker("host-a", concurrency=1)
    assert not client.cancel("no-such-request")  # nothing of this client waits under it
    req = request("slow", {"seconds": 25}, timeout=40)
    outcome: list[ExecutionResult] = []
    thread = threading.Thread(target=lambda: outcome.append(client.execute(req)))
    thread.start()
    # Cancelled as soon as it is claimed: often before the sandbox has it (the worker keeps
    # trying), sometimes while it runs.
    _claimed_by(client, a)
    assert client.cancel(req.request_id)
    thread.join(timeout=slow(20))
    assert outcome, "the cancelled request was never answered"
    result = outcome[0]
    assert result.status is ExecutionStatus.CANCELED, result
    assert result.node == "host-a", result  # the worker's own answer, not the client's
    assert "did not answer" not in result.error and "is gone" not in result.error
    # The worker's thread is free again (it runs one at a time), well before the 25 s sleep
    # would have ended, and its log says the execution was cancelled.
    follow = client.execute(request("echo", {"after": "cancel"}, timeout=15))
    assert follow.ok and follow.node == "host-a", follow
    assert [r["status"] for r in a.records() if r["request_id"] == req.request_id] \
        == ["canceled"]


@pytest.mark.timeout(90)
def test_cancelling_an_awaiting_task_cancels_the_request_on_its_worker(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    import asyncio

    a = start_worker("host-a", concurrency=1)
    req = request("slow", {"seconds": 25}, timeout=40)

    async def cancel_while_running() -> None:
        task = asyncio.ensure_future(client.aexecute(req))
        await asyncio.to_thread(_claimed_by, client, a)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(asyncio.wait_for(cancel_while_running(), timeout=slow(30)))
    deadline = time.monotonic() + slow(10)
    while not any(r["request_id"] == req.request_id for r in a.records()):
        assert time.monotonic() < deadline, "the cancelled execution was never logged"
        time.sleep(0.05)
    assert [r["status"] for r in a.records() if r["request_id"] == req.request_id] \
        == ["canceled"]


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture
def control_config(tmp_path: Path) -> Path:
    """A worker config: a circuit that opens after 3 failures and stays open, and a tenant
    whose token bucket holds 3 executions and refills about never."""
    (tmp_path / "policy.toml").write_text(
        '[tenants.acme]\nrate_limit = { rate = 0.001, burst = 3 }\n')
    config = tmp_path / "worker.toml"
    config.write_text('policy = "policy.toml"\n[circuit]\nfailure_threshold = 3\n'
                      'cooldown = 600\n')
    return config


def _run_on(start_worker: Callable[..., Worker], node: str, config: Path,
            client: FleetClient, requests: list[ExecutionRequest],
            state: str = "--shared-state") -> list[object]:
    """Start one worker (a host, or the same host restarted), run `requests` on it in order,
    and stop it: each phase runs on exactly one worker, so the test knows who decided."""
    worker = start_worker(node, extra=["--config", str(config), state])
    try:
        return [client.execute(req) for req in requests]
    finally:
        assert worker.terminate() == 0


def _tenant(req: ExecutionRequest, tenant: str) -> ExecutionRequest:
    return msgspec.structs.replace(req, tenant_id=tenant)


@pytest.mark.timeout(120)
def test_circuit_opened_on_one_worker_holds_on_another_and_after_a_restart(
        start_worker: Callable[..., Worker], client: FleetClient, control_config: Path) -> None:
    failures = _run_on(start_worker, "host-a", control_config, client,
                       [request("fail", {}) for _ in range(3)])
    assert [r.error_kind for r in failures] == [ErrorKind.SKILL_FAILED] * 3  # type: ignore[attr-defined]
    on_b = _run_on(start_worker, "host-b", control_config, client, [request("fail", {})])
    again_a = _run_on(start_worker, "host-a", control_config, client, [request("fail", {})])
    for result in (*on_b, *again_a):
        assert result.status is ExecutionStatus.REJECTED, result  # type: ignore[attr-defined]
        assert result.error_kind is ErrorKind.CIRCUIT_OPEN  # type: ignore[attr-defined]
    assert on_b[0].node == "host-b" and again_a[0].node == "host-a"  # type: ignore[attr-defined]
    # other skills are not affected
    ok = _run_on(start_worker, "host-b", control_config, client, [request("echo", {})])
    assert ok[0].ok  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_tenant_rate_limit_holds_across_workers_and_restarts(
        start_worker: Callable[..., Worker], client: FleetClient, control_config: Path) -> None:
    first = _run_on(start_worker, "host-a", control_config, client,
                    [_tenant(request("echo", {"n": n}), "acme") for n in range(2)])
    second = _run_on(start_worker, "host-b", control_config, client,
                     [_tenant(request("echo", {"n": n}), "acme") for n in range(2, 4)])
    third = _run_on(start_worker, "host-a", control_config, client,
                    [_tenant(request("echo", {"n": 4}), "acme"),
                     _tenant(request("echo", {"n": 5}), "other")])
    statuses = [r.status for r in (*first, *second, *third)]  # type: ignore[attr-defined]
    assert statuses == [ExecutionStatus.SUCCESS] * 3 + [ExecutionStatus.REJECTED] * 2 + \
        [ExecutionStatus.SUCCESS]  # burst 3 across both hosts; another tenant unaffected
    assert second[1].error_kind is ErrorKind.POLICY_REJECTED  # type: ignore[attr-defined]
    assert "rate limit" in second[1].error  # type: ignore[attr-defined]
    assert third[0].error_kind is ErrorKind.POLICY_REJECTED  # type: ignore[attr-defined]


@pytest.mark.timeout(120)
def test_control_without_shared_state_each_worker_restarts_its_tenant_budget(
        start_worker: Callable[..., Worker], client: FleetClient, control_config: Path) -> None:
    """The same phases with the in-memory state: the limit does not hold across hosts — the
    failure the shared state exists to prevent, shown so the test above cannot pass
    vacuously."""
    first = _run_on(start_worker, "host-a", control_config, client,
                    [_tenant(request("echo", {"n": n}), "acme") for n in range(3)],
                    state="--local-state")
    second = _run_on(start_worker, "host-b", control_config, client,
                     [_tenant(request("echo", {"n": 3}), "acme")], state="--local-state")
    assert all(r.ok for r in (*first, *second))  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_fleet_status_shows_workers_their_skills_and_queue_depths(
        start_worker: Callable[..., Worker], redis_server: RedisServer, prefix: str) -> None:
    from click.testing import CliRunner

    from sandbox.cli import main

    a = start_worker("host-a")
    result = CliRunner().invoke(main, ["fleet", "status", "--json", "--broker", redis_server.url,
                                       "--prefix", prefix])
    assert result.exit_code == 0, result.output
    data = msgspec.json.decode(result.output)
    assert [(w["node"], w["worker_id"]) for w in data["workers"]] == [("host-a", a.worker_id)]
    assert "fleet/echo" in data["workers"][0]["skills"]
    assert data["skills"]["fleet/idem"] == {"queue": queue_name("default"), "idempotent": True,
                                            "workers": 1, "unrouted_on": []}
    assert data["queues"] == {queue_name("default"): 0}
    text_out = CliRunner().invoke(main, ["fleet", "status", "--broker", redis_server.url,
                                         "--prefix", prefix])
    assert text_out.exit_code == 0 and "host-a" in text_out.output


@pytest.mark.timeout(90)
def test_a_skill_routed_to_a_live_group_is_not_taken_over_by_another_group(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    """A skill belongs to one group. A worker of another group loading it too leaves its route
    alone while the first group has a live worker for it, and says so; once that group is gone,
    the next worker to start routes it to its own queue."""
    a = start_worker("host-a")
    b = start_worker("host-b", extra=["--group", "other"])
    echo = client.status()["skills"]["fleet/echo"]
    assert echo["queue"] == queue_name("default") and echo["workers"] == 1, echo
    assert echo["unrouted_on"] == [queue_name("other")], echo
    [b_info] = [w for w in client.status()["workers"] if w["node"] == "host-b"]
    assert "fleet/echo" in b_info["unrouted"]
    assert "a skill belongs to one group" in b.output.read_text()
    nodes = {client.execute(request("echo", {"n": n})).node for n in range(5)}
    assert nodes == {"host-a"}
    # Control: with group default gone, a new worker of group other takes the route.
    assert a.terminate() == 0
    start_worker("host-c", extra=["--group", "other"])
    assert client.status()["skills"]["fleet/echo"]["queue"] == queue_name("other")
    assert client.execute(request("echo", {"n": "after"})).node in {"host-b", "host-c"}


@pytest.mark.timeout(60)
def test_plan_and_async_execute_run_on_the_fleet_as_in_process(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    import asyncio

    from sandbox.plans import ExecutionContext, ExecutionPlan, ExecutionStep

    start_worker("host-a")
    plan = ExecutionPlan("asst", [
        ExecutionStep("fleet/echo", "skill", {"word": "hello"}),
        ExecutionStep("fleet/echo", "skill", {"again": "{{fleet/echo.word}}"}),
    ])
    ec = ExecutionContext(assistant_id="asst", timeout=30)
    steps = client.execute_plan(plan, ec)
    assert [step.output for step in steps] == [{"word": "hello"}, {"again": "hello"}]
    assert all(step.execution is not None and step.execution.node == "host-a"
               for step in steps)
    result = asyncio.run(client.aexecute(request("echo", {"async": 1})))
    assert result.ok and result.json() == {"async": 1} and result.node == "host-a"


@pytest.mark.timeout(60)
def test_worker_serves_prometheus_metrics_on_loopback(
        start_worker: Callable[..., Worker], client: FleetClient) -> None:
    import urllib.request

    from tests.fleet_util import free_port

    port = free_port()
    start_worker("host-a", extra=["--metrics-port", str(port)])
    assert client.execute(request("echo", {"m": 1})).ok
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert 'skill_sandbox_fleet_executions_total{skill_id="fleet/echo",status="success"} 1.0' \
        in body
    assert 'skill_sandbox_fleet_worker_info{node="host-a"} 1.0' in body
