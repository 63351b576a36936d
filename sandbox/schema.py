"""JSON Schema checks with a hostile schema (the skill author wrote it) on hostile data (the
skill's output, or a caller's input): bounded in time, depth and memory.

jsonschema as it comes is not: its `pattern`/`patternProperties` run Python's backtracking
`re` (a 28-byte output froze the supervisor for seconds), it follows `$ref`s without end and
fetches remote ones over HTTP, it costs ~11 µs of supervisor CPU per array element (a 1 MB
output of numbers held the GIL for seconds), it compares `uniqueItems` pairwise, and its error
messages `repr()` whole instances. Here:

- regexes (`pattern`, `patternProperties`, and the `additionalProperties` that depends on them)
  run on RE2, which matches in linear time; a schema regex RE2 cannot compile (backreferences,
  lookaround) is refused when the skill loads, with the file and the field;
- every keyword applied and every subschema entered costs one step, and one check may take at
  most `SCHEMA_STEP_BUDGET` steps, so the work per check is bounded by construction;
- `$ref` resolves inside the schema only (no retrieval of any URI);
- the instance is checked through views whose `repr()` is short, so error messages cost
  little whatever the data; `uniqueItems` is linear;
- `unevaluatedProperties`/`unevaluatedItems` are refused at load: jsonschema evaluates them
  by re-walking the schema outside the step budget, with Python's `re`.

Nesting is bounded before any of this runs (`sandbox.jsonbounds`), for the schema as well.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import jsonschema
import re2
import referencing
import referencing.exceptions
from jsonschema.exceptions import ValidationError

from sandbox.jsonbounds import MAX_JSON_DEPTH, within_depth

#: Keywords applied plus subschemas entered, at most, in one schema check (~10 µs of supervisor
#: CPU a step, so ~0.2 s at most). A 2 000-element array of objects with three typed properties
#: takes ~16 000 steps.
SCHEMA_STEP_BUDGET = 20_000

_REFUSED_KEYWORDS = ("unevaluatedProperties", "unevaluatedItems")


class SchemaBudgetExceeded(Exception):
    """The check took more than `SCHEMA_STEP_BUDGET` steps."""


class SchemaProblem(ValueError):
    """A schema this module will not run; the message names where in the schema."""


# -- the step budget -----------------------------------------------------------------------------

_budget = threading.local()


def _charge(steps: int = 1) -> None:
    left: int | None = getattr(_budget, "left", None)
    if left is None:
        return  # not inside `check` (e.g. validating the schema itself at load)
    left -= steps
    if left < 0:
        raise SchemaBudgetExceeded(f"the schema check took more than {SCHEMA_STEP_BUDGET} steps")
    _budget.left = left


def _counted(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def keyword(validator: Any, value: Any, instance: Any, schema: Any) -> Any:
        _charge()
        return function(validator, value, instance, schema)

    return keyword


# -- RE2 ---------------------------------------------------------------------------------------

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@functools.lru_cache(maxsize=512)
def compile_regex(pattern: str) -> Any:
    """The RE2 program for a schema regex; `SchemaProblem` if RE2 cannot take it."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(
            exc.args[0], bytes) else str(exc)
        raise SchemaProblem(f"regex {pattern!r} is not supported: RE2 (linear-time, no "
                            f"backreferences or lookaround) cannot compile it: {detail}") from None


