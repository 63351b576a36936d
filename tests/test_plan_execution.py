"""Running plans through a real Sandbox: skills in workers, tools in-process, one deadline."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from sandbox import (
    CircuitOpen,
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    InMemoryCircuitBreaker,
    InvalidPlan,
    PlanFailed,
    Sandbox,
    StepType,
    ToolContext,
)

DOUBLE = ("def run(input):\n"
          "    return {'value': input['n'] * 2, 'type': type(input['n']).__name__}\n")
GREET = "def run(input):\n    return {'text': 'hello ' + str(input['name'])}\n"
WHOAMI = ("def run(input, ctx):\n    return {'tenant': ctx.tenant_id, 'user': ctx.user_id,\n"
          "            'request': ctx.request_id, 'input': input}\n")
FAIL = "def run(input):\n    raise ValueError('no such city: ' + input.get('city', '?'))\n"
SLOW = ("import time\ndef run(input):\n"
        "    time.sleep(input['seconds'])\n    return {'slept': True}\n")


@pytest.fixture
def plan_sandbox(make_sandbox: Callable[..., Sandbox],
                 skill_dir: Callable[..., Path]) -> Sandbox:
    return make_sandbox(
        skill_dir(DOUBLE, skill_id="t/double"), skill_dir(GREET, skill_id="t/greet"),
        skill_dir(WHOAMI, skill_id="t/whoami"), skill_dir(FAIL, skill_id="t/fail"),
        skill_dir(SLOW, "[limits]\ntimeout = 10\n", skill_id="t/slow"))


def steps(*items: tuple[str, str, dict[str, Any]]) -> ExecutionPlan:
    return ExecutionPlan("asst", [ExecutionStep(name, kind, args) for name, kind, args in items])


def test_two_skills_and_a_tool_pass_data_between_steps(plan_sandbox: Sandbox) -> None:
    plan_sandbox.register_tool("label", lambda args: {"name": f"#{args['value']}",
                                                      "raw": args["value"]})
    plan = steps(("t/double", "skill", {"n": 21}),
                 ("label", "tool", {"value": "{{t/double.value}}"}),
                 ("t/greet", "skill", {"name": "{{label.name}} ({{t/double.type}})"}),
                 ("t/double", "skill", {"n": "{{label.raw}}"}))
    results = plan_sandbox.execute_plan(plan, ExecutionContext(timeout=20))
    assert [r.output for r in results] == [
        {"value": 42, "type": "int"}, {"name": "#42", "raw": 42}, {"text": "hello #42 (int)"},
        {"value": 84, "type": "int"}]
    assert [(r.step_name, r.type, r.index, r.status) for r in results] == [
        ("t/double", "skill", 0, "success"), ("label", "tool", 1, "success"),
        ("t/greet", "skill", 2, "success"), ("t/double", "skill", 3, "success")]
    assert results[0].execution is not None and results[0].execution.ok
    assert results[1].execution is None


def test_skill_steps_carry_the_context_identities(plan_sandbox: Sandbox) -> None:
    ec = ExecutionContext(request_id="req-9", tenant_id="acme", user_id="u1")
    [result] = plan_sandbox.execute_plan(steps(("t/whoami", "skill", {"q": [1, "x"]})), ec)
    assert result.output == {"tenant": "acme", "user": "u1", "request": "req-9",
                             "input": {"q": [1, "x"]}}
    assert ec.results() == [result]


def test_positional_reference_picks_an_earlier_repeated_step(plan_sandbox: Sandbox) -> None:
    plan = steps(("t/double", "skill", {"n": 1}), ("t/double", "skill", {"n": 10}),
                 ("t/greet", "skill", {"name": "{{t/double#1.value}}+{{t/double.value}}"}))
    assert plan_sandbox.execute_plan(plan)[-1].output == {"text": "hello 2+20"}


def test_first_failing_step_stops_the_plan(plan_sandbox: Sandbox) -> None:
    calls: list[dict[str, Any]] = []
    plan_sandbox.register_tool("after", lambda args: calls.append(args))
    plan = steps(("t/double", "skill", {"n": 1}), ("t/fail", "skill", {"city": "Atlantis"}),
                 ("after", "tool", {}))
    ec = ExecutionContext()
    with pytest.raises(PlanFailed) as caught:
        plan_sandbox.execute_plan(plan, ec)
    failed = caught.value.step_result
    assert (failed.index, failed.step_name, failed.status) == (1, "t/fail", "failed")
    assert "ValueError: no such city: Atlantis" in failed.error
    assert "steps[1] 't/fail' (skill)" in str(caught.value)
    assert [r.index for r in caught.value.results] == [0, 1]
    assert ec.results() == caught.value.results
    assert calls == []
    assert caught.value.result is failed.execution


def test_missing_field_at_run_time_fails_that_step_before_it_runs(plan_sandbox: Sandbox) -> None:
    ran: list[Any] = []
    plan_sandbox.register_tool("sink", ran.append)
    plan = steps(("t/double", "skill", {"n": 2}), ("sink", "tool", {"x": "{{t/double.nope}}"}))
    with pytest.raises(PlanFailed) as caught:
        plan_sandbox.execute_plan(plan)
    error = caught.value.step_result.error
    assert "argument template" in error
    assert "has no field 'nope' (fields there: type, value)" in error
    assert ran == []


def test_plan_validation_failure_runs_nothing(plan_sandbox: Sandbox) -> None:
    plan = steps(("t/double", "skill", {"n": 1}), ("unregistered", "tool", {}))
    with pytest.raises(InvalidPlan, match=r"steps\[1\] 'unregistered': tool 'unregistered'"):
        plan_sandbox.execute_plan(plan)
    with pytest.raises(InvalidPlan, match="skill 'x/y' is not loaded"):
        plan_sandbox.execute_plan(steps(("x/y", "skill", {})))


def test_the_plan_deadline_bounds_a_skill_step(plan_sandbox: Sandbox) -> None:
    ec = ExecutionContext(timeout=1.0)
    with pytest.raises(PlanFailed) as caught:
        plan_sandbox.execute_plan(steps(("t/slow", "skill", {"seconds": 8})), ec)
    failed = caught.value.step_result
    assert failed.status == "timeout"
    assert failed.error.startswith("runtime: execution timeout")


def test_the_plan_deadline_bounds_a_sync_tool(plan_sandbox: Sandbox) -> None:
    release = threading.Event()
    plan_sandbox.register_tool("stuck", lambda args: release.wait(10))
    try:
        with pytest.raises(PlanFailed) as caught:
            plan_sandbox.execute_plan(steps(("stuck", "tool", {})), ExecutionContext(timeout=0.3))
    finally:
        release.set()
    assert caught.value.step_result.status == "timeout"
    assert "tool 'stuck' did not finish within" in caught.value.step_result.error


def test_no_step_starts_once_the_deadline_has_passed(plan_sandbox: Sandbox) -> None:
    ran: list[Any] = []
    plan_sandbox.register_tool("sink", ran.append)
    ec = ExecutionContext(deadline=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(PlanFailed) as caught:
        plan_sandbox.execute_plan(steps(("sink", "tool", {}), ("t/double", "skill", {"n": 1})),
                                  ec)
    failed = caught.value.step_result
    assert (failed.index, failed.status) == (0, "timeout")
    assert "the plan's deadline passed before this step started" in failed.error
    assert ran == []


def test_tools_get_a_context_and_may_be_async(plan_sandbox: Sandbox) -> None:
    seen: list[ToolContext] = []

    def with_ctx(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
        seen.append(ctx)
        return {"tenant": ctx.tenant_id}

    async def async_tool(args: dict[str, Any]) -> int:
        await asyncio.sleep(0)
        return int(args["n"]) + 1

    plan_sandbox.register_tool("ctx", with_ctx)
    plan_sandbox.register_tool("inc", async_tool)
    ec = ExecutionContext(request_id="r-1", tenant_id="acme", user_id="u", timeout=20)
    results = plan_sandbox.execute_plan(steps(("ctx", "tool", {}), ("inc", "tool", {"n": 4})),
                                        ec)
    assert [r.output for r in results] == [{"tenant": "acme"}, 5]
    [ctx] = seen
    assert (ctx.tool, ctx.request_id, ctx.user_id, ctx.step_index) == ("ctx", "r-1", "u", 0)
    assert ctx.timeout is not None and 0 < ctx.timeout <= 20


def test_a_tool_that_raises_or_returns_non_json_fails_its_step(plan_sandbox: Sandbox) -> None:
    def boom(args: dict[str, Any]) -> None:
        raise KeyError("city")

    plan_sandbox.register_tool("boom", boom)
    plan_sandbox.register_tool("setty", lambda args: object())
    with pytest.raises(PlanFailed, match="tool 'boom' raised KeyError: 'city'"):
        plan_sandbox.execute_plan(steps(("boom", "tool", {})))
    with pytest.raises(PlanFailed, match="tool 'setty' returned a value that is not JSON"):
        plan_sandbox.execute_plan(steps(("setty", "tool", {})))


def test_cancel_from_another_thread_stops_the_running_skill_step(plan_sandbox: Sandbox) -> None:
    ec = ExecutionContext()
    timer = threading.Timer(0.5, ec.cancel)
    timer.start()
    try:
        with pytest.raises(PlanFailed) as caught:
            plan_sandbox.execute_plan(steps(("t/slow", "skill", {"seconds": 8}),
                                            ("t/double", "skill", {"n": 1})), ec)
    finally:
        timer.cancel()
    assert caught.value.step_result.status == "canceled"
    assert len(ec.results()) == 1


def test_circuit_open_failure_is_the_cause_of_plan_failed(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    breaker = InMemoryCircuitBreaker(failure_threshold=1)
    sandbox = make_sandbox(skill_dir(FAIL, skill_id="t/fail"), circuit_breaker=breaker)
    with pytest.raises(PlanFailed):
        sandbox.execute_plan(steps(("t/fail", "skill", {})))
    with pytest.raises(PlanFailed) as caught:
        sandbox.execute_plan(steps(("t/fail", "skill", {})))
    assert caught.value.step_result.error == "runtime: circuit breaker open"
    assert caught.value.step_result.status == "rejected"
    assert caught.value.result is not None
    with pytest.raises(CircuitOpen):
        caught.value.result.raise_for_status()


def test_async_plan_runs_skills_and_tools(plan_sandbox: Sandbox) -> None:
    async def shout(args: dict[str, Any]) -> dict[str, str]:
        return {"name": str(args["text"]).upper()}

    plan_sandbox.register_tool("shout", shout)
    plan = steps(("t/greet", "skill", {"name": "ada"}),
                 ("shout", "tool", {"text": "{{t/greet.text}}"}),
                 ("t/greet", "skill", {"name": "{{shout.name}}"}))
    results = asyncio.run(plan_sandbox.aexecute_plan(plan, ExecutionContext(timeout=20)))
    assert results[-1].output == {"text": "hello HELLO ADA"}
    assert [r.type for r in results] == [StepType.SKILL, "tool", "skill"]


def test_async_sync_tool_is_bounded_by_the_deadline(plan_sandbox: Sandbox) -> None:
    release = threading.Event()
    plan_sandbox.register_tool("stuck", lambda args: release.wait(10))

    async def main() -> None:
        await plan_sandbox.aexecute_plan(steps(("stuck", "tool", {})),
                                         ExecutionContext(timeout=0.3))

    try:
        with pytest.raises(PlanFailed, match="did not finish within"):
            asyncio.run(main())
    finally:
        release.set()


def test_cancelling_an_async_plan_kills_the_running_step(plan_sandbox: Sandbox) -> None:
    async def main() -> None:
        task = asyncio.create_task(plan_sandbox.aexecute_plan(
            steps(("t/slow", "skill", {"seconds": 8}))))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
