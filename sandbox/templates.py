"""Plan argument templates: how one step's arguments use an earlier step's output.

openbotstack writes `"{{name}}"` or `"{{name.field.sub}}"`, where `name` is the skill id or tool
name of an earlier step (the latest one with that name). Plans may call the same skill twice, so
`"{{name#N.field}}"` picks the N-th step (1-based) with that name instead of the latest.

A string that is exactly one reference becomes the referenced JSON value with its type (a
number stays a number, an object stays an object); a reference inside a longer string is
rendered as text (strings as they are, anything else as compact JSON). Field segments that are
non-negative integers index into lists (`{{search.results.0.url}}`).

Names may contain dots (skill ids such as `core/text.wordcount` do), so the step name is the
longest dotted prefix of the reference that names an earlier step; the rest is the field path.
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

#: `{{ expr }}`; whitespace around the expression is ignored.
REFERENCE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class TemplateError(ValueError):
    """A reference that cannot be resolved; the text says which and why."""


@dataclass(frozen=True)
class Reference:
    """One parsed `{{...}}`: the step it points at (by plan position) and a field path."""

    text: str
    step_index: int
    path: tuple[str, ...]


#: Most characters a step's rendered arguments may hold (all strings together): a reference
#: repeats an earlier output, so without a bound a short argument such as `{{big}}` times
#: 20 000 would make gigabytes of text in the supervisor from a 1 MB output.
MAX_RENDERED_CHARS = 16 << 20


def references_in(value: Any) -> list[str]:
    """Every `{{...}}` occurrence (the whole braces text) in a JSON value, depth-first."""
    found: list[str] = []
    _collect(value, found)
    return found


def _collect(value: Any, found: list[str]) -> None:
    if isinstance(value, str):
        found.extend(match.group(0) for match in REFERENCE.finditer(value))
    elif isinstance(value, dict):
        for item in value.values():
            _collect(item, found)
    elif isinstance(value, list):
        for item in value:
            _collect(item, found)


def resolve_reference(text: str, earlier: Sequence[str]) -> Reference:
    """Bind `{{expr}}` to one of the `earlier` step names (the steps before the current one)."""
    match = REFERENCE.fullmatch(text)
    expr = match.group(1) if match else text
    if not expr:
        raise TemplateError(f"{text!r} is an empty reference")
    segments = expr.split(".")
    if any(not segment for segment in segments):
        raise TemplateError(f"{text!r} has an empty field name")
    for cut in range(len(segments), 0, -1):
        head = ".".join(segments[:cut])
        name, occurrence = _split_occurrence(head)
        if name not in earlier:
            continue
        positions = [index for index, item in enumerate(earlier) if item == name]
        if occurrence is None:
            index = positions[-1]
        elif occurrence < 1 or occurrence > len(positions):
            raise TemplateError(
                f"{text!r} asks for step #{occurrence} named {name!r}, but only "
                f"{len(positions)} earlier step(s) have that name")
        else:
            index = positions[occurrence - 1]
        return Reference(text=text, step_index=index, path=tuple(segments[cut:]))
    name = _split_occurrence(segments[0])[0]
    raise TemplateError(f"{text!r} refers to {name!r}, which is not the name of an earlier step")


def _split_occurrence(head: str) -> tuple[str, int | None]:
    name, sep, count = head.rpartition("#")
    if sep and count.isdigit():
        return name, int(count)
    return head, None


def lookup(reference: Reference, output: Any, step_name: str) -> Any:
    """Follow the reference's field path into a step output; a missing field is a TemplateError."""
    value = output
    for depth, key in enumerate(reference.path):
        where = ".".join(reference.path[: depth + 1])
        if isinstance(value, dict):
            if key not in value:
                known = ", ".join(sorted(map(str, value))[:10]) or "none"
                raise TemplateError(f"{reference.text}: the output of step {step_name!r} has no "
                                    f"field {where!r} (fields there: {known})")
            value = value[key]
        elif isinstance(value, list) and key.isdigit():
            if int(key) >= len(value):
                raise TemplateError(f"{reference.text}: the output of step {step_name!r} has no "
                                    f"item {where!r} (the list has {len(value)} items)")
            value = value[int(key)]
        else:
            raise TemplateError(f"{reference.text}: the output of step {step_name!r} has no "
                                f"field {where!r} ({_kind(value)} there)")
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "it is null"
    if isinstance(value, list):
        return "it is a list; index it with a number"
    return f"it is a {type(value).__name__}"


def as_text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()


class _Budget:
    """What a step's substituted references may still add (`MAX_RENDERED_CHARS` in all)."""

    def __init__(self) -> None:
        self.left = MAX_RENDERED_CHARS

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise TemplateError(f"the rendered arguments would exceed {MAX_RENDERED_CHARS} "
                                "characters (references repeat earlier outputs)")


