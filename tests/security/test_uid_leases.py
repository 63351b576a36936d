"""Two supervisors on one host (a daemon and a `skill-sandbox run` beside it, or two sandboxes
in one process with overlapping ranges) never run two executions under the same uid at once:
a shared uid would let one execution signal, `prlimit` or read the other."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from sandbox import ExecutionRequest, Sandbox, Skill
from sandbox.capabilities import IsolationConfig
from sandbox.uidpool import UidPool, UidPoolExhausted
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


def _two_sandboxes(make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
                   *ranges: tuple[int, int]) -> tuple[Skill, Sandbox, Sandbox]:
    """The WHOAMI skill loaded in two sandboxes, with the uid ranges (base, count) given; its
    zygotes started at load, so the requests take their uids in the order they are sent (a
    lazy zygote's boot would let the other sandbox's requests take theirs first)."""
    skill = Skill.from_dir(skill_dir(WHOAMI))
    first, second = (make_sandbox(skill, isolation=IsolationConfig(uid_base=base, uid_count=count),
                                  warm=True)
                     for base, count in ranges)
    return skill, first, second


@requires("identity")
def test_sandboxes_with_overlapping_uid_ranges_never_share_a_uid(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill, wide, narrow = _two_sandboxes(make_sandbox, skill_dir, (BASE + 10, 4), (BASE + 10, 1))
    with ThreadPoolExecutor(1) as pool:
        nap = f'{{"sleep": {slow(1.5)}}}'.encode()
        busy = pool.submit(wide.execute, ExecutionRequest(skill_id=skill.id, input=nap))
        assert _wait_for_uid(BASE + 10, 1) == BASE + 10  # the wide pool took the shared uid
        starved = narrow.execute(ExecutionRequest(skill_id=skill.id, timeout=0.5))
        assert busy.result(timeout=slow(20)).json() == BASE + 10
    assert not starved.ok and "execution uids" in starved.error, starved
    after = narrow.execute(ExecutionRequest(skill_id=skill.id))
    assert after.json() == BASE + 10  # freed: leases end with the execution


def test_pools_with_shifted_overlapping_ranges_never_hand_out_one_uid_twice(
        tmp_path: Path) -> None:
    """[base, base+3) and [base+1, base+4) share two uids: held together, they hand out each
    of the four uids of their union once, and no more."""
    leases = str(tmp_path / "leases")
    low, high = UidPool(BASE + 30, 3, leases), UidPool(BASE + 31, 3, leases)
    held = [low.acquire(1), low.acquire(1), high.acquire(1), high.acquire(1)]
    assert sorted(held) == [BASE + 30, BASE + 31, BASE + 32, BASE + 33]
    with pytest.raises(UidPoolExhausted):
        high.acquire(0.1)  # its third uid, BASE + 31, is the low pool's
    low.release(BASE + 31)
    assert high.acquire(1) == BASE + 31  # free again: leases end on release
    # Control: pools that do not share their leases hand the same uid to both.
    apart = UidPool(BASE + 31, 3, str(tmp_path / "other"))
    assert apart.acquire(1) in held


def _sessions_by_uid(base: int, count: int) -> dict[int, set[int]]:
    """The sessions (one per execution: the child calls setsid) running under each uid."""
    found: dict[int, set[int]] = {}
    for process in psutil.process_iter(["uids"]):
        uids_info = process.info["uids"]
        if uids_info is None or not base <= uids_info.real < base + count:
            continue
        try:
            found.setdefault(uids_info.real, set()).add(os.getsid(process.pid))
        except OSError:  # gone meanwhile
            continue
    return found


@requires("identity")
def test_sandboxes_with_shifted_overlapping_ranges_never_run_two_executions_under_one_uid(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill, low, high = _two_sandboxes(make_sandbox, skill_dir, (BASE + 20, 3), (BASE + 21, 3))
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(sandbox.execute,
                               ExecutionRequest(skill_id=skill.id, input=b'{"sleep": 6}'))
                   for sandbox in (low, low, high, high)]
        most = 0
        deadline = time.monotonic() + 30
        while most < 4 and time.monotonic() < deadline:
            sessions = _sessions_by_uid(BASE + 20, 4)
            shared = {uid: sids for uid, sids in sessions.items() if len(sids) > 1}
            assert not shared, f"two executions under one uid at once: {shared}"
            most = max(most, sum(len(sids) for sids in sessions.values()))
            time.sleep(0.02)
        results = [future.result(timeout=30) for future in futures]
    assert most == 4  # control: all four ran at once, so a shared uid would have shown
    assert all(result.ok for result in results), results
    assert sorted(result.json() for result in results) == [BASE + 20 + i for i in range(4)]


pytestmark = pytest.mark.timeout(90)
