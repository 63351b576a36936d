"""Helpers for the fleet tests: a private redis-server on loopback, and worker processes that
stand for hosts. Every process started here is stopped and reaped by its owner, with deadlines.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import psutil
import pytest

from tests.conftest import slow

REDIS_SERVER = shutil.which("redis-server") or (
    "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)
#: The mark of every fleet test module: they start their own redis-server.
NEEDS_REDIS = pytest.mark.skipif(
    REDIS_SERVER is None,
    reason="redis-server is not installed (Debian package redis-server; `make test` installs it "
           "as root)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """redis-server on 127.0.0.1 and a free port, data in `directory`; no persistence unless
    `persist` (then an append-only file there survives a restart of this server)."""

    def __init__(self, directory: Path, persist: bool = False, password: str = "") -> None:
        assert REDIS_SERVER is not None
        self.directory = directory
        self.port = free_port()
        self.persist = persist
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [str(REDIS_SERVER), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes" if self.persist else "no",
                "--protected-mode", "yes", "--daemonize", "no", "--logfile",
                str(self.directory / "redis.log"),
                *(["--requirepass", self.password] if self.password else [])]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + slow(10)
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith((b"+PONG", b"-NOAUTH")):  # up either way
                    return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}: "
                           f"{(self.directory / 'redis.log').read_text(errors='replace')}")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=slow(10))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=slow(10))
        self.proc = None


class Worker:
    """`skill-sandbox worker` in a subprocess: one host of the fleet."""

    def __init__(self, broker: str, skills: Path, node: str, tmp: Path, prefix: str,
                 concurrency: int = 2, heartbeat_ttl: float = 2.0,
                 extra: list[str] | None = None, broker_in_env: bool = False) -> None:
        """`broker_in_env`: the URL goes in SKILL_SANDBOX_BROKER, as deploy/'s unit passes it,
        instead of on the command line."""
        self.node = node
        self.log = tmp / f"{node}.jsonl"
        self.ready = tmp / f"{node}.ready"
        self.output = tmp / f"{node}.out"
        self.ready.unlink(missing_ok=True)
        env = {**os.environ, "SKILL_SANDBOX_BROKER": broker} if broker_in_env else None
        args = [sys.executable, "-m", "sandbox", "worker",
                *([] if broker_in_env else ["--broker", broker]), "--skills", str(skills),
                "--node", node, "--prefix", prefix,
                "--execution-log", str(self.log), "--max-concurrency", str(concurrency),
                "--heartbeat-ttl", str(heartbeat_ttl), "--ready-file", str(self.ready),
                "--log-level", "warning", *(extra or [])]
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=env)
        deadline = time.monotonic() + slow(40)
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"worker {node} did not become ready: "
                                   f"{self.output.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)
        self.worker_id = self.ready.read_text()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> set[int]:
        """The worker and every process below it (zygotes, executions)."""
        try:
            proc = psutil.Process(self.proc.pid)
            return {self.proc.pid} | {child.pid for child in proc.children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain) and wait for it to exit."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=slow(timeout))
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the worker's whole session (the host dies) and reap the worker."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=slow(10))

    def records(self) -> list[dict[str, object]]:
        """This node's execution log."""
        if not self.log.exists():
            return []
        return [msgspec.json.decode(line) for line in self.log.read_bytes().splitlines()
                if line.strip()]
