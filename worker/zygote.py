"""The zygote: a warm, lean fork server for one skill.

Started by the supervisor as a fresh interpreter (`python -I -m worker.zygote FD CONFIG`), so it
never holds a copy of the supervisor's memory. It imports the worker runtime and the skill's
trusted `preload` modules, compiles the skill's entrypoint (compiling runs no skill code), says
it is ready, and then serves fork requests on its control socket (fd FD) until that socket reaches
EOF — the supervisor's exit, however abrupt, is the shutdown signal.

Per request it hands the request to its pre-forked spare child (`worker.spare`: forked, set up
and in the next execution's cgroups before the request came) or, when there is no usable spare,
forks one execution child on the spot; it passes the child's pidfd back on the execution's own
report socket, reports the kernel's wait4 accounting when the child is reaped, and forks the
next spare. Any other process that ends up its child (the zygote is a subreaper: orphans of an
execution land here) is killed and reaped.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import selectors
import signal
import socket
import sys
import time
import traceback
from types import CodeType
from typing import TYPE_CHECKING

import msgspec

from worker import child, isolation, pidns, spare
from worker.protocol import (
    EXIT_BOOT_FAILED,
    EXIT_SPARE_FAILED,
    SETUP_FAILED,
    ChildExited,
    ChildStarted,
    ControlMessage,
    ForkCommand,
    SkillCode,
    SpareCgroups,
    ZygoteConfig,
    ZygoteFailed,
    ZygoteForked,
    ZygoteReady,
)

if TYPE_CHECKING:
    from worker import wasm

MAX_CONTROL_MESSAGE = 1 << 16
#: The zygote's RSS (the baseline subtracted from a child's peak) is re-read every this many forks.
RSS_REFRESH_FORKS = 64
_FDS_PER_EXECUTION = 5
#: How long the zygote waits to reap a spare whose socket closed (it is exiting).
SPARE_EXIT_WAIT = 1.0
#: After this many spares in a row died before serving, the zygote forks no more spares until
#: the next request (each request allows one more try): no fork loop if something kills them.
MAX_SPARE_FAILURES = 3
_SPARE = "spare"  # selector key data of the spare's socket
#: How long a request waits for a spare that is still setting up (joining its cgroups: on v1 an
#: RCU grace period, milliseconds) before the zygote forks a child for it instead, which would
#: have to join its cgroups too, from the start and on the request's path.
SPARE_WAIT = 0.05


class SkillCodeFailed(Exception):
    """The skill's entrypoint does not compile: its own fault, reported as such."""


class _Running:
    __slots__ = ("max_file_bytes", "pid", "pidfd", "report", "workdir")

    def __init__(self, pid: int, pidfd: int, report: socket.socket, command: ForkCommand) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.report = report
        self.workdir = command.workdir
        self.max_file_bytes = command.limits.max_file_bytes


