"""The WASM row: an echo module (openbotstack's reactor shape: `execute`, input through
`env.get_input`, answer through `env.set_output`) run by wasmtime in the execution child, cold
(load, zygote boot with the module's compilation, first execution) and warm, beside the
fork-mode Python echo and a fresh interpreter per execution.

The module is built from WAT at bench time (no binary in the repository). Its compilation is
milliseconds; a Go module's is seconds of CPU (openbotstack's hello-world: ~2 s here, more on a
loaded machine), paid once per zygote boot, not per execution.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from benchmarks.report import Check, Figure, Report
from benchmarks.stats import summarize

WASM_ID = "bench/wasm-echo"
KEY = "wasm_echo"
LABEL = "echo as a WASM reactor (wasmtime in the child)"
ECHO_WAT = """(module
  (import "env" "get_input_len" (func $len (result i32)))
  (import "env" "get_input" (func $get (param i32) (result i32)))
  (import "env" "set_output" (func $set (param i32 i32)))
  (memory (export "memory") 16)
  (func (export "execute")
    (drop (call $get (i32.const 0)))
    (call $set (i32.const 0) (call $len))))
"""


def write_skill(root: Path) -> tuple[Path | None, str]:
    """The echo skill's directory under `root`, or None and why (no wasmtime)."""
    try:
        import wasmtime
    except ImportError:
        return None, "wasmtime is not installed (pip install 'skill-sandbox[wasm]')"
    directory = root / "wasm_echo"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.wasm").write_bytes(wasmtime.wat2wasm(ECHO_WAT))
    (directory / "skill.toml").write_text(f'id = "{WASM_ID}"\nwasm = "main.wasm"\n')
    return directory, ""


def cold_start(sandbox: Any, skill: Any, payload: bytes, expected: Any) -> tuple[float, int]:
    """Seconds from loading the skill (its zygote booted at load: interpreter, wasmtime import,
    compilation) through its first execution; and that zygote's RSS in kB."""
    from benchmarks.project import check_result
    from sandbox import ExecutionRequest

    started = time.perf_counter()
    sandbox.load_skill(skill, warm=True)
    check_result(sandbox.execute(ExecutionRequest(skill_id=skill.id, input=payload)), expected)
    cold = time.perf_counter() - started
    return cold, int(sandbox.zygote_info(skill.id).get("rss_kb", 0))


def figure(report: Report, series: Any, cold_s: float, rss_kb: int, problem: str) -> None:
    if series is None:
        report.add(Figure(key=KEY, label=LABEL, section="latency", skipped=problem))
        return
    summary = summarize(series.samples) if series.samples else None
    item = Figure(key=KEY, label=LABEL, section="latency", summary=summary,
                  errors=series.errors, first_error=series.first_error,
                  data={"cold_s": cold_s, "zygote_rss_kb": rss_kb})
    fork = report.figure("fork_echo")
    spawn = report.figure("spawn_baseline")
    if summary is not None and fork is not None and fork.summary is not None:
        ratio = summary.p50_ms / fork.summary.p50_ms if fork.summary.p50_ms else 0.0
        item.checks.append(Check(f"warm p50 {ratio:.2f}x fork-mode echo", ratio=ratio))
    if summary is not None and spawn is not None and spawn.summary is not None:
        ratio = spawn.summary.p50_ms / summary.p50_ms if summary.p50_ms else 0.0
        item.checks.append(Check(f"{ratio:.1f}x faster than spawn-per-execution", ratio=ratio))
    item.checks.append(Check(f"cold (load, boot with compile, first run) {cold_s * 1e3:.0f} ms; "
                             f"zygote RSS {rss_kb / 1024:.0f} MB"))
    report.add(item)
