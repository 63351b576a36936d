"""Keeps the `pick`ed fields of every record (all when absent) and renames them per `rename`."""

from typing import Any


def run(input: dict[str, Any]) -> dict[str, Any]:
    pick = input.get("pick")
    rename: dict[str, str] = input.get("rename", {})
    records = []
    for record in input["records"]:
        kept = {key: record[key] for key in (pick if pick is not None else record) if key in record}
        records.append({rename.get(key, key): value for key, value in kept.items()})
    return {"records": records}
