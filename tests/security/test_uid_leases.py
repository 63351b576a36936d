"""Two supervisors on one host (a daemon and a `skill-sandbox run` beside it, or two sandboxes
in one process with overlapping ranges) never run two executions under the same uid at once:
a shared uid would let one execution signal, `prlimit` or read the other."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from sandbox import ExecutionRequest, Sandbox, Skill
from sandbox.capabilities import IsolationConfig
from tests.conftest import slow
from tests.security.hostile import requires

BASE = 1_500_000_000  # a range no other test uses
#: Wall limit of the skills: their naps scale with the host's slowness, so must it.
LIMITS = f"[limits]\ntimeout = {slow(30)}\n"
WHOAMI = ("import os, time\n"
          "def run(input):\n"
          "    time.sleep(input.get('sleep', 0))\n"
          "    return os.getuid()\n")


def _running_uids(base: int, count: int) -> set[int]:
    uids = set()
    for process in psutil.process_iter(["uids"]):
        uids_info = process.info["uids"]
        if uids_info is not None and base <= uids_info.real < base + count:
            uids.add(uids_info.real)
    return uids


def _wait_for_uid(base: int, count: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + slow(timeout)
    while time.monotonic() < deadline:
        found = _running_uids(base, count)
        if found:
            return min(found)
        time.sleep(0.02)
    raise AssertionError("the other supervisor's execution never started")


@requires("identity")
def test_another_supervisor_process_never_gets_a_uid_in_use_here(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    directory = skill_dir(WHOAMI, LIMITS)
    other = textwrap.dedent(f"""
        from sandbox import ExecutionRequest, Sandbox, Skill
        from sandbox.capabilities import IsolationConfig
        with Sandbox([Skill.from_dir({str(directory)!r})],
                     isolation=IsolationConfig(uid_base={BASE}, uid_count=2)) as sandbox:
            result = sandbox.execute(ExecutionRequest(skill_id="test/skill0",
                                                      input=b'{{"sleep": {slow(3)}}}'))
            print(result.json())
    """)
    process = subprocess.Popen([sys.executable, "-c", other], stdout=subprocess.PIPE)
    try:
        theirs = _wait_for_uid(BASE, 2)
        assert theirs == BASE  # control: a fresh pool starts at its base, as ours would
        skill = Skill.from_dir(directory)
        ours = make_sandbox(skill, isolation=IsolationConfig(uid_base=BASE, uid_count=2))
        result = ours.execute(ExecutionRequest(skill_id=skill.id))
        assert result.ok, result
        assert result.json() != theirs
        out, _ = process.communicate(timeout=slow(30))
        assert int(out) == theirs
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=slow(10))
        if process.stdout is not None:
            process.stdout.close()


@requires("identity")
def test_sandboxes_with_overlapping_uid_ranges_never_share_a_uid(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = Skill.from_dir(skill_dir(WHOAMI, LIMITS))
    wide = make_sandbox(skill, isolation=IsolationConfig(uid_base=BASE + 10, uid_count=4))
    narrow = make_sandbox(skill, isolation=IsolationConfig(uid_base=BASE + 10, uid_count=1))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        nap = f'{{"sleep": {slow(1.5)}}}'.encode()
        busy = pool.submit(wide.execute, ExecutionRequest(skill_id=skill.id, input=nap))
        assert _wait_for_uid(BASE + 10, 1) == BASE + 10  # the wide pool took the shared uid
        starved = narrow.execute(ExecutionRequest(skill_id=skill.id, timeout=0.5))
        assert busy.result(timeout=slow(20)).json() == BASE + 10
    assert not starved.ok and "execution uids" in starved.error, starved
    after = narrow.execute(ExecutionRequest(skill_id=skill.id))
    assert after.json() == BASE + 10  # freed: leases end with the execution


pytestmark = pytest.mark.timeout(90)
