"""Decoding JSON that a skill chose (its output) or that is checked with a schema a skill's
author chose (the caller's input): bounded in depth before any recursive code sees it.

Bounds, each enforced here or by msgspec underneath:

- size: the caller's cap (`max_output_bytes` for output) is checked before decoding;
- depth: at most `MAX_JSON_DEPTH` nested arrays/objects, counted on the raw bytes in C-speed
  passes (strings removed, brackets kept, then a running sum; ≤ ~60 ms per MB), so neither
  msgspec, jsonschema, the execution log nor a JSON response ever recurses deeper than that;
- numbers: msgspec parses each number in one linear pass and refuses integers outside 64 bits
  and floats outside the double range, so no number costs more than its bytes;
- time: every step above is linear in the input's size.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import msgspec

#: Deepest nesting of arrays/objects accepted from a skill (and in checked input). Real data
#: rarely passes 10; 64 keeps every recursive consumer far from Python's recursion limit.
MAX_JSON_DEPTH = 64

# A string from its opening quote to its closing quote, or to the end of the data. Every match
# attempt that starts at a quote succeeds, so the scan is one linear pass even on hostile input.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
_OPENERS_CLOSERS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(sorted(set(range(256)) - set(b"[]{}")))
_PLUS_MINUS = bytes.maketrans(b"[]", b"\x01\xff")


def depth_problem(raw: bytes, limit: int = MAX_JSON_DEPTH) -> str:
    """Why `raw` nests arrays/objects deeper than `limit`, or "" (also "" for malformed JSON
    whose brackets are shallow: the decoder reports that). Linear in `len(raw)` per level."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return ""  # the common case: too few brackets to be too deep
    skeleton = _STRING.sub(b"", raw).translate(_OPENERS_CLOSERS, _NOT_BRACKETS)
    peeled_levels = 0
    while skeleton and peeled_levels < limit:
        # Peel the innermost pairs while that halves the work; most data is done here.
        peeled = skeleton.replace(b"[]", b"")
        if len(peeled) > len(skeleton) // 2:
            break
        skeleton = peeled
        peeled_levels += 1
    if not skeleton:
        return ""
    # What is left: the running depth as signed bytes, summed in C (~50 ms per MB).
    steps = memoryview(skeleton.translate(_PLUS_MINUS)).cast("b")
    if max(itertools.accumulate(steps)) + peeled_levels > limit:
        return f"arrays/objects nested deeper than {limit} levels"
    return ""


def decode(raw: bytes | memoryview) -> tuple[Any, str]:
    """`(data, "")` for acceptable JSON, else `(None, problem)` with `problem` reading
    "not JSON: …" or "not acceptable JSON: …". Never raises, whatever the bytes."""
    data = bytes(raw)
    problem = depth_problem(data)
    if problem:
        return None, f"not acceptable JSON: {problem}"
    try:
        return msgspec.json.decode(data), ""
    except msgspec.DecodeError as exc:
        return None, f"not JSON: {exc}"
    except RecursionError:  # only when the caller's own stack is already deep
        return None, "not acceptable JSON: nested too deeply for this thread"


def within_depth(value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether already-decoded `value` nests no deeper than `limit`, walked without recursion
    (for values that did not come through `decode`, such as a plan step's output)."""
    level: list[Any] = [value]
    for _ in range(limit):
        below: list[Any] = []
        for item in level:
            if isinstance(item, dict):
                below.extend(child for child in item.values() if isinstance(child, list | dict))
            elif isinstance(item, list | tuple):
                below.extend(child for child in item if isinstance(child, list | tuple | dict))
        if not below:
            return True
        level = below
    return False
