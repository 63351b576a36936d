"""`SandboxClient` / `AsyncSandboxClient`: the `Sandbox` shape over the daemon, errors mapped to
the `SandboxError` family."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_util import EXAMPLES, TOKEN, Daemon, wait_for, write_skill
from tool_registry import serve_registry

from sandbox import Sandbox, SandboxError, SkillNotLoaded
from sandbox.client import (
    AsyncSandboxClient,
    BadRequest,
    DaemonUnavailable,
    SandboxClient,
    Unauthorized,
)
from sandbox.plans import ExecutionContext, ExecutionPlan, ExecutionStep, InvalidPlan, PlanFailed
from worker.protocol import ExecutionRequest


@pytest.fixture(scope="module")
def skills_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("client-skills")
    write_skill(root, "upper", "def run(input):\n    return {'text': input['text'].upper()}\n")
    write_skill(root, "boom", "def run(input):\n    raise ValueError('no')\n")
    write_skill(root, "sleeper", "import time\n\ndef run(input):\n"
                "    time.sleep(input.get('seconds', 0))\n    return 'woke'\n",
                "[limits]\ntimeout = 20\n")
    return root


@pytest.fixture(scope="module")
def daemon(skills_root: Path) -> Iterator[Daemon]:
    item = Daemon([EXAMPLES / "echo", skills_root], tcp=True)
    try:
        yield item.start()
        assert item.stop() == 0
    finally:
        item.close()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[SandboxClient]:
    with daemon.client() as client:
        yield client


def test_client_and_in_process_sandbox_answer_alike(
        client: SandboxClient, skills_root: Path,
        make_sandbox: Callable[..., Sandbox]) -> None:
    local = make_sandbox(EXAMPLES / "echo", skills_root / "upper", skills_root / "boom")
    requests = [ExecutionRequest(skill_id="examples/echo", input=b'{"a": [1, 2]}'),
                ExecutionRequest(skill_id="test/upper", input=b'{"text": "hi"}'),
                ExecutionRequest(skill_id="test/boom"),
                ExecutionRequest(skill_id="nobody/here"),
                ExecutionRequest(skill_id="examples/echo", input=b"{oops"),
                ExecutionRequest(skill_id="examples/echo", timeout=-1)]
    for request in requests:
        for target in (local, client):
            assert target.can_execute(request.skill_id) == (request.skill_id != "nobody/here")
        remote, here = client.execute(request), local.execute(request)
        assert remote.status is here.status, request
        assert remote.json() == (here.json() if here.output else None)
        assert remote.error.split(":")[:2] == here.error.split(":")[:2]
        assert remote.request_id == request.request_id
        assert remote.skill_id == request.skill_id


def test_raise_for_status_maps_to_the_error_family(client: SandboxClient) -> None:
    with pytest.raises(SkillNotLoaded):
        client.execute(ExecutionRequest(skill_id="nobody/here")).raise_for_status()
    with pytest.raises(SkillNotLoaded):
        client.skill("nobody/here")


def test_execute_plan_over_the_daemon(client: SandboxClient) -> None:
    plan = ExecutionPlan(assistant_id="a1", steps=[
        ExecutionStep(name="examples/echo", type="skill", arguments={"text": "abc"}),
        ExecutionStep(name="test/upper", type="skill",
                      arguments={"text": "{{examples/echo.text}}"}),
    ])
    ec = ExecutionContext(assistant_id="a1", tenant_id="acme", timeout=20)
    results = client.execute_plan(plan, ec)
    assert [result.output for result in results] == [{"text": "abc"}, {"text": "ABC"}]
    assert [result.step_name for result in ec.results()] == ["examples/echo", "test/upper"]
    assert results[1].execution is not None and results[1].execution.ok
    assert results[1].execution.request_id == ec.request_id


def test_execute_plan_raises_like_the_sandbox(client: SandboxClient) -> None:
    failing = ExecutionPlan(assistant_id="a1", steps=[
        ExecutionStep(name="examples/echo", type="skill", arguments={}),
        ExecutionStep(name="test/boom", type="skill", arguments={}),
    ])
    with pytest.raises(PlanFailed) as failed:
        client.execute_plan(failing)
    assert failed.value.step_result.step_name == "test/boom"
    assert "ValueError: no" in failed.value.step_result.error
    assert len(failed.value.results) == 2
    invalid = ExecutionPlan(assistant_id="a1", steps=[
        ExecutionStep(name="nobody/here", type="skill", arguments={})])
    with pytest.raises(InvalidPlan, match="is not loaded"):
        client.execute_plan(invalid)


def test_operator_calls(client: SandboxClient) -> None:
    assert client.health()["status"] == "ok"
    assert client.ready()
    assert {skill["id"] for skill in client.skills()} == {"examples/echo", "test/upper",
                                                          "test/boom", "test/sleeper"}
    status = client.status()
    assert status["status"] == "ok" and status["inflight"] == 0
    report = client.reload()
    assert report["errors"] == [] and report["added"] == []
    assert sorted(report["unchanged"]) == ["examples/echo", "test/boom", "test/sleeper",
                                           "test/upper"]
    request = ExecutionRequest(skill_id="examples/echo", input=b'{"logged": true}')
    client.execute(request)
    [record] = client.execution(request.request_id)
    assert record["output"] == {"logged": True}
    assert "skill_sandbox_executions_total" in client.metrics()
    assert not client.cancel("not-running")


def _public(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


def test_the_async_client_has_every_call_of_the_sync_one() -> None:
    sync_only = {"close"}  # the async client closes with `aclose`, as httpx's does
    assert _public(SandboxClient) - sync_only <= _public(AsyncSandboxClient)


def _steady(info: dict[str, Any]) -> dict[str, Any]:
    """A skill's detail without what moves between two calls (its zygote's memory now)."""
    zygote = {key: value for key, value in info["zygote"].items()
              if key not in ("rss_kb", "pss_kb")}
    return {**info, "zygote": zygote}


def test_the_async_client_answers_the_operator_calls_like_the_sync_one(
        daemon: Daemon, client: SandboxClient) -> None:
    request = ExecutionRequest(skill_id="examples/echo", input=b'{"async": true}')
    client.execute(request)

    async def main() -> None:
        async with AsyncSandboxClient(daemon.socket, env={}) as aclient:
            assert await aclient.health() == client.health()
            assert await aclient.ready() is True
            assert _steady(await aclient.skill("test/upper")) == \
                _steady(client.skill("test/upper"))
            assert await aclient.execution(request.request_id) == \
                client.execution(request.request_id)
            assert await aclient.executions(request_id=request.request_id) == \
                client.executions(request_id=request.request_id)
            assert not await aclient.cancel("not-running")

    asyncio.run(main())


def test_tcp_client_needs_the_right_token(daemon: Daemon) -> None:
    url = f"http://{daemon.tcp_address}"
    with pytest.raises(Unauthorized, match="needs a bearer token"):
        SandboxClient(url=url, env={})
    with SandboxClient(url=url, token="z" * 24, env={}) as wrong, \
            pytest.raises(Unauthorized, match="invalid bearer token"):
        wrong.execute(ExecutionRequest(skill_id="examples/echo"))
    with SandboxClient(url=url, env={"SKILL_SANDBOX_TOKEN": TOKEN}) as right:
        assert right.execute(ExecutionRequest(skill_id="examples/echo")).ok


def test_no_daemon_is_daemon_unavailable(tmp_path: Path) -> None:
    with SandboxClient(tmp_path / "absent.sock", env={}) as client:
        with pytest.raises(DaemonUnavailable, match=r"absent\.sock") as raised:
            client.execute(ExecutionRequest(skill_id="examples/echo"))
        assert isinstance(raised.value, SandboxError)
        with pytest.raises(DaemonUnavailable):
            client.status()


def test_a_bad_request_id_is_a_bad_request_naming_the_field(client: SandboxClient) -> None:
    with pytest.raises(BadRequest) as raised:
        client.execute(ExecutionRequest(skill_id="examples/echo", request_id="no spaces"))
    assert raised.value.status_code == 422
    assert raised.value.problems[0]["field"] == "request_id"


def test_the_environment_chooses_the_socket(daemon: Daemon) -> None:
    with SandboxClient(env={"SKILL_SANDBOX_SOCKET": str(daemon.socket)}) as client:
        assert client.execute(ExecutionRequest(skill_id="examples/echo")).ok


def test_async_client_runs_concurrently_and_plans(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncSandboxClient(daemon.socket, env={}) as client:
            results = await asyncio.gather(*(
                client.execute(ExecutionRequest(skill_id="test/upper",
                                                input=f'{{"text": "n{i}"}}'.encode()))
                for i in range(6)))
            assert [result.json() for result in results] == \
                [{"text": f"N{i}"} for i in range(6)]
            assert await client.can_execute("test/upper")
            assert not await client.can_execute("nobody/here")
            plan = ExecutionPlan(assistant_id="a", steps=[
                ExecutionStep(name="test/upper", type="skill", arguments={"text": "x"})])
            [step] = await client.aexecute_plan(plan)
            assert step.output == {"text": "X"}

    asyncio.run(main())


def test_cancelling_an_async_call_cancels_the_execution(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncSandboxClient(daemon.socket, env={}) as client:
            task = asyncio.create_task(client.execute(ExecutionRequest(
                skill_id="test/sleeper", input=b'{"seconds": 15}', request_id="async-gone")))
            for _ in range(500):
                if (await client.status())["running"] == 1:
                    break
                await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    wait_for(lambda: daemon.find_events("caller disconnected; execution canceled",
                                        request_id="async-gone"), what="the cancel")
    with daemon.client() as client:
        wait_for(lambda: client.status()["inflight"] == 0, what="nothing in flight")


# -- retry policies and the fallback tool travel with the plan -----------------------------------


def test_retry_policy_and_fallback_tool_apply_over_the_daemon(skills_root: Path) -> None:
    """The policy is run configuration, not plan JSON: the client sends it beside the plan, the
    daemon retries the failing skill, then calls its registered fallback tool; each step comes
    back with its step_id, retries and fallback flag, as in-process."""
    from sandbox.plans import RetryPolicy

    with serve_registry() as registry:
        url = f"http://127.0.0.1:{registry.server_address[1]}/"
        item = Daemon([EXAMPLES / "echo", skills_root], tcp=True,
                      args=["--tools", f"builtin.cached={url}"])
        try:
            with item.start().client() as client:
                plan = ExecutionPlan.from_dict({"assistant_id": "a1", "steps": [
                    {"type": "skill", "name": "test/boom", "step_id": "s-boom",
                     "arguments": {"q": 1}},
                    {"type": "skill", "name": "examples/echo", "step_id": "s-echo",
                     "arguments": {"n": "2"}}]}, dialect="openbotstack")
                plan.step_retry = {"test/boom": RetryPolicy(
                    max_retries=2, initial_backoff=0.01, max_backoff=0.02,
                    fallback_tool="builtin.cached")}
                results = client.execute_plan(plan, ExecutionContext(timeout=30))
                runs = client.executions(skill_id="test/boom")
            assert [(r.step_name, r.step_id, r.retries, r.fallback) for r in results] == [
                ("test/boom", "s-boom", 2, True), ("examples/echo", "s-echo", 0, False)]
            assert results[0].output["echo"] == {"q": 1}
            assert results[1].output == {"n": 2}  # the plan went on after the fallback
            assert len(runs) == 3  # the first run and two retries, each a real execution
            assert [path for path, _ in registry.received] == ["/invoke"]
        finally:
            assert item.stop() == 0
            item.close()


def test_a_step_retry_naming_no_step_or_a_missing_fallback_is_refused(
        client: SandboxClient) -> None:
    from sandbox.plans import RetryPolicy

    plan = ExecutionPlan(assistant_id="a1", steps=[
        ExecutionStep(name="examples/echo", type="skill", arguments={})])
    plan.step_retry = {"exmaples/echo": RetryPolicy(max_retries=1)}
    with pytest.raises(InvalidPlan, match="step_retry names no step of the plan: 'exmaples/echo'"):
        client.execute_plan(plan)
    plan.step_retry = {}
    plan.retry = RetryPolicy(max_retries=1, fallback_tool="builtin.nowhere")
    with pytest.raises(InvalidPlan, match=r"fallback tool 'builtin\.nowhere' is not registered"):
        client.execute_plan(plan)
