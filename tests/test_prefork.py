"""The zygote's pre-forked spare child: it serves exactly one execution, it is in that
execution's own cgroups before the request comes, it holds nothing of the zygote's, and it
never outlives its zygote or its sandbox. Without a usable spare, executions are forked on
request as before."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import psutil
import pytest

from sandbox import ExecutionRequest, ExecutionResult, ExecutionStatus, Sandbox, Skill
from sandbox.cgroups import CgroupTickets, ExecutionCgroup
from sandbox.errors import SkillLoadError
from sandbox.zygote import ZygoteProcess
from tests.conftest import spare_pids, wait_until_gone
from tests.security.hostile import requires
from worker.protocol import (
    ChildExited,
    ChildResult,
    ChildStarted,
    ExecutionInput,
    ExecutionIsolation,
    ForkCommand,
    Limits,
    ReportMessage,
    SkillCode,
    ZygoteSettings,
    encode_frame,
)

#: Returns its own pid, a module-level counter (1 in a fresh process) and its cgroups.
WHOAMI = """
import os, time
calls = []

def run(input):
    calls.append(1)
    time.sleep(input.get("sleep", 0))
    with open("/proc/self/cgroup") as cgroup:
        groups = dict(line.split(":", 2)[1:] for line in cgroup.read().splitlines())
    # The host's pid: in its own PID namespace os.getpid() is 1.
    return {"pid": int(os.readlink("/proc/self")), "calls": len(calls),
            "pids": groups.get("pids", ""), "memory": groups.get("memory", "")}
"""
LIMITS = "[limits]\nmax_processes = 9\nmemory_mb = 96\ntimeout = 5\n"


#: recvmsg(2), where a ready spare waits for its request (it said ready just before).
_RECVMSG = {"x86_64": "47", "aarch64": "212"}.get(os.uname().machine)


def _waiting_for_request(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/syscall") as syscall:
            number = syscall.read().split()[0]
        with open(f"/proc/{pid}/wchan") as wchan:
            waiting = wchan.read()
    except (OSError, IndexError):
        return False
    if _RECVMSG is not None:
        return number == _RECVMSG
    return "wait_for_more_packets" in waiting  # pragma: no cover - other architectures


def wait_for_spare(zygote: psutil.Process, other_than: int = 0, timeout: float = 5.0) -> int:
    """The pid of the zygote's spare (not `other_than`) once it is set up, in its cgroups and
    waiting for a request (a request that comes earlier is forked for, not made to wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [pid for pid in spare_pids(zygote) if pid != other_than]
        if pids and _waiting_for_request(pids[0]):
            return pids[0]
        time.sleep(0.01)
    raise AssertionError("the zygote kept no spare child ready")


@pytest.fixture
def whoami(make_sandbox: Callable[..., Sandbox],
           skill_dir: Callable[..., Path]) -> tuple[Sandbox, Skill, psutil.Process]:
    skill = Skill.from_dir(skill_dir(WHOAMI, LIMITS))
    sandbox = make_sandbox(skill)
    return sandbox, skill, psutil.Process(sandbox.zygote_info(skill.id)["pid"])


def run(sandbox: Sandbox, skill: Skill, **input: float) -> ExecutionResult:
    import json

    result = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                              input=json.dumps(input).encode()))
    assert result.status is ExecutionStatus.SUCCESS, result
    return result


