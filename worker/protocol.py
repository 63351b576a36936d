"""Wire types shared by the supervisor (`sandbox/`) and the worker processes (`worker/`).

This is the only module both sides import. It depends on msgspec alone so that the code
running next to untrusted skills stays small; the supervisor re-exports the public types.

Frames are msgpack, prefixed by a 4-byte big-endian length, and travel on dedicated pipes or
sockets — never on a skill's stdout.
"""

from __future__ import annotations

import enum
import os
import struct
import uuid
from typing import Any

import msgspec

#: Bytes of the big-endian length prefix in front of every frame.
FRAME_HEADER = struct.Struct(">I")


class ExecutionStatus(enum.StrEnum):
    """Outcome of one execution; the values are openbotstack's, byte for byte."""

    SUCCESS = "success"
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    REJECTED = "rejected"


class ErrorKind(enum.StrEnum):
    """Why an execution did not succeed, as the supervisor observed it (exit status, signals,
    cgroup events, its own deadlines and admission checks) — never read from anything the skill
    wrote. `raise_for_status`, the circuit breaker and the execution log decide by it; `error`
    is text for people and is never parsed back."""

    NONE = ""
    #: The skill raised, crashed, exited non-zero, or answered with an invalid result.
    SKILL_FAILED = "skill_failed"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    SKILL_NOT_LOADED = "skill_not_loaded"
    INVALID_INPUT = "invalid_input"
    POLICY_REJECTED = "policy_rejected"
    CIRCUIT_OPEN = "circuit_open"
    #: Waited its whole timeout for a concurrency slot: load on the host, not the skill's fault.
    NO_SLOT = "no_slot"
    #: The sandbox's own machinery failed (zygote died, no execution uid, set-up failed).
    WORKER_FAILURE = "worker_failure"


#: Most tokens one execution can report: 2**53 - 1, exact in a double (JSON consumers) and far
#: inside SQLite's 64-bit integers. The child refuses a larger count and saturates its total;
#: the supervisor clamps whatever a (possibly forged) result frame says.
MAX_TOKENS = 2**53 - 1

#: Fixed fds inside a Python execution (after 0, 1, 2): result pipe (write), request pipe (read).
RESULT_FD = 3
REQUEST_FD = 4
#: Exit codes of the worker processes, read by the supervisor. A zygote that could not boot
#: (preload, compile, isolation); an execution child that could not write its result frame; one
#: that could not be set up (a worker failure only while its request is still unread, i.e.
#: before any skill code could run and exit with this code itself); a spare that failed before
#: any request.
EXIT_BOOT_FAILED = 3
EXIT_FRAME_FAILED = 70
EXIT_SETUP_FAILED = 71
EXIT_SPARE_FAILED = 72
#: The line a child (or the zygote, for it) that cannot set an execution up writes on the
#: execution's stderr; the supervisor quotes it only when no skill code can have run.
SETUP_FAILED = "skill-sandbox: execution set-up failed: "


class ResourceUsage(msgspec.Struct, frozen=True, kw_only=True):
    """What an execution cost, measured by the supervisor from outside the child.

    `tokens_used` is the one figure the skill reports itself (`ctx.report_tokens`): there is
    no way to measure it from outside.
    """

    cpu_time_ms: int = 0
    memory_mb: int = 0
    tokens_used: int = 0


def _new_request_id() -> str:
    return uuid.uuid4().hex


class ExecutionRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Input to one execution. `input` is JSON bytes; `timeout` (seconds) overrides the skill's."""

    skill_id: str
    input: bytes = b"{}"
    timeout: float | None = None
    tenant_id: str = ""
    user_id: str = ""
    request_id: str = msgspec.field(default_factory=_new_request_id)


class ExecutionResult(msgspec.Struct, frozen=True, kw_only=True):
    """Outcome of one execution; returned for every outcome, including the skill's own faults."""

    status: ExecutionStatus
    output: bytes = b""
    error: str = ""
    duration: float = 0.0
    resource_usage: ResourceUsage = ResourceUsage()
    stdout: str = ""
    stderr: str = ""
    request_id: str = ""
    skill_id: str = ""
    error_kind: ErrorKind = ErrorKind.NONE
    #: The host (node name) that ran it, set by a fleet worker (`sandbox.fleet`); "" in-process.
    node: str = ""

    @property
    def ok(self) -> bool:
        return self.status is ExecutionStatus.SUCCESS

    def json(self) -> Any:
        """The output decoded from JSON (None when there is none)."""
        return msgspec.json.decode(self.output) if self.output else None

    def raise_for_status(self) -> ExecutionResult:
        """Raise the `SandboxError` matching this result, or return the result on success."""
        from sandbox.errors import error_for_result  # supervisor side only; never in a worker

        error = error_for_result(self)
        if error is not None:
            raise error
        return self


