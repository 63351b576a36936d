"""Hostile values through plan templates: a skill's output or a planner's argument chosen to make
the supervisor's template resolution raise or grow without bound. Each must end as a failed
step naming why (or as Go's behaviour), never as an exception out of `execute_plan` nor as
gigabytes of rendered arguments in the supervisor."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import ExecutionContext, ExecutionPlan, PlanFailed, Sandbox
from sandbox.templates import (
    MAX_RENDERED_CHARS,
    TemplateError,
    coerce_string_numbers,
    render,
    render_go,
)

#: A skill whose output holds an integer no float64 can hold (JSON allows it; msgspec keeps it).
HUGE_INT = "def run(input):\n    return {'n': 10 ** 400}\n"
ECHO = "def run(input):\n    return {'got': str(input)[:100]}\n"
#: A skill whose output is one large string, to be repeated by references.
BIG = "def run(input):\n    return {'s': 'x' * 100_000}\n"


def obs(data: dict[str, Any]) -> ExecutionPlan:
    return ExecutionPlan.from_dict(data, dialect="openbotstack")


@pytest.fixture
def template_sandbox(make_sandbox: Callable[..., Sandbox],
                     skill_dir: Callable[..., Path]) -> Sandbox:
    return make_sandbox(skill_dir(HUGE_INT, skill_id="huge"),
                        skill_dir(ECHO, skill_id="echo"),
                        skill_dir(BIG, skill_id="big"))


def test_an_output_integer_beyond_float64_fails_only_the_referencing_step(
        template_sandbox: Sandbox) -> None:
    # CONTROL: the integer really reaches the supervisor (the native dialect passes it on).
    native = ExecutionPlan.from_dict({"assistant_id": "a", "steps": [
        {"type": "skill", "name": "huge"},
        {"type": "skill", "name": "echo", "arguments": {"v": "{{huge.n}}"}}]})
    results = template_sandbox.execute_plan(native, ExecutionContext(timeout=30))
    assert results[0].output == {"n": 10 ** 400}
    assert results[1].ok
    # Go's stringification (float64 `%v`) cannot print it: the step fails, the plan ends with
    # PlanFailed naming the argument, nothing raises OverflowError out of execute_plan.
    for argument in ("{{huge.n}}", "{{huge}}"):
        plan = obs({"assistant_id": "a", "steps": [
            {"type": "skill", "name": "huge"},
            {"type": "skill", "name": "echo", "arguments": {"v": argument}}]})
        with pytest.raises(PlanFailed) as caught:
            template_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
        assert "argument template" in str(caught.value.step_result.error)
        assert "float64" in str(caught.value.step_result.error)


def test_a_planner_digit_string_too_long_for_int64_stays_a_string_as_in_go() -> None:
    # CONTROL: an int64-sized digit string is coerced.
    assert coerce_string_numbers({"n": "9" * 18}) == {"n": int("9" * 18)}
    # Past Python's int-from-text limit (4300 digits) int() raises; Go's ParseInt says "out of
    # range" and openbotstack keeps the string: so here.
    for text in ("1" * 5000, "-" + "1" * 5000, "1" * 20):
        assert coerce_string_numbers({"n": text}) == {"n": text}


def test_a_long_decimal_string_overflowing_float64_stays_a_string_as_in_go() -> None:
    # CONTROL: a plain decimal is coerced.
    assert coerce_string_numbers({"n": "2.5"}) == {"n": 2.5}
    # ParseFloat reports ErrRange for a value past float64, and openbotstack keeps the string.
    text = "9" * 400 + ".5"
    assert coerce_string_numbers({"n": text}) == {"n": text}


@pytest.mark.parametrize("dialect", ["native", "openbotstack"])
def test_repeated_references_cannot_amplify_an_output_past_the_render_bound(
        dialect: str) -> None:
    output = {"s": "x" * 100_000}
    # CONTROL: a few references render (the output really is repeated).
    few = "{{big.s}}" * 3
    rendered = (render_go({"v": few}, {"big": output}) if dialect == "openbotstack"
                else render({"v": few}, ["big"], [output]))
    assert len(rendered["v"]) == 300_000
    # 20 000 references to 100 kB would be 2 GB of text in the supervisor.
    many = "{{big.s}}" * 20_000
    with pytest.raises(TemplateError, match="rendered arguments"):
        if dialect == "openbotstack":
            render_go({"v": many}, {"big": output})
        else:
            render({"v": many, "w": [many]}, ["big"], [output])
    assert MAX_RENDERED_CHARS < 20_000 * 100_000


def test_a_plan_amplifying_a_skill_output_fails_the_step(template_sandbox: Sandbox) -> None:
    plan = obs({"assistant_id": "a", "steps": [
        {"type": "skill", "name": "big"},
        {"type": "skill", "name": "echo", "arguments": {"v": "{{big.s}}" * 20_000}}]})
    with pytest.raises(PlanFailed) as caught:
        template_sandbox.execute_plan(plan, ExecutionContext(timeout=30))
    assert "rendered arguments" in str(caught.value.step_result.error)
