"""Plans as openbotstack-core's current planner writes them (`dialect="openbotstack"`): `llm`
steps, plan `id`/`parent_id`, `step_id`, `timeout_ms`, parallel groups, unique step names, the
`builtin.`/`mcp.` short aliases, Go's template typing and string-to-number coercion; and the
native default still refusing all of that."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandbox import ExecutionContext, ExecutionPlan, InvalidPlan, PlanFailed, Sandbox
from sandbox.planrun import MAX_PARALLEL_STEPS
from sandbox.plans import StepType
from sandbox.templates import coerce_string_numbers, go_results, go_text, render_go

#: The shape of openbotstack-core's plan_prompt.md, with the fields its ExecutionPlan carries.
PLANNER_PLAN = {
    "id": "plan-2", "parent_id": "plan-1", "assistant_id": "asst",
    "reasoning": "time, then a greeting",
    "steps": [
        {"type": "tool", "name": "builtin.now", "arguments": {}, "step_id": "s1",
         "timeout_ms": 2000, "expected_output": "the time", "risk_level": "info"},
        {"type": "skill", "name": "t/greet", "arguments": {"name": "{{now.time}}"},
         "parallelizable": True, "parallel_group": "g", "output_schema": {"type": "object"}},
        {"type": "llm", "name": "respond", "arguments": {"prompt": "Say {{t/greet}}"}},
    ],
}


def obs(data: dict[str, Any]) -> ExecutionPlan:
    return ExecutionPlan.from_dict(data, dialect="openbotstack")


# -- parsing and validation ----------------------------------------------------------------------


def test_planner_plan_parses_validates_and_round_trips_in_the_openbotstack_dialect() -> None:
    plan = obs(PLANNER_PLAN)
    plan.validate()
    assert (plan.id, plan.parent_id, plan.dialect) == ("plan-2", "plan-1", "openbotstack")
    assert [step.type for step in plan.steps] == [StepType.TOOL, StepType.SKILL, StepType.LLM]
    assert (plan.steps[0].step_id, plan.steps[0].timeout_ms) == ("s1", 2000)
    assert (plan.steps[1].parallelizable, plan.steps[1].parallel_group) == (True, "g")
    assert plan.steps[1].step_id and plan.steps[2].step_id  # generated, as openbotstack does
    again = plan.to_dict()
    assert again["steps"][0]["expected_output"] == "the time"
    assert again["steps"][1]["output_schema"] == {"type": "object"}
    assert obs(msgspec.json.decode(msgspec.json.encode(again))).to_dict() == again


def test_validate_gives_the_plan_an_id_when_it_has_none() -> None:
    plan = obs({"assistant_id": "a", "steps": [{"type": "llm", "name": "respond"}]})
    plan.validate()
    assert plan.id and plan.steps[0].step_id


@pytest.mark.parametrize(("data", "message"), [
    (PLANNER_PLAN, "unknown plan field(s) id, parent_id"),
    ({"assistant_id": "a", "steps": [{"type": "tool", "name": "x", "step_id": "1",
                                      "timeout_ms": 5}]},
     "steps[0]: unknown field(s) step_id, timeout_ms"),
    ({"assistant_id": "a", "steps": [{"type": "tool", "name": "x", "parallel_group": "g"}]},
     "steps[0]: unknown field(s) parallel_group"),
])
def test_native_default_still_rejects_openbotstack_fields(data: dict[str, Any],
                                                         message: str) -> None:
    with pytest.raises(InvalidPlan) as caught:
        ExecutionPlan.from_dict(data)
    assert message in str(caught.value)


def test_native_default_still_rejects_unknown_step_types() -> None:
    plan = ExecutionPlan.from_dict({"assistant_id": "a",
                                    "steps": [{"type": "agent", "name": "respond"}]})
    with pytest.raises(InvalidPlan, match=r"steps\[0\] 'respond': unknown type 'agent' "
                                          r"\(expected 'skill', 'tool' or 'llm'\)"):
        plan.validate()


def test_native_default_still_allows_repeated_names() -> None:
    ExecutionPlan.from_dict({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "x"}, {"type": "tool", "name": "x",
                                        "arguments": {"v": "{{x#1}}"}}]}).validate()


def test_duplicate_step_names_are_rejected_in_the_openbotstack_dialect() -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "x"}, {"type": "tool", "name": "y"},
        {"type": "tool", "name": "x"}]})
    with pytest.raises(InvalidPlan, match="duplicate step name 'x' at positions 0 and 2"):
        plan.validate()


def test_unknown_type_names_the_three_allowed_in_the_openbotstack_dialect() -> None:
    plan = obs({"assistant_id": "a", "steps": [{"type": "agent", "name": "x"}]})
    with pytest.raises(InvalidPlan, match="unknown type 'agent' \\(expected 'skill', 'tool' "
                                          "or 'llm'\\)"):
        plan.validate()


@pytest.mark.parametrize(("step", "message"), [
    ({"timeout_ms": "5000"}, "timeout_ms must be an integer, got a string"),
    ({"timeout_ms": -1}, "timeout_ms must not be negative"),
    ({"parallelizable": "yes"}, "parallelizable must be a boolean, got a string"),
    ({"step_id": 7}, "step_id must be a string, got a number"),
    ({"when": "now"}, "unknown field(s) when"),
])
def test_bad_openbotstack_step_fields_are_named(step: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidPlan) as caught:
        obs({"assistant_id": "a", "steps": [{"type": "tool", "name": "x", **step}]})
    assert message in str(caught.value)


def test_unknown_dialect_is_refused() -> None:
    with pytest.raises(InvalidPlan, match="unknown plan dialect 'go'"):
        ExecutionPlan.from_dict({"assistant_id": "a", "steps": []}, dialect="go")  # type: ignore[arg-type]


def test_reference_to_a_later_step_is_rejected() -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "x", "arguments": {"v": "{{later.field}}"}},
        {"type": "tool", "name": "later"}]})
    with pytest.raises(InvalidPlan) as caught:
        plan.validate()
    assert "refers to 'later.field', which is not the name of an earlier step" in str(
        caught.value)


def test_reference_into_the_same_parallel_group_is_rejected() -> None:
    group = {"parallelizable": True, "parallel_group": "g"}
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "a", **group},
        {"type": "tool", "name": "b", "arguments": {"v": "{{a}}"}, **group}]})
    with pytest.raises(InvalidPlan, match="refers to 'a', which runs in the same parallel group"):
        plan.validate()


# -- Go's template typing and coercion -----------------------------------------------------------


def test_whole_string_references_are_stringified_as_go_does() -> None:
    results = go_results(["builtin.lookup"], [{"city": "Paris", "n": 3, "big": 1234567,
                                               "tags": ["<a>", 1.0], "ok": True}])
    rendered = render_go({"whole": "{{lookup}}", "n": "{{lookup.n}}", "big": "{{lookup.big}}",
                          "ok": "{{lookup.ok}}", "tags": "{{builtin.lookup.tags}}",
                          "text": "in {{lookup.city}}!", "spaced": "{{ lookup }}",
                          "nested": {"v": "{{lookup}}"}, "number": 5}, results)
    assert rendered == {
        "whole": '{"big":1234567,"city":"Paris","n":3,"ok":true,"tags":["\\u003ca\\u003e",1]}',
        "n": "3", "big": "1.234567e+06", "ok": "true", "tags": '["\\u003ca\\u003e",1]',
        "text": "in Paris!", "spaced": "{{ lookup }}", "nested": {"v": "{{lookup}}"},
        "number": 5}


@pytest.mark.parametrize(("value", "text"), [
    (0.1, "0.1"), (1e-5, "1e-05"), (1e21, "1e+21"), (123456, "123456"), (-2.5, "-2.5"),
    (None, "<nil>")])
def test_go_prints_numbers_as_fmt_does(value: Any, text: str) -> None:
    assert go_text(value) == text


def test_a_field_of_a_list_cannot_be_indexed_as_in_go() -> None:
    from sandbox.templates import TemplateError

    with pytest.raises(TemplateError, match="cannot index a list"):
        render_go({"v": "{{s.items.0}}"}, go_results(["s"], [{"items": [1]}]))


def test_steps_without_output_are_not_referenceable_as_in_go() -> None:
    from sandbox.templates import TemplateError

    with pytest.raises(TemplateError, match="step 'quiet' not found"):
        render_go({"v": "{{quiet}}"}, go_results(["quiet", "other"], [None, {}]))


def test_llm_written_strings_are_coerced_to_numbers_and_booleans() -> None:
    assert coerce_string_numbers({"a": "5", "b": "-3", "c": "2.5", "d": "true", "e": "5a",
                                  "f": "1e5", "g": "-", "h": {"n": "5"}}) == {
        "a": 5, "b": -3, "c": 2.5, "d": True, "e": "5a", "f": "1e5", "g": "-", "h": {"n": "5"}}


# -- running, with Python skills -----------------------------------------------------------------

DOUBLE = ("def run(input):\n"
          "    return {'value': input['n'] * 2, 'type': type(input['n']).__name__}\n")
GREET = "def run(input):\n    return {'text': 'hello ' + str(input['name'])}\n"
SLOW = ("import time\ndef run(input):\n"
        "    time.sleep(input['seconds'])\n    return {'slept': True}\n")


@pytest.fixture
def dialect_sandbox(make_sandbox: Callable[..., Sandbox],
                    skill_dir: Callable[..., Path]) -> Sandbox:
    sandbox = make_sandbox(skill_dir(DOUBLE, skill_id="t/double"),
                           skill_dir(GREET, skill_id="t/greet"),
                           skill_dir(SLOW, "[limits]\ntimeout = 10\n", skill_id="t/slow"))
    sandbox.register_tool("builtin.lookup", lambda args: {"city": "Paris", "n": 3})
    return sandbox


def test_planner_plan_runs_with_coercion_aliases_and_go_typing(dialect_sandbox: Sandbox) -> None:
    plan = obs({"id": "p", "assistant_id": "a", "steps": [
        {"type": "tool", "name": "builtin.lookup", "arguments": {}, "step_id": "one"},
        {"type": "skill", "name": "t/double", "arguments": {"n": "5"}, "timeout_ms": 5000},
        {"type": "skill", "name": "t/greet", "arguments": {"name": "{{lookup}}"}}]})
    results = dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert [result.output for result in results] == [
        {"city": "Paris", "n": 3}, {"value": 10, "type": "int"},
        {"text": 'hello {"city":"Paris","n":3}'}]
    assert results[0].step_id == "one" and results[2].step_id


def test_the_same_plan_in_the_native_dialect_keeps_types_and_does_not_coerce(
        dialect_sandbox: Sandbox) -> None:
    plan = ExecutionPlan.from_dict({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "builtin.lookup"},
        {"type": "skill", "name": "t/double", "arguments": {"n": "5"}},
        {"type": "skill", "name": "t/double", "arguments": {"n": "{{builtin.lookup.n}}"}}]})
    results = dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert [result.output for result in results[1:]] == [{"value": "55", "type": "str"},
                                                         {"value": 6, "type": "int"}]


def test_a_number_from_an_earlier_step_reaches_a_skill_as_go_text(
        dialect_sandbox: Sandbox) -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "builtin.lookup"},
        {"type": "skill", "name": "t/double", "arguments": {"n": "{{lookup.n}}"}}]})
    results = dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert results[1].output == {"value": "33", "type": "str"}  # as openbotstack passes it


def test_llm_step_without_a_provider_is_refused_naming_it(dialect_sandbox: Sandbox) -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "builtin.lookup"},
        {"type": "llm", "name": "respond", "arguments": {"prompt": "Say {{lookup.city}}"}}]})
    with pytest.raises(InvalidPlan, match="an llm step needs an LLM provider"):
        dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))


def test_timeout_ms_bounds_the_step(dialect_sandbox: Sandbox) -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "skill", "name": "t/slow", "arguments": {"seconds": 8}, "timeout_ms": 300}]})
    with pytest.raises(PlanFailed) as caught:
        dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert caught.value.step_result.status == "timeout"


def barrier_tools(sandbox: Sandbox, names: list[str], parties: int) -> None:
    barrier = threading.Barrier(parties, timeout=3)

    def meet(args: dict[str, Any]) -> dict[str, Any]:
        return {"arrived": barrier.wait()}

    for name in names:
        sandbox.register_tool(name, meet)


def group(names: list[str]) -> dict[str, Any]:
    return {"assistant_id": "a", "steps": [
        {"type": "tool", "name": name, "parallelizable": True, "parallel_group": "g"}
        for name in names]}


def test_a_parallel_group_runs_its_steps_at_the_same_time(dialect_sandbox: Sandbox) -> None:
    names = [f"meet{i}" for i in range(MAX_PARALLEL_STEPS)]
    barrier_tools(dialect_sandbox, names, MAX_PARALLEL_STEPS)
    results = dialect_sandbox.execute_plan(obs(group(names)), ExecutionContext(timeout=30))
    assert sorted(result.output["arrived"] for result in results) == list(
        range(MAX_PARALLEL_STEPS))


def test_the_same_steps_without_a_group_run_one_by_one(dialect_sandbox: Sandbox) -> None:
    names = ["meet0", "meet1"]
    barrier_tools(dialect_sandbox, names, 2)
    plan = obs({"assistant_id": "a", "steps": [{"type": "tool", "name": name}
                                               for name in names]})
    with pytest.raises(PlanFailed) as caught:  # control: sequential steps never meet
        dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert "BrokenBarrierError" in caught.value.step_result.error


def test_a_parallel_group_is_bounded(dialect_sandbox: Sandbox) -> None:
    names = [f"meet{i}" for i in range(MAX_PARALLEL_STEPS + 1)]
    barrier_tools(dialect_sandbox, names, MAX_PARALLEL_STEPS + 1)
    with pytest.raises(PlanFailed) as caught:  # one more than the bound can never all meet
        dialect_sandbox.execute_plan(obs(group(names)), ExecutionContext(timeout=30))
    assert "BrokenBarrierError" in caught.value.step_result.error


def test_a_parallel_group_of_skills_runs_under_asyncio(dialect_sandbox: Sandbox) -> None:
    import asyncio

    group_marks = {"parallelizable": True, "parallel_group": "g"}
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "tool", "name": "builtin.lookup"},
        {"type": "skill", "name": "t/double", "arguments": {"n": "4"}, **group_marks},
        {"type": "skill", "name": "t/greet", "arguments": {"name": "{{lookup.city}}"},
         **group_marks},
        {"type": "tool", "name": "builtin.lookup2"}]})
    dialect_sandbox.register_tool("builtin.lookup2", lambda args: {"done": True})
    results = asyncio.run(dialect_sandbox.aexecute_plan(plan, ExecutionContext(timeout=30)))
    assert [result.output for result in results] == [
        {"city": "Paris", "n": 3}, {"value": 8, "type": "int"}, {"text": "hello Paris"},
        {"done": True}]


# -- retries and the fallback tool (openbotstack's RetryPolicy) ---------------------------------


def flaky_tool(sandbox: Sandbox, name: str, failures: int) -> list[int]:
    calls: list[int] = []

    def flaky(args: dict[str, Any]) -> dict[str, Any]:
        calls.append(len(calls))
        if len(calls) <= failures:
            raise RuntimeError(f"attempt {len(calls)} failed")
        return {"attempts": len(calls)}

    sandbox.register_tool(name, flaky)
    return calls


def test_a_failed_step_is_retried_under_the_retry_policy(dialect_sandbox: Sandbox) -> None:
    from sandbox.plans import RetryPolicy

    calls = flaky_tool(dialect_sandbox, "builtin.flaky", failures=2)
    plan = obs({"assistant_id": "a", "steps": [{"type": "tool", "name": "builtin.flaky"}]})
    plan.retry = RetryPolicy(max_retries=2, initial_backoff=0.01, max_backoff=0.02)
    results = dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert (results[0].output, results[0].retries, len(calls)) == ({"attempts": 3}, 2, 3)


def test_without_a_retry_policy_the_first_failure_stops_the_plan(
        dialect_sandbox: Sandbox) -> None:
    calls = flaky_tool(dialect_sandbox, "builtin.flaky", failures=1)
    plan = obs({"assistant_id": "a", "steps": [{"type": "tool", "name": "builtin.flaky"}]})
    with pytest.raises(PlanFailed, match="attempt 1 failed"):
        dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert len(calls) == 1


def test_retries_are_capped_at_three_as_in_openbotstack(dialect_sandbox: Sandbox) -> None:
    from sandbox.plans import MAX_RETRIES, RetryPolicy

    calls = flaky_tool(dialect_sandbox, "builtin.flaky", failures=100)
    plan = obs({"assistant_id": "a", "steps": [{"type": "tool", "name": "builtin.flaky"}]})
    plan.retry = RetryPolicy(max_retries=50)
    with pytest.raises(PlanFailed):
        dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert len(calls) == 1 + MAX_RETRIES


def test_the_fallback_tool_replaces_a_step_that_kept_failing(dialect_sandbox: Sandbox) -> None:
    from sandbox.plans import RetryPolicy

    dialect_sandbox.register_tool("builtin.cached", lambda args: {"cached": args["seconds"]})
    dialect_sandbox.register_tool("builtin.echo", lambda args: args)
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "skill", "name": "t/slow", "arguments": {"seconds": "soon"}},
        {"type": "tool", "name": "builtin.flaky", "arguments": {"seconds": "later"}},
        {"type": "tool", "name": "builtin.echo", "arguments": {"v": "{{flaky.cached}}"}}]})
    flaky_tool(dialect_sandbox, "builtin.flaky", failures=100)
    plan.retry = RetryPolicy(max_retries=1, fallback_tool="builtin.cached")
    results = dialect_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert [(r.step_name, r.output, r.retries, r.fallback) for r in results] == [
        ("t/slow", {"cached": "soon"}, 1, True), ("builtin.flaky", {"cached": "later"}, 1, True),
        ("builtin.echo", {"v": "later"}, 0, False)]