# ---------------------------------------------------------------------------------------------
# Internal messages between the supervisor, the zygote and an execution child.


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """Per-execution limits, already resolved from the request, the manifest and the defaults."""

    timeout: float = 30.0
    cpu_time: float = 5.0
    memory_mb: int = 128
    max_processes: int = 32
    max_output_bytes: int = 1 << 20
    max_file_bytes: int = 16 << 20
    max_open_files: int = 256


class SkillCode(msgspec.Struct, frozen=True, kw_only=True):
    """How to run a skill: a Python entrypoint in-process, or an executable speaking JSON."""

    skill_dir: str
    kind: str  # "python" | "command" | "wasm"
    entrypoint: str = ""  # "module:function" for python skills
    command: list[str] = []
    spawn: bool = False  # python only: a fresh interpreter per execution instead of a fork
    wasm: str = ""  # wasm only: the module's absolute path (read once, by the zygote)
    host: list[str] = []  # the openbotstack host capabilities granted (permissions.host)
    #: wasm only: the module's linear memory cap (the manifest's memory_mb; the process's own
    #: limit, `Limits.memory_mb`, adds the runtime's share on top)
    wasm_memory_mb: int = 0


class ZygoteSettings(msgspec.Struct, frozen=True, kw_only=True):
    """The layers a zygote applies, chosen by the supervisor (`sandbox.capabilities`) for one
    skill and fixed for the zygote's life; all off by default."""

    network: bool = False
    drop_uid: bool = False  # the uid/gid of each execution arrive with its ForkCommand
    user_ns: bool = False  # not root: a user namespace of its own (for mount/net/ipc ones)
    execution_user_ns: bool = False  # and a nested one per execution: RLIMIT_NPROC its own
    mount_ns: bool = False  # own mount namespace: exposed paths, read-only view, tmpfs workdir
    net_ns: bool = False  # own network namespace: no interface but a downed loopback
    ipc_ns: bool = False  # own IPC namespace: no SysV object or POSIX queue shared with others
    pid_ns: bool = False  # each execution pid 1 of its own PID namespace (`worker.pidns`)
    seccomp: bool = False
    seccomp_network: bool = False  # AF_UNIX stream sockets only, no connect()
    seccomp_audit: bool = False  # calls off the allow-list allowed and logged (deriving lists)
    landlock_abi: int = 0
    workdir_root: str = ""
    read_only: list[str] = []  # further read-only paths the operator allows


class ZygoteConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Supervisor → zygote, once, on its command line: the skill and the layers to apply."""

    code: SkillCode
    preload: list[str] = []
    settings: ZygoteSettings = ZygoteSettings()
    #: wasm only: the sha256 of the module a compiled artifact handed along with the config
    #: (an fd: the exec'd zygote's third argument, a forked one's SCM_RIGHTS) was made from.
    #: The zygote uses it only if the module it reads now has that digest.
    wasm_artifact_sha256: str = ""


class ExecutionIsolation(msgspec.Struct, frozen=True, kw_only=True):
    """What differs per execution in how it is contained: its uid/gid (-1: the zygote's own),
    its tmpfs workdir size (0: none) and the cgroup.procs files it joins (none: no cgroups)."""

    uid: int = -1
    gid: int = -1
    disk_bytes: int = 0
    cgroups: list[str] = []


class ForkCommand(msgspec.Struct, frozen=True, kw_only=True, tag="fork"):
    """Supervisor → zygote: start one execution.

    It says how to contain the execution and nothing about who asked for it: the zygote (and
    every later child forked from its heap) serves all callers, so the request's identity and
    input travel only to the child that runs it (`ExecutionInput`, on its own pipe). Five file
    descriptors travel beside it with SCM_RIGHTS: the request pipe (read end), the result,
    stdout and stderr pipes (write ends) and the execution's report socket.
    """

    exec_id: str
    limits: Limits
    workdir: str
    env: dict[str, str]
    isolation: ExecutionIsolation = ExecutionIsolation()


class ExecutionInput(msgspec.Struct, frozen=True, kw_only=True):
    """Supervisor → execution child of a Python skill, on the request pipe: who asks, until
    when (a wall-clock `time.time` instant), and the JSON input. A command skill gets only the
    input, on stdin."""

    request_id: str
    skill_id: str
    tenant_id: str = ""
    user_id: str = ""
    deadline: float = 0.0
    input: bytes = b"{}"


class SpareCgroups(msgspec.Struct, frozen=True, kw_only=True, tag="spare"):
    """Supervisor → zygote: a prepared cgroup pair (`cgroup.procs` paths) for its next spare
    child; empty when executions get no cgroups. No fds travel with it.

    Every `ForkCommand` also brings one (its `isolation["cgroups"]`): for its own child when no
    spare is ready, else for the spare that replaces the one it used. This message starts the
    cycle at boot and refills it when the zygote had to give a pair back.
    """

    cgroups: list[str] = []


class ZygoteReady(msgspec.Struct, frozen=True, kw_only=True, tag="ready"):
    pid: int
    rss_kb: int
    python: str
    #: wasm only: "compiled" (its module, now; an artifact of it comes with this message, as
    #: an fd, and `artifact_sha256` names the module) or "cached" (from the artifact given)
    wasm_module: str = ""
    artifact_sha256: str = ""


class ZygoteForked(msgspec.Struct, frozen=True, kw_only=True, tag="hello"):
    """A zygote forked by the shared base, first thing on its control socket, before it reads
    its config: its pid, so the supervisor can reap it even if the base died before it could
    reply (the zygote then exits on EOF, a child of the supervisor that nobody else names)."""

    pid: int


class ZygoteFailed(msgspec.Struct, frozen=True, kw_only=True, tag="failed"):
    error: str
    #: The skill's own code failed (its entrypoint does not compile): the skill's fault, not
    #: the host's.
    skill_code: bool = False


class ChildStarted(msgspec.Struct, frozen=True, kw_only=True, tag="started"):
    """Zygote → supervisor on the execution's report socket; a pidfd travels beside it.

    `cgroups`: the pair the child runs in (a spare's, prepared earlier, or the command's own).
    `spare`: whether a pre-forked spare took the request (else it was forked for it).
    `released`: pairs the zygote gave back unused since its last report.
    """

    pid: int
    zygote_rss_kb: int
    cgroups: list[str] = []
    spare: bool = False
    released: list[list[str]] = []


class ChildExited(msgspec.Struct, frozen=True, kw_only=True, tag="exited"):
    """Zygote → supervisor: the child was reaped; rusage as the kernel counted it (wait4)."""

    pid: int
    wait_status: int
    utime: float
    stime: float
    maxrss_kb: int
    #: A file in the workdir reached max_file_bytes: the sign of RLIMIT_FSIZE where SIGXFSZ
    #: cannot be (a PID namespace's pid 1, a command, ignores it and gets EFBIG instead).
    file_limit_reached: bool = False


class ChildResult(msgspec.Struct, frozen=True, kw_only=True):
    """Child → supervisor on the result pipe: the skill's answer, in the child's own words.

    The supervisor trusts none of it beyond "what the skill returned": status, timing and
    resource usage are decided outside the child.
    """

    ok: bool
    output: bytes = b""
    error: str = ""
    limit: str = ""  # a resource limit the skill ran into ("memory", "file size"), if any
    tokens_used: int = 0


#: Host calls: a WASM skill's `llm_generate` / `http_fetch` (`worker.wasm`) asked of the
#: supervisor, which holds the provider and its key. The child writes a `HostCall` frame on its
#: result pipe and blocks reading a `HostReply` frame on its request pipe (kept open for a
#: skill granted one of these permissions). Every bound is applied on both sides: the child
#: refuses before asking, the supervisor (which trusts no frame) checks again.
HOST_CALL_PERMISSIONS = {"llm_generate": "llm:generate", "http_fetch": "http:fetch"}
#: Host calls one execution may make; past it the call fails in the child, and a child that
#: asks anyway is killed by the supervisor (a resource verdict).
MAX_HOST_CALLS = 32
MAX_PROMPT_BYTES = 256 << 10
MAX_URL_BYTES = 8 << 10
MAX_FETCH_REQUEST_BYTES = 1 << 20
#: Largest LLM text or fetched body handed back (openbotstack truncates http_fetch at 1 MiB).
MAX_HOST_REPLY_BYTES = 1 << 20
#: Largest host-call frame the supervisor accepts, and reply frame the child reads.
MAX_HOST_CALL_FRAME = MAX_FETCH_REQUEST_BYTES + MAX_URL_BYTES + (4 << 10)
MAX_HOST_REPLY_FRAME = MAX_HOST_REPLY_BYTES + (64 << 10)


class HostCall(msgspec.Struct, frozen=True, kw_only=True, tag="host-call"):
    """Child → supervisor on the result pipe, before its final `ChildResult`: one host call.
    `kind` is a key of `HOST_CALL_PERMISSIONS`; `prompt` for llm_generate, `url`, `method`
    and `body` for http_fetch. Tagged, so the supervisor tells it from the (untagged) result."""

    kind: str
    prompt: str = ""
    url: str = ""
    method: str = ""
    body: bytes = b""


class HostReply(msgspec.Struct, frozen=True, kw_only=True):
    """Supervisor → child on the request pipe: the answer to the one pending `HostCall`.
    `data`: the LLM's text (UTF-8) or the fetched body; `status`: the HTTP status; `error`:
    why the call failed (for the execution's stderr; never parsed back)."""

    ok: bool
    data: bytes = b""
    status: int = 0
    error: str = ""


class BaseReady(msgspec.Struct, frozen=True, kw_only=True, tag="base-ready"):
    """Shared base zygote → supervisor, once: it has imported the worker runtime."""

    pid: int


class BaseForked(msgspec.Struct, frozen=True, kw_only=True, tag="forked"):
    """Shared base zygote → supervisor, per fork request: the new zygote's pid (the
    supervisor's own child), or 0 and why not."""

    pid: int
    error: str = ""


BaseMessage = BaseReady | BaseForked
ZygoteMessage = ZygoteReady | ZygoteFailed | ZygoteForked
ControlMessage = ForkCommand | SpareCgroups
ReportMessage = ChildStarted | ChildExited


def encode_frame(message: msgspec.Struct, encoder: msgspec.msgpack.Encoder | None = None) -> bytes:
    """One length-prefixed msgpack frame."""
    buffer = bytearray(FRAME_HEADER.size)
    (encoder or _ENCODER).encode_into(message, buffer, FRAME_HEADER.size)
    FRAME_HEADER.pack_into(buffer, 0, len(buffer) - FRAME_HEADER.size)
    return bytes(buffer)


class FrameError(ValueError):
    """A frame that is short, oversized, trailed by garbage or undecodable."""


def write_all(fd: int, data: bytes | bytearray) -> None:
    """Write all of `data` to `fd` (a pipe or file may take it in several writes)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def decode_frame(data: bytes, decoder: msgspec.msgpack.Decoder[Any]) -> Any:
    """Decode exactly one frame occupying all of `data`; anything else is a `FrameError`."""
    if len(data) < FRAME_HEADER.size:
        raise FrameError(f"short frame: {len(data)} bytes, no complete length prefix")
    (length,) = FRAME_HEADER.unpack_from(data)
    body = len(data) - FRAME_HEADER.size
    if body < length:
        raise FrameError(f"truncated frame: header says {length} bytes, got {body}")
    if body > length:
        raise FrameError(f"{body - length} unexpected bytes after the result frame")
    try:
        return decoder.decode(memoryview(data)[FRAME_HEADER.size :])
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:
        # RecursionError: msgspec skips a field the Struct does not have by recursing into
        # it, so a thousand nested arrays under an unknown key raise it (not DecodeError).
        raise FrameError(f"undecodable frame: {exc}") from None


_ENCODER = msgspec.msgpack.Encoder()


def read_frame(fd: int, limit: int) -> bytes:
    """One whole frame (prefix included) read from blocking `fd`, its body at most `limit`
    bytes: for a pipe that stays open after the frame, where reading to EOF would block."""
    header = _read_exactly(fd, FRAME_HEADER.size)
    (length,) = FRAME_HEADER.unpack(header)
    if length > limit:
        raise FrameError(f"frame of {length} bytes is over the limit of {limit}")
    return header + _read_exactly(fd, length)


def _read_exactly(fd: int, size: int) -> bytes:
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise FrameError(f"the pipe closed {size} bytes short of a frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
