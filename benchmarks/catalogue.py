"""Loading a catalogue of skills: 100 trivial skills to ready, against one skill loaded alike.

Zygotes are lazy (they start on first use), so loading is reading manifests and registering
skills; this row shows the load time and the processes it costs, and the cold first execution
that pays the boot instead.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.report import Check, Figure

CATALOGUE = 100
#: The issue's target scaled to this row: 1,000 skills to ready in 2 s is 2 ms per skill.
READY_MS_PER_SKILL = 2.0


def _write(root: Path, count: int) -> list[Path]:
    dirs = []
    for index in range(count):
        directory = root / f"s{index}"
        directory.mkdir()
        (directory / "main.py").write_text("def run(input):\n    return input\n")
        (directory / "skill.toml").write_text(
            f'id = "catalogue/s{index}"\nversion = "0.1.0"\nentrypoint = "main:run"\n')
        dirs.append(directory)
    return dirs


def _load(dirs: list[Path]) -> tuple[float, int, float]:
    """Seconds from manifests on disk to a ready sandbox, processes it started, and the first
    (cold) execution's seconds."""
    from sandbox import ExecutionRequest, Sandbox, Skill

    me = psutil.Process()
    before = {process.pid for process in me.children(recursive=True)}
    started = time.perf_counter()
    sandbox = Sandbox([Skill.from_dir(directory) for directory in dirs])
    ready = time.perf_counter() - started
    try:
        processes = len({process.pid for process in me.children(recursive=True)} - before)
        started = time.perf_counter()
        result = sandbox.execute(ExecutionRequest(skill_id="catalogue/s0", input=b"1"))
        cold = time.perf_counter() - started
        if not result.ok:
            raise RuntimeError(f"cold execution failed: {result.error}")
    finally:
        sandbox.close()
    return ready, processes, cold


def measure() -> Figure:
    key, label = "catalogue_100_ready", f"{CATALOGUE} skills loaded: time to ready, processes"
    with tempfile.TemporaryDirectory(prefix="bench-catalogue-") as tmp:
        root = Path(tmp)
        (root / "one").mkdir()
        (root / "many").mkdir()
        one = _write(root / "one", 1)
        many = _write(root / "many", CATALOGUE)
        try:
            _load(one)  # imports, host detection: once per process, not per load
            single, _, _ = _load(one)
            ready, processes, cold = _load(many)
        except (OSError, RuntimeError) as exc:
            return Figure(key=key, label=label, section="footprint", skipped=repr(exc))
    ratio = ready / single if single > 0 else 0.0
    per_skill_ms = ready * 1e3 / CATALOGUE
    return Figure(
        key=key, label=label, section="footprint", value=ready * 1e3, unit="ms",
        display=f"{ready * 1e3:.0f} ms, {processes} processes",
        data={"skills": CATALOGUE, "ready_s": ready, "single_s": single,
              "processes": processes, "cold_first_execution_s": cold},
        checks=[Check(f"{ratio:.1f}x one skill loaded ({single * 1e3:.1f} ms)", ratio=ratio),
                Check(f"{per_skill_ms:.2f} ms per skill; first execution (cold) "
                      f"{cold * 1e3:.1f} ms", f"≤ {READY_MS_PER_SKILL:g} ms per skill",
                      per_skill_ms <= READY_MS_PER_SKILL)],
    )
