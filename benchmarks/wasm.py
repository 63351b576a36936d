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


GO_KEY = "wasm_go_reboot"
GO_LABEL = "Go WASM module (openbotstack hello-world): zygote re-boot"
#: openbotstack's hello-world (a wasip1 Go module, 3.4 MB), beside the repository as in tests.
GO_MODULE = (Path(__file__).resolve().parents[1].parent / "shared" / "reference"
             / "openbotstack" / "runtime-wasip1" / "hello-world" / "main.wasm")
_REBOOTS = 5


def go_reboot(report: Report, workdir: Path, quick: bool = False) -> None:
    """A Go module's cold boot (its compile: seconds of CPU) against its re-boots after a
    crash, which deserialize the compiled module the supervisor kept: first answer, each."""
    if quick:
        report.add(Figure(key=GO_KEY, label=GO_LABEL, section="latency",
                          skipped="not in a quick run (its compile alone takes seconds)"))
        return
    if not GO_MODULE.is_file():
        report.add(Figure(key=GO_KEY, label=GO_LABEL, section="latency",
                          skipped=f"openbotstack's reference skills are not at {GO_MODULE}"))
        return
    import shutil

    import psutil

    from sandbox import ExecutionRequest, Sandbox, Skill

    directory = workdir / "go_hello"
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(GO_MODULE, directory / "main.wasm")
    (directory / "skill.toml").write_text(
        'id = "bench/go-hello"\nwasm = "main.wasm"\n[permissions]\nhost = ["log:write"]\n'
        "[limits]\nmemory_mb = 64\ntimeout = 30.0\n")
    skill = Skill.from_dir(directory)
    request = ExecutionRequest(skill_id=skill.id, input=b'{"message": "hello"}')
    with Sandbox([skill], max_zygotes=None) as sandbox:
        started = time.perf_counter()
        first = sandbox.execute(request)
        cold = time.perf_counter() - started
        reboots = []
        for _ in range(_REBOOTS):
            psutil.Process(sandbox.zygote_info(skill.id)["pid"]).kill()
            time.sleep(0.2)  # the zygote's death seen before the next request
            started = time.perf_counter()
            result = sandbox.execute(request)
            reboots.append(time.perf_counter() - started)
            if not result.ok or sandbox.zygote_info(skill.id)["wasm_module"] != "cached":
                why = result.error or "not from the kept compiled module"
                report.add(Figure(key=GO_KEY, label=GO_LABEL, section="latency", errors=1,
                                  first_error=f"re-boot: {why}"))
                return
    if not first.ok:
        report.add(Figure(key=GO_KEY, label=GO_LABEL, section="latency", errors=1,
                          first_error=f"cold: {first.error}"))
        return
    reboots.sort()
    median = reboots[len(reboots) // 2]
    item = Figure(key=GO_KEY, label=GO_LABEL, section="latency", value=median * 1e3, unit="ms",
                  data={"cold_s": cold, "reboot_s": reboots})
    item.checks.append(Check(f"cold boot with its compile {cold:.2f} s; re-boot from the kept "
                             f"compiled module {median * 1e3:.0f} ms (median of {_REBOOTS}), "
                             f"{cold / median:.0f}x faster", ratio=cold / median))
    report.add(item)
