"""Attacks with processes and signals: escapees, ignored signals, killing or tracing the parent,
`kill(-1)`, and one execution against another."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import ExecutionResult, ExecutionStatus
from sandbox.capabilities import IsolationConfig, detect
from tests.conftest import ROOT, execution_children
from tests.security.hostile import (
    Hostile,
    assert_gone,
    host,
    layer_variants,
    reported_pids,
    requires,
)


def test_setsid_double_fork_escapee_dies_with_the_execution(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            read_end, write_end = os.pipe()
            child = os.fork()
            if child == 0:
                os.setsid()
                if os.fork() == 0:  # the grandchild: new session, orphaned, sleeping
                    os.write(write_end, str(host_pid()).encode())
                    signal.signal(signal.SIGTERM, signal.SIG_IGN)
                    for fd in range(3):
                        os.close(fd)
                    time.sleep(3600)
                os._exit(0)
            os.waitpid(child, 0)
            escapee = int(os.read(read_end, 32))
            report_pid(escapee)
            return {"escapee": escapee}
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.SUCCESS, result
    assert reported_pids(result) == {result.json()["escapee"]}
    assert_gone(reported_pids(result))
    attack.assert_still_serving()


def test_ignoring_sigterm_and_sigint_does_not_outlive_the_timeout(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(signum, signal.SIG_IGN)
            report_pid(host_pid())
            while True:
                time.sleep(0.1)
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.TIMEOUT
    assert_gone(reported_pids(result))
    attack.assert_still_serving()


def _skip_unless_signals_can_be_stopped(isolation: IsolationConfig) -> None:
    """Without the uid switch and without a PID namespace a skill runs as the supervisor's own
    uid and can name it, and only Landlock's signal scoping (ABI 6, Linux 6.12) refuses its
    signals; an older Landlock (Debian 12's 6.1: ABI 2) has none, so the variant would only
    kill the test run itself."""
    if {"uid", "pidns"} <= isolation.disabled and detect().landlock_abi < 6:
        pytest.skip(f"Landlock ABI {detect().landlock_abi} cannot scope signals (needs 6): "
                    "without the uid switch nothing refuses them on this kernel")


def _refusal(isolation: IsolationConfig) -> int:
    """How a signal to a process outside the execution fails: in a PID namespace of its own
    the process has no name (ESRCH); outside one the kernel refuses it (EPERM)."""
    return errno.EPERM if "pidns" in isolation.disabled else errno.ESRCH


@requires("supervisor hidden")
@layer_variants("all layers", "landlock alone", "uid alone", "pidns alone")
def test_killing_the_parent_zygote_is_refused(hostile: Callable[..., Hostile],
                                              isolation: IsolationConfig) -> None:
    _skip_unless_signals_can_be_stopped(isolation)
    attack = hostile("""
        def attack(input):
            parent = zygote_pid()
            os.kill(parent, signal.SIGKILL)
            return "killed it"
    """, isolation=isolation)
    result = attack.run()
    assert result.status is ExecutionStatus.FAILED
    refused = {errno.EPERM: "PermissionError", errno.ESRCH: "ProcessLookupError"}
    assert result.error.startswith(refused[_refusal(isolation)]), result.error
    attack.assert_still_serving()


@requires("supervisor hidden")
@layer_variants("all layers", "landlock alone", "uid alone", "pidns alone")
def test_signals_to_the_supervisor_are_refused(hostile: Callable[..., Hostile],
                                               isolation: IsolationConfig) -> None:
    _skip_unless_signals_can_be_stopped(isolation)
    attack = hostile("""
        def attack(input):
            outcome = {}
            for signum in (0, signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP):
                try:
                    os.kill(input["pid"], signum)
                    outcome[signum] = "sent"
                    break  # the probe went through: a real signal would end this test run
                except OSError as exc:
                    outcome[signum] = exc.errno
            return outcome
    """, isolation=isolation)
    result = attack.run(pid=os.getpid())
    assert result.status is ExecutionStatus.SUCCESS, result
    assert set(result.json().values()) == {_refusal(isolation)}
    attack.assert_still_serving()


@requires("supervisor hidden")
@pytest.mark.parametrize("pidns", [True, False], ids=["own pid namespace", "control: none"])
def test_in_its_own_pid_namespace_an_execution_can_name_no_outside_process(
        hostile: Callable[..., Hostile], pidns: bool) -> None:
    # Root executions without their own uid or Landlock: nothing but the PID namespace is left
    # to keep the supervisor and the zygote out of reach (the control shows they are then
    # reachable; it only probes, with signal 0 and a pidfd it closes at once).
    disabled = {"uid", "mountns", "landlock"} | (set() if pidns else {"pidns"})
    attack = hostile("""
        def attack(input):
            outcome = {"pid": os.getpid()}
            for who, pid in (("supervisor", input["supervisor"]), ("zygote", zygote_pid())):
                try:
                    os.kill(pid, 0)
                    outcome[f"kill {who}"] = "sent"
                except OSError as exc:
                    outcome[f"kill {who}"] = exc.errno
                try:
                    os.close(os.pidfd_open(pid))
                    outcome[f"pidfd {who}"] = "opened"
                except OSError as exc:
                    outcome[f"pidfd {who}"] = exc.errno
            return outcome
    """, isolation=IsolationConfig(disabled=frozenset(disabled)))
    result = attack.run(supervisor=os.getpid())
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    reach = {key: value for key, value in outcome.items() if key != "pid"}
    if pidns:
        assert outcome["pid"] == 1
        assert set(reach.values()) == {errno.ESRCH}, outcome
    else:
        assert outcome["pid"] != 1
        assert set(reach.values()) == {"sent", "opened"}, outcome
    attack.assert_still_serving()


@requires("seccomp")
def test_ptrace_and_memory_reads_of_the_parent_are_refused(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        PTRACE_ATTACH, PTRACE_SEIZE = 16, 0x4206

        def attempt(*args):
            ctypes.set_errno(0)
            result = libc.syscall(*(ctypes.c_long(a) for a in args))
            return ctypes.get_errno() if result == -1 else "allowed"

        def attack(input):
            parent = zygote_pid()
            buffer = ctypes.create_string_buffer(64)
            iov = (ctypes.c_void_p * 2)(ctypes.addressof(buffer), 64)
            remote = (ctypes.c_void_p * 2)(0x400000, 64)
            mem = "allowed"
            try:
                open(f"/proc/{parent}/mem", "rb").read(1)
            except OSError as exc:
                mem = exc.errno
            return {
                "ptrace_attach": attempt(101, PTRACE_ATTACH, parent, 0, 0),
                "ptrace_seize": attempt(101, PTRACE_SEIZE, parent, 0, 0),
                "process_vm_readv": attempt(310, parent, ctypes.addressof(iov), 1,
                                            ctypes.addressof(remote), 1, 0),
                "proc_mem": mem,
            }
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    assert "allowed" not in outcome.values(), outcome
    assert outcome["ptrace_attach"] == outcome["ptrace_seize"] == errno.EPERM
    assert outcome["process_vm_readv"] == errno.EPERM
    attack.assert_still_serving()


@requires("identity", "supervisor hidden")
def test_concurrent_executions_cannot_signal_each_other(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            if "victim" not in input:  # the victim: sleeps, then reports it was left alone
                time.sleep(1.0)
                return {"uid": os.getuid()}
            try:
                os.kill(input["victim"], signal.SIGKILL)
                return {"uid": os.getuid(), "kill": "sent"}
            except OSError as exc:
                return {"uid": os.getuid(), "kill": exc.errno}
    """, max_concurrency=2)
    zygote = psutil.Process(attack.zygote_pid)
    outcome: dict[str, ExecutionResult] = {}
    victim = threading.Thread(target=lambda: outcome.setdefault("victim", attack.run()))
    victim.start()
    try:
        deadline_checks = 500
        while not execution_children(zygote) and deadline_checks:
            deadline_checks -= 1
            victim.join(0.01)
        (victim_process,) = execution_children(zygote)
        attacker = attack.run(victim=victim_process.pid)
    finally:
        victim.join(5)
    assert attacker.status is ExecutionStatus.SUCCESS, attacker
    assert attacker.json()["kill"] == errno.ESRCH  # no name for it in the attacker's namespace
    assert outcome["victim"].status is ExecutionStatus.SUCCESS, outcome["victim"]
    assert outcome["victim"].json()["uid"] != attacker.json()["uid"]
    attack.assert_still_serving()


