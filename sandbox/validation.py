"""One wording for pydantic's validation errors: every file, body and config names the field."""

from __future__ import annotations

from pydantic import ValidationError


def field_problems(error: ValidationError, whole: str) -> list[tuple[str, str]]:
    """`(dotted field, message)` per problem; `whole` names a problem with the document itself.

    An unexpected key reads "unknown field" (pydantic's "Extra inputs are not permitted" does
    not say which mistake was made), and validators' "Value error, " prefix is dropped.
    """
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or whole
        if item["type"] == "extra_forbidden":
            message = "unknown field"
        else:
            message = item["msg"].removeprefix("Value error, ")
        problems.append((field, message))
    return problems


def describe(error: ValidationError, source: str, whole: str) -> str:
    """`source: field 'a.b': message; …` — the text of a load error."""
    return "; ".join(f"{source}: field '{field}': {message}"
                     for field, message in field_problems(error, whole))
