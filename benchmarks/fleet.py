"""The fleet (`sandbox.fleet`): latency the queue adds over in-process `execute`, throughput with
one and with two workers, and the Redis commands one execution costs.

A private redis-server on 127.0.0.1 (a free port, no persistence) and `skill-sandbox worker`
subprocesses standing for hosts, all started and stopped here; the client is `FleetClient` in
this process. On one 2-core machine two workers share the same cores as one: the second buys
little, and the figure says so. Run alone with `python -m benchmarks.fleet`.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import msgspec

from benchmarks.report import Check, Figure
from benchmarks.stats import summarize

SECTION = "fleet"
START_TIMEOUT = 60.0
#: Client threads sending at once in the throughput runs.
CLIENT_THREADS = 8


def unavailable() -> str:
    """Why the fleet cannot be measured here ("" when it can)."""
    for module in ("celery", "redis"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install 'skill-sandbox[fleet]')"
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian package redis-server; `make bench` " \
               "installs it as root)"
    return ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _Processes:
    """redis-server and the workers, stopped and reaped by `close`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.procs.append(subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", str(directory)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)

    def worker(self, skill_dir: Path, node: str, concurrency: int) -> None:
        ready = self.directory / f"{node}.ready"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "worker", "--broker", self.url,
             "--skills", str(skill_dir), "--node", node, "--max-concurrency", str(concurrency),
             "--execution-log", str(self.directory / f"{node}.jsonl"),
             "--ready-file", str(ready), "--log-level", "warning"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker {node} did not start")
            time.sleep(0.05)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _commands(client: Any) -> int:
    """Commands Redis has processed so far (INFO stats)."""
    return int(client.info("stats")["total_commands_processed"])


def measure(sandbox: Any, skill_dir: Path, skill_id: str, payload: bytes, expected: Any, *,
            runs: int, throughput_runs: int, concurrency: int,
            quick: bool = False) -> list[Figure]:
    """The fleet's figures; `sandbox` (holding `skill_id`) is the in-process reference."""
    from sandbox.fleet import FleetClient
    from worker.protocol import ExecutionRequest

    labels = {"fleet_in_process": "Sandbox.execute in-process (fleet reference)",
              "fleet_execute": "FleetClient.execute, 1 worker, Redis on loopback",
              "fleet_throughput_1": "fleet throughput, 1 worker",
              "fleet_throughput_2": "fleet throughput, 2 workers (same 2 cores)",
              "fleet_redis_ops": "Redis commands per fleet execution"}
    problem = "not in --quick: it starts redis-server and two workers" if quick \
        else unavailable()
    if problem:
        return [Figure(key=key, label=label, section=SECTION, skipped=problem)
                for key, label in labels.items()]

    def request() -> ExecutionRequest:
        return ExecutionRequest(skill_id=skill_id, input=payload, timeout=30)

    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        procs = _Processes(Path(tmp))
        try:
            procs.worker(skill_dir, "bench-a", concurrency)
            with FleetClient(procs.url) as client:
                for _ in range(5):  # warm: the zygote boots on first use
                    client.execute(request())
                    sandbox.execute(request())
                local: list[float] = []
                remote: list[float] = []
                errors = 0
                first_error = ""
                before = _commands(client.redis)
                for _ in range(runs):  # interleaved, one at a time
                    for samples, target in ((remote, client), (local, sandbox)):
                        started = time.perf_counter()
                        result = target.execute(request())
                        elapsed = time.perf_counter() - started
                        if result.ok and result.json() == expected:
                            samples.append(elapsed)
                        else:
                            errors += 1
                            first_error = first_error or result.error
                ops = (_commands(client.redis) - before) / max(1, runs)

                def throughput() -> tuple[float, int]:
                    started = time.perf_counter()
                    with ThreadPoolExecutor(CLIENT_THREADS) as pool:
                        results = list(pool.map(lambda _: client.execute(request()),
                                                range(throughput_runs)))
                    elapsed = time.perf_counter() - started
                    return throughput_runs / elapsed, sum(1 for r in results if not r.ok)

                one, one_bad = throughput()
                procs.worker(skill_dir, "bench-b", concurrency)
                for _ in range(5):
                    client.execute(request())
                two, two_bad = throughput()
        finally:
            procs.close()
    figures = []
    in_process = Figure(key="fleet_in_process", label=labels["fleet_in_process"],
                        section=SECTION, summary=summarize(local) if local else None)
    fleet = Figure(key="fleet_execute", label=labels["fleet_execute"], section=SECTION,
                   summary=summarize(remote) if remote else None, errors=errors,
                   first_error=first_error)
    if fleet.summary is not None and in_process.summary is not None:
        added50 = fleet.summary.p50_ms - in_process.summary.p50_ms
        added99 = fleet.summary.p99_ms - in_process.summary.p99_ms
        fleet.data.update(added_p50_ms=round(added50, 3), added_p99_ms=round(added99, 3))
        fleet.checks.append(Check(f"queue adds +{added50:.2f} ms p50, +{added99:.2f} ms p99 "
                                  "over in-process (interleaved)"))
    figures += [in_process, fleet]
    figures.append(Figure(key="fleet_throughput_1", label=labels["fleet_throughput_1"],
                          section=SECTION, value=one, unit="exec/s", errors=one_bad,
                          data={"client_threads": CLIENT_THREADS,
                                "worker_threads": concurrency}))
    gain = two / one if one else 0.0
    figures.append(Figure(
        key="fleet_throughput_2", label=labels["fleet_throughput_2"], section=SECTION,
        value=two, unit="exec/s", errors=two_bad, data={"x_one_worker": round(gain, 2)},
        checks=[Check(f"x{gain:.2f} of one worker: both share this machine's cores and the "
                      "client's; on N hosts each adds its own cores")]))
    figures.append(Figure(
        key="fleet_redis_ops", label=labels["fleet_redis_ops"], section=SECTION, value=ops,
        unit="commands",
        checks=[Check("client + worker + Celery's transport, counted by Redis itself; a "
                      "single Redis at ~100k commands/s bounds a fleet near "
                      f"{100_000 / ops if ops else 0:.0f} exec/s")]))
    return figures


def main() -> int:
    from sandbox.sandbox import Sandbox

    root = Path(__file__).resolve().parent.parent
    echo = root / "skills_examples" / "echo"
    payload = b'{"message": "hello"}'
    with Sandbox([echo], max_concurrency=2) as sandbox:
        figures = measure(sandbox, echo, "examples/echo", payload,
                          msgspec.json.decode(payload), runs=200, throughput_runs=500,
                          concurrency=2)
    for figure in figures:
        if figure.skipped:
            print(f"{figure.label}: skipped: {figure.skipped}")
        elif figure.summary is not None:
            s = figure.summary
            print(f"{figure.label}: p50 {s.p50_ms:.2f} ms  p99 {s.p99_ms:.2f} ms  (n={s.n})"
                  + "".join(f"  [{c.compare}]" for c in figure.checks))
        else:
            print(f"{figure.label}: {figure.value:.1f} {figure.unit}"
                  + "".join(f"  [{c.compare}]" for c in figure.checks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
