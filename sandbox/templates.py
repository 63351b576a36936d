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

import re
from collections.abc import Sequence
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


def render(value: Any, earlier: Sequence[str], outputs: Sequence[Any]) -> Any:
    """`value` with every reference replaced, given the names and outputs of earlier steps."""
    if isinstance(value, str):
        return _render_string(value, earlier, outputs)
    if isinstance(value, dict):
        return {key: render(item, earlier, outputs) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, earlier, outputs) for item in value]
    return value


def _render_string(text: str, earlier: Sequence[str], outputs: Sequence[Any]) -> Any:
    def resolve(reference_text: str) -> Any:
        reference = resolve_reference(reference_text, earlier)
        return lookup(reference, outputs[reference.step_index], earlier[reference.step_index])

    if REFERENCE.fullmatch(text):
        return resolve(text)
    if "{{" not in text:
        return text
    return REFERENCE.sub(lambda match: as_text(resolve(match.group(0))), text)