def test_each_execution_is_served_by_the_waiting_spare_and_never_twice(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    seen: list[int] = []
    for _ in range(5):
        spare = wait_for_spare(zygote, other_than=seen[-1] if seen else 0)
        answer = run(sandbox, skill).json()
        assert answer["pid"] == spare  # the spare took the request...
        assert answer["calls"] == 1  # ...and nothing of an earlier execution was in it
        seen.append(answer["pid"])
    assert len(set(seen)) == len(seen)
    assert wait_until_gone(set(seen)) == set()  # each served once, then reaped


def test_the_spare_holds_none_of_the_zygotes_descriptors(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    wait_for_spare(zygote)
    # While an execution runs, the zygote holds its report socket and pidfd: the spare forked
    # after it started must not have them (nor the control socket or the selector).
    outcome: list[ExecutionResult] = []
    worker = threading.Thread(target=lambda: outcome.append(run(sandbox, skill, sleep=1.0)))
    worker.start()
    try:
        deadline = time.monotonic() + 5
        spare = 0
        while not spare and time.monotonic() < deadline:
            busy = {child.pid for child in zygote.children()} - set(spare_pids(zygote))
            spare = next(iter(set(spare_pids(zygote)) - busy), 0) if busy else 0
            time.sleep(0.01)
        assert spare, "no spare next to the running execution"
        # Right after the fork it still has the zygote's fds; it closes them before it joins
        # its cgroups: wait until it holds one socket (its own), then look at the rest.
        while True:
            targets = {os.readlink(f"/proc/{spare}/fd/{fd}")
                       for fd in os.listdir(f"/proc/{spare}/fd")}
            sockets = [target for target in targets if target.startswith("socket:")]
            if len(sockets) == 1 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert len(sockets) == 1, targets  # its own hand-off socket only
        assert not [target for target in targets if "pidfd" in target or "eventpoll" in target]
    finally:
        worker.join(10)
    assert outcome and outcome[0].json()["calls"] == 1


def test_an_idle_spare_is_reaped_when_the_sandbox_closes(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(WHOAMI, LIMITS))
    sandbox = make_sandbox(skill)
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])
    run(sandbox, skill)
    spare = wait_for_spare(zygote)
    sandbox.close()
    assert wait_until_gone({spare, zygote.pid}) == set()
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(spare).status()  # reaped, not a zombie


