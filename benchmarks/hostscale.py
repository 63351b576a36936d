"""Thousands of skills on one host (issue 13): the targets, each against a baseline of the run.

- cold first execution of a never-run skill, zygote forked from the shared base: p50 ≤ 25 ms
  and ≤ 10x a warm execution; against the same with exec'd zygotes (`base_zygote=False`);
- 1,000 skills loaded from a directory tree (`Skill.discover`) to ready in ≤ 2 s, against one;
- 1,000 loaded and 20 hot: PSS of every process below the supervisor ≤ 150 MB (against the same
  with exec'd zygotes);
- a Zipf-distributed mix over the 1,000 at concurrency 4: ≥ 70 % of one skill's throughput.

Run these rows alone with `python -m benchmarks.hostscale` (add `--quick` for a smoke run).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from benchmarks.report import Check, Figure
from benchmarks.stats import summarize

SKILLS = 1000
HOT = 20
COLD_SAMPLES = 40
WARM_SAMPLES = 40
ZIPF_S = 1.1
ZIPF_RUNS = 2000
CONCURRENCY = 4
# The targets.
COLD_P50_MS = 25.0
COLD_VS_WARM = 10.0
READY_S = 2.0
PSS_MB = 150.0
ZIPF_SHARE = 0.70


def write_tree(root: Path, count: int) -> None:
    """`count` trivial skills, two levels deep (a tree, as an operator's skills directory)."""
    for index in range(count):
        directory = root / f"group{index // 100}" / f"s{index}"
        directory.mkdir(parents=True)
        (directory / "main.py").write_text("def run(input):\n    return input\n")
        (directory / "skill.toml").write_text(
            f'id = "scale/s{index}"\nversion = "0.1.0"\nentrypoint = "main:run"\n')


def _timed(sandbox: object, skill_id: str) -> float:
    from sandbox import ExecutionRequest, Sandbox

    assert isinstance(sandbox, Sandbox)
    started = time.perf_counter()
    result = sandbox.execute(ExecutionRequest(skill_id=skill_id, input=b"1", timeout=60))
    elapsed = time.perf_counter() - started
    if not result.ok:
        raise RuntimeError(f"{skill_id}: {result.error}")
    return elapsed


def _cold_and_warm(root: Path, base: bool, samples: int) -> tuple[list[float], list[float]]:
    """First executions of never-run skills (after one cold start that starts the base), and
    warm executions of one skill."""
    from sandbox import Sandbox, Skill

    with Sandbox(Skill.discover(root), base_zygote=base) as sandbox:
        _timed(sandbox, "scale/s0")  # the base starts here (and host detection is behind us)
        cold = [_timed(sandbox, f"scale/s{index}") for index in range(1, samples + 1)]
        warm = [_timed(sandbox, "scale/s0") for _ in range(samples)]
    return cold, warm


def cold_start(root: Path, samples: int) -> Figure:
    key, label = "cold_first_execution_base", "cold first execution, zygote forked from the base"
    try:
        cold, warm = _cold_and_warm(root, True, samples)
        exec_cold, _ = _cold_and_warm(root, False, samples)
    except (OSError, RuntimeError) as exc:
        return Figure(key=key, label=label, section="footprint", skipped=repr(exc))
    summary, warm_s, exec_s = summarize(cold), summarize(warm), summarize(exec_cold)
    vs_warm = summary.p50_ms / warm_s.p50_ms
    vs_exec = summary.p50_ms / exec_s.p50_ms
    return Figure(
        key=key, label=label, section="footprint", summary=summary,
        data={"warm_p50_ms": warm_s.p50_ms, "exec_cold_p50_ms": exec_s.p50_ms},
        checks=[Check(f"{vs_exec:.2f}x an exec'd zygote's cold start "
                      f"(p50 {exec_s.p50_ms:.1f} ms)", ratio=vs_exec),
                Check(f"p50 {summary.p50_ms:.1f} ms", f"≤ {COLD_P50_MS:g} ms",
                      summary.p50_ms <= COLD_P50_MS),
                Check(f"{vs_warm:.1f}x warm (p50 {warm_s.p50_ms:.1f} ms)",
                      f"≤ {COLD_VS_WARM:g}x", vs_warm <= COLD_VS_WARM, ratio=vs_warm)],
    )


def _ready(root: Path) -> float:
    from sandbox import Sandbox, Skill

    started = time.perf_counter()
    sandbox = Sandbox(Skill.discover(root))
    elapsed = time.perf_counter() - started
    sandbox.close()
    return elapsed


def load_time(root: Path, one: Path, count: int) -> Figure:
    key, label = "catalogue_1000_ready", f"{count} skills from a directory tree to ready"
    _ready(one)  # imports and host detection, once per process
    single = _ready(one)
    ready = _ready(root)
    ratio = ready / single if single > 0 else 0.0
    return Figure(key=key, label=label, section="footprint", value=ready * 1e3, unit="ms",
                  data={"skills": count, "ready_s": ready, "single_s": single},
                  checks=[Check(f"{ratio:.1f}x one skill ({single * 1e3:.1f} ms)", ratio=ratio),
                          Check(f"{ready:.2f} s", f"≤ {READY_S:g} s", ready <= READY_S)])


def _pss_below(pid: int, exclude: frozenset[int] = frozenset()) -> tuple[int, int]:
    """PSS in bytes of every process below `pid` but those in `exclude` (the full bench's other
    sandboxes and pool, alive while this row runs), and how many there are."""
    total = count = 0
    for process in psutil.Process(pid).children(recursive=True):
        if process.pid in exclude:
            continue
        try:
            total += process.memory_full_info().pss
            count += 1
        except psutil.Error:
            continue
    return total, count


def _hot_pss(root: Path, base: bool, hot: int) -> tuple[int, int]:
    import os

    from sandbox import Sandbox, Skill

    before = frozenset(child.pid for child in psutil.Process().children(recursive=True))
    with Sandbox(Skill.discover(root), base_zygote=base) as sandbox:
        for index in range(hot):
            _timed(sandbox, f"scale/s{index}")
        time.sleep(0.2)  # spares forked after the last executions
        return _pss_below(os.getpid(), exclude=before)


def footprint(root: Path, hot: int) -> Figure:
    key, label = "pss_1000_loaded_20_hot", f"PSS below the supervisor, {hot} of 1,000 hot"
    try:
        pss, processes = _hot_pss(root, True, hot)
        exec_pss, _ = _hot_pss(root, False, hot)
    except (OSError, RuntimeError, psutil.Error) as exc:
        return Figure(key=key, label=label, section="footprint", skipped=repr(exc))
    mb, exec_mb = pss / 2**20, exec_pss / 2**20
    ratio = mb / exec_mb if exec_mb else 0.0
    return Figure(key=key, label=label, section="footprint", value=mb, unit="MB",
                  display=f"{mb:.1f} MB, {processes} processes",
                  data={"pss_mb": mb, "exec_pss_mb": exec_mb, "processes": processes},
                  checks=[Check(f"{ratio:.2f}x with exec'd zygotes ({exec_mb:.1f} MB)",
                                ratio=ratio),
                          Check(f"{mb:.1f} MB", f"≤ {PSS_MB:g} MB", mb <= PSS_MB)])


def _throughput(root: Path, skill_ids: list[str], max_zygotes: int | None = 64) -> float:
    """Executions per second of `skill_ids` (in order) at `CONCURRENCY`, after one unmeasured
    pass of the same mix (the steady state: the hot set's zygotes are up, as far as
    `max_zygotes` lets them stay)."""
    from sandbox import Sandbox, Skill

    with Sandbox(Skill.discover(root), max_concurrency=CONCURRENCY,
                 max_zygotes=max_zygotes) as sandbox, \
            ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(lambda skill_id: _timed(sandbox, skill_id), skill_ids))
        started = time.perf_counter()
        list(pool.map(lambda skill_id: _timed(sandbox, skill_id), skill_ids))
        return len(skill_ids) / (time.perf_counter() - started)


