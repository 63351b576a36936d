"""The baselines every project figure is compared with, measured in the same run.

- floor: a bare `os.fork()` + pipe write + `wait4` round trip — from this process (the size of
  a supervisor) and from a lean, zygote-sized interpreter;
- spawn-per-execution: a fresh interpreter per run that imports the worker runtime and runs the
  same skill (code-jail style runners, minus their isolation);
- reused worker: a warm `ProcessPoolExecutor` process calling the skill's function — no
  isolation between runs: the throughput ceiling;
- bubblewrap + fresh interpreter, where `bwrap` is installed and works.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.series import RunFailed, Series

PROBES = Path(__file__).resolve().parent / "probes"
#: Progress units of one fresh-interpreter run (a fork-mode execution is one).
SPAWN_WEIGHT = 15
#: Seconds any single baseline run may take before it counts as failed.
RUN_TIMEOUT = 30.0

BWRAP_ARGS = ("--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
              "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
              "--chdir", "/tmp")


class ForkFloor(Series):
    key = "floor"
    label = "floor: fork+pipe+wait4 (supervisor-sized)"

    def once(self) -> None:
        read_end, write_end = os.pipe()
        try:
            pid = os.fork()
            if pid == 0:
                try:
                    os.write(write_end, b"x")
                finally:
                    os._exit(0)
            data = os.read(read_end, 1)
            os.wait4(pid, 0)
        finally:
            os.close(read_end)
            os.close(write_end)
        if data != b"x":
            raise RunFailed(f"the forked child wrote {data!r}")


class LeanForkFloor(Series):
    """The same round trip, timed inside a fresh zygote-sized interpreter (probes/fork_floor)."""

    key = "floor_lean"
    label = "floor: fork+pipe+wait4 (zygote-sized)"

    def __init__(self, runs: int) -> None:
        super().__init__(runs)
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-B", str(PROBES / "fork_floor.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/",
        )

    def _batch(self, count: int) -> list[float]:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"%d\n" % count)
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise RunFailed(f"the floor probe exited with status {process.wait(timeout=10)}")
        return [ns / 1e9 for ns in msgspec.json.decode(line, type=list[int])]

    def warm(self, count: int) -> None:
        try:
            self._batch(count)
        except RunFailed as exc:
            self.failed(exc)

    def run(self, count: int) -> None:
        try:
            self.samples.extend(self._batch(count))
        except RunFailed as exc:
            self.errors += count - 1
            self.failed(exc)

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()


class FreshInterpreter(Series):
    """One fresh interpreter per run, running the skill through the worker runtime."""

    key = "spawn_baseline"
    label = "spawn-per-execution (fresh python)"
    weight = SPAWN_WEIGHT

    def __init__(self, runs: int, skill_dir: Path, payload: bytes, expected: Any,
                 prefix: tuple[str, ...] = ()) -> None:
        super().__init__(runs)
        self.argv = [*prefix, sys.executable, "-I", "-B", str(PROBES / "spawn_echo.py"),
                     str(skill_dir)]
        self.payload = payload
        self.expected = expected

    def once(self) -> None:
        try:
            done = subprocess.run(self.argv, input=self.payload, capture_output=True,
                                  timeout=RUN_TIMEOUT, check=False, cwd="/")
        except subprocess.TimeoutExpired:
            raise RunFailed(f"no answer within {RUN_TIMEOUT:g}s") from None
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise RunFailed(f"exit status {done.returncode}: {' '.join(detail)}")
        if msgspec.json.decode(done.stdout or b"null") != self.expected:
            raise RunFailed(f"unexpected output {done.stdout[:200]!r}")


class BubblewrapInterpreter(FreshInterpreter):
    key = "bwrap_baseline"
    label = "bubblewrap + fresh python"

    def __init__(self, runs: int, skill_dir: Path, payload: bytes, expected: Any,
                 bwrap: str) -> None:
        super().__init__(runs, skill_dir, payload, expected, prefix=(bwrap, *BWRAP_ARGS))


def bwrap_unavailable() -> tuple[str, str]:
    """(path to bwrap, "") when bubblewrap works here, else ("", why not)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "", "bwrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        done = subprocess.run([bwrap, *BWRAP_ARGS, sys.executable, "-I", "-c", "pass"],
                              capture_output=True, timeout=RUN_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return "", f"bwrap did not run: {exc}"
    if done.returncode != 0:
        detail = done.stderr.decode(errors="replace").strip()
        return "", f"bwrap cannot create its sandbox here: {detail or done.returncode}"
    return bwrap, ""


# -- reused worker --------------------------------------------------------------------------

_reused_function: Callable[[Any], Any] | None = None


def load_function(skill_dir: Path, entrypoint: str = "main:run") -> Callable[[Any], Any]:
    """Import a skill's entrypoint from its file, under a name no other skill shares."""
    module_name, _, function_name = entrypoint.partition(":")
    path = skill_dir / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(
        f"_bench_skill_{abs(hash(str(path))):x}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function: Callable[[Any], Any] = getattr(module, function_name)
    return function


def _reused_init(skill_dir: str) -> None:
    global _reused_function
    _reused_function = load_function(Path(skill_dir))


def _reused_call(payload: bytes) -> bytes:
    assert _reused_function is not None
    return msgspec.json.encode(_reused_function(msgspec.json.decode(payload)))


def reused_pool(skill_dir: Path, workers: int) -> ProcessPoolExecutor:
    """Warm worker processes with the skill's function loaded (spawned, not forked: the
    harness has threads)."""
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_reused_init, initargs=(str(skill_dir),))
    # Start every worker now, so no measured call pays for an interpreter start.
    for future in [pool.submit(_reused_call, b"null") for _ in range(workers * 4)]:
        future.result(timeout=60)
    return pool


class ReusedWorker(Series):
    key = "reused_worker"
    label = "reused worker (ProcessPoolExecutor)"

    def __init__(self, runs: int, pool: ProcessPoolExecutor, payload: bytes,
                 expected: Any) -> None:
        super().__init__(runs)
        self.pool = pool
        self.payload = payload
        self.expected = expected

    def once(self) -> None:
        output = self.pool.submit(_reused_call, self.payload).result(timeout=RUN_TIMEOUT)
        if msgspec.json.decode(output) != self.expected:
            raise RunFailed(f"unexpected output {output[:200]!r}")