def render(value: Any, earlier: Sequence[str], outputs: Sequence[Any],
           budget: _Budget | None = None) -> Any:
    """`value` with every reference replaced, given the names and outputs of earlier steps.

    Every substituted value counts against one `MAX_RENDERED_CHARS` budget (a whole-string
    reference to an object by its JSON size, since the request carries it encoded once per
    reference)."""
    budget = _Budget() if budget is None else budget
    if isinstance(value, str):
        return _render_string(value, earlier, outputs, budget)
    if isinstance(value, dict):
        return {key: render(item, earlier, outputs, budget) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, earlier, outputs, budget) for item in value]
    return value


def _render_string(text: str, earlier: Sequence[str], outputs: Sequence[Any],
                   budget: _Budget) -> Any:
    def resolve(reference_text: str) -> Any:
        reference = resolve_reference(reference_text, earlier)
        return lookup(reference, outputs[reference.step_index], earlier[reference.step_index])

    def substitute(reference_text: str) -> str:
        text = as_text(resolve(reference_text))
        budget.spend(len(text))
        return text

    if REFERENCE.fullmatch(text):
        value = resolve(text)
        budget.spend(len(value) if isinstance(value, str) else
                     len(as_text(value)) if isinstance(value, dict | list) else 1)
        return value
    if "{{" not in text:
        return text
    return REFERENCE.sub(lambda match: substitute(match.group(0)), text)


# -- openbotstack's dialect: execution/template in openbotstack-core, as it behaves ---------------
#
# Go's resolver differs from the one above in four ways, mirrored here for plans an openbotstack
# planner wrote (`ExecutionPlan.from_dict(..., dialect="openbotstack")`):
# - a reference is `{{name}}` or `{{name.field}}` over `[\w][\w.-]*`, no spaces and no `#N`
#   (step names are unique in that dialect); anything else in braces stays text;
# - only the arguments' top-level string values are resolved (ResolveArguments); strings nested
#   in objects or lists are passed as they are;
# - a string that is exactly one reference becomes a string too (stringifyComplex): a string as
#   it is, an object or list as Go's JSON text, a number or boolean as Go's `%v` prints it;
# - a field path walks objects only (a list cannot be indexed), and a step that produced no
#   output (null) cannot be referenced.
# The LLM-friendly coercion (CoerceStringNumbers) is separate: `coerce_string_numbers`.

GO_REFERENCE = re.compile(r"\{\{([\w][\w.-]*)\}\}")
#: Step-name prefixes whose short form a reference may use (`{{now.time}}` for `builtin.now`).
GO_ALIAS_PREFIXES = ("builtin.", "mcp.")
_GO_INT = re.compile(r"^-?\d+$")
_GO_FLOAT = re.compile(r"^-?(\d+\.\d*|\.\d+)$")
_INT64 = range(-(1 << 63), 1 << 63)


def go_results(names: Sequence[str], outputs: Sequence[Any]) -> dict[str, Any]:
    """openbotstack's `buildPrevResults`: outputs by step name, plus the short alias of every
    `builtin.`/`mcp.` name that no step has taken; steps without output are left out."""
    results: dict[str, Any] = {}
    for name, output in zip(names, outputs, strict=True):
        if output is not None:
            results[name] = output
    for name, output in zip(names, outputs, strict=True):
        for prefix in GO_ALIAS_PREFIXES:
            if output is not None and name.startswith(prefix):
                results.setdefault(name.removeprefix(prefix), output)
    return results


def go_alias_names(names: Sequence[str]) -> set[str]:
    """Every name a reference may use for the steps `names` (names and short aliases)."""
    return {*names, *(name.removeprefix(prefix) for name in names
                      for prefix in GO_ALIAS_PREFIXES if name.startswith(prefix))}


def go_references(arguments: dict[str, Any]) -> list[str]:
    """The `{{...}}` references openbotstack would resolve in `arguments` (top level only)."""
    return [match.group(0) for value in arguments.values() if isinstance(value, str)
            for match in GO_REFERENCE.finditer(value)]


def go_split(content: str, known: Collection[str]) -> tuple[str, str]:
    """`resolveTemplateContent`: (step name, field path); the longest known dotted prefix."""
    if content in known or "." not in content:
        return content, ""
    segments = content.split(".")
    for cut in range(len(segments) - 1, 0, -1):
        name = ".".join(segments[:cut])
        if name in known:
            return name, ".".join(segments[cut:])
    return content, ""


