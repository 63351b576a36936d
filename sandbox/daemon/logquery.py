"""Opening and querying the daemon's execution log (SQLite, or JSON Lines by suffix), shared by
the API (`GET /v1/executions`) and `skill-sandbox logs --db` (which works with the daemon down).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sandbox.execlog import (
    ExecutionLogRecord,
    JsonlExecutionLogger,
    RecordLogger,
    SqliteExecutionLogger,
    iter_jsonl,
)

MAX_LIMIT = 1000
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def is_jsonl(path: str | Path) -> bool:
    return str(path).endswith((".jsonl", ".ndjson"))


def open_logger(path: str | Path) -> RecordLogger:
    """A logger writing to `path`; the parent directory is created (mode 0750)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    return JsonlExecutionLogger(target) if is_jsonl(target) else SqliteExecutionLogger(target)


def parse_since(text: str, now: float | None = None) -> float:
    """Epoch seconds from an age (`90s`, `15m`, `2h`, `7d`) or an ISO 8601 time."""
    match = _AGE.match(text)
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * \
            _AGE_UNITS[match.group(2)]
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since: {text!r} is neither an age like '15m', '2h', '7d' nor an ISO "
                         "time like '2026-01-31T12:00:00+00:00'") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is the operator's local time
    return moment.timestamp()


@dataclass(frozen=True)
class Filters:
    request_id: str | None = None
    tenant_id: str | None = None
    skill_id: str | None = None
    status: str | None = None
    since: float | None = None
    limit: int = 100

    @classmethod
    def from_strings(cls, values: dict[str, str | None]) -> Filters:
        unknown = sorted(set(values) - {"request_id", "tenant_id", "skill_id", "status",
                                        "since", "limit"})
        if unknown:
            raise ValueError(f"unknown filter(s): {', '.join(unknown)} (use request_id, "
                             "tenant_id, skill_id, status, since, limit)")
        limit_text = values.get("limit") or "100"
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= MAX_LIMIT:
            raise ValueError(f"limit: {limit_text!r} is not a number from 1 to {MAX_LIMIT}")
        since = values.get("since")
        return cls(request_id=values.get("request_id") or None,
                   tenant_id=values.get("tenant_id") or None,
                   skill_id=values.get("skill_id") or None,
                   status=values.get("status") or None,
                   since=parse_since(since) if since else None, limit=int(limit_text))


def query(source: RecordLogger | str | Path, filters: Filters) -> list[dict[str, Any]]:
    """Matching records, newest first, as JSON-ready dicts."""
    if isinstance(source, SqliteExecutionLogger):
        records = source.query(request_id=filters.request_id, tenant_id=filters.tenant_id,
                               skill=filters.skill_id, status=filters.status,
                               since=filters.since, limit=filters.limit, newest_first=True)
        return [record.to_dict() for record in records]
    path = getattr(source, "path", source)
    if not isinstance(path, str | Path):
        raise ValueError("this execution log cannot be queried")
    if is_jsonl(path):
        return [record.to_dict() for record in _scan_jsonl(Path(path), filters)]
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no execution log here")
    reader = SqliteExecutionLogger(path)
    try:
        return query(reader, filters)
    finally:
        reader.close()


def _scan_jsonl(path: Path, filters: Filters) -> list[ExecutionLogRecord]:
    matching = [
        record for record in iter_jsonl(path)
        if (filters.request_id is None or record.request_id == filters.request_id)
        and (filters.tenant_id is None or record.tenant_id == filters.tenant_id)
        and (filters.skill_id is None or record.step_name == filters.skill_id)
        and (filters.status is None or record.status == filters.status)
        and (filters.since is None or record.timestamp.timestamp() >= filters.since)
    ]
    return matching[::-1][:filters.limit]
