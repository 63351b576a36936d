"""Figures, their comparisons and targets, and the two ways they leave the harness: a table on
stdout and a JSON document on disk."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.stats import Summary


@dataclass(frozen=True)
class Check:
    """One comparison of a figure: with a baseline (`compare`), against a target when the
    issue sets one (`target`, `met`)."""

    compare: str
    target: str = ""
    met: bool | None = None
    ratio: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"compare": self.compare, "ratio": None if self.ratio is None
                else round(self.ratio, 4), "target": self.target or None, "met": self.met}


@dataclass
class Figure:
    key: str
    label: str
    section: str
    summary: Summary | None = None  # latency figures
    value: float | None = None  # everything else, in `unit`
    unit: str = ""
    display: str = ""  # how to show `value` when a number alone says too little
    checks: list[Check] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    skipped: str = ""  # why the figure was not measured
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"label": self.label, "section": self.section}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.summary is not None:
            out["latency_ms"] = self.summary.to_json()
        if self.value is not None:
            out["value"] = round(self.value, 4)
            out["unit"] = self.unit
        if self.checks:
            out["checks"] = [check.to_json() for check in self.checks]
        if self.errors:
            out["errors"] = self.errors
            out["first_error"] = self.first_error
        out.update(self.data)
        return out


@dataclass
class Report:
    config: dict[str, Any]
    machine: dict[str, Any]
    python: dict[str, Any]
    commit: dict[str, Any]
    started: str
    duration_s: float = 0.0
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def figure(self, key: str) -> Figure | None:
        return next((item for item in self.figures if item.key == key), None)

    def targets(self) -> list[dict[str, Any]]:
        return [{"figure": item.key, "target": check.target, "met": check.met,
                 "compare": check.compare}
                for item in self.figures for check in item.checks if check.target]

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": 1,
            "started": self.started,
            "duration_s": round(self.duration_s, 2),
            "machine": self.machine,
            "python": self.python,
            "commit": self.commit,
            "config": self.config,
            "figures": {item.key: item.to_json() for item in self.figures},
            "targets": self.targets(),
            "notes": self.notes,
            **self.extra,
        }

    def write_json(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        return path


# -- the table ------------------------------------------------------------------------------

_SECTIONS = {
    "baseline": "Baselines (same run)",
    "latency": "Sandbox.execute latency, sequential",
    "throughput": "Throughput and latency under load",
    "cpu": "CPU-bound overhead",
    "footprint": "Footprint",
    "daemon": "Daemon over the Unix socket",
    "fleet": "Fleet: Celery workers on Redis (loopback, this machine)",
}


def _verdict(check: Check | None) -> str:
    if check is None or not check.target:
        return ""
    return "met" if check.met else "MISSED"


def _columns(item: Figure) -> tuple[str, str]:
    if item.skipped:
        return "skipped", ""
    if item.summary is not None:
        return f"{item.summary.p50_ms:.3f} ms", f"{item.summary.p99_ms:.3f} ms"
    if item.display:
        return item.display, ""
    if item.value is not None:
        return f"{item.value:,.1f} {item.unit}".strip(), ""
    return "", ""


def render_table(report: Report) -> str:
    header = ("figure", "p50 / value", "p99", "compared with", "target", "")
    rows: list[tuple[str, ...] | str] = []
    for section, title in _SECTIONS.items():
        members = [item for item in report.figures if item.section == section]
        if not members:
            continue
        rows.append(f"-- {title}")
        for item in members:
            first, second = _columns(item)
            checks: list[Check | None] = list(item.checks) or [None]
            for index, check in enumerate(checks):
                label = item.label if index == 0 else ""
                cells = (first, second) if index == 0 else ("", "")
                compare = check.compare if check else (item.skipped if item.skipped else "")
                rows.append((label, *cells, compare, check.target if check else "",
                             _verdict(check)))
            if item.errors:
                rows.append(("", "", "", f"!! {item.errors} failed runs: {item.first_error}",
                             "", "ERRORS"))
    table_rows = [row for row in rows if isinstance(row, tuple)]
    widths = [max(len(header[i]), *(len(row[i]) for row in table_rows)) for i in range(6)]
    widths[3] = min(widths[3], 44)

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(widths[i]) if i != 1 and i != 2 else cell.rjust(widths[i])
                         for i, cell in enumerate(cells)).rstrip()

    out = [line(header), line(tuple("-" * width for width in widths))]
    for row in rows:
        out.append(row if isinstance(row, str) else line(row))
    return "\n".join(out)


def _layers(isolation: Any) -> str:
    """`name (status)` for each layer of `Sandbox.capabilities()`, or what was said instead."""
    layers = isolation.get("layers") if isinstance(isolation, dict) else None
    if not isinstance(layers, list):
        return str(isolation or "not reported")
    names = [f"{layer.get('name')} ({layer.get('status')})" for layer in layers
             if isinstance(layer, dict)]
    return ", ".join(names) or "none reported"


def render(report: Report, json_path: Path | None) -> str:
    machine = report.machine
    python = report.python
    commit = report.commit
    lines = [
        f"Skill Sandbox benchmark — {report.started}, {report.duration_s:.0f} s",
        f"machine: {machine.get('cpu_model')} x {machine.get('cpus')} "
        f"({machine.get('cpus_usable')} usable), {machine.get('memory_mb')} MB, "
        f"{machine.get('os')}, kernel {machine.get('kernel')}",
        f"python {python.get('version')} ({python.get('executable')}), "
        f"commit {commit.get('sha', '')[:12]}{' (dirty)' if commit.get('dirty') else ''}, "
        f"load average at start {machine.get('load_average')}",
        f"isolation layers: {_layers(report.extra.get('isolation'))}",
        "",
        render_table(report),
    ]
    targets = report.targets()
    if targets:
        met = sum(1 for item in targets if item["met"])
        lines += ["", f"targets met: {met} of {len(targets)}"]
    if report.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in report.notes]
    if json_path is not None:
        lines += ["", f"JSON written to {json_path}"]
    return "\n".join(lines)
