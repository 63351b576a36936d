"""Plans as data: JSON round trips with openbotstack-core's field names, validation messages,
templates."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import (
    ExecutionContext,
    ExecutionPlan,
    ExecutionStep,
    InvalidPlan,
    StepResult,
    StepType,
)
from sandbox.templates import TemplateError, references_in, render, resolve_reference

# -- strategies --------------------------------------------------------------------------------

_segment = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-", min_size=1, max_size=8)
step_names = st.one_of(_segment, st.builds(lambda a, b: f"{a}/{b}", _segment, _segment),
                       st.builds(lambda a, b: f"{a}.{b}", _segment, _segment))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=20).filter(lambda s: "{{" not in s))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
arguments = st.dictionaries(st.text(max_size=8), json_values, max_size=4)


@st.composite
def valid_plans(draw: st.DrawFn) -> ExecutionPlan:
    """Plans whose references all point at earlier steps (latest, positional, nested, in text)."""
    count = draw(st.integers(1, 6))
    steps: list[ExecutionStep] = []
    for index in range(count):
        args = draw(arguments)
        if index:
            earlier = [step.name for step in steps]
            target = draw(st.sampled_from(earlier))
            form = draw(st.sampled_from(["latest", "positional", "text"]))
            if form == "positional":
                occurrence = draw(st.integers(1, earlier.count(target)))
                args["ref"] = f"{{{{{target}#{occurrence}.field}}}}"
            elif form == "text":
                args["ref"] = f"value: {{{{ {target} }}}}!"
            else:
                args["ref"] = [{"deep": f"{{{{{target}}}}}"}]
        kind = draw(st.sampled_from([StepType.SKILL, StepType.TOOL]))  # the native dialect's
        steps.append(ExecutionStep(name=draw(step_names), type=kind, arguments=args))
    return ExecutionPlan(assistant_id=draw(st.text(max_size=10)), steps=steps,
                         reasoning=draw(st.text(max_size=20)))


# -- JSON ---------------------------------------------------------------------------------------


def test_plan_json_uses_the_seed_field_names() -> None:
    step = ExecutionStep("text/word_count", StepType.SKILL, {"text": "a"})
    plan = ExecutionPlan("asst-1", [step], reasoning="count words")
    data = json.loads(plan.to_json())
    assert data == {"assistant_id": "asst-1", "reasoning": "count words",
                    "steps": [{"name": "text/word_count", "type": "skill",
                               "arguments": {"text": "a"}}]}


def test_plan_from_openbotstack_json_without_reasoning_or_arguments() -> None:
    plan = ExecutionPlan.from_json(
        b'{"assistant_id": "a", "steps": [{"name": "search", "type": "tool"}]}')
    assert plan.steps == [ExecutionStep("search", StepType.TOOL, {})]
    assert plan.reasoning == ""
    assert "reasoning" not in json.loads(plan.to_json())


def test_arguments_json_is_the_step_input() -> None:
    step = ExecutionStep("s", "skill", {"n": 1, "t": ["x"]})
    assert json.loads(step.arguments_json()) == {"n": 1, "t": ["x"]}


@settings(max_examples=150, deadline=None)
@given(valid_plans())
def test_plans_round_trip_through_json(plan: ExecutionPlan) -> None:
    again = ExecutionPlan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()


@settings(max_examples=150, deadline=None)
@given(valid_plans())
def test_generated_valid_plans_pass_validation(plan: ExecutionPlan) -> None:
    plan.validate()


@pytest.mark.parametrize(("document", "message"), [
    (b"[1]", "a plan must be a JSON object, got an array"),
    (b"{", "not valid JSON"),
    (b'{"steps": {}}', "steps must be a JSON array, got an object"),
    (b'{"steps": [1]}', "steps[0]: must be a JSON object, got a number"),
    (b'{"steps": [{"name": 3}]}', "steps[0]: name must be a string, got a number"),
    (b'{"steps": [{"name": "x", "kind": "tool"}]}', "steps[0]: unknown field(s) kind"),
    (b'{"steps": [], "extra": 1}', "unknown plan field(s) extra"),
])
def test_malformed_plan_json_is_rejected_naming_the_field(document: bytes, message: str) -> None:
    with pytest.raises(InvalidPlan) as caught:
        ExecutionPlan.from_json(document)
    assert message in str(caught.value)
    assert str(caught.value).startswith("runtime: invalid plan")


# -- validation ---------------------------------------------------------------------------------


def _plan(*steps: tuple[str, str, Any]) -> ExecutionPlan:
    return ExecutionPlan("a", [ExecutionStep(name, kind, args) for name, kind, args in steps])


@pytest.mark.parametrize(("plan", "message"), [
    (ExecutionPlan("a", []), "the plan has no steps"),
    (_plan(("s", "skill", {}), ("", "tool", {})), "steps[1]: name is empty"),
    (_plan(("s", "skill", {}), ("s", "script", {})),
     "steps[1] 's': unknown type 'script' (expected 'skill', 'tool' or 'llm')"),
    (_plan(("s", "skill", [1, 2])), "steps[0] 's': arguments must be a JSON object, got an array"),
    (_plan(("s", "skill", {"a": {1, 2}})), "steps[0] 's': arguments.a is a Python set"),
    (_plan(("s", "skill", {"a": float("nan")})), "steps[0] 's': arguments.a is nan"),
    (_plan(("s", "skill", {"a": "{{t.x}}"}), ("t", "tool", {})),
     "steps[0] 's': '{{t.x}}' refers to 't', which is not the name of an earlier step"),
    (_plan(("s", "skill", {}), ("t", "tool", {"a": "{{t}}"})),
     "steps[1] 't': '{{t}}' refers to 't', which is not the name of an earlier step"),
    (_plan(("s", "skill", {}), ("t", "tool", {"a": ["x {{s#2.y}}"]})),
     "steps[1] 't': '{{s#2.y}}' asks for step #2 named 's', but only 1 earlier step(s)"),
    (_plan(("s", "skill", {}), ("t", "tool", {"a": "{{}}"})), "steps[1] 't': '{{}}' is an empty"),
    (_plan(("s", "skill", {}), ("t", "tool", {"a": "{{s..x}}"})), "has an empty field name"),
    (_plan(("a b", "tool", {})), "steps[0] 'a b': name contains ' '"),
    (_plan(("a#1", "tool", {})), "steps[0] 'a#1': name contains '#'"),
])
def test_validate_names_the_step_and_its_position(plan: ExecutionPlan, message: str) -> None:
    with pytest.raises(InvalidPlan) as caught:
        plan.validate()
    assert message in str(caught.value)


@settings(max_examples=100, deadline=None)
@given(valid_plans(), st.data())
def test_a_forward_reference_is_rejected_at_its_position(plan: ExecutionPlan,
                                                         data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(plan.steps) - 1))
    earlier = {step.name for step in plan.steps[:index]}
    name = data.draw(step_names.filter(lambda n: n not in earlier and
                                       all(not n.startswith(e + ".") for e in earlier)))
    plan.steps[index].arguments["bad"] = f"{{{{{name}.out}}}}"
    with pytest.raises(InvalidPlan) as caught:
        plan.validate()
    assert f"steps[{index}] {plan.steps[index].name!r}:" in str(caught.value)


@settings(max_examples=100, deadline=None)
@given(valid_plans(), st.data())
def test_an_unknown_step_type_is_rejected_at_its_position(plan: ExecutionPlan,
                                                          data: st.DataObject) -> None:
    index = data.draw(st.integers(0, len(plan.steps) - 1))
    bad_type = data.draw(st.text(min_size=1, max_size=6).filter(
        lambda t: t not in ("skill", "tool")))
    plan.steps[index].type = bad_type
    with pytest.raises(InvalidPlan) as caught:
        plan.validate()
    assert f"steps[{index}] {plan.steps[index].name!r}: unknown type" in str(caught.value)


class _Target:
    def __init__(self, skills: set[str], tools: set[str]) -> None:
        self.skills, self.tools = skills, tools

    def can_execute(self, skill_id: str) -> bool:
        return skill_id in self.skills

    def has_tool(self, name: str) -> bool:
        return name in self.tools


def test_validate_against_a_target_requires_loaded_skills_and_registered_tools() -> None:
    plan = _plan(("s/one", "skill", {}), ("fmt", "tool", {}))
    plan.validate(_Target({"s/one"}, {"fmt"}))
    with pytest.raises(InvalidPlan, match=r"steps\[0\] 's/one': skill 's/one' is not loaded"):
        plan.validate(_Target(set(), {"fmt"}))
    with pytest.raises(InvalidPlan, match=r"steps\[1\] 'fmt': tool 'fmt' is not registered"):
        plan.validate(_Target({"s/one"}, set()))


# -- templates ------------------------------------------------------------------------------------


def test_whole_string_reference_keeps_the_json_type() -> None:
    outputs = [{"n": 3, "items": [{"id": 7}], "ok": True, "none": None}]
    args = {"n": "{{a.n}}", "id": "{{a.items.0.id}}", "ok": "{{a.ok}}", "all": "{{a}}",
            "none": "{{ a.none }}"}
    assert render(args, ["a"], outputs) == {"n": 3, "id": 7, "ok": True, "all": outputs[0],
                                            "none": None}


def test_reference_inside_text_is_rendered_as_text() -> None:
    rendered = render({"s": "n={{a.n}} s={{a.s}} l={{a.l}} z={{a.z}}"}, ["a"],
                      [{"n": 2.5, "s": "hi", "l": [1, "x"], "z": None}])
    assert rendered == {"s": 'n=2.5 s=hi l=[1,"x"] z=null'}


def test_latest_step_of_a_name_wins_and_positional_form_picks_one() -> None:
    names = ["fetch", "fetch", "fetch"]
    outputs = [{"v": 1}, {"v": 2}, {"v": 3}]
    assert render("{{fetch.v}}", names, outputs) == 3
    assert render("{{fetch#1.v}}", names, outputs) == 1
    assert render("{{fetch#2.v}}", names, outputs) == 2


def test_names_with_dots_match_the_longest_earlier_step_name() -> None:
    names = ["core/text", "core/text.wordcount"]
    outputs = [{"wordcount": {"words": "short name"}}, {"words": 5}]
    assert render("{{core/text.wordcount.words}}", names, outputs) == 5
    assert render("{{core/text.wordcount.words}}", names[:1], outputs[:1]) == "short name"


def test_missing_field_at_run_time_says_which_field_and_what_exists() -> None:
    with pytest.raises(TemplateError) as caught:
        render({"x": "{{a.data.missing}}"}, ["a"], [{"data": {"b": 1, "c": 2}}])
    assert "the output of step 'a' has no field 'data.missing' (fields there: b, c)" in str(
        caught.value)
    with pytest.raises(TemplateError, match=r"has no item 'l.5' \(the list has 1 items\)"):
        render("{{a.l.5}}", ["a"], [{"l": [0]}])
    with pytest.raises(TemplateError, match="it is a str"):
        render("{{a.s.t}}", ["a"], [{"s": "text"}])


def test_references_are_found_at_any_depth() -> None:
    assert references_in({"a": ["{{x}}", {"b": "p {{y.z}} q {{ w }}"}], "c": 1}) == [
        "{{x}}", "{{y.z}}", "{{ w }}"]
    assert resolve_reference("{{ y.z }}", ["y"]).path == ("z",)


# -- context and results -------------------------------------------------------------------------


def test_context_results_are_a_thread_safe_copy() -> None:
    ec = ExecutionContext(request_id="r", tenant_id="t")

    def add(worker: int) -> None:
        for index in range(200):
            ec.add_result(StepResult(step_name=f"w{worker}", type="tool", index=index))

    threads = [threading.Thread(target=add, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    results = ec.results()
    assert len(results) == 1600
    results.clear()
    assert len(ec.results()) == 1600


def test_context_deadline_from_timeout_counts_down() -> None:
    ec = ExecutionContext(timeout=30)
    assert ec.deadline is not None
    assert (ec.deadline - ec.started_at).total_seconds() == 30
    left = ec.time_left()
    assert left is not None and 0 < left <= 30
    assert ExecutionContext().time_left() is None
    with pytest.raises(ValueError, match="timeout must be positive"):
        ExecutionContext(timeout=0)