def _search(pattern: str, text: str) -> bool:
    _charge()
    return compile_regex(pattern).search(text) is not None


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{_short(instance)} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any,
                        schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional(instance: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    properties = schema.get("properties", {})
    patterns = list(schema.get("patternProperties", {}))
    return [key for key in instance
            if key not in properties and not any(_search(p, key) for p in patterns)]


def _additional_properties(validator: Any, allowed: Any, instance: Any,
                           schema: Any) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    extras = _additional(instance, schema)
    if validator.is_type(allowed, "object"):
        for extra in extras:
            yield from validator.descend(instance[extra], allowed, path=extra)
    elif not allowed and extras:
        shown = ", ".join(_short(key) for key in extras[:5]) + (", …" if len(extras) > 5 else "")
        yield ValidationError(f"Additional properties are not allowed ({shown} "
                              f"{'was' if len(extras) == 1 else 'were'} unexpected)")


# -- cheap uniqueItems and enum ------------------------------------------------------------------


def _canonical(value: Any) -> Any:
    """A hashable key equal for JSON-equal values (1 == 1.0, true != 1); depth is bounded."""
    if isinstance(value, bool) or value is None:
        return ("b", value)
    if isinstance(value, int | float):
        return ("n", int(value) if isinstance(value, float) and value.is_integer() else value)
    if isinstance(value, str):
        return ("s", str(value))
    if isinstance(value, list):
        return ("a", tuple(_canonical(item) for item in value))
    if isinstance(value, dict):
        return ("o", frozenset((key, _canonical(item)) for key, item in value.items()))
    return ("?", repr(value))


def _unique_items(validator: Any, unique: Any, instance: Any,
                  schema: Any) -> Iterator[ValidationError]:
    if unique and validator.is_type(instance, "array"):
        keys = {_canonical(item) for item in instance}
        if len(keys) != len(instance):
            yield ValidationError(f"{_short(instance)} has non-unique elements")


def _enum(validator: Any, enums: Any, instance: Any, schema: Any) -> Iterator[ValidationError]:
    _charge(len(enums) if isinstance(enums, list) else 1)
    yield from _PLAIN_ENUM(validator, enums, instance, schema)


_PLAIN_ENUM = jsonschema.Draft202012Validator.VALIDATORS["enum"]

# -- short reprs for error messages ----------------------------------------------------------


def _short(value: Any, level: int = 2) -> str:
    """A repr of at most a few dozen characters, whatever the size of `value`."""
    if isinstance(value, str):
        text = str.__str__(value)
        return repr(text[:40]) + (f"…({len(text)} chars)" if len(text) > 40 else "")
    if isinstance(value, list):
        if not value:
            return "[]"
        if level == 0:
            return f"[…{len(value)} items]"
        items = ", ".join(_short(item, level - 1) for item in value[:4])
        return f"[{items}{', …' if len(value) > 4 else ''}]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        if level == 0:
            return f"{{…{len(value)} keys}}"
        pairs = ", ".join(f"{_short(key, 0)}: {_short(item, level - 1)}"
                          for key, item in islice(value.items(), 4))
        return f"{{{pairs}{', …' if len(value) > 4 else ''}}}"
    return repr(value)


def _key(key: Any) -> str:
    text = str(key)
    return text if len(text) <= _LONG_TEXT else f"{text[:_LONG_TEXT]}…"


class _Text(str):
    __slots__ = ()

    def __repr__(self) -> str:
        return _short(self)


class _Array(list[Any]):
    __slots__ = ()

    def __repr__(self) -> str:
        return _short(self)


class _Object(dict[str, Any]):
    __slots__ = ()

    def __repr__(self) -> str:
        return _short(self)


_LONG_TEXT = 40


def _view(value: Any) -> Any:
    """`value` with containers and long strings swapped for subclasses whose repr is short
    (jsonschema formats `{instance!r}` into its messages). Depth is already bounded."""
    kind = type(value)
    if kind is list:
        return _Array([item if type(item) in _SCALARS else _view(item) for item in value])
    if kind is dict:
        return _Object({key: item if type(item) in _SCALARS else _view(item)
                        for key, item in value.items()})
    if kind is str and len(value) > _LONG_TEXT:
        return _Text(value)
    return value


_SCALARS = frozenset({int, float, bool, type(None)})

# -- the validator class ----------------------------------------------------------------------


def _bounded_class(base: Any) -> Any:
    overrides = {name: _counted(function) for name, function in base.VALIDATORS.items()}
    overrides.update({
        "pattern": _counted(_pattern),
        "patternProperties": _counted(_pattern_properties),
        "additionalProperties": _counted(_additional_properties),
        "uniqueItems": _counted(_unique_items),
    })
    if "enum" in base.VALIDATORS:
        overrides["enum"] = _counted(_enum)
    bounded = jsonschema.validators.extend(base, overrides)  # type: ignore[no-untyped-call]
    plain_descend = bounded.descend

    def descend(self: Any, *args: Any, **kwargs: Any) -> Iterator[ValidationError]:
        _charge()
        return plain_descend(self, *args, **kwargs)  # type: ignore[no-any-return]

    bounded.descend = descend
    return bounded


@functools.cache
def _bounded(base: Any) -> Any:
    return _bounded_class(base)


_REGEX_FORMAT = jsonschema.FormatChecker(formats=())


@_REGEX_FORMAT.checks("regex", raises=SchemaProblem)
def _re2_format(value: object) -> bool:
    if isinstance(value, str):
        compile_regex(value)
    return True


class BoundedSchema:
    """A compiled schema whose `check` is bounded; build with `compile_schema`."""

    def __init__(self, validator: Any) -> None:
        self._validator = validator

    def check(self, data: Any) -> str:
        """The best error as `at $.path: message`, or "". Raises `SchemaBudgetExceeded` past
        the budget (and, for a schema that cannot be resolved, whatever jsonschema raises)."""
        _budget.left = SCHEMA_STEP_BUDGET
        try:
            view = _view(data)
            error = jsonschema.exceptions.best_match(self._validator.iter_errors(view))
        finally:
            _budget.left = None
        if error is None:
            return ""
        where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{_key(p)}"
                              for p in error.absolute_path)
        return f"at {where}: {error.message}"


def compile_schema(schema: dict[str, Any]) -> BoundedSchema:
    """Check `schema` and compile it; `SchemaProblem` names what is refused and where."""
    if not within_depth(schema, MAX_JSON_DEPTH):
        raise SchemaProblem(f"the schema is nested deeper than {MAX_JSON_DEPTH} levels")
    refused = _find_keys(schema, _REFUSED_KEYWORDS)
    if refused:
        raise SchemaProblem(f"keyword '{refused}' is not supported: jsonschema evaluates it "
                            "outside the bounds this sandbox puts on schema checks")
    base = jsonschema.validators.validator_for(schema)
    try:
        base.check_schema(schema, format_checker=_REGEX_FORMAT)  # type: ignore[call-arg]
    except jsonschema.SchemaError as exc:
        if isinstance(exc.cause, SchemaProblem):
            where = "/".join(str(part) for part in exc.absolute_path) or "(root)"
            raise SchemaProblem(f"at {where}: {exc.cause}") from None
        raise SchemaProblem(f"not a valid JSON Schema: {exc.message}") from None
    for pattern in _pattern_property_keys(schema):  # drafts whose metaschema does not check them
        compile_regex(pattern)
    # An empty registry: jsonschema adds the metaschemas; nothing is ever retrieved.
    return BoundedSchema(_bounded(base)(schema, registry=referencing.Registry()))


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def _find_keys(schema: Any, keys: tuple[str, ...]) -> str:
    for mapping in _walk(schema):
        for key in keys:
            if isinstance(mapping.get(key), bool | dict):
                return key
    return ""


def _pattern_property_keys(schema: Any) -> Iterator[str]:
    for mapping in _walk(schema):
        patterns = mapping.get("patternProperties")
        if isinstance(patterns, dict):
            yield from patterns

