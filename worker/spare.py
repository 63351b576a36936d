"""A spare execution child, forked by the zygote before any request needs it.

Forking and the start of every child (its own session, death with the zygote, signals, fds
closed) do not depend on the request; nor does joining the cgroup pair the supervisor prepared
for the next execution. On cgroup v1 that join is the expensive part: each `cgroup.procs` write
takes a percpu rwsem for writing, which waits for an RCU grace period when no other attach
happened recently — milliseconds after an idle moment, on the request path if done per request.

So the zygote keeps one spare: forked after boot and after each hand-off, it does all of that
itself (the zygote's loop never waits on the attach), says ready, and blocks on its own
socketpair. A request is handed to it there (the `ForkCommand` and the four pipe ends, with
SCM_RIGHTS); the spare then does exactly what a child forked on request does after the fork.
It serves one request at most: after the hand-off it closes the socket and never reads again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from types import CodeType

import msgspec

from worker import child, isolation, pidns
from worker.protocol import EXIT_SPARE_FAILED, ForkCommand, SkillCode

#: `ps` name of a spare while it waits (set in the zygote around the fork, so a spare never
#: shows under another name); a handed-off spare takes the zygote's name back.
SPARE_NAME = b"sbx-spare"
READY = b"R"
_EXECUTION_FDS = 4
_MAX_COMMAND = 1 << 16


class Spare:
    """The zygote's handle on its spare: pid, pidfd, its end of the hand-off socket, the cgroup
    pair it joins, and the zygote's RSS when it was forked (the child's memory baseline)."""

    __slots__ = ("born", "cgroups", "pid", "pidfd", "ready", "rss_kb", "sock")

    def __init__(self, pid: int, pidfd: int, sock: socket.socket, cgroups: list[str],
                 rss_kb: int) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock
        self.cgroups = cgroups
        self.rss_kb = rss_kb
        self.ready = False
        self.born = time.monotonic()

    def poll_ready(self) -> bool | None:
        """Whether the spare has said ready, without waiting: True, False (not yet: still
        setting up or joining its cgroups), None (dead, or it said something else)."""
        if self.ready:
            return True
        try:
            data = self.sock.recv(16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return None
        self.ready = data == READY
        return True if self.ready else None

    def hand_off(self, message: bytes, fds: list[int]) -> bool:
        """Send the request to the spare; False if it cannot take it (then it must be killed)."""
        try:
            socket.send_fds(self.sock, [message], fds)
        except OSError:
            return False
        self.sock.close()  # it has its request; the queued message survives this close
        return True

    def kill(self) -> None:
        """SIGKILL it (the caller reaps it and closes the pidfd)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


def fork_spare(code: SkillCode, preload: list[str], precompiled: CodeType | None,
               cgroups: list[str], rss_kb: int, zygote_name: bytes, pid_ns: bool) -> Spare:
    """In the zygote: fork a spare that joins `cgroups` (in a PID namespace of its own when
    `pid_ns`); returns at once, never blocks on it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote_pid = os.getpid()
    isolation.set_process_name(SPARE_NAME)
    try:
        pid = pidns.fork(pid_ns)
    except BaseException:
        ours.close()
        theirs.close()
        raise
    finally:
        if os.getpid() == zygote_pid:
            isolation.set_process_name(zygote_name)
    if pid == 0:  # the spare: never returns
        _serve(code, preload, precompiled, cgroups, theirs, zygote_pid, zygote_name)
    theirs.close()
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        os.kill(pid, signal.SIGKILL)
        ours.close()
        os.waitpid(pid, 0)
        raise
    return Spare(pid, pidfd, ours, cgroups, rss_kb)


def _serve(code: SkillCode, preload: list[str], precompiled: CodeType | None,
           cgroups: list[str], sock: socket.socket, zygote_pid: int, name: bytes) -> None:
    """The spare's life: set up, join the cgroups, say ready, wait for one request, run it."""
    try:
        child.become_execution_process(zygote_pid)
        # 0-2: the zygote's /dev/null and its stderr (the operator's log) until the request's
        # pipes replace them; the Landlock plan's fds are needed to confine the request.
        isolation.close_fds_except({0, 1, 2, sock.fileno(), *isolation.kept_fds()})
        isolation.own_ruleset()
        isolation.join_cgroups(cgroups, os.getpid())
        isolation.enter_own_user_namespace()
        sock.send(READY)
        message, fds, _flags, _addr = socket.recv_fds(sock, _MAX_COMMAND, _EXECUTION_FDS)
    except BaseException:  # noqa: BLE001 - the zygote sees the exit and forks on request
        os._exit(EXIT_SPARE_FAILED)
    try:
        sock.close()
        if not message or len(fds) != _EXECUTION_FDS:
            os._exit(0)  # the zygote is done with this spare (shutdown)
        command = msgspec.msgpack.decode(message, type=ForkCommand)
        isolation.set_process_name(name)
    except BaseException as exc:  # noqa: BLE001 - nothing may escape into the zygote's code
        child.setup_failed(exc)
    child.run_command(code, preload, command, fds, precompiled)
