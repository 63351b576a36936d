"""The zygote: a warm, lean fork server for one skill.

Started by the supervisor as a fresh interpreter (`python -I -m worker.zygote FD CONFIG`), so it
never holds a copy of the supervisor's memory. It imports the worker runtime and the skill's
trusted `preload` modules, compiles the skill's entrypoint (compiling runs no skill code), says
it is ready, and then serves fork requests on its control socket (fd FD) until that socket reaches
EOF — the supervisor's exit, however abrupt, is the shutdown signal.

Per request it forks one execution child, passes the child's pidfd back on the execution's own
report socket, and reports the kernel's wait4 accounting when the child is reaped. Any other
process that ends up its child (the zygote is a subreaper: orphans of an execution land here)
is killed and reaped.
"""

from __future__ import annotations

import contextlib
import gc
import os
import selectors
import signal
import socket
import sys
import traceback
from types import CodeType
from typing import Any

import msgspec

from worker import child, isolation
from worker.protocol import (
    ChildExited,
    ChildStarted,
    ForkCommand,
    SkillCode,
    ZygoteFailed,
    ZygoteReady,
)

#: Exit code when start-up (preload, compile, isolation) fails: the supervisor reports the error
#: it received and does not retry in a loop.
EXIT_BOOT_FAILED = 3
MAX_CONTROL_MESSAGE = 1 << 16
#: The zygote's RSS (the baseline subtracted from a child's peak) is re-read every this many forks.
RSS_REFRESH_FORKS = 64
_FDS_PER_EXECUTION = 5


class ZygoteConfig(msgspec.Struct, frozen=True, kw_only=True):
    code: SkillCode
    preload: list[str] = []
    isolation: dict[str, Any] = {}


class _Running:
    __slots__ = ("pid", "pidfd", "report", "workdir")

    def __init__(self, pid: int, pidfd: int, report: socket.socket, workdir: str) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.report = report
        self.workdir = workdir


def _rss_kb() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * (os.sysconf("SC_PAGE_SIZE") // 1024)


class Zygote:
    def __init__(self, config: ZygoteConfig, control: socket.socket) -> None:
        self.config = config
        self.control = control
        self.precompiled: CodeType | None = None
        self.running: dict[int, _Running] = {}
        self.doomed: set[int] = set()
        self.selector = selectors.DefaultSelector()
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ForkCommand)
        self.children_file = f"/proc/self/task/{os.getpid()}/children"
        self.rss_kb = 0
        self.forks = 0

    # -- start-up ---------------------------------------------------------------------------

    def boot(self) -> None:
        """Everything every execution would otherwise repeat: imports, compilation, layers."""
        import importlib

        for name in self.config.preload:
            importlib.import_module(name)
        code = self.config.code
        if code.kind == "python" and not code.spawn:
            self.precompiled = child.compile_entrypoint(code)
        isolation.apply_zygote_layers(self.config.isolation, code)
        isolation.become_subreaper()
        # Objects alive now are shared copy-on-write with every child: keep the collector from
        # touching (and so copying) them in each execution.
        gc.collect()
        gc.freeze()
        self.rss_kb = _rss_kb()
        isolation.note_data_baseline()

    # -- serving ----------------------------------------------------------------------------

    def serve(self) -> None:
        self.selector.register(self.control, selectors.EVENT_READ, None)
        while True:
            timeout = 0.05 if self.doomed else 1.0
            events = self.selector.select(timeout)
            exited = False
            for key, _ in events:
                if key.data is None:
                    if not self.handle_control():
                        return
                else:
                    self.handle_exit(key.data)
                    exited = True
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
        if len(fds) != _FDS_PER_EXECUTION:
            for fd in fds:
                os.close(fd)
            return True
        try:
            command = self.decoder.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError):
            for fd in fds:
                os.close(fd)
            return True
        self.fork_execution(command, fds)
        return True

    def fork_execution(self, command: ForkCommand, fds: list[int]) -> None:
        report = socket.socket(fileno=fds[-1])
        self.forks += 1
        if self.forks % RSS_REFRESH_FORKS == 0:  # it drifts slowly; reading it costs ~30 µs
            self.rss_kb = _rss_kb()
            isolation.note_data_baseline()
        zygote_rss = self.rss_kb
        try:
            isolation.before_fork(command)
        except OSError as exc:  # this execution cannot be isolated: refuse it, keep serving
            with contextlib.suppress(OSError):
                os.write(fds[3], f"skill-sandbox: execution set-up failed: {exc}\n".encode())
            for fd in fds[:-1]:
                os.close(fd)
            report.close()  # the supervisor sees no child: a worker failure, for this one only
            return
        pid = os.fork()
        if pid == 0:  # the execution child: never returns
            child.run_execution(self.config.code, self.config.preload, command, fds,
                                self.precompiled, os.getppid())
        isolation.after_fork(command, pid)
        for fd in fds[:-1]:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(report, [self.encoder.encode(ChildStarted(
                pid=pid, zygote_rss_kb=zygote_rss))], [pidfd])
        except OSError:
            os.kill(pid, signal.SIGKILL)  # nobody is listening for this execution any more
        self.running[pid] = _Running(pid, pidfd, report, command.workdir)
        self.selector.register(pidfd, selectors.EVENT_READ, self.running[pid])
        isolation.prepare_next()

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
        report = ChildExited(pid=pid, wait_status=status, utime=usage.ru_utime,
                             stime=usage.ru_stime, maxrss_kb=usage.ru_maxrss)
        with contextlib.suppress(OSError):
            running.report.send(self.encoder.encode(report))
        running.report.close()
        isolation.release_execution(running.workdir)

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
        for pid in pids:
            if pid not in self.running and pid not in self.doomed:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                self.doomed.add(pid)

    def shutdown(self) -> None:
        for running in list(self.running.values()):
            with contextlib.suppress(OSError):
                os.killpg(running.pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                os.kill(running.pid, signal.SIGKILL)
        for running in list(self.running.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(running.pid, 0)
        self.sweep_orphans()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    control = socket.socket(fileno=int(sys.argv[1]))
    encoder = msgspec.msgpack.Encoder()
    try:
        config = msgspec.json.decode(sys.argv[2], type=ZygoteConfig)
        zygote = Zygote(config, control)
        zygote.boot()
    except BaseException as exc:  # noqa: BLE001 - every boot failure is reported, then exit
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        try:
            control.send(encoder.encode(ZygoteFailed(error=detail)))
        finally:
            os._exit(EXIT_BOOT_FAILED)
    control.send(encoder.encode(ZygoteReady(pid=os.getpid(), rss_kb=zygote.rss_kb,
                                            python=sys.version.split()[0])))
    try:
        zygote.serve()
    finally:
        zygote.shutdown()


if __name__ == "__main__":
    main()
