"""One execution, seen from the supervisor: fork it, feed it, watch it, end it, judge it.

Everything runs in the calling thread around one `poll()` loop with a deadline: the request
pipe is written, the result/stdout/stderr pipes are drained under byte caps, the zygote's report
socket says when the child started (with a pidfd to kill it by) and when it was reaped (with
the kernel's rusage), and the process tree is sampled for CPU, memory and task counts. Whatever
the child does, the loop ends by its deadline, everything is killed and reaped, every fd is
closed and the workdir is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import select
import shutil
import signal
import socket
import sys
import termios
import time
from dataclasses import dataclass, field

import msgspec

from sandbox import jsonbounds
from sandbox.cgroups import ExecutionGroup
from sandbox.hostcalls import HostChannel, HostServices, granted
from sandbox.skill import Skill
from sandbox.skilltext import printable, skill_text
from sandbox.watch import TreeWatch
from sandbox.zygote import ZygoteProcess
from worker.protocol import (
    EXIT_SETUP_FAILED,
    FRAME_HEADER,
    HOST_CALL_PERMISSIONS,
    MAX_HOST_CALL_FRAME,
    MAX_HOST_CALLS,
    MAX_TOKENS,
    SETUP_FAILED,
    ChildExited,
    ChildResult,
    ChildStarted,
    ErrorKind,
    ExecutionInput,
    ExecutionIsolation,
    ExecutionResult,
    ExecutionStatus,
    ForkCommand,
    FrameError,
    HostCall,
    Limits,
    ReportMessage,
    ResourceUsage,
    decode_frame,
    encode_frame,
)

TIMEOUT_ERROR = "runtime: execution timeout"
EXHAUSTED_ERROR = "runtime: resource exhausted"
CANCELED_ERROR = "runtime: execution canceled"
WORKER_ERROR = "runtime: worker failure"
#: Limits only the child itself can see hit (MemoryError under RLIMIT_DATA, EFBIG, a full
#: workdir, no thread to start, its own output cap): the only `ChildResult.limit` values taken.
#: "cpu time": a WASM module out of fuel (`worker.wasm`), before RLIMIT_CPU would end it.
CLAIMABLE_LIMITS = frozenset({"memory", "file size", "disk", "threads", "output", "cpu time"})

#: How long after a kill (or after the child exits) the pipes and the reap report may take.
KILL_GRACE = 5.0
#: Tree sampling starts this late, so quick executions pay nothing for it, then repeats.
FIRST_SAMPLE_AFTER = 0.02
SAMPLE_INTERVAL = 0.05
#: After draining a skill's stdout or stderr, leave it unpolled this long (the pipe buffers
#: 64 KiB meanwhile): the supervisor wakes at most ~200 times a second per stream, however
#: the skill writes.
STREAM_REST = 0.005
#: Result frames may exceed the output cap by this much (framing, error text).
FRAME_SLACK = 64 << 10
_READ_CHUNK = 1 << 16
_REPORT_DECODER = msgspec.msgpack.Decoder(ReportMessage)
_RESULT_DECODER = msgspec.msgpack.Decoder(ChildResult)
_HOST_CALL_DECODER = msgspec.msgpack.Decoder(HostCall)
#: What decoding a frame the child wrote may raise. RecursionError: msgspec skips a field the
#: Struct does not have by recursing into it, so a thousand nested arrays under an unknown key
#: raise it; escaping the loop, it became a "worker failure" (sparing the skill's circuit).
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, RecursionError)


class _FrameType(msgspec.Struct):
    """The tag of a frame on the result pipe: "host-call", or "" for the final result."""

    type: str = ""


_FRAME_TYPE_DECODER = msgspec.msgpack.Decoder(_FrameType)


class Tail:
    """Keeps the last `keep` bytes of a stream and counts all of them."""

    __slots__ = ("data", "keep", "total")

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.data = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.data += chunk
        if len(self.data) > self.keep:
            del self.data[: len(self.data) - self.keep]

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


@dataclass
class _State:
    started: ChildStarted | None = None
    pidfd: int = -1
    exited: ChildExited | None = None
    report_closed: bool = False
    killed_kind: ErrorKind = ErrorKind.NONE  # why the supervisor killed it, if it did
    killed_for: str = ""  # the detail: "<limit>: what happened", or the worker failure
    killed_at: float = 0.0
    result: bytearray = field(default_factory=bytearray)
    result_overflow: bool = False
    watch: TreeWatch | None = None


@dataclass(frozen=True)
class ExecutionSpec:
    """Everything one execution needs, resolved by the `Sandbox` before it forks."""

    skill: Skill
    zygote: ZygoteProcess
    exec_id: str
    request_id: str
    tenant_id: str
    user_id: str
    input: bytes
    limits: Limits
    env: dict[str, str]
    isolation: ExecutionIsolation
    workdir_root: str
    tail_bytes: int
    cancel_fd: int  # readable once the caller cancels
    #: When the request arrived and when its time is up (`time.monotonic`): the deadline was
    #: fixed on arrival, `limits.timeout` after it; the reported duration counts from arrival.
    arrived: float
    deadline: float
    #: Where a skill granted `llm:generate` / `http:fetch` gets its host calls answered
    #: (`sandbox.hostcalls`); None: no host call is served.
    host: HostServices | None = None


def _set_nonblocking(*fds: int) -> None:
    for fd in fds:
        os.set_blocking(fd, False)


class Execution:
    def __init__(self, spec: ExecutionSpec) -> None:
        self.spec = spec
        self.state = _State()
        self.stdout = Tail(spec.tail_bytes if spec.skill.manifest.kind == "python"
                           else spec.limits.max_output_bytes + 1)
        self.stderr = Tail(spec.tail_bytes)
        self.start = time.monotonic()
        self.deadline = spec.deadline
        self.cgroup: ExecutionGroup | None = None
        self.cgroup_limit = ""  # the cgroup limit the execution ran into, if any
        self.cgroup_peak = 0
        self.cgroup_exact_peak = True  # False: sampled (v2 before memory.peak, Linux < 5.19)
        self.cgroup_cpu = 0.0  # the cgroup's final CPU figure (cpuacct), seconds
        #: The child exited with its request unread: it never got as far as any skill code.
        self.request_unread = False
        #: The child wrote on its result pipe: it read its request (the runtime reads it before
        #: anything else), so bytes left in the request pipe (an unread host-call reply) do not
        #: mean that no skill code ran.
        self.result_seen = False
        #: Serves the skill's host calls (`llm_generate`, `http_fetch`) if it is granted any.
        self.channel: HostChannel | None = None
        #: The final result frame is whole at the front of the result buffer: what follows it is
        #: judged with it, never parsed again (a skill trickling bytes after a big result made
        #: each one copy and decode the whole frame again, on the supervisor's CPU).
        self.final_seen = False

    # -- the whole life of one execution ---------------------------------------------------

    def run(self) -> ExecutionResult:
        spec = self.spec
        # With a tmpfs workdir (the zygote's mount namespace) the zygote makes and removes the
        # directory, on a tmpfs of its own over the root: nothing per execution on the host's
        # filesystem, where an rmdir waits for the disk's journal (milliseconds when busy).
        host_dir = not spec.isolation.disk_bytes
        workdir = (_make_workdir(spec.workdir_root, spec.exec_id) if host_dir
                   else _workdir_path(spec.workdir_root, spec.exec_id))
        fds: list[int] = []
        report: socket.socket | None = None
        request_r = -1
        try:
            kinds = granted(spec.skill.manifest.permissions.host)
            if spec.host is not None and kinds and spec.skill.manifest.kind != "command":
                self.channel = HostChannel(spec.host, kinds, skill_id=spec.skill.id,
                                           request_id=spec.request_id, tenant_id=spec.tenant_id,
                                           user_id=spec.user_id, deadline=spec.deadline)
            isolation = spec.isolation
            if isolation.uid >= 0 and host_dir:
                os.chown(workdir, isolation.uid, isolation.gid)  # no tmpfs: the uid owns it
            request_r, request_w = os.pipe2(os.O_CLOEXEC)
            result_r, result_w = os.pipe2(os.O_CLOEXEC)
            stdout_r, stdout_w = os.pipe2(os.O_CLOEXEC)
            stderr_r, stderr_w = os.pipe2(os.O_CLOEXEC)
            fds = [request_r, request_w, result_r, result_w, stdout_r, stdout_w, stderr_r,
                   stderr_w]
            report, report_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            tickets = spec.zygote.cgroups
            ticket = None
            try:
                if tickets is not None:
                    # For this execution's child if the zygote must fork it now; else for the
                    # spare that replaces the one (already in a pair of its own) taking it.
                    ticket = tickets.issue()
                    isolation = msgspec.structs.replace(isolation,
                                                        cgroups=ticket.procs_files)
                command = ForkCommand(
                    exec_id=spec.exec_id, limits=spec.limits, workdir=workdir,
                    env={"HOME": workdir, "TMPDIR": workdir, **spec.env}, isolation=isolation,
                )
                spec.zygote.fork(command, [request_r, result_w, stdout_w, stderr_w,
                                           report_theirs.fileno()])
            except BaseException:
                if tickets is not None and ticket is not None:
                    tickets.release(ticket.procs_files)
                raise
            finally:
                report_theirs.close()
                # The request pipe's read end stays open here too: what the child left
                # unread in it tells whether any skill code can have run (`_request_unread`).
                for fd in (result_w, stdout_w, stderr_w):
                    os.close(fd)
                    fds.remove(fd)
            _set_nonblocking(request_w, result_r, stdout_r, stderr_r)
            self._loop(report, request_w, result_r, stdout_r, stderr_r, fds)
        finally:
            if report is not None and self.state.started is None:
                # A start report the loop left unread (it reads the socket late): the pid,
                # for the kill just below, and the cgroup pair, for the clean-up after it.
                report.setblocking(False)
                while self.state.exited is None and self._receive_report(report):
                    pass
            self._kill()
            if self.channel is not None:  # a late answer is dropped; its thread ends alone
                self.channel.settle(self.deadline, spec.cancel_fd)
                self.channel.close()
            if request_r >= 0:
                self.request_unread = _unread_bytes(request_r) > 0 and not self.result_seen
            if self.cgroup is not None:
                self._finish_cgroup(self.cgroup)
            if self.state.pidfd >= 0:
                os.close(self.state.pidfd)
            if report is not None:
                report.close()
            for fd in fds:
                os.close(fd)
            if host_dir:
                _remove_workdir(workdir)
        return self._judge()

    # -- the poll loop --------------------------------------------------------------------

    def _loop(self, report: socket.socket, request_w: int, result_r: int, stdout_r: int,
              stderr_r: int, fds: list[int]) -> None:
        spec = self.spec
        state = self.state
        poller = select.poll()
        pending_input = memoryview(self._request_bytes())
        readers = {result_r: "result", stdout_r: "stdout", stderr_r: "stderr"}
        for fd in readers:
            poller.register(fd, select.POLLIN)
        # The report socket is first read once the pipes are done with (the child exited),
        # at the first tree sample, or when the execution must be killed (its pid is in the
        # start report): a quick execution's start report waits in the socket and is read
        # with its exit report, one wake-up fewer while the child runs.
        report_from = self.start + FIRST_SAMPLE_AFTER
        report_polled = False
        poller.register(spec.cancel_fd, select.POLLIN)
        channel = self.channel
        if channel is not None:
            poller.register(channel.wake_fd, select.POLLIN)
        # An empty pipe takes a small input at once: no poll round for the common case.
        try:
            pending_input = pending_input[os.write(request_w, pending_input[:_READ_CHUNK]):]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            pending_input = memoryview(b"")
        writing = bool(pending_input)
        if writing:
            poller.register(request_w, select.POLLOUT)
        elif channel is None:  # a skill granted host calls gets its replies on this pipe
            os.close(request_w)
            fds.remove(request_w)
        next_sample = self.start + FIRST_SAMPLE_AFTER
        resting: dict[int, float] = {}  # stdout/stderr fds left unpolled until then

        while True:
            now = time.monotonic()
            if not report_polled and (now >= report_from or not readers or state.killed_kind):
                poller.register(report.fileno(), select.POLLIN)
                report_polled = True
            for fd, until in list(resting.items()):
                if until <= now or state.exited is not None or state.killed_kind:
                    poller.register(fd, select.POLLIN)
                    del resting[fd]
            if state.exited is not None and not readers:
                return
            if state.report_closed and state.exited is None:
                return  # the zygote died under us: judged as a worker failure
            if state.killed_kind and now > state.killed_at + KILL_GRACE:
                return
            if state.exited is not None and now > self._exit_grace_end:
                return  # descendants still hold the pipes; they are killed on the way out
            if not state.killed_kind:
                if now >= self.deadline:
                    self._kill(ErrorKind.TIMEOUT)
                    continue
                if state.started is not None and now >= next_sample:
                    self._check_tree()
                    next_sample = now + SAMPLE_INTERVAL
                    continue
            wake = min(self._next_wake(now, next_sample), *resting.values(),
                       math.inf if report_polled else report_from)
            for fd, events in poller.poll(max(0.0, wake - now) * 1000):
                if fd == request_w:
                    if events & (select.POLLERR | select.POLLHUP):
                        pending_input = memoryview(b"")
                    else:
                        try:
                            written = os.write(request_w, pending_input[:_READ_CHUNK])
                            pending_input = pending_input[written:]
                        except BlockingIOError:
                            pass
                        except BrokenPipeError:
                            pending_input = memoryview(b"")
                    if not pending_input and writing:
                        writing = False
                        poller.unregister(request_w)
                        if channel is None:
                            os.close(request_w)
                            fds.remove(request_w)
                        else:  # the reply is in the pipe: the next call may come
                            channel.pending = False
                elif channel is not None and fd == channel.wake_fd:
                    reply = channel.take()
                    if reply is not None and not state.killed_kind:
                        pending_input = memoryview(bytes(pending_input) + encode_frame(reply))
                        if not writing:
                            writing = True
                            poller.register(request_w, select.POLLOUT)
                elif fd in readers:
                    if not self._drain(fd, readers[fd]):
                        poller.unregister(fd)
                        del readers[fd]
                    elif readers[fd] != "result":
                        poller.unregister(fd)
                        # A skill that writes a byte at a time would wake this thread for
                        # each one, on the supervisor's CPU: let its pipe fill for a moment.
                        # The exit report ends the rest at once, so no result waits on it.
                        resting[fd] = time.monotonic() + STREAM_REST
                elif fd == spec.cancel_fd:
                    poller.unregister(fd)
                    if not state.killed_kind:
                        self._kill(ErrorKind.CANCELED)
                elif fd == report.fileno() and not self._receive_report(report):
                    poller.unregister(fd)
                    state.report_closed = True

    def _request_bytes(self) -> bytes:
        """What goes down the request pipe, straight to the child (never through the zygote):
        a command reads its input on stdin; a Python skill gets who asks, with the input."""
        spec = self.spec
        if spec.skill.manifest.kind == "command":
            return spec.input
        return encode_frame(ExecutionInput(
            request_id=spec.request_id, skill_id=spec.skill.id, tenant_id=spec.tenant_id,
            user_id=spec.user_id, deadline=time.time() + (self.deadline - time.monotonic()),
            input=spec.input))

    def _next_wake(self, now: float, next_sample: float) -> float:
        state = self.state
        if state.killed_kind:
            return state.killed_at + KILL_GRACE
        if state.exited is not None:
            return self._exit_grace_end
        wake = self.deadline
        if state.started is not None:
            wake = min(wake, next_sample)
        return wake

    @property
    def _exit_grace_end(self) -> float:
        return self._exited_at + 0.5

    def _drain(self, fd: int, name: str) -> bool:
        """Read what is there; False at EOF. Over-cap streams kill the execution."""
        limits = self.spec.limits
        while True:
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except BlockingIOError:
                return True
            if not chunk:
                return False
            if name == "result":
                self.result_seen = True
                if len(self.state.result) + len(chunk) > limits.max_output_bytes + FRAME_SLACK:
                    self.state.result_overflow = True
                    self._kill(ErrorKind.RESOURCE_EXHAUSTED,
                               f"output: result exceeds {limits.max_output_bytes} bytes")
                    return False
                self.state.result += chunk
                if self.channel is not None:
                    self._host_calls(self.channel)
                continue
            tail = self.stdout if name == "stdout" else self.stderr
            tail.add(chunk)
            if tail.total > limits.max_output_bytes and not self.state.killed_kind:
                self._kill(ErrorKind.RESOURCE_EXHAUSTED,
                           f"output: {name} exceeds {limits.max_output_bytes} bytes")

    def _host_calls(self, channel: HostChannel) -> None:
        """Take the host-call frames off the front of the result buffer and start answering
        them; stop at the final result (judged at the end). The child is not trusted: a frame
        that is neither, a second call before the first was answered, or one call too many
        ends the execution at once with a verdict naming it."""
        buffer = self.state.result
        limit = self.spec.limits.max_output_bytes + FRAME_SLACK
        while len(buffer) >= FRAME_HEADER.size and not self.state.killed_kind \
                and not self.final_seen:
            (length,) = FRAME_HEADER.unpack_from(buffer)
            if length > limit:
                self._kill(ErrorKind.RESOURCE_EXHAUSTED,
                           f"output: a frame of {length} bytes on the result pipe is over the "
                           f"limit of {limit}")
                return
            end = FRAME_HEADER.size + length
            if len(buffer) < end:
                return
            body = bytes(buffer[FRAME_HEADER.size:end])
            try:
                tagged = _FRAME_TYPE_DECODER.decode(body).type == "host-call"
            except _UNDECODABLE as exc:
                self._kill(ErrorKind.SKILL_FAILED, f"invalid result frame: {exc}")
                return
            if not tagged:
                self.final_seen = True  # the final result: anything after it is judged with it
                return
            if length > MAX_HOST_CALL_FRAME:
                self._kill(ErrorKind.RESOURCE_EXHAUSTED, f"host calls: a host call of {length} "
                           f"bytes is over the limit of {MAX_HOST_CALL_FRAME}")
                return
            try:
                call = _HOST_CALL_DECODER.decode(body)
            except _UNDECODABLE as exc:
                self._kill(ErrorKind.SKILL_FAILED, f"invalid host call frame: {exc}")
                return
            del buffer[:end]
            if call.kind not in HOST_CALL_PERMISSIONS:
                self._kill(ErrorKind.SKILL_FAILED, "invalid host call frame: unknown kind "
                           f"{printable(call.kind)[:40]!r}")
            elif channel.pending:
                self._kill(ErrorKind.SKILL_FAILED, "invalid host call frame: a second host "
                           "call before the first was answered")
            elif channel.calls >= MAX_HOST_CALLS:
                self._kill(ErrorKind.RESOURCE_EXHAUSTED,
                           f"host calls: more than {MAX_HOST_CALLS} in one execution")
            else:
                channel.start(call)

    def _receive_report(self, report: socket.socket) -> bool:
        try:
            message, fds, _flags, _addr = socket.recv_fds(report, 4096, 1)
        except OSError:
            return False
        if not message:
            for fd in fds:
                os.close(fd)
            return False
        try:
            decoded = _REPORT_DECODER.decode(message)
        except (msgspec.DecodeError, msgspec.ValidationError):
            for fd in fds:
                os.close(fd)
            return False  # a zygote that says nonsense is treated as gone: a worker failure
        if isinstance(decoded, ChildStarted):
            self.state.started = decoded
            self.state.pidfd = fds[0] if fds else -1
            for fd in fds[1:]:
                os.close(fd)
            self._claim_cgroup(decoded)
            if self.state.killed_kind:  # the kill was asked for before we had the pid
                self._signal_tree()
        else:
            for fd in fds:
                os.close(fd)
            self.state.exited = decoded
            self._exited_at = time.monotonic()
        return True

    def _claim_cgroup(self, started: ChildStarted) -> None:
        """Take over the cgroup pair the child runs in; refill the zygote if it holds none."""
        zygote = self.spec.zygote
        tickets = zygote.cgroups
        if tickets is None:
            return
        tickets.release(*started.released)
        self.cgroup = tickets.claim(started.cgroups)
        if self.cgroup is None:  # not in a pair of ours: it must not run
            self._kill(ErrorKind.WORKER_FAILURE, "the child is not in a cgroup of this execution")
        if zygote.prefork and tickets.empty():
            zygote.offer_spare_cgroups()

    # -- limits ---------------------------------------------------------------------------

    def _finish_cgroup(self, group: ExecutionGroup) -> None:
        """Kill whatever is left (setsid escapees too), keep the figures, remove the cgroup.

        The final CPU figure covers every process the execution ever had; over `cpu_time` it
        is a CPU verdict even when the overrun fell between two samples."""
        group.kill_all()
        self.cgroup_peak = group.peak_memory_bytes()
        self.cgroup_exact_peak = group.exact_peak
        self.cgroup_cpu = group.cpu_seconds()
        cpu_time = self.spec.limits.cpu_time
        if self.cgroup_cpu > cpu_time:  # the first reason given stays the one reported
            self._kill(ErrorKind.RESOURCE_EXHAUSTED, f"cpu time: used more than {cpu_time:g}s")
        self.cgroup_limit = self.cgroup_limit or self._cgroup_limit_hit(group)
        tickets = self.spec.zygote.cgroups
        assert tickets is not None
        tickets.root.finish(group, reuse=not self.cgroup_limit)

    def _cgroup_limit_hit(self, group: ExecutionGroup) -> str:
        limits = self.spec.limits
        if group.oom_killed():
            return f"memory: the execution's processes used more than {limits.memory_mb} MB"
        if group.pids_limit_hit():
            return (f"processes: the execution reached its limit of {limits.max_processes} "
                    "processes/threads")
        return ""

    def _check_tree(self) -> None:
        state = self.state
        if self.cgroup is not None and not self.cgroup_limit:
            self.cgroup_limit = self._cgroup_limit_hit(self.cgroup)
            if self.cgroup_limit:
                self._kill(ErrorKind.RESOURCE_EXHAUSTED, self.cgroup_limit)
                return
        if state.watch is None and state.started is not None and state.exited is None:
            try:  # created on first use: quick executions never pay for psutil
                cgroup = self.cgroup
                state.watch = (TreeWatch(state.started.pid) if cgroup is None else
                               TreeWatch(state.started.pid, cgroup.members, cgroup.memory_bytes,
                                         cgroup.cpu_seconds if cgroup.has_cpu else None))
            except Exception:  # noqa: BLE001 - already gone: the exit report follows
                return
        watch = state.watch
        if watch is None:
            return
        sample = watch.sample()
        if sample is None:
            return
        limits = self.spec.limits
        exhausted = ErrorKind.RESOURCE_EXHAUSTED
        if sample.cpu_seconds > limits.cpu_time:
            self._kill(exhausted, f"cpu time: used more than {limits.cpu_time:g}s")
        elif sample.memory_bytes > limits.memory_mb << 20:
            self._kill(exhausted, f"memory: used more than {limits.memory_mb} MB")
        elif sample.tasks > limits.max_processes:
            self._kill(exhausted, f"processes: more than {limits.max_processes} processes/threads")

    def _kill(self, kind: ErrorKind = ErrorKind.NONE, detail: str = "") -> None:
        """Kill the whole execution; the first reason given is the one reported."""
        state = self.state
        if kind is not ErrorKind.NONE and state.killed_kind is ErrorKind.NONE:
            state.killed_kind, state.killed_for = kind, detail
            state.killed_at = time.monotonic()
        if state.started is not None and state.exited is None:
            self._signal_tree()

    def _signal_tree(self) -> None:
        state = self.state
        assert state.started is not None
        if state.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(state.pidfd, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(state.started.pid, signal.SIGKILL)

    # -- the verdict ----------------------------------------------------------------------

    def _judge(self) -> ExecutionResult:
        state = self.state
        spec = self.spec
        limits = spec.limits
        usage = self._usage()
        tokens = 0
        frame: ChildResult | None = None
        frame_problem = ""
        if state.result:
            try:
                frame = decode_frame(bytes(state.result), _RESULT_DECODER)
                tokens = min(max(0, frame.tokens_used), MAX_TOKENS)  # a forged frame: any int
            except FrameError as exc:
                frame_problem = str(exc)
        if self.channel is not None:  # counted here, from the provider's usage
            tokens = min(tokens + self.channel.tokens, MAX_TOKENS)

        status, kind, error, output = self._verdict(frame, frame_problem, usage)
        if status is ExecutionStatus.SUCCESS:
            # The frame is the child's word: a forged one may carry anything as "output".
            limit = limits.max_output_bytes
            failed = ExecutionStatus.FAILED
            if len(output) > limit:
                error = (f"{EXHAUSTED_ERROR}: output: result is {len(output)} bytes, "
                         f"limit is {limit}")
                status, kind, output = failed, ErrorKind.RESOURCE_EXHAUSTED, b""
            elif problem := self._output_problem(output):
                status, kind, output, error = failed, ErrorKind.SKILL_FAILED, b"", problem
        return ExecutionResult(
            status=status, output=output, error=error,
            duration=time.monotonic() - spec.arrived,
            resource_usage=ResourceUsage(cpu_time_ms=usage.cpu_time_ms,
                                         memory_mb=usage.memory_mb, tokens_used=tokens),
            stdout=self.stdout.text() if spec.skill.manifest.kind == "python" else "",
            stderr=self.stderr.text(), request_id=spec.request_id, skill_id=spec.skill.id,
            error_kind=kind,
        )

    def _verdict(self, frame: ChildResult | None, frame_problem: str,
                 usage: ResourceUsage) -> tuple[ExecutionStatus, ErrorKind, str, bytes]:
        """Status, kind, error text and output, from what the supervisor saw: its own kill
        reasons and deadlines, cgroup events, the exit status. The frame only says what the
        skill answered; its text never chooses the kind."""
        state, spec = self.state, self.spec
        limits = spec.limits
        exited = state.exited
        failed, exhausted = ExecutionStatus.FAILED, ErrorKind.RESOURCE_EXHAUSTED
        if state.killed_kind is ErrorKind.CANCELED:
            return ExecutionStatus.CANCELED, ErrorKind.CANCELED, CANCELED_ERROR, b""
        if state.killed_kind is ErrorKind.WORKER_FAILURE:
            return failed, ErrorKind.WORKER_FAILURE, f"{WORKER_ERROR}: {state.killed_for}", b""
        if state.killed_kind is ErrorKind.TIMEOUT:
            return (ExecutionStatus.TIMEOUT, ErrorKind.TIMEOUT,
                    f"{TIMEOUT_ERROR} after {limits.timeout:g}s", b"")
        if state.killed_kind is exhausted:
            return failed, exhausted, f"{EXHAUSTED_ERROR}: {state.killed_for}", b""
        if state.killed_kind is ErrorKind.SKILL_FAILED:  # e.g. a garbage host-call frame
            return failed, ErrorKind.SKILL_FAILED, state.killed_for, b""
        if self.cgroup_limit and not (frame is not None and frame.ok and exited is not None
                                      and exited.wait_status == 0):
            return failed, exhausted, f"{EXHAUSTED_ERROR}: {self.cgroup_limit}", b""
        if exited is None:
            if state.started is None:  # the zygote said why on the execution's stderr
                return (failed, ErrorKind.WORKER_FAILURE, f"{WORKER_ERROR}: the zygote could "
                        f"not start the execution: {self._setup_problem()}", b"")
            return (failed, ErrorKind.WORKER_FAILURE,
                    f"{WORKER_ERROR}: the skill's zygote died during the execution", b"")
        if self.request_unread and _exit_code(exited.wait_status) == EXIT_SETUP_FAILED:
            # Its request unread: no skill code ran, so this exit code is the set-up's own.
            return (failed, ErrorKind.WORKER_FAILURE, f"{WORKER_ERROR}: the execution could "
                    f"not be set up: {self._setup_problem()}", b"")
        if _signal_of(exited.wait_status) == signal.SIGXCPU or (
                usage.cpu_time_ms >= limits.cpu_time * 1000 and _signalled(exited.wait_status)):
            # SIGXCPU comes only from RLIMIT_CPU (rusage, tick-sampled, may read a bit less)
            return (failed, exhausted,
                    f"{EXHAUSTED_ERROR}: cpu time: used more than {limits.cpu_time:g}s", b"")
        if _signal_of(exited.wait_status) == signal.SIGXFSZ or exited.file_limit_reached:
            return (failed, exhausted, f"{EXHAUSTED_ERROR}: file size: a file grew past "
                                       f"{limits.max_file_bytes} bytes", b"")
        if spec.skill.manifest.kind == "command":
            return self._judge_command(exited)
        skill_failed = ErrorKind.SKILL_FAILED
        if frame_problem:  # the skill can write anything on its result pipe: its own fault
            return failed, skill_failed, f"invalid result frame: {frame_problem}", b""
        if frame is None:
            return failed, skill_failed, f"skill {_describe_exit(exited.wait_status)} " \
                                         "without a result", b""
        if frame.limit in CLAIMABLE_LIMITS:
            # Only limits the child alone can see (MemoryError under RLIMIT_DATA, EFBIG, a
            # full workdir): a claim that blames the skill itself, named by the supervisor.
            return (failed, exhausted,
                    f"{EXHAUSTED_ERROR}: {frame.limit}: {skill_text(frame.error)}", b"")
        if not frame.ok or frame.limit:
            return failed, skill_failed, skill_text(frame.error) or "skill failed", b""
        if exited.wait_status != 0:
            return failed, skill_failed, f"skill {_describe_exit(exited.wait_status)} after " \
                                         "writing its result", b""
        return ExecutionStatus.SUCCESS, ErrorKind.NONE, "", frame.output

    def _setup_problem(self) -> str:
        """The reason a worker process wrote before any skill code ran (or "no detail")."""
        for line in reversed(self.stderr.text().splitlines()):
            if line.startswith(SETUP_FAILED):
                return printable(line[len(SETUP_FAILED):])[:1000]
        return "no detail"

    def _output_problem(self, output: bytes) -> str:
        """Why a successful execution's output cannot be handed to the caller, or "".

        The output is the skill's choice: nesting and schema work are bounded
        (`sandbox.jsonbounds`, `sandbox.schema`), and whatever else goes wrong while checking
        it fails the execution instead of escaping `execute` (which must log every execution).
        """
        try:
            data, problem = jsonbounds.decode(output)
            if not problem:
                problem = self.spec.skill.output_problem(data) or ""
        except Exception as exc:  # noqa: BLE001 - a bug or a limit we missed: still a result
            problem = f"the output check failed: {type(exc).__name__}: {str(exc)[:200]}"
        return f"invalid output: {problem}" if problem else ""

    def _judge_command(self, exited: ChildExited
                       ) -> tuple[ExecutionStatus, ErrorKind, str, bytes]:
        failed = ExecutionStatus.FAILED, ErrorKind.SKILL_FAILED
        if exited.wait_status != 0:
            last = self.stderr.text().strip().splitlines()[-1:] or [""]
            detail = f": {skill_text(last[0])}" if last[0] else ""
            return *failed, f"command {_describe_exit(exited.wait_status)}{detail}", b""
        raw = bytes(self.stdout.data).strip() or b"null"
        _data, problem = jsonbounds.decode(raw)
        if problem:
            return *failed, f"invalid output: stdout is {problem}", b""
        return ExecutionStatus.SUCCESS, ErrorKind.NONE, "", raw

    def _usage(self) -> ResourceUsage:
        state = self.state
        cpu = 0.0
        memory_kb = 0
        if state.exited is not None:
            cpu = state.exited.utime + state.exited.stime
            baseline = state.started.zygote_rss_kb if state.started is not None else 0
            memory_kb = max(0, state.exited.maxrss_kb - baseline)
        if state.watch is not None:
            cpu = max(cpu, state.watch.peak_cpu_seconds)
            memory_kb = max(memory_kb, state.watch.peak_memory_bytes // 1024)
        if self.cgroup_peak and self.cgroup_exact_peak:
            memory_kb = self.cgroup_peak // 1024  # what the kernel charged: the real peak
        elif self.cgroup_peak:  # samples can miss a spike that wait4's maxrss saw
            memory_kb = max(memory_kb, self.cgroup_peak // 1024)
        cpu = max(cpu, self.cgroup_cpu)  # every process it ever had, reaped or not
        return ResourceUsage(cpu_time_ms=round(cpu * 1000), memory_mb=round(memory_kb / 1024))

    _exited_at: float = 0.0


def _workdir_path(root: str, exec_id: str) -> str:
    """Where an execution's workdir is: named after its (random) id, under the root."""
    return os.path.join(root, f"exec-{exec_id}")


def _make_workdir(root: str, exec_id: str) -> str:
    """A fresh, private directory named after the (random) execution id."""
    path = _workdir_path(root, exec_id)
    try:
        os.mkdir(path, 0o700)
    except FileNotFoundError:  # the root went away (or was never made): make it once more
        os.makedirs(root, mode=0o711, exist_ok=True)
        os.mkdir(path, 0o700)
    return path


def _remove_workdir(path: str) -> None:
    """Most executions leave the directory empty (or wrote to a tmpfs detached by the zygote):
    one rmdir; a tree only when the skill left files behind."""
    try:
        os.rmdir(path)
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def _signalled(status: int) -> bool:
    return os.WIFSIGNALED(status)


def _signal_of(status: int) -> int:
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0


def _exit_code(status: int) -> int | None:
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None


def _unread_bytes(fd: int) -> int:
    """Bytes still in a pipe (FIONREAD works on either end)."""
    answer = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(answer, sys.byteorder, signed=True)


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"was killed by {name}"
    code = os.waitstatus_to_exitcode(status)
    return f"exited with status {code}"


