"""The execution child: the first code that runs after the zygote forks.

It turns the fork into a contained execution — own process group, death with the zygote,
its pipes on fixed fds and every other fd closed, a fresh workdir as cwd, a scrubbed
environment, per-execution rlimits, the isolation layers — and then runs the skill: in this
process (fork mode), or by exec'ing a fresh interpreter (spawn mode) or the skill's command.
It never returns: it ends in `os._exit` or `execve`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
from types import CodeType
from typing import NoReturn

import msgspec

from worker import isolation, runtime
from worker.protocol import (
    EXIT_SETUP_FAILED,
    REQUEST_FD,
    RESULT_FD,
    SETUP_FAILED,
    ForkCommand,
    SkillCode,
)

#: Largest entrypoint source the zygote compiles ahead of its executions (as root, before its
#: layers and without a memory limit: compiling costs several times the source's size). A
#: larger one is compiled by each execution itself, under its own limits.
MAX_PRECOMPILED_SOURCE = 4 << 20


def compile_entrypoint(code: SkillCode) -> CodeType | None:
    """Compile the entrypoint module's source without running it, so no fork repeats the work.

    Only a plain top-level module file is precompiled; packages and dotted modules are left to
    the normal import system in the child.
    """
    module = code.entrypoint.partition(":")[0]
    if "." in module:
        return None
    path = os.path.join(code.skill_dir, module + ".py")
    try:
        # Read as root before the layers: anything but a regular file in the skill's directory
        # of a sane size is left to each execution's own import, under its uid, Landlock and
        # memory limit.
        source = isolation.read_confined(path, code.skill_dir, MAX_PRECOMPILED_SOURCE)
    except (OSError, isolation.ConfinedFileError):
        return None
    return compile(source, path, "exec", dont_inherit=True)


def _place_fds(fds: list[int], kind: str) -> None:
    """Move the execution's pipes onto fixed numbers and close every other descriptor."""
    # Park everything above the range we are about to fill, so no dup2 clobbers a source.
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, REQUEST_FD + 1) for fd in fds]
    for fd in fds:
        os.close(fd)
    request_r, result_w, stdout_w, stderr_w = parked
    devnull = os.open(os.devnull, os.O_RDONLY)
    if kind == "command":
        os.dup2(request_r, 0)  # a command reads its JSON input on stdin
        os.dup2(devnull, RESULT_FD)  # and answers on stdout: it gets no result pipe
        os.dup2(devnull, REQUEST_FD)
    else:
        os.dup2(devnull, 0)
        os.dup2(result_w, RESULT_FD)
        os.dup2(request_r, REQUEST_FD)
    os.dup2(stdout_w, 1)
    os.dup2(stderr_w, 2)
    os.closerange(REQUEST_FD + 1, isolation.max_fd())
    if kind == "command":
        os.close(RESULT_FD)
        os.close(REQUEST_FD)


def become_execution_process(zygote_pid: int) -> None:
    """What every child of the zygote does first, request or not: its own session and process
    group (the unit the zygote and the supervisor kill), death with the zygote, default
    signal dispositions."""
    os.setsid()
    isolation.die_with_parent(zygote_pid)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(signum, signal.SIG_DFL)


def run_execution(code: SkillCode, preload: list[str], command: ForkCommand, fds: list[int],
                  precompiled: CodeType | None, zygote_pid: int,
                  gate: isolation.CgroupGate | None) -> None:
    """Entry point of a child forked for a request. `fds` are the execution's four pipe ends
    and its report socket (the zygote's business: closed at once). Never returns."""
    try:
        os.close(fds[4])
        become_execution_process(zygote_pid)
    except BaseException as exc:  # noqa: BLE001 - nothing may escape into the zygote's loop
        setup_failed(exc)
    run_command(code, preload, command, fds[:4], precompiled, gate)


def run_command(code: SkillCode, preload: list[str], command: ForkCommand, fds: list[int],
                precompiled: CodeType | None, gate: isolation.CgroupGate | None = None) -> None:
    """The per-request part, in a fresh fork or a spare handed `command`: cgroup gate and
    Landlock, pipes on fixed fds, workdir, environment, rlimits and uid, then the skill.
    `fds`: request (read), result, stdout, stderr (write). Never returns."""
    stderr_fd = fds[3]  # until the pipes are placed: then fd 2
    try:
        kind = "command" if code.kind == "command" else "python"
        isolation.enter_execution(command, gate)  # in its cgroups, then Landlock: still root
        _place_fds(fds, kind)
        stderr_fd = 2
        os.chdir(command.workdir)
        _replace_environment(command.env)
        isolation.apply_child_layers(command, code)
        if code.kind == "command":
            _stdin_from_memory()
            _exec_command(code, command)
        elif code.spawn:
            _exec_fresh_interpreter(code, preload, command)
    except BaseException as exc:  # noqa: BLE001 - nothing may escape into the zygote's loop
        setup_failed(exc, stderr_fd)
    runtime.run_and_exit(code, command, precompiled, RESULT_FD, REQUEST_FD)


def _stdin_from_memory() -> None:
    """Read the request pipe to its end and give the command the input from memory instead:
    a request left unread then proves that no skill code ran (the supervisor's test for a
    set-up failure), for commands as for Python skills, whose runtime reads it first."""
    chunks = []
    while chunk := os.read(0, 1 << 16):
        chunks.append(chunk)
    memory = os.memfd_create("input", os.MFD_CLOEXEC)
    data = memoryview(b"".join(chunks))
    while data:
        data = data[os.write(memory, data):]
    os.lseek(memory, 0, os.SEEK_SET)
    os.dup2(memory, 0)
    os.close(memory)


def setup_failed(exc: BaseException, stderr_fd: int = 2) -> NoReturn:
    try:
        os.write(stderr_fd, f"\n{SETUP_FAILED}{exc!r}\n".encode())
    finally:
        os._exit(EXIT_SETUP_FAILED)


def _replace_environment(env: dict[str, str]) -> None:
    """Make the environment exactly `env`, touching only what differs (each putenv/unsetenv
    costs copy-on-write faults in a fresh fork)."""
    for name in [name for name in os.environ if name not in env]:
        del os.environ[name]
    for name, value in env.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _exec_command(code: SkillCode, command: ForkCommand) -> None:
    argv = list(code.command)
    program = argv[0]
    if "/" in program:  # relative to the skill directory, like the manifest's other paths
        program = os.path.join(code.skill_dir, program)
    for fd in (0, 1, 2):
        os.set_inheritable(fd, True)
    # Python ignores these at start-up and an ignored signal stays ignored across exec: give
    # the program the defaults, so a file past RLIMIT_FSIZE ends it with SIGXFSZ (judged as
    # the file-size limit) and a closed pipe with SIGPIPE, as in any shell.
    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    if "/" in program:
        os.execve(program, argv, dict(os.environ))
    os.execvpe(program, argv, dict(os.environ))


def _exec_fresh_interpreter(code: SkillCode, preload: list[str], command: ForkCommand) -> None:
    from worker import spawn

    for fd in (0, 1, 2, RESULT_FD, REQUEST_FD):
        os.set_inheritable(fd, True)
    # The environment (the manifest's env may hold the skill's credentials) reaches the new
    # interpreter through execve, not through its argv, which /proc shows to every uid.
    args = spawn.encode_args(code, preload, msgspec.structs.replace(command, env={}))
    argv = [sys.executable, "-I", "-B", "-m", "worker.spawn", args]
    os.execve(sys.executable, argv, dict(os.environ))