def _rss_kb() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class Zygote:
    def __init__(self, config: ZygoteConfig, control: socket.socket,
                 artifact: int = -1) -> None:
        self.config = config
        self.control = control
        #: wasm: the compiled module the supervisor kept from an earlier boot (an fd, -1: none)
        #: until `boot` is done with it; then `prepared` says how the module was had.
        self.artifact = artifact
        self.prepared: wasm.Prepared | None = None
        self.precompiled: CodeType | None = None
        self.running: dict[int, _Running] = {}
        self.doomed: set[int] = set()
        self.selector = selectors.DefaultSelector()
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ControlMessage)
        self.pid = os.getpid()
        self.children_file = f"/proc/self/task/{self.pid}/children"
        self.rss_kb = 0
        self.forks = 0
        self.name = b"python"
        self.spare: spare.Spare | None = None
        #: cgroup pairs (`cgroup.procs` paths; [] without cgroups) for the next spares.
        self.tickets: list[list[str]] = []
        #: pairs given back to the supervisor with the next ChildStarted.
        self.released: list[list[str]] = []
        self.spare_failures = 0
        #: A request waiting for the spare to say ready: command, fds, message, the spare's
        #: pid and until when it waits.
        self.waiting: tuple[ForkCommand, list[int], bytes, int, float] | None = None

    # -- start-up ---------------------------------------------------------------------------

    def boot(self) -> None:
        """Everything every execution would otherwise repeat: imports, compilation, layers."""
        import importlib

        code = self.config.code
        if not code.spawn:  # spawn: each execution's fresh interpreter imports them itself
            for name in self.config.preload:
                importlib.import_module(name)
        try:
            with isolation.compile_limits():  # the skill's bytes, compiled before any limit
                self.compile(code)
        finally:  # no layer is applied, no child forked, while it is open
            self.close_artifact()
        isolation.apply_zygote_layers(self.config.settings, code)
        isolation.become_subreaper()
        # Objects alive now are shared copy-on-write with every child: keep the collector from
        # touching (and so copying) them in each execution.
        gc.collect()
        gc.freeze()
        self.rss_kb = _rss_kb()
        isolation.note_data_baseline()
        with open("/proc/self/comm", "rb") as comm:
            self.name = comm.read().strip() or self.name

    def compile(self, code: SkillCode) -> None:
        try:
            if code.kind == "python" and not code.spawn:
                try:
                    self.precompiled = child.compile_entrypoint(code)
                except (SyntaxError, ValueError, OSError) as exc:
                    raise SkillCodeFailed(f"{type(exc).__name__}: {exc}") from exc
            elif code.kind == "wasm":  # compiled once here, before the layers; never per run
                from worker import wasm

                try:
                    self.prepared = wasm.prepare(code, self.artifact,
                                                 self.config.wasm_artifact_sha256)
                except wasm.WasmModuleError as exc:
                    raise SkillCodeFailed(str(exc)) from exc
        except MemoryError:
            raise SkillCodeFailed(f"compiling the skill's code needs more than "
                                  f"{isolation.COMPILE_MEMORY_MB} MiB") from None

    def close_artifact(self) -> None:
        if self.artifact >= 0:
            os.close(self.artifact)
            self.artifact = -1

    def ready(self) -> tuple[ZygoteReady, list[int]]:
        """The ready message, with the compiled module for the supervisor to keep, if one
        was made (the caller sends it, then closes the fd: before any child exists)."""
        prepared = self.prepared
        fds = [prepared.artifact] if prepared is not None and prepared.artifact >= 0 else []
        return ZygoteReady(pid=os.getpid(), rss_kb=self.rss_kb, python=sys.version.split()[0],
                           wasm_module=prepared.how if prepared is not None else "",
                           artifact_sha256=prepared.sha256 if prepared and fds else ""), fds

    # -- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, None)
        while True:
            timeout = 0.05 if self.doomed else 1.0
            if self.waiting is not None:
                timeout = max(0.0, min(timeout, self.waiting[4] - time.monotonic()))
            events = self.selector.select(timeout)
            exited = False
            for key, _ in events:
                if key.data is None:
                    if not self.handle_control():
                        return
                elif key.data is _SPARE:
                    self.handle_spare()
                else:
                    self.handle_exit(key.data)
                    exited = True
            if self.waiting is not None:
                self.release_waiting()
            # Orphans appear when an execution ends (or escapes while running): look after an
            # exit, while some are dying, and when idle — not on every fork request.
            if exited or self.doomed or not events:
                self.sweep_orphans()

    def handle_control(self) -> bool:
        try:
            message, fds, _flags, _addr = socket.recv_fds(
                self.control, MAX_CONTROL_MESSAGE, _FDS_PER_EXECUTION
            )
        except OSError:
            return False
        if not message:
            return False
        try:
            decoded = self.decoder.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError):
            decoded = None
        if isinstance(decoded, SpareCgroups):
            for fd in fds:
                os.close(fd)
            self.tickets.append(list(decoded.cgroups))
            self.ensure_spare()
            return True
        if decoded is None or len(fds) != _FDS_PER_EXECUTION:
            for fd in fds:
                os.close(fd)
            return True
        self.start_execution(decoded, fds, message)
        return True

    def start_execution(self, command: ForkCommand, fds: list[int], message: bytes,
                        wait: bool = True) -> None:
        """Hand the request to the spare, or fork a child for it; report it; fork the next spare.

        The command's cgroup pair goes to the child forked for it, or, when the spare (already
        in a pair of its own) takes the request, to the spare that replaces it. A spare still
        setting up is waited for (up to `SPARE_WAIT`, one request at a time, without blocking
        the loop): it is further along than a child forked now would be.
        """
        current = self.spare
        if (wait and self.waiting is None and current is not None
                and bool(current.cgroups) == bool(command.isolation.cgroups)
                and current.poll_ready() is False):
            self.waiting = (command, fds, message, current.pid, time.monotonic() + SPARE_WAIT)
            return
        report = socket.socket(fileno=fds[-1])
        ticket = list(command.isolation.cgroups)
        self.forks += 1
        if self.forks % RSS_REFRESH_FORKS == 0:  # it drifts slowly; reading it costs ~30 µs
            self.rss_kb = _rss_kb()
            isolation.note_data_baseline()
        ready = self.usable_spare(ticket)
        try:
            isolation.before_fork(command)
        except OSError as exc:  # this execution cannot be isolated: refuse it, keep serving
            with contextlib.suppress(OSError):
                os.write(fds[3], f"\n{SETUP_FAILED}{exc}\n".encode())
            for fd in fds[:-1]:
                os.close(fd)
            report.close()  # the supervisor sees no child: a worker failure, for this one only
            self.tickets.append(ticket)
            return
        if ready is not None:
            self.selector.unregister(ready.sock)
            if ready.hand_off(message, fds[:-1]):
                self.spare = None
                self.spare_failures = 0
                pid, pidfd, cgroups = ready.pid, ready.pidfd, ready.cgroups
                zygote_rss = ready.rss_kb
                self.tickets.append(ticket)
            else:
                self.selector.register(ready.sock, selectors.EVENT_READ, _SPARE)
                self.retire_spare(release=True)
                ready = None
        if ready is None:
            gate = isolation.gate_for(command)
            try:
                pid = pidns.fork(self.config.settings.pid_ns)
            except BaseException:
                if gate is not None:
                    gate.discard()
                raise
            if pid == 0:  # the execution child: never returns
                child.run_execution(self.config.code, self.config.preload, command, fds,
                                    self.precompiled, self.pid, gate)
            if gate is not None:
                gate.open_for(pid)
            pidfd = os.pidfd_open(pid)
            zygote_rss, cgroups = self.rss_kb, ticket
        for fd in fds[:-1]:
            os.close(fd)
        try:
            socket.send_fds(report, [self.encoder.encode(ChildStarted(
                pid=pid, zygote_rss_kb=zygote_rss, cgroups=cgroups, spare=ready is not None,
                released=self.released))], [pidfd])
            self.released = []
        except OSError:
            os.kill(pid, signal.SIGKILL)  # nobody is listening for this execution any more
        self.running[pid] = _Running(pid, pidfd, report, command)
        self.selector.register(pidfd, selectors.EVENT_READ, self.running[pid])
        if ready is None:
            isolation.prepare_next()  # the forked child took the Landlock ruleset
        self.spare_failures = min(self.spare_failures, MAX_SPARE_FAILURES - 1)
        self.ensure_spare()

    def release_waiting(self) -> None:
        """Start the waiting request once its spare is ready, gone, or late."""
        assert self.waiting is not None
        command, fds, message, pid, until = self.waiting
        current = self.spare
        if (current is not None and current.pid == pid and not current.ready
                and time.monotonic() < until):
            return
        self.waiting = None
        self.start_execution(command, fds, message, wait=False)

    # -- the spare --------------------------------------------------------------------------

    def usable_spare(self, ticket: list[str]) -> spare.Spare | None:
        """The spare, if it is ready for a request with cgroup pair `ticket`. One still setting
        up is kept for the next request (this one is forked: waiting for the spare would stall
        the zygote's loop for as long); a dead one, or one without cgroups when the request has
        them, is retired."""
        current = self.spare
        if current is None:
            return None
        if bool(current.cgroups) != bool(ticket):
            self.retire_spare(release=True)
            return None
        ready = current.poll_ready()
        if ready is None:
            self.spare_died(current)
            return None
        return current if ready else None

    def ensure_spare(self) -> None:
        """Fork a spare if there is none and a cgroup pair for it; give back spare pairs.

        Not while more than one execution runs: a spare costs ~0.2 ms more CPU than a fork on
        request (the hand-off, copy-on-write faults shared three ways), which a busy zygote on
        few cores pays in throughput; the join it saves matters after idle moments. The last
        exit of a burst forks it."""
        if (self.spare is None and self.tickets and self.spare_failures < MAX_SPARE_FAILURES
                and len(self.running) <= 1):
            ticket = self.tickets.pop(0)
            try:
                new = spare.fork_spare(self.config.code, self.config.preload, self.precompiled,
                                       ticket, self.rss_kb, self.name,
                                       self.config.settings.pid_ns)
            except OSError:
                self.tickets.append(ticket)
                self.spare_failures += 1
            else:
                self.spare = new
                self.selector.register(new.sock, selectors.EVENT_READ, _SPARE)
                # The spare builds a Landlock ruleset of its own (`isolation.own_ruleset`): the
                # zygote's stays untouched, for the next child forked on request.
        while len(self.tickets) > (0 if self.spare is not None else 1):
            extra = self.tickets.pop()
            if extra:
                self.released.append(extra)

    def handle_spare(self) -> None:
        """The spare said ready, or died (its socket reached EOF): replace a dead one.

        The event may be stale: a request handled earlier in the same loop pass can have read
        the ready byte already (`poll_ready`), or handed that spare off and forked another. A
        blocking read would then stall the whole zygote until the next spare speaks, or for
        ever if it already has."""
        current = self.spare
        if current is None:
            return
        try:
            data = current.sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data == spare.READY:
            current.ready = True
            return
        self.spare_died(current)
        self.ensure_spare()

    def spare_died(self, current: spare.Spare) -> None:
        """Its socket closed (or it said something else): it is exiting. Its set-up or cgroup
        join failed (its own exit code, or it does not end): the pair goes back to the
        supervisor. Killed from outside: the pair is sound and the replacement takes it."""
        status = _reap_within(current.pid, current.pidfd, SPARE_EXIT_WAIT)
        failed = status is None or os.waitstatus_to_exitcode(status) == EXIT_SPARE_FAILED
        self.retire_spare(release=failed, reaped=status is not None)

    def retire_spare(self, release: bool, reaped: bool = False) -> None:
        current, self.spare = self.spare, None
        if current is None:
            return
        self.selector.unregister(current.sock)
        if not reaped:
            current.kill()
            self.doomed.add(current.pid)  # reaped by sweep_orphans
        current.sock.close()
        os.close(current.pidfd)
        if release:
            if current.cgroups:
                self.released.append(current.cgroups)
        else:
            self.tickets.append(current.cgroups)
        self.spare_failures += 1

    def handle_exit(self, running: _Running) -> None:
        # The execution's process group may still hold descendants: end them with it. The
        # zombie leader keeps the group id reserved until it is reaped just below.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.pid, signal.SIGKILL)
        pid, status, usage = os.wait4(running.pid, os.WNOHANG)
        if pid == 0:
            return
        self.selector.unregister(running.pidfd)
        os.close(running.pidfd)
        del self.running[running.pid]
        # A command failing as pid 1 of its PID namespace may have met RLIMIT_FSIZE without
        # dying of SIGXFSZ: look for the file (a Python skill's runtime reports EFBIG itself).
        at_limit = (status != 0 and self.config.code.kind == "command"
                    and isolation.file_limit_reached(running.workdir, running.max_file_bytes))
        report = ChildExited(pid=pid, wait_status=status, utime=usage.ru_utime,
                             stime=usage.ru_stime, maxrss_kb=usage.ru_maxrss,
                             file_limit_reached=at_limit)
        with contextlib.suppress(OSError):
            running.report.send(self.encoder.encode(report))
        running.report.close()
        isolation.release_execution(running.workdir)
        if self.spare is None:
            self.ensure_spare()

    def sweep_orphans(self) -> None:
        """Kill and reap every child that is not an execution: orphans that reparented here."""
        for pid in list(self.doomed):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                self.doomed.discard(pid)
        try:
            with open(self.children_file, "rb") as children:
                pids = [int(p) for p in children.read().split()]
        except OSError:
            return
        spare_pid = self.spare.pid if self.spare is not None else 0
        for pid in pids:
            if pid not in self.running and pid not in self.doomed and pid != spare_pid:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.doomed.add(pid)

    def shutdown(self) -> None:
        if self.waiting is not None:  # never started: its report socket's EOF says so
            for fd in self.waiting[1]:
                os.close(fd)
            self.waiting = None
        current = self.spare
        if current is not None:  # never got a request: kill and reap it
            self.retire_spare(release=False)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(current.pid, 0)
            self.doomed.discard(current.pid)
        for running in list(self.running.values()):
            with contextlib.suppress(OSError):
                os.killpg(running.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(running.pid, signal.SIGKILL)
        for running in list(self.running.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(running.pid, 0)
        self.sweep_orphans()


def _reap_within(pid: int, pidfd: int, timeout: float) -> int | None:
    """Reap `pid` if it ends within `timeout` s: its wait status, else None."""
    if not select.select([pidfd], [], [], timeout)[0]:
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return status if done else None


#: Largest config a zygote forked by the base reads from its control socket.
MAX_CONFIG = 1 << 20


def _install_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


def main() -> None:
    """An exec'd zygote: its control socket's fd and its config are on its command line, and
    the fd of a compiled WASM module (-1: none) after them."""
    _install_signals()
    artifact = int(sys.argv[3]) if len(sys.argv) > 3 else -1
    run(socket.socket(fileno=int(sys.argv[1])), sys.argv[2].encode(), artifact)


def run_forked(control: socket.socket) -> None:
    """A zygote forked by the shared base (`worker.base`): its config is the first message on
    its own control socket, so the base never receives anything of the skill."""
    _install_signals()
    fds: list[int] = []
    try:
        control.send(msgspec.msgpack.encode(ZygoteForked(pid=os.getpid())))
        config, fds, _flags, _addr = socket.recv_fds(control, MAX_CONFIG, 1)
    except OSError:
        config = b""
    if not config:  # the supervisor gave up on it before sending one
        os._exit(EXIT_BOOT_FAILED)
    run(control, config, fds[0] if fds else -1)


def run(control: socket.socket, config_json: bytes, artifact: int = -1) -> None:
    """Boot as the config says, say ready (or why not), serve until the control socket's EOF."""
    encoder = msgspec.msgpack.Encoder()
    try:
        config = msgspec.json.decode(config_json, type=ZygoteConfig)
        zygote = Zygote(config, control, artifact)  # it closes the artifact fd
        zygote.boot()
    except BaseException as exc:  # noqa: BLE001 - every boot failure is reported, then exit
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            control.send(encoder.encode(ZygoteFailed(
                error=detail, skill_code=isinstance(exc, SkillCodeFailed))))
        finally:
            os._exit(EXIT_BOOT_FAILED)
    ready, fds = zygote.ready()
    try:
        socket.send_fds(control, [encoder.encode(ready)], fds)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        zygote.serve()
    finally:
        zygote.shutdown()


if __name__ == "__main__":
    main()
