"""Starting the real daemon (`python -m sandbox serve`) as a subprocess for tests.

Every wait has a deadline; `stop()`/`kill()` always reap the process. Sockets live in a short
directory under /tmp (Unix socket paths are limited to 107 bytes; pytest's tmp paths can be
longer), removed by `close()`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "skills_examples"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0
TOKEN = "test-token-0123456789abcdef"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
              what: str = "condition") -> Any:
    """Poll until `condition()` is truthy; its value, or AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_skill(root: Path, name: str, code: str, manifest_extra: str = "",
                skill_id: str | None = None) -> Path:
    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "main.py").write_text(code)
    (directory / "skill.toml").write_text(
        f'id = "{skill_id or "test/" + name}"\nversion = "0.1.0"\n'
        f'entrypoint = "main:run"\n{manifest_extra}\n')
    return directory


class Daemon:
    """One daemon subprocess and how to reach it."""

    def __init__(self, skills: list[Path], *, tcp: bool = False, token: str | None = TOKEN,
                 args: list[str] | None = None, env: dict[str, str] | None = None,
                 config: str | None = None, nofile: int | None = None,
                 umask: int | None = None, warm: bool = True) -> None:
        self.nofile = nofile
        self.umask = umask
        self.dir = Path(tempfile.mkdtemp(prefix="ssd-", dir="/tmp"))
        self.socket = self.dir / "d.sock"
        self.log_path = self.dir / "daemon.log"
        self.exec_log = self.dir / "executions.db"
        self.token = token
        self.command = [sys.executable, "-m", "sandbox", "serve", "--socket", str(self.socket),
                        "--execution-log", str(self.exec_log), "--log-level", "debug",
                        "--zygote-check-interval", "0.1"]
        for path in skills:
            self.command += ["--skills", str(path)]
        if warm:  # most tests find executions below a zygote's pid; lazy ones say warm=False
            self.command += ["--warm", "*"]
        if tcp:
            token_file = self.dir / "token"
            token_file.write_text(token or "")
            token_file.chmod(0o600)
            self.command += ["--tcp", "127.0.0.1:0", "--token-file", str(token_file)]
        if config is not None:
            config_path = self.dir / "config.toml"
            config_path.write_text(config)
            self.command += ["--config", str(config_path)]
        self.command += args or []
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("SKILL_SANDBOX_", "NOTIFY_SOCKET"))}
        self.env.update(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.tcp_address: str | None = None
        self.pid = 0

    # -- lifecycle --

    def spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=log, env=self.env, cwd=ROOT,
                                            preexec_fn=self._limits)
        self.pid = self.process.pid
        return self.process

    def _limits(self) -> None:
        """In the child before exec: the fd limit and umask the test asked for (like an
        operator's `ulimit -n` or a service manager's UMask=)."""
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))
        if self.umask is not None:
            os.umask(self.umask)

    def start(self) -> Daemon:
        self.spawn()
        listening = wait_for(self._listening, START_TIMEOUT, 0.05, "the daemon to listen")
        self.tcp_address = listening.get("tcp")
        return self

    def _listening(self) -> dict[str, Any] | None:
        assert self.process is not None
        for event in self.events():
            if event.get("event") == "listening":
                return event
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n"
                                 f"{self.log_text()}")
        return None

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> int:
        """SIGTERM and reap; the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.wait()
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- reaching it --

    def http(self, timeout: float = 30.0) -> httpx.Client:
        """Raw HTTP over the Unix socket."""
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://daemon", timeout=timeout)

    def tcp_http(self, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        assert self.tcp_address is not None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=f"http://{self.tcp_address}", headers=headers,
                            timeout=timeout)

    def client(self, **options: Any) -> Any:
        from sandbox.client import SandboxClient

        options.setdefault("timeout", 30.0)  # a hung daemon fails the test, not the run
        return SandboxClient(self.socket, env={}, **options)

    # -- its log --

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def events(self) -> Iterator[dict[str, Any]]:
        for line in self.log_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                yield event

    def find_events(self, name: str, **fields: Any) -> list[dict[str, Any]]:
        return [event for event in self.events() if event.get("event") == name
                and all(event.get(key) == value for key, value in fields.items())]


def metric(text: str, name: str, **labels: str) -> float:
    from sandbox.daemon.metrics import metric_value

    value = metric_value(text, name, labels)
    return 0.0 if value is None else value
