"""The kernel surface and the execution's identity: denied syscalls through ctypes, and who the
skill runs as (uid, groups, capabilities, no_new_privs, seccomp, environment, umask)."""

from __future__ import annotations

import ast
import errno
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from tests.conftest import slow
from tests.security.hostile import Hostile, requires

#: x86_64 numbers; the skill calls them raw through ctypes, past anything Python checks.
_DENIED = {
    "unshare(CLONE_NEWUSER)": (272, 0x10000000),
    "unshare(CLONE_NEWNS)": (272, 0x20000),
    "setns": (308, 0, 0),
    "mount": (165, 0, 0, 0, 0, 0),
    "umount2": (166, 0, 0),
    "pivot_root": (155, 0, 0),
    "chroot": (161, 0),
    "bpf": (321, 0, 0, 0),
    "perf_event_open": (298, 0, 0, -1, -1, 0),
    "kexec_load": (246, 0, 0, 0, 0),
    "init_module": (175, 0, 0, 0),
    "keyctl": (250, 0, 0, 0, 0, 0),
    "add_key": (248, 0, 0, 0, 0, 0),
    "userfaultfd": (323, 0),
    "io_uring_setup": (425, 1, 0),
    "fsopen": (430, 0, 0),
    "open_by_handle_at": (304, 0, 0, 0),
    "reboot": (169, 0, 0, 0, 0),
    "swapon": (167, 0, 0),
    "acct": (163, 0),
    "pidfd_getfd": (438, 0, 0, 0),
}


@requires("seccomp")
def test_ctypes_calls_to_denied_syscalls_fail_with_eperm(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long

        def attack(input):
            outcome = {}
            for name, call in input["calls"].items():
                ctypes.set_errno(0)
                result = libc.syscall(*(ctypes.c_long(value) for value in call))
                outcome[name] = ctypes.get_errno() if result == -1 else f"returned {result}"
            with open("/proc/self/status") as status:
                outcome["mode"] = [line.split()[1] for line in status
                                   if line.startswith("Seccomp:")][0]
            return outcome
    """)
    result = attack.run(calls=_DENIED)
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    assert outcome.pop("mode") == "2"  # SECCOMP_MODE_FILTER
    assert outcome == dict.fromkeys(_DENIED, errno.EPERM)
    attack.assert_still_serving()


@requires("identity")
def test_the_skill_runs_unprivileged_in_a_scrubbed_process(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            with open("/proc/self/status") as handle:
                status = dict(line.rstrip("\\n").split(":\\t", 1) for line in handle)
            umask = os.umask(0)
            return {
                "ids": [*os.getresuid(), *os.getresgid()],
                "groups": os.getgroups(),
                "caps": [status[key] for key in ("CapInh", "CapPrm", "CapEff", "CapAmb")],
                "no_new_privs": status["NoNewPrivs"],
                "umask": umask,
                "env": sorted(os.environ),
                "core": __import__("resource").getrlimit(__import__("resource").RLIMIT_CORE),
                "workdir_owner": os.stat(".").st_uid,
                "workdir_mode": os.stat(".").st_mode & 0o777,
            }
    """)
    result = attack.run()
    assert result.status is ExecutionStatus.SUCCESS, result
    seen = result.json()
    uid = seen["ids"][0]
    assert uid != 0 and seen["ids"] == [uid] * 6  # real, effective, saved: uid and gid alike
    assert seen["groups"] == []
    assert seen["caps"] == ["0000000000000000"] * 4
    assert seen["no_new_privs"] == "1"
    assert seen["umask"] == 0o077
    assert seen["env"] == ["HOME", "LANG", "LC_ALL", "PATH", "TMPDIR"]
    assert seen["core"] == [0, 0]
    assert seen["workdir_owner"] == uid and seen["workdir_mode"] == 0o700
    attack.assert_still_serving()


_SPAWN_SKILL = """\
import os


def run(input):
    try:
        open("/etc/shadow").read()
        shadow = "read"
    except OSError:
        shadow = "denied"
    with open("/proc/self/status") as status:
        fields = dict(line.rstrip("\\n").split(":\\t", 1) for line in status)
    return {"uid": os.getuid(), "shadow": shadow, "seccomp": fields["Seccomp"],
            "no_new_privs": fields["NoNewPrivs"]}
"""

_COMMAND = r"""
uid=$(id -u)
if cat /etc/shadow >/dev/null 2>&1; then shadow=read; else shadow=denied; fi
if touch /tmp/skill-sandbox-escape-$$ 2>/dev/null; then tmp=written; else tmp=denied; fi
seccomp=none
while read -r key value; do [ "$key" = "Seccomp:" ] && seccomp=$value; done < /proc/self/status
printf '{"uid": %s, "shadow": "%s", "tmp": "%s", "seccomp": "%s"}' \
    "$uid" "$shadow" "$tmp" "$seccomp"
"""


