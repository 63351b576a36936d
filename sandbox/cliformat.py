"""How the command line prints: JSON for scripts, plain aligned tables and key/value pairs for
people. Its own module so that command groups kept beside their features (`sandbox.fleet.cli`)
print alike without importing `sandbox.cli`, which imports them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import click

from sandbox.skilltext import printable


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned table (no box drawing: it must survive `less`, logs and e-mail)."""
    cells = [[str(header) for header in headers]] + \
        [["-" if value is None else printable(str(value), keep="") for value in row]
         for row in rows]
    widths = [max(len(row[col]) for row in cells) for col in range(len(headers))]
    lines = ["  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True))
             .rstrip() for row in cells]
    return "\n".join(lines)


def pairs(items: Iterable[tuple[str, Any]]) -> str:
    items = [(key, value) for key, value in items if value not in (None, "", [])]
    width = max((len(key) for key, _ in items), default=0)
    return "\n".join(f"{key.ljust(width)}  {printable(str(value))}" for key, value in items)