_KILL_ALL = textwrap.dedent("""
    import json, os, signal, sys
    from sandbox import ExecutionRequest, Sandbox, Skill

    skill = Skill.from_dir(sys.argv[1])
    with Sandbox([skill], max_concurrency=1) as sandbox:
        zygote = sandbox.zygote_info(skill.id)["pid"]
        attack = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
        probe = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b'{"probe": true}'))
        after = sandbox.zygote_info(skill.id)
        print(json.dumps({"attack": [attack.status.value, attack.json()],
                          "probe": [probe.status.value, probe.json()],
                          "zygote_same": after["pid"] == zygote and after["starts"] == 1,
                          "pid": os.getpid()}))
""")


@requires("identity", "supervisor hidden")
@pytest.mark.skipif(shutil.which("unshare") is None or not host().host.works("pidns"),
                    reason="needs unshare(1) and PID namespaces to contain the test itself")
def test_kill_minus_one_only_reaches_the_execution(skill_dir: Callable[..., Path],
                                                  tmp_path: Path) -> None:
    # The whole sandbox runs in a PID namespace of its own, so that if the attack worked it
    # would kill that namespace's supervisor, never this test run.
    code = textwrap.dedent("""\
        import os, signal, time
        def run(input):
            if input.get("probe"):
                return "alive"
            child = os.fork()
            if child == 0:
                time.sleep(30)
                os._exit(0)
            os.kill(-1, signal.SIGKILL)  # every process it may signal, but itself
            _, status = os.waitpid(child, 0)
            return {"own_child_killed": os.WTERMSIG(status) == signal.SIGKILL}
    """)
    skill = skill_dir(code, "[limits]\ntimeout = 2\ncpu_time = 1\nmemory_mb = 64\n")
    script = tmp_path / "kill_all.py"
    script.write_text(_KILL_ALL)
    done = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", sys.executable,
         str(script), str(skill)],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["pid"] != os.getpid()  # it really ran in the other namespace
    # It reached its own child and nothing else: this supervisor and zygote lived to report.
    assert outcome["attack"] == ["success", {"own_child_killed": True}]
    assert outcome["probe"] == ["success", "alive"]
    assert outcome["zygote_same"] is True
