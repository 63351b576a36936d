"""Supervisor-side handle on one skill's zygote process (see `worker/zygote.py`)."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import NamedTuple, Protocol

import msgspec

from sandbox.cgroups import CgroupTickets
from sandbox.errors import SkillCodeInvalid, SkillLoadError
from sandbox.wasmcache import CompiledModules
from worker.protocol import (
    BaseForked,
    BaseMessage,
    BaseReady,
    ForkCommand,
    SkillCode,
    SpareCgroups,
    ZygoteConfig,
    ZygoteFailed,
    ZygoteForked,
    ZygoteMessage,
    ZygoteReady,
    ZygoteSettings,
)

_log = logging.getLogger(__name__)

#: The only variables a zygote starts with: it must never see the supervisor's secrets.
BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


class RuntimeProfile(NamedTuple):
    """Everything a zygote's process is before it reads its config: interpreter, interpreter
    flags (-I: no environment-derived sys.path, no user site; -B), environment, working
    directory; the user is the supervisor's. Zygotes of one profile can be forks of one shared
    base interpreter (`worker.base`); today every skill has the one default profile, whatever
    its kind (python, spawn, command): the kind, preloads, layers and uid are applied by the
    zygote after the fork, from its own config."""

    python: str
    flags: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: str

    def argv(self, module: str, *args: str) -> list[str]:
        return [self.python, *self.flags, "-m", module, *args]


DEFAULT_PROFILE = RuntimeProfile(sys.executable, ("-I", "-B"), tuple(sorted(BASE_ENV.items())),
                                 "/")


class _Child(Protocol):
    """What the handle needs of a zygote's process: a `Popen`, or a `_Sibling`."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class _Sibling:
    """A zygote forked by the base: this process's own child (`CLONE_PARENT`) that no `Popen`
    started. Reaped here by pid, under a lock, like `Popen` does: the pid is ours and is not
    reused before we reap it, so `kill` never reaches another process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        with self._lock:
            if self.returncode is None:
                try:
                    done, status = os.waitpid(self.pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere (a waitpid(-1) in the embedder)
                    done, status = self.pid, 0
                if done:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"zygote {self.pid}", timeout or 0.0)
            time.sleep(0.005)
        return code

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)


class BaseUnavailable(RuntimeError):
    """No base zygote can fork this zygote now; the caller execs a fresh interpreter."""


class BaseZygote:
    """The supervisor's handle on one shared base zygote (`worker.base`) of one profile."""

    def __init__(self, profile: RuntimeProfile, start_timeout: float) -> None:
        self.profile = profile
        self.start_timeout = start_timeout
        self.pid = 0
        self.forks = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None
        self._decoder = msgspec.msgpack.Decoder(BaseMessage)

    def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            process = subprocess.Popen(
                self.profile.argv("worker.base", str(theirs.fileno())),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
                pass_fds=(theirs.fileno(),), env=dict(self.profile.env), cwd=self.profile.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise BaseUnavailable(f"base zygote: {exc}") from exc
        finally:
            theirs.close()
        self._process, self._control = process, ours
        try:
            message = self._receive(self.start_timeout)
            if not isinstance(message, BaseReady):
                raise BaseUnavailable(f"base zygote cannot fork zygotes: {message.error}")
        except BaseException:
            self.stop(timeout=1.0)
            raise
        self.pid = message.pid

    def _receive(self, timeout: float) -> BaseReady | BaseForked:
        control = self._control
        if control is None:
            raise BaseUnavailable("base zygote is stopped")
        try:
            ready, _, _ = select.select([control], [], [], timeout)
            data = control.recv(256) if ready else None
        except OSError as exc:
            raise BaseUnavailable(f"base zygote is gone ({exc.strerror})") from None
        if data is None:
            raise BaseUnavailable(f"base zygote did not answer within {timeout:g}s")
        if not data:
            raise BaseUnavailable("base zygote is gone")
        try:
            message: BaseReady | BaseForked = self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise BaseUnavailable(f"base zygote said something else: {exc}") from None
        return message

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def fork(self, zygote_end: socket.socket) -> int:
        """Fork a zygote that serves on `zygote_end` (duplicated into it only): its pid, a
        child of this process. Not thread-safe: `BaseZygotes` serialises the calls."""
        control = self._control
        if control is None:
            raise BaseUnavailable("base zygote is stopped")
        try:
            socket.send_fds(control, [b"F"], [zygote_end.fileno()])
        except OSError as exc:
            raise BaseUnavailable(f"base zygote is gone ({exc.strerror})") from None
        message = self._receive(self.start_timeout)
        if not isinstance(message, BaseForked) or not message.pid:
            error = message.error if isinstance(message, BaseForked) else "ready again"
            raise BaseUnavailable(f"base zygote could not fork: {error}")
        self.forks += 1
        return message.pid

    def stop(self, timeout: float = 5.0) -> None:
        """EOF on its control socket ends it; it has no child to wait for."""
        control, process = self._control, self._process
        self._control = self._process = None
        _close_and_reap(control, process, timeout)


#: After a base failed to start, zygotes are exec'd for this long before it is tried again.
BASE_RETRY_AFTER = 30.0


class BaseZygotes:
    """The shared base zygotes of one sandbox, one per runtime profile: started on the first
    cold start that needs one, started again when found dead (killed from outside), and left
    alone for `BASE_RETRY_AFTER` s after one failed to start (zygotes are exec'd meanwhile)."""

    def __init__(self, start_timeout: float = 30.0) -> None:
        self.start_timeout = start_timeout
        self.starts = 0
        self._bases: dict[RuntimeProfile, BaseZygote] = {}
        self._failed_at: dict[RuntimeProfile, float] = {}
        self._lock = threading.Lock()
        self._closed = False

    def fork(self, profile: RuntimeProfile, zygote_end: socket.socket) -> int:
        """A zygote of `profile` forked from its base, serving on `zygote_end`: its pid.
        Raises `BaseUnavailable` when there is no base to fork from (closed, failing)."""
        with self._lock:
            # A base found dead (killed from outside) is replaced here before the request;
            # one that fails the request itself is stopped, and this zygote is exec'd: it may
            # have forked with `zygote_end` before it failed, so the caller's next try must
            # use a new socketpair.
            base = self._running(profile)
            try:
                return base.fork(zygote_end)
            except BaseUnavailable:
                base.stop(timeout=1.0)
                del self._bases[profile]
                raise

    def _running(self, profile: RuntimeProfile) -> BaseZygote:
        if self._closed:
            raise BaseUnavailable("the sandbox is closed")
        base = self._bases.get(profile)
        if base is not None and base.alive():
            return base
        if base is not None:  # died (killed from outside): reap it, start another
            base.stop(timeout=1.0)
            del self._bases[profile]
        failed = self._failed_at.get(profile)
        if failed is not None and time.monotonic() - failed < BASE_RETRY_AFTER:
            raise BaseUnavailable("the base zygote failed to start recently")
        base = BaseZygote(profile, self.start_timeout)
        try:
            base.start()
        except BaseUnavailable:
            self._failed_at[profile] = time.monotonic()
            raise
        self._failed_at.pop(profile, None)
        self._bases[profile] = base
        self.starts += 1
        return base

    def pids(self) -> list[int]:
        """The running bases' pids (for operators and tests)."""
        with self._lock:
            return [base.pid for base in self._bases.values() if base.alive()]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            bases = list(self._bases.values())
            self._bases.clear()
        for base in bases:
            base.stop()


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
                 cgroups: CgroupTickets | None = None, prefork: bool = True,
                 bases: BaseZygotes | None = None,
                 profile: RuntimeProfile = DEFAULT_PROFILE,
                 modules: CompiledModules | None = None) -> None:
        self.skill_id = skill_id
        #: where a WASM skill's compiled module is kept between boots (None: compiled each)
        self.modules = modules
        #: how the running zygote had its WASM module: "compiled", "cached" ("" otherwise)
        self.wasm_module = ""
        self.bases = bases
        self.profile = profile
        #: whether the running zygote was forked from the shared base (else exec'd)
        self.from_base = False
        self.code = code
        self.preload = preload
        self.settings = settings
        self.start_timeout = start_timeout
        self.cgroups = cgroups
        self.prefork = prefork
        self.pid = 0
        self.rss_kb = 0
        self.starts = 0
        self._process: _Child | None = None
        #: Set when a fork request could not be sent: the zygote is gone even if `poll()` (which
        #: answers "still running" while another thread is inside waitpid) has not seen it yet.
        self._broken = False
        self._control: socket.socket | None = None
        self._lock = threading.Lock()
        self._encoder = msgspec.msgpack.Encoder()

    def start(self) -> None:
        """Fork the zygote from the shared base of its profile (or, without one, exec a fresh
        interpreter) and wait until it has preloaded and says it is ready."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        artifact = (self.modules.take(self.skill_id)
                    if self.modules is not None and self.code.kind == "wasm" else None)
        artifact_fd, artifact_sha256 = artifact if artifact is not None else (-1, "")
        config = msgspec.json.encode(ZygoteConfig(code=self.code, preload=self.preload,
                                                  settings=self.settings,
                                                  wasm_artifact_sha256=artifact_sha256))
        try:
            process: _Child | None = self._fork_from_base(ours, theirs, config, artifact_fd)
            if process is None:
                # A fresh pair: a base that died mid-request may have forked a zygote holding
                # the first one; closing it ends that stray (EOF before its config), and the
                # pid it said first lets us reap it.
                theirs.close()
                _reap_stray(ours, self.start_timeout)
                ours.close()
                ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                process = subprocess.Popen(
                    self.profile.argv("worker.zygote", str(theirs.fileno()), config.decode(),
                                      str(artifact_fd)),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
                    pass_fds=(theirs.fileno(), *([artifact_fd] if artifact_fd >= 0 else [])),
                    env=dict(self.profile.env), cwd=self.profile.cwd, start_new_session=True,
                )
        finally:
            theirs.close()
            if artifact_fd >= 0:
                os.close(artifact_fd)
        try:
            message, made = self._await_boot(ours, process)
        except BaseException:
            ours.close()
            _kill_and_reap(process)
            raise
        self.wasm_module = message.wasm_module
        if made >= 0:
            if self.modules is not None and message.artifact_sha256:
                self.modules.keep(self.skill_id, made, message.artifact_sha256)
            else:
                os.close(made)
        self._process, self._control = process, ours
        self._broken = False
        self.from_base = isinstance(process, _Sibling)
        self.pid, self.rss_kb = message.pid, message.rss_kb
        self.starts += 1
        if self.prefork:
            self.offer_spare_cgroups()

    def _fork_from_base(self, ours: socket.socket, theirs: socket.socket,
                        config: bytes, artifact_fd: int = -1) -> _Sibling | None:
        """The zygote forked from the base, its config sent on its own socket; None when
        there is no base (off, failing, or the config too large for one message)."""
        if self.bases is None:
            return None
        try:
            pid = self.bases.fork(self.profile, theirs)
        except BaseUnavailable as exc:
            _log.debug("%s: exec'ing its zygote: %s", self.skill_id, exc)
            return None
        process = _Sibling(pid)
        try:
            socket.send_fds(ours, [config], [artifact_fd] if artifact_fd >= 0 else [])
        except OSError:
            _kill_and_reap(process)
            return None
        return process

    def _await_boot(self, control: socket.socket, process: _Child) -> tuple[ZygoteReady, int]:
        """The ready message, and the fd of the compiled module it came with (-1: none)."""
        deadline = time.monotonic() + self.start_timeout
        message: ZygoteReady | ZygoteFailed | ZygoteForked | None = None
        made = -1
        try:
            while message is None or isinstance(message, ZygoteForked):  # a forked one's hello
                poller = select.poll()
                poller.register(control.fileno(), select.POLLIN)
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    raise SkillLoadError(f"{self.skill_id}: zygote did not become ready "
                                         f"within {self.start_timeout:g}s")
                data, fds, _flags, _addr = socket.recv_fds(control, 1 << 16, 1)
                if fds:  # only the ready message brings one (a compiled WASM module)
                    if made >= 0:
                        os.close(made)
                    made = fds[0]
                if not data:
                    code = process.wait(timeout=5)
                    if code == -signal.SIGXCPU:  # the one CPU limit a booting zygote has
                        raise SkillCodeInvalid(f"{self.skill_id}: its zygote ran out of CPU "
                                               "time compiling the skill's code (worker."
                                               "isolation.COMPILE_CPU_SECONDS)")
                    raise SkillLoadError(f"{self.skill_id}: zygote exited with status {code} "
                                         "before it was ready")
                message = msgspec.msgpack.decode(data, type=ZygoteMessage)
            if isinstance(message, ZygoteFailed):
                failure = SkillCodeInvalid if message.skill_code else SkillLoadError
                raise failure(f"{self.skill_id}: zygote failed to start: {message.error}")
        except BaseException:
            if made >= 0:
                os.close(made)
            raise
        return message, made

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
        _close_and_reap(control, process, timeout)
        if self.cgroups is not None:  # its spare is gone with it (parent-death signal)
            self.cgroups.release_all()


def _reap_stray(control: socket.socket, timeout: float) -> None:
    """After a failed fork from the base, with our copy of the zygote's end closed: wait for
    EOF (nobody else holds it: no stray) or the hello of a zygote the base forked before it
    failed, and reap that one. It is this process's child (`CLONE_PARENT`) and nobody else
    knows its pid: unreaped, it would stay a zombie until the supervisor exits. The pid is
    acted on only if it names a child of ours."""
    poller = select.poll()
    poller.register(control.fileno(), select.POLLIN)
    try:
        if not poller.poll(timeout * 1000):
            return
        data = control.recv(1 << 16)
        message = msgspec.msgpack.decode(data, type=ZygoteMessage) if data else None
    except (OSError, msgspec.DecodeError, msgspec.ValidationError):
        return
    if not isinstance(message, ZygoteForked) or message.pid <= 0:
        return
    try:
        os.waitpid(message.pid, os.WNOHANG)  # ChildProcessError: not ours, leave it alone
    except ChildProcessError:
        return
    _kill_and_reap(_Sibling(message.pid))


def _close_and_reap(control: socket.socket | None, process: _Child | None,
                    timeout: float) -> None:
    """EOF on its control socket is a worker's signal to exit; past `timeout`, SIGKILL."""
    if control is not None:
        control.close()
    if process is not None:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_and_reap(process)


def _kill_and_reap(process: _Child) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    deadline = time.monotonic() + 10
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if process.poll() is None:  # pragma: no cover - SIGKILL not honoured in 10 s: say so
        os.write(2, f"skill-sandbox: zygote {process.pid} survived SIGKILL\n".encode())
