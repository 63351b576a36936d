"""`POST /v1/execute` through the daemon over its Unix socket, against in-process execute.

The daemon runs as `skill-sandbox serve` would run it (a separate process, its default SQLite
execution log and info-level JSON logs), loading the same echo skill; requests go over one
keep-alive HTTP/1.1 connection on the Unix socket — the raw protocol, so the figure is the
daemon's cost and not a client library's. The in-process side is `Sandbox.execute` in this
process, interleaved with the daemon requests.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.config import BenchConfig
from benchmarks.progress import Progress
from benchmarks.report import Check, Figure
from benchmarks.series import RunFailed, Series, interleave
from benchmarks.stats import summarize

DAEMON_OVERHEAD_MS = 1.0
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
_SERVE = ("import sys; from sandbox.daemon.server import serve; "
          "raise SystemExit(serve(sys.argv[1]))")


def unavailable() -> str:
    """Why the daemon cannot be measured here ("" when it can)."""
    for module in ("sandbox.daemon", "sandbox.daemon.server"):
        try:
            found = importlib.util.find_spec(module)
        except ImportError:
            found = None
        if found is None:
            return f"the daemon ({module}) is not in this checkout yet"
    return ""


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a Unix socket (http.client speaks TCP only)."""

    def __init__(self, path: str, timeout: float = REQUEST_TIMEOUT) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Daemon:
    """A daemon process of our own, in a temporary directory it removes on `stop`."""

    def __init__(self, skill_dir: Path, concurrency: int) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="skill-sandbox-bench-daemon-"))
        skills = self.root / "skills"
        shutil.copytree(skill_dir, skills / skill_dir.name)
        self.socket_path = self.root / "sandbox.sock"
        config = self.root / "daemon.toml"
        config.write_text(
            f"skills = [{json.dumps(str(skills))}]\n"
            f"socket = {json.dumps(str(self.socket_path))}\n"
            f"execution_log = {json.dumps(str(self.root / 'executions.db'))}\n"
            f"workdir_root = {json.dumps(str(self.root / 'work'))}\n"
            f"max_concurrency = {concurrency}\n"
            "notify = false\n",
            encoding="utf-8",
        )
        self.log_path = self.root / "daemon.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the daemon
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(config)], stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log, start_new_session=True,
        )
        self.connection: UnixHTTPConnection | None = None

    def log_tail(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(lines[-3:])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with status {self.process.returncode}: "
                                   f"{self.log_tail()}")
            try:
                status, _ = self.request("GET", "/readyz")
            except OSError:
                status = 0
            if status == 200:
                return
            self.close_connection()
            time.sleep(0.1)
        raise RuntimeError(f"the daemon was not ready within {START_TIMEOUT:g}s: "
                           f"{self.log_tail()}")

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        if self.connection is None:
            self.connection = UnixHTTPConnection(str(self.socket_path))
        headers = {"Content-Type": "application/json"} if body is not None else {}
        try:
            self.connection.request(method, path, body=body, headers=headers)
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.close_connection()
            raise

    def close_connection(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def stop(self) -> None:
        self.close_connection()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._log.close()
        shutil.rmtree(self.root, ignore_errors=True)


class DaemonSeries(Series):
    key = "daemon_execute"
    label = "POST /v1/execute, Unix socket"

    def __init__(self, runs: int, daemon: Daemon, skill_id: str, payload: bytes,
                 expected: Any) -> None:
        super().__init__(runs)
        self.daemon = daemon
        self.body = json.dumps({"skill_id": skill_id, "input": json.loads(payload)}).encode()
        self.expected = expected

    def once(self) -> None:
        try:
            status, body = self.daemon.request("POST", "/v1/execute", self.body)
        except (OSError, http.client.HTTPException) as exc:
            raise RunFailed(f"request failed: {exc!r}") from None
        if status != 200:
            raise RunFailed(f"HTTP {status}: {body[:200]!r}")
        answer = json.loads(body)
        if answer.get("status") != "success" or answer.get("output") != self.expected:
            raise RunFailed(f"unexpected answer {body[:200]!r}")


def measure(config: BenchConfig, skill_dir: Path, skill_id: str, payload: bytes, expected: Any,
            in_process: Series, progress: Progress) -> list[Figure]:
    """Daemon latency and its overhead over `in_process` (a fresh series of the same skill)."""
    progress.phase("daemon: starting")
    daemon = Daemon(skill_dir, concurrency=max(config.concurrency))
    try:
        try:
            daemon.wait_ready()
        except RuntimeError as exc:
            return [Figure(key="daemon_execute", label="POST /v1/execute, Unix socket",
                           section="daemon", skipped=str(exc))]
        over_http = DaemonSeries(config.daemon_runs, daemon, skill_id, payload, expected)
        interleave([over_http, in_process], config.block, config.warmup, progress,
                   phase="daemon")
    finally:
        daemon.stop()
    local = Figure(key="daemon_in_process", label=in_process.label, section="daemon",
                   errors=in_process.errors, first_error=in_process.first_error)
    remote = Figure(key="daemon_execute", label=over_http.label, section="daemon",
                    errors=over_http.errors, first_error=over_http.first_error)
    if not in_process.samples or not over_http.samples:
        remote.skipped = f"no successful run ({over_http.first_error or in_process.first_error})"
        return [local, remote]
    local.summary = summarize(in_process.samples)
    remote.summary = summarize(over_http.samples)
    overhead = remote.summary.p50_ms - local.summary.p50_ms
    local.checks.append(Check("interleaved with the daemon requests"))
    remote.data["overhead_p50_ms"] = round(overhead, 4)
    remote.checks.append(Check(f"+{overhead:.3f} ms p50 over in-process",
                               f"≤ +{DAEMON_OVERHEAD_MS:g} ms p50", overhead <= DAEMON_OVERHEAD_MS,
                               remote.summary.p50_ms / local.summary.p50_ms))
    return [local, remote]