@requires("identity", "filesystem", "seccomp")
def test_layers_hold_across_exec_in_spawn_and_command_skills(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    spawn = tmp_path / "spawn"
    spawn.mkdir()
    (spawn / "main.py").write_text(_SPAWN_SKILL)
    (spawn / "skill.toml").write_text('id = "test/spawn"\nentrypoint = "main:run"\n'
                                      'isolation = "spawn"\n')
    command = tmp_path / "command"
    command.mkdir()
    (command / "skill.toml").write_text(
        f'id = "test/command"\ncommand = ["/bin/sh", "-c", {json.dumps(_COMMAND)}]\n')
    sandbox = make_sandbox(Skill.from_dir(spawn), Skill.from_dir(command))
    spawned = sandbox.execute(ExecutionRequest(skill_id="test/spawn"))
    assert spawned.status is ExecutionStatus.SUCCESS, spawned
    assert spawned.json()["uid"] != 0
    assert spawned.json() | {"uid": 0} == {"uid": 0, "shadow": "denied", "seccomp": "2",
                                           "no_new_privs": "1"}
    commanded = sandbox.execute(ExecutionRequest(skill_id="test/command"))
    assert commanded.status is ExecutionStatus.SUCCESS, commanded
    assert commanded.json()["uid"] != 0
    assert commanded.json() | {"uid": 0} == {"uid": 0, "shadow": "denied", "tmp": "denied",
                                             "seccomp": "2"}


#: Calls no runtime profile needs and the old deny-list did not name; each does something on
#: the host (the control shows it), so a default-deny filter is what refuses them.
_UNLISTED = {
    "sysfs(3)": (139, 3),
    "modify_ldt(0)": (154, 0, 0, 0),
    "personality(query)": (135, 0xFFFFFFFF),
    "syscall 1000": (1000,),
}
_UNLISTED_CODE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def call_each(calls):
    outcome = {}
    for name, call in calls.items():
        ctypes.set_errno(0)
        result = libc.syscall(*(ctypes.c_long(value) for value in call))
        outcome[name] = ctypes.get_errno() if result == -1 else "returned"
    return outcome
"""


@requires("seccomp")
def test_calls_off_the_allow_list_fail_with_enosys(hostile: Callable[..., Hostile]) -> None:
    plain = subprocess.run([sys.executable, "-c", _UNLISTED_CODE
                            + f"\nprint(repr(call_each({_UNLISTED!r})))"],
                           capture_output=True, text=True, timeout=30, check=True)
    control = ast.literal_eval(plain.stdout)
    # The control: on the host the calls do something (only the made-up number is ENOSYS).
    assert {name: value for name, value in control.items() if value == errno.ENOSYS} == \
        {"syscall 1000": errno.ENOSYS}
    attack = hostile(_UNLISTED_CODE + "\n\ndef attack(input):\n"
                                      "    return call_each(input['calls'])\n")
    result = attack.run(calls=_UNLISTED)
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json() == dict.fromkeys(_UNLISTED, errno.ENOSYS)
    attack.assert_still_serving()


_WORKLOAD = r"""
mkdir d && printf 'b\na\n' > d/f && cp -a d e && ln -s f e/l && readlink e/l >/dev/null &&
sort e/f | tr -d '\n' && tar cf - d 2>/dev/null | gzip -c | gzip -dc | tar tf - >/dev/null &&
find . -name f | wc -l | tr -d ' \n' && sleep 0.01 && rm -r d e && date +%Y >/dev/null &&
id -u >/dev/null && awk 'END {printf "%d", NR}' /etc/hosts >/dev/null && printf ok
"""
#: The same as a command skill, whose stdout must be JSON: the output as a JSON string.
_WORKLOAD_JSON = "printf '\"%s\"' \"$(" + _WORKLOAD + ")\""
_RUNTIME_SKILL = """\
import asyncio, concurrent.futures, hashlib, os, shutil, signal, subprocess, time


async def _child():
    proc = await asyncio.create_subprocess_exec("/bin/echo", "hi",
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    await asyncio.sleep(0.01)
    return out.decode().strip()


def run(input):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        digests = set(pool.map(lambda n: hashlib.sha256(b"x" * n).hexdigest(), range(64)))
    fired = []
    signal.signal(signal.SIGALRM, lambda *args: fired.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(0.05)
    os.mkfifo("fifo")
    shell = subprocess.run(["/bin/sh", "-c", input["script"]], capture_output=True, text=True,
                           timeout=input["timeout"])
    return {"threads": len(digests), "timer": len(fired), "asyncio": asyncio.run(_child()),
            "shell": shell.stdout, "stderr": shell.stderr, "random": len(os.urandom(8))}
"""


@requires("seccomp")
def test_threads_asyncio_subprocess_and_coreutils_work_under_the_allow_list(
        make_sandbox: Callable[..., Sandbox], tmp_path: Path) -> None:
    # No false denials: what ordinary skills do, in both runtime profiles.
    python = tmp_path / "python"
    python.mkdir()
    (python / "main.py").write_text(_RUNTIME_SKILL)
    limits = f'[limits]\ntimeout = {slow(20)}\ncpu_time = {slow(5)}\nmax_processes = 32\n'
    (python / "skill.toml").write_text('id = "test/runtime"\nentrypoint = "main:run"\n' + limits)
    command = tmp_path / "command"
    command.mkdir()
    (command / "skill.toml").write_text(
        f'id = "test/coreutils"\ncommand = ["/bin/sh", "-c", {json.dumps(_WORKLOAD_JSON)}]\n'
        + limits)
    sandbox = make_sandbox(Skill.from_dir(python), Skill.from_dir(command))
    result = sandbox.execute(ExecutionRequest(skill_id="test/runtime",
                                              input=json.dumps({"script": _WORKLOAD,
                                                                "timeout": slow(5)}).encode()))
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json() == {"threads": 64, "timer": 1, "asyncio": "hi", "shell": "ab2ok",
                             "stderr": "", "random": 8}
    commanded = sandbox.execute(ExecutionRequest(skill_id="test/coreutils"))
    assert commanded.status is ExecutionStatus.SUCCESS, commanded
    assert commanded.json() == "ab2ok"