def zipf_mix(root: Path, count: int, runs: int) -> Figure:
    key = "zipf_throughput_1000"
    label = f"throughput, Zipf({ZIPF_S:g}) mix over {count} skills, concurrency {CONCURRENCY}"
    rng = random.Random(13)
    weights = [1 / (rank ** ZIPF_S) for rank in range(1, count + 1)]
    mix = [f"scale/s{index}" for index in rng.choices(range(count), weights, k=runs)]
    distinct = len(set(mix))
    try:
        single = _throughput(root, ["scale/s0"] * runs)
        # A zygote budget that holds the mix's working set (what an operator sizes
        # `max_zygotes` to), and the default budget of 64, which evicts part of it.
        mixed = _throughput(root, mix, max_zygotes=distinct)
        evicting = _throughput(root, mix)
    except (OSError, RuntimeError) as exc:
        return Figure(key=key, label=label, section="throughput", skipped=repr(exc))
    share, evicting_share = mixed / single, evicting / single
    return Figure(key=key, label=label, section="throughput", value=mixed, unit="/s",
                  data={"single_per_s": single, "distinct_skills": distinct,
                        "default_budget_per_s": evicting},
                  checks=[Check(f"{share:.0%} of one skill's ({single:.0f}/s) with "
                                f"max_zygotes = {distinct} (the mix's distinct skills)",
                                f"≥ {ZIPF_SHARE:.0%}", share >= ZIPF_SHARE, ratio=share),
                          Check(f"{evicting_share:.0%} with the default max_zygotes = 64 "
                                "(evicting part of the working set)", ratio=evicting_share)])


def measure(quick: bool = False) -> list[Figure]:
    count = 100 if quick else SKILLS
    with tempfile.TemporaryDirectory(prefix="bench-hostscale-") as tmp:
        root, one = Path(tmp) / "many", Path(tmp) / "one"
        write_tree(root, count)
        write_tree(one, 1)
        return [cold_start(root, 5 if quick else COLD_SAMPLES),
                load_time(root, one, count),
                footprint(root, 3 if quick else HOT),
                zipf_mix(root, count, 50 if quick else ZIPF_RUNS)]


def main() -> None:
    for figure in measure(quick="--quick" in sys.argv[1:]):
        line = figure.display or (f"p50 {figure.summary.p50_ms:.1f} ms" if figure.summary
                                  else f"{figure.value:.1f} {figure.unit}" if figure.value
                                  is not None else figure.skipped)
        print(f"{figure.label}: {line}")
        for check in figure.checks:
            verdict = "" if check.met is None else (" [met]" if check.met else " [NOT met]")
            print(f"    {check.compare} {check.target}{verdict}")


if __name__ == "__main__":
    main()
