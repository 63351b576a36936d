"""Supervisor-side handle on one skill's zygote process (see `worker/zygote.py`)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time

import msgspec

from sandbox.cgroups import CgroupTickets
from sandbox.errors import SkillCodeInvalid, SkillLoadError
from worker.protocol import (
    ForkCommand,
    SkillCode,
    SpareCgroups,
    ZygoteConfig,
    ZygoteFailed,
    ZygoteMessage,
    ZygoteReady,
    ZygoteSettings,
)

#: The only variables a zygote starts with: it must never see the supervisor's secrets.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class ZygoteDied(RuntimeError):
    """The zygote is gone; the caller restarts it."""


class ZygoteProcess:
    """Starts, feeds and stops one zygote. `fork` is safe from many threads at once.

    `cgroups`: where the cgroup pairs of this skill's executions come from (None: no cgroups).
    `prefork`: keep a spare child forked and in its cgroups ahead of the next request (see
    `worker.spare`); the zygote gets its first pair at boot, each `ForkCommand` brings the next.
    """

    def __init__(self, skill_id: str, code: SkillCode, preload: list[str],
                 settings: ZygoteSettings, start_timeout: float = 30.0,
                 cgroups: CgroupTickets | None = None, prefork: bool = True) -> None:
        self.skill_id = skill_id
        self.code = code
        self.preload = preload
        self.settings = settings
        self.start_timeout = start_timeout
        self.cgroups = cgroups
        self.prefork = prefork
        self.pid = 0
        self.rss_kb = 0
        self.starts = 0
        self._process: subprocess.Popen[bytes] | None = None
        #: Set when a fork request could not be sent: the zygote is gone even if `poll()` (which
        #: answers "still running" while another thread is inside waitpid) has not seen it yet.
        self._broken = False
        self._control: socket.socket | None = None
        self._lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()

    def start(self) -> None:
        """Exec a fresh interpreter and wait until it has preloaded and says it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = msgspec.json.encode(ZygoteConfig(code=self.code, preload=self.preload,
                                                  settings=self.settings)).decode()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-B", "-m", "worker.zygote", str(theirs.fileno()),
                 config],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
                pass_fds=(theirs.fileno(),), env=dict(BASE_ENV), cwd="/",
                start_new_session=True,
            )
        finally:
            theirs.close()
        try:
            message = self._await_boot(ours, process)
        except BaseException:
            ours.close()
            _kill_and_reap(process)
            raise
        self._process, self._control = process, ours
        self._broken = False
        self.pid, self.rss_kb = message.pid, message.rss_kb
        self.starts += 1
        if self.prefork:
            self.offer_spare_cgroups()

    def _await_boot(self, control: socket.socket, process: subprocess.Popen[bytes]) -> ZygoteReady:
        ready, _, _ = select.select([control], [], [], self.start_timeout)
        if not ready:
            raise SkillLoadError(f"{self.skill_id}: zygote did not become ready within "
                                 f"{self.start_timeout:g}s")
        data = control.recv(1 << 16)
        if not data:
            code = process.wait(timeout=5)
            raise SkillLoadError(f"{self.skill_id}: zygote exited with status {code} "
                                 "before it was ready")
        message: ZygoteReady | ZygoteFailed = msgspec.msgpack.decode(data, type=ZygoteMessage)
        if isinstance(message, ZygoteFailed):
            failure = SkillCodeInvalid if message.skill_code else SkillLoadError
            raise failure(f"{self.skill_id}: zygote failed to start: {message.error}")
        return message

    def alive(self) -> bool:
        return not self._broken and self._process is not None and self._process.poll() is None

    def fork(self, command: ForkCommand, fds: list[int]) -> None:
        """Ask the zygote for one execution child; the fds are duplicated into it."""
        payload = self._encoder.encode(command)
        with self._lock:
            if self._control is None:
                raise ZygoteDied(f"{self.skill_id}: zygote is not running")
            try:
                socket.send_fds(self._control, [payload], fds)
            except OSError as exc:
                self._broken = True  # under the lock: this is the current zygote's socket
                raise ZygoteDied(f"{self.skill_id}: zygote is gone ({exc.strerror})") from None

    def offer_spare_cgroups(self) -> None:
        """Give the zygote a cgroup pair for a spare (an empty one without cgroups): at boot,
        and when an execution saw it hold none any more. Failures surface on the next fork."""
        tickets = self.cgroups
        group = tickets.issue() if tickets is not None else None
        payload = self._encoder.encode(SpareCgroups(
            cgroups=group.procs_files if group is not None else []))
        with self._lock:
            if self._control is not None:
                with contextlib.suppress(OSError):
                    self._control.send(payload)
                    return
        if tickets is not None and group is not None:
            tickets.release(group.procs_files)

    def stop(self, timeout: float = 5.0) -> None:
        """EOF on the control socket tells the zygote to kill its executions and exit."""
        with self._lock:
            control, process = self._control, self._process
            self._control = self._process = None
        if control is not None:
            control.close()
        if process is not None:
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_and_reap(process)
        if self.cgroups is not None:  # its spare is gone with it (parent-death signal)
            self.cgroups.release_all()


def _kill_and_reap(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:  # pragma: no cover - SIGKILL not honoured in 10 s: say so
        os.write(2, f"skill-sandbox: zygote {process.pid} survived SIGKILL\n".encode())