def test_a_spare_dies_with_its_zygote_and_a_new_zygote_serves(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    spare = wait_for_spare(zygote)
    zygote.kill()
    assert wait_until_gone({zygote.pid, spare}) == set()
    assert run(sandbox, skill).json()["calls"] == 1  # the zygote is restarted


def test_a_spare_killed_from_outside_is_replaced_and_executions_still_succeed(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    spare = wait_for_spare(zygote)
    os.kill(spare, signal.SIGKILL)
    assert wait_until_gone({spare}) == set()  # dead (its socket closed), maybe not reaped yet
    # Whether or not the zygote has noticed yet: a replacement or a fork on request serves it.
    assert run(sandbox, skill).json()["pid"] != spare
    with pytest.raises(psutil.NoSuchProcess):
        psutil.Process(spare).status()  # reaped by now
    following = wait_for_spare(zygote, other_than=spare)
    assert run(sandbox, skill).json()["pid"] == following


def test_a_spare_killed_while_idle_is_replaced_before_the_next_request(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    spare = wait_for_spare(zygote)
    os.kill(spare, signal.SIGKILL)
    replacement = wait_for_spare(zygote, other_than=spare)  # forked without any request
    assert run(sandbox, skill).json()["pid"] == replacement


@requires("processes")
def test_each_execution_runs_in_its_own_cgroup_with_the_skills_limits(
        whoami: tuple[Sandbox, Skill, psutil.Process]) -> None:
    sandbox, skill, zygote = whoami
    outcome: list[ExecutionResult] = []
    threads = [threading.Thread(target=lambda: outcome.append(run(sandbox, skill, sleep=0.3)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    spare = wait_for_spare(zygote)  # once the burst is over there is a spare again
    answers = [result.json() for result in outcome] + [run(sandbox, skill).json()]
    assert len(answers) == 3 and answers[2]["pid"] == spare
    # Concurrent executions never share a cgroup; each is a child of this sandbox's own.
    assert answers[0]["pids"] != answers[1]["pids"]
    for answer in answers:
        assert "/skill-sandbox-" in answer["pids"], answer
        with open(os.path.join(_cgroup_dir("pids", answer["pids"]), "pids.max")) as pids_max:
            assert pids_max.read().strip() == "9"
        memory_dir = _cgroup_dir("memory", answer["memory"])
        with open(os.path.join(memory_dir, "memory.limit_in_bytes")) as limit:
            assert int(limit.read()) == 96 << 20  # memory_mb: tmpfs files included


def _cgroup_dir(controller: str, relative: str) -> str:
    """The directory of cgroup `relative` (as /proc/<pid>/cgroup names it) of a v1 controller."""
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if (fields[separator + 1] == "cgroup"
                    and controller in fields[separator + 3].split(",")):
                root, mount_point = fields[3], fields[4]
                return os.path.join(mount_point, os.path.relpath(relative, root))
    raise AssertionError(f"no {controller} cgroup hierarchy")


@requires("processes")
def test_a_fork_bomb_in_a_spare_is_held_at_the_skills_process_limit(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    bomb = """
import os, time
def run(input):
    started = 0
    for _ in range(200):
        try:
            if os.fork() == 0:
                time.sleep(30)
                os._exit(0)
            started += 1
        except OSError:
            break
    return {"pid": int(os.readlink("/proc/self")), "started": started}
"""
    skill = Skill.from_dir(skill_dir(bomb, "[limits]\nmax_processes = 6\ntimeout = 5\n"))
    sandbox = make_sandbox(skill)
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])
    for _ in range(2):  # the second bomb runs where the first one's leftovers were killed
        spare = wait_for_spare(zygote)
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id))
        if result.status is ExecutionStatus.SUCCESS:  # the fork failed at the cap: it said so
            assert result.json()["pid"] == spare
            assert result.json()["started"] <= 5
        else:
            assert result.error.startswith("runtime: resource exhausted: processes"), result
    assert wait_until_gone({child.pid for child in zygote.children(recursive=True)}
                           - set(spare_pids(zygote))) == set()


def test_without_prefork_no_spare_waits_and_executions_are_forked_on_request(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(WHOAMI, LIMITS))
    sandbox = make_sandbox(skill, prefork=False)
    zygote = psutil.Process(sandbox.zygote_info(skill.id)["pid"])
    pids = {run(sandbox, skill, sleep=0.3).json()["pid"] for _ in range(3)}
    assert len(pids) == 3
    assert spare_pids(zygote) == []
    # Control: with prefork, the next spare is forked right after the hand-off, so it is there
    # by the time an execution of the same length has answered (the window above is enough).
    preforking = make_sandbox(skill)
    other = psutil.Process(preforking.zygote_info(skill.id)["pid"])
    first = wait_for_spare(other)
    run(preforking, skill, sleep=0.3)
    assert [pid for pid in spare_pids(other) if pid != first]


class _UnjoinableCgroups(CgroupTickets):
    """Hands the zygote a cgroup pair that does not exist, so its spare cannot join it."""

    def __init__(self) -> None:
        self.given: list[list[str]] = []
        self.returned: list[list[str]] = []

    def issue(self) -> ExecutionCgroup:
        group = ExecutionCgroup("/nonexistent/pids/x", "/nonexistent/memory/x")
        self.given.append(group.procs_files)
        return group

    def release(self, *pairs: list[str]) -> None:
        self.returned.extend(pairs)

    def release_all(self) -> None:
        pass


def _execute_directly(zygote: ZygoteProcess, skill_id: str, workdir: Path, timeout: float,
                      isolation: ExecutionIsolation | None = None
                      ) -> tuple[ChildStarted, ChildExited, ChildResult]:
    """One execution driven by hand, as the supervisor drives it: the fork command with its
    pipes, the request, then the zygote's start and exit reports and the result frame."""
    request_r, request_w = os.pipe()
    result_r, result_w = os.pipe()
    out_r, out_w = os.pipe()
    report, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    command = ForkCommand(exec_id="e1", limits=Limits(timeout=5), workdir=str(workdir), env={},
                          isolation=isolation or ExecutionIsolation())
    try:
        zygote.fork(command, [request_r, result_w, out_w, out_w, theirs.fileno()])
        for fd in (request_r, result_w, out_w):
            os.close(fd)
        theirs.close()
        os.write(request_w, encode_frame(ExecutionInput(request_id="r1", skill_id=skill_id)))
        os.close(request_w)
        report.settimeout(timeout)
        message, fds, _, _ = socket.recv_fds(report, 4096, 1)
        for fd in fds:
            os.close(fd)
        started = msgspec.msgpack.decode(message, type=ReportMessage)
        assert isinstance(started, ChildStarted)
        exited = msgspec.msgpack.decode(report.recv(4096), type=ReportMessage)
        assert isinstance(exited, ChildExited)
        with os.fdopen(result_r, "rb") as result:
            frame = msgspec.msgpack.decode(result.read()[4:], type=ChildResult)
        return started, exited, frame
    finally:
        report.close()
        os.close(out_r)


def test_a_spare_that_cannot_join_its_cgroups_gives_them_back_and_the_request_is_forked(
        skill_dir: Callable[..., Path], tmp_path: Path) -> None:
    directory = skill_dir(WHOAMI)
    code = SkillCode(skill_dir=str(directory), kind="python", entrypoint="main:run")
    tickets = _UnjoinableCgroups()
    zygote = ZygoteProcess("test/unjoinable", code, [], ZygoteSettings(), cgroups=tickets)
    zygote.start()
    try:
        assert tickets.given  # the pair for its first spare, offered at boot
        workdir = tmp_path / "work"
        workdir.mkdir()
        started, exited, frame = _execute_directly(zygote, "test/unjoinable", workdir, 5)
        assert started.released == tickets.given  # the spare failed: its pair came back
        assert started.cgroups == []  # and the request got a child forked for it
        assert exited.wait_status == 0
        assert frame.ok and msgspec.json.decode(frame.output)["pid"] == started.pid
    finally:
        zygote.stop()


class _StuckCgroups(_UnjoinableCgroups):
    """Hands the zygote a "cgroup" whose cgroup.procs is a FIFO nobody reads: its spare blocks
    in the join, forever still setting up."""

    def __init__(self, directory: Path) -> None:
        super().__init__()
        directory.mkdir()
        os.mkfifo(directory / "cgroup.procs")
        self.directory = str(directory)

    def issue(self) -> ExecutionCgroup:
        group = ExecutionCgroup(self.directory, self.directory)
        self.given.append(group.procs_files)
        return group


def test_a_request_waits_for_a_spare_still_setting_up_only_so_long_then_is_forked(
        skill_dir: Callable[..., Path], tmp_path: Path) -> None:
    """A request that comes while the spare is still joining its cgroups waits for it (it is
    further along than a child forked now), but not for one that never gets there."""
    directory = skill_dir(WHOAMI)
    code = SkillCode(skill_dir=str(directory), kind="python", entrypoint="main:run")
    tickets = _StuckCgroups(tmp_path / "stuck")
    zygote = ZygoteProcess("test/stuck", code, [], ZygoteSettings(), cgroups=tickets)
    zygote.start()
    try:
        assert tickets.given  # the stuck pair, for its first spare
        workdir = tmp_path / "work"
        workdir.mkdir()
        plain = tmp_path / "plain.procs"  # a pair the child forked on request can join
        plain.write_text("")
        started, exited, frame = _execute_directly(
            zygote, "test/stuck", workdir, 10, ExecutionIsolation(cgroups=[str(plain)]))
        assert not started.spare and started.cgroups == [str(plain)]  # forked, in its pair
        assert plain.read_text() == str(started.pid)  # (joined by the zygote, at its gate)
        assert exited.wait_status == 0
        assert frame.ok and msgspec.json.decode(frame.output)["pid"] == started.pid
    finally:
        zygote.stop()


def test_a_zygote_slower_to_start_than_its_start_timeout_fails_the_load(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    # No interpreter starts within a microsecond: the same as a host far slower than this one.
    # (A warm load starts the zygote at once; a lazy one would fail its first execution.)
    skill = Skill.from_dir(skill_dir("def run(input):\n    return 1\n"))
    with pytest.raises(SkillLoadError, match="did not become ready within 1e-06s"):
        make_sandbox(skill, zygote_start_timeout=1e-6, warm=True)
    # Control: with the default the same skill loads and runs.
    sandbox = make_sandbox(skill)
    assert sandbox.execute(ExecutionRequest(skill_id=skill.id)).json() == 1


_STALE_READY_EVENT = """
import os, selectors, socket, subprocess, sys
from worker import spare, zygote
from worker.protocol import SkillCode, ZygoteConfig

sleeper = subprocess.Popen(["sleep", "30"])  # stands in for the spare's process
ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
control, _supervisor = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
loop = zygote.Zygote(ZygoteConfig(code=SkillCode(skill_dir=sys.argv[1], kind="python",
                                                 entrypoint="main:run")), control)
current = spare.Spare(sleeper.pid, os.pidfd_open(sleeper.pid), ours, [], 0)
loop.spare = current
loop.selector.register(ours, selectors.EVENT_READ, zygote._SPARE)
theirs.send(spare.READY)
assert [key.data for key, _ in loop.selector.select(1)] == [zygote._SPARE]
assert current.poll_ready() is True  # a request earlier in the same pass read the byte
loop.handle_spare()  # then the pass reaches the spare's now-stale event
print("kept" if loop.spare is current and current.ready else "retired")
sleeper.kill()
sleeper.wait()
"""


def test_a_stale_ready_event_from_the_spare_never_stalls_the_zygote(tmp_path: Path) -> None:
    """The spare's ready byte and a request can wake the zygote in one pass; the request reads
    the byte first. The spare's event that follows must not block on a byte that is gone (the
    zygote stopped serving every execution until the next spare spoke, or for ever)."""
    import subprocess
    import sys

    try:
        done = subprocess.run([sys.executable, "-c", _STALE_READY_EVENT, str(tmp_path)],
                              capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail("the zygote blocked on the spare's socket after its ready byte was read")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "kept"  # still the spare, still ready: not taken for dead
