"""Zygotes forked from the shared base zygote (`worker.base`): nothing of one skill reaches
another skill forked from the same base — no fd, no byte of memory, no module, no /proc view —
and the base itself holds none of theirs."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import ExecutionRequest, Sandbox, Skill
from sandbox.capabilities import IsolationConfig
from tests.security.hostile import Hostile

#: A skill that reports what it can find of others: marker-shaped strings anywhere in its
#: readable memory, the modules loaded from outside its own directory tree and the stdlib, its
#: open fds, and whether it can read another process's maps.
_PROBE = '''
import os, re, sys
import {private}

SECRET = {private}.SECRET

def run(input):
    shape = re.compile(rb"skillsecret-[0-9a-f]{{32}}")
    found = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                continue
            try:
                mem.seek(start)
                data = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            found.update(m.decode() for m in shape.findall(data))
    other = input.get("other_pid")
    try:
        with open(f"/proc/{{other}}/maps") as maps:
            maps.read(1)
        other_maps = True
    except OSError:
        other_maps = False
    return {{"found": sorted(found), "modules": sorted(sys.modules),
             "other_maps": other_maps}}
'''


def _secret() -> str:
    return f"skillsecret-{uuid.uuid4().hex}"


def _probe_skill(skill_dir: Callable[..., Path], private: str) -> tuple[Skill, str]:
    secret = _secret()
    directory = skill_dir(_PROBE.format(private=private), "[limits]\nmemory_mb = 256\n")
    (directory / f"{private}.py").write_text(f"SECRET = {secret!r}\n")
    return Skill.from_dir(directory), secret


def _sockets(pid: int) -> set[str]:
    found = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def test_two_skills_forked_from_one_base_share_no_fd_memory_module_or_proc_view(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    alpha, alpha_secret = _probe_skill(skill_dir, "alpha_private")
    beta, beta_secret = _probe_skill(skill_dir, "beta_private")
    sandbox = make_sandbox(alpha, beta)
    request_secret = _secret()  # alpha's caller's data, in alpha's zygote only via its request
    first = sandbox.execute(ExecutionRequest(
        skill_id=alpha.id, input=f'{{"other_pid": 1, "note": "{request_secret}"}}'.encode()))
    assert first.ok, first
    alpha_info = sandbox.zygote_info(alpha.id)
    [base_pid] = sandbox.base_zygote_pids()
    base_sockets_before = _sockets(base_pid)
    # beta boots after alpha's zygote holds alpha's code and served a request: forked from the
    # same base all the same
    second = sandbox.execute(ExecutionRequest(
        skill_id=beta.id, input=f'{{"other_pid": {alpha_info["pid"]}}}'.encode()))
    assert second.ok, second
    beta_info = sandbox.zygote_info(beta.id)
    assert alpha_info["from_base"] and beta_info["from_base"]
    assert sandbox.base_zygote_pids() == [base_pid]
    seen_by_alpha, seen_by_beta = first.json(), second.json()

    # Memory. Control: each scan finds its own skill's secret, so the scan does look.
    assert alpha_secret in seen_by_alpha["found"] and request_secret in seen_by_alpha["found"]
    assert beta_secret in seen_by_beta["found"]
    assert alpha_secret not in seen_by_beta["found"]
    assert request_secret not in seen_by_beta["found"]
    # Module state. Control: alpha has its own private module loaded.
    assert "alpha_private" in seen_by_alpha["modules"]
    assert "alpha_private" not in seen_by_beta["modules"]
    # /proc: beta's execution cannot read alpha's zygote. Control: this process can.
    with open(f"/proc/{alpha_info['pid']}/maps") as maps:
        assert maps.read(1)
    assert seen_by_beta["other_maps"] is False

    # Fds: no socket of alpha's zygote is open in beta's zygote or in the base, and the base
    # holds no more sockets after forking beta than before. Control: alpha's zygote has some.
    alpha_sockets = _sockets(alpha_info["pid"])
    assert alpha_sockets
    assert not alpha_sockets & _sockets(beta_info["pid"])
    assert not alpha_sockets & _sockets(base_pid)
    assert not _sockets(beta_info["pid"]) & _sockets(base_pid)
    assert _sockets(base_pid) == base_sockets_before
    # The base runs nothing of a skill: no child (its forks are the supervisor's children).
    assert psutil.Process(base_pid).children() == []
    for info in (alpha_info, beta_info):
        assert psutil.Process(info["pid"]).ppid() == os.getpid()


_REACH_BASE = """
    def attack(input):
        base = input["pid"]
        outcome = {}
        for signum in (0, signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(base, signum)
                outcome[f"signal {signum}"] = "sent"
                break  # the probe went through: a real signal would be the attack
            except OSError as exc:
                outcome[f"signal {signum}"] = errno.errorcode[exc.errno]
        try:
            os.close(os.pidfd_open(base))
            outcome["pidfd"] = "opened"
        except OSError as exc:
            outcome["pidfd"] = errno.errorcode[exc.errno]
        for name in ("environ", "maps"):
            try:
                with open(f"/proc/{base}/{name}", "rb") as leak:
                    leak.read(1)
                outcome[name] = "read"
            except OSError as exc:
                outcome[name] = errno.errorcode[exc.errno]
        return outcome
"""


@pytest.mark.parametrize("disabled", [
    pytest.param(frozenset(), id="all layers"),
    pytest.param(frozenset({"uid", "pidns", "landlock", "mountns"}), id="control: none"),
])
def test_an_execution_cannot_signal_open_or_read_the_base_zygote(
        hostile: Callable[..., Hostile], disabled: frozenset[str]) -> None:
    """A skill that finds the base's pid (handed to it here: /proc is hidden) and tries to
    stop or kill it — every later cold start of every skill forks from it — or read it. With
    every layer off (the control) the first probe reaches it; with them, nothing does, and
    the base serves the next skill's cold start."""
    attack = hostile(_REACH_BASE, isolation=IsolationConfig(disabled=disabled))
    [base] = attack.sandbox.base_zygote_pids()
    result = attack.run(pid=base)
    assert result.ok, result
    outcome = result.json()
    if not disabled:
        assert "sent" not in outcome.values() and "opened" not in outcome.values(), outcome
        assert "read" not in outcome.values(), outcome
    else:  # signal 0 only: the probe shows the base could have been stopped or killed
        assert outcome["signal 0"] == "sent" and outcome["pidfd"] == "opened", outcome
    assert psutil.Process(base).status() != psutil.STATUS_STOPPED
    attack.assert_still_serving()
    assert attack.sandbox.base_zygote_pids() == [base]