def render_go(arguments: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """`arguments` with openbotstack's template resolution applied (see above)."""
    budget = _Budget()
    return {key: _render_go_string(key, value, results, budget) if isinstance(value, str)
            else value for key, value in arguments.items()}


def _render_go_string(key: str, text: str, results: dict[str, Any], budget: _Budget) -> str:
    def resolve(content: str) -> Any:
        name, field = go_split(content, results)
        if name not in results:
            available = ", ".join(sorted(results)) or "none"
            raise TemplateError(f"argument {key!r}: {{{{{content}}}}}: step {name!r} not found "
                                f"(steps with output: {available})")
        value = results[name]
        walked: list[str] = []
        for part in field.split(".") if field else ():
            if not isinstance(value, dict):
                raise TemplateError(f"argument {key!r}: {{{{{content}}}}}: cannot index "
                                    f"{_go_type(value)} at {'.'.join(walked) or name!r}")
            if part not in value:
                known = ", ".join(sorted(map(str, value))) or "none"
                raise TemplateError(f"argument {key!r}: {{{{{content}}}}}: field {part!r} not "
                                    f"found (available: {known})")
            value = value[part]
            walked.append(part)
        return value

    def substitute(content: str) -> str:
        try:
            text = go_text(resolve(content))
        except TemplateError as exc:
            raise TemplateError(f"argument {key!r}: {{{{{content}}}}}: {exc}") from None
        budget.spend(len(text))
        return text

    return GO_REFERENCE.sub(lambda match: substitute(match.group(1)), text)


def _go_type(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def go_text(value: Any) -> str:
    """A value as Go's `stringifyValue` writes it: strings as they are, objects and lists as
    `json.Marshal` writes them, numbers and booleans as `fmt` prints a decoded JSON value."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return _go_json(value)
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _go_float(_float64(value), exponent_at=6, short_exponent=False)
    return str(value)


def _float64(value: int | float) -> float:
    """`value` as the float64 Go decodes a JSON number into; an integer past float64's range
    (which a skill's JSON output may hold) is what Go's decoder refuses, so the reference fails
    instead of raising OverflowError out of the plan."""
    try:
        return float(value)
    except OverflowError:
        raise TemplateError(f"an integer of {int(value).bit_length()} bits does not fit a "
                            "float64, as Go would read it") from None


def _go_json(value: Any) -> str:
    """encoding/json's output for a decoded JSON value: keys sorted, no spaces, `<>&` escaped,
    numbers as float64 (`1`, not `1.0`)."""
    if isinstance(value, dict):
        items = (f"{_go_json(str(key))}:{_go_json(item)}" for key, item in sorted(value.items()))
        return "{" + ",".join(items) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_go_json(item) for item in value) + "]"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                             ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
            text = text.replace(char, escape)
        return text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _go_float(_float64(value), exponent_at=21, short_exponent=True, small=-6)
    raise TypeError(f"not a JSON value: {type(value).__name__}")


def _go_float(number: float, *, exponent_at: int, short_exponent: bool, small: int = -4) -> str:
    """Shortest round-trip digits of a float64, in Go's layout: exponent form when the decimal
    exponent is below `small` or at least `exponent_at` (`%v`: -4 and 6; JSON: -6 and 21)."""
    if not math.isfinite(number):
        return "+Inf" if number > 0 else "-Inf" if number < 0 else "NaN"
    if number == 0:
        return "-0" if math.copysign(1.0, number) < 0 else "0"
    sign, digits, exponent = decimal.Decimal(repr(number)).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    assert isinstance(exponent, int)
    point = len(digits) + exponent  # digits before the decimal point
    decimal_exponent = point - 1
    prefix = "-" if sign else ""
    if decimal_exponent < small or decimal_exponent >= exponent_at:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        magnitude = abs(decimal_exponent)
        width = 1 if short_exponent else 2
        return (f"{prefix}{mantissa}e{'-' if decimal_exponent < 0 else '+'}"
                f"{magnitude:0{width}d}")
    if point <= 0:
        return f"{prefix}0.{'0' * -point}{text}"
    if point >= len(text):
        return prefix + text + "0" * (point - len(text))
    return f"{prefix}{text[:point]}.{text[point:]}"


def coerce_string_numbers(arguments: dict[str, Any]) -> dict[str, Any]:
    """openbotstack's `CoerceStringNumbers`, for LLM-written arguments: a top-level string value
    that is an integer (`"5"`, `"-3"`), a decimal (`"2.5"`) or `"true"`/`"false"` becomes that
    number or boolean. Applied to the plan's own arguments before templates are resolved, so
    values that come from earlier steps are not coerced (as in openbotstack)."""
    coerced = dict(arguments)
    for key, value in arguments.items():
        if not isinstance(value, str):
            continue
        if _GO_INT.match(value):
            # ParseInt's "out of range" keeps the string; the length test comes first, since
            # int() refuses text past 4300 digits with ValueError
            if len(value.lstrip("-")) <= 19 and int(value) in _INT64:
                coerced[key] = int(value)
        elif _GO_FLOAT.match(value):
            number = float(value)
            if math.isfinite(number):  # ParseFloat's ErrRange keeps the string too
                coerced[key] = number
        elif value in ("true", "false"):
            coerced[key] = value == "true"
    return coerced
