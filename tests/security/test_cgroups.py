"""Per-execution cgroups: reused without carrying one execution's limit hits into the next, and
not left behind by a supervisor that was killed."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from sandbox.cgroups import CgroupRoot, ExecutionCgroup
from tests.conftest import ROOT, slow
from tests.security.hostile import EXHAUSTED, Hostile, requires


@requires("processes")
def test_a_reused_cgroup_starts_clean_after_a_bomb(hostile: Callable[..., Hostile]) -> None:
    attack = hostile("""
        def attack(input):
            if input.get("bomb") == "fork":
                while True:
                    try:
                        os.fork()
                    except OSError:
                        pass
            if input.get("bomb") == "memory":
                for _ in range(6):
                    if os.fork() == 0:
                        block = b"x" * (50 << 20)
                        time.sleep(30)
                        os._exit(len(block) & 1)
                time.sleep(30)
            block = b"y" * (8 << 20)
            time.sleep(0.3)  # long enough for the supervisor to sample the cgroup
            return len(block)
    """, max_concurrency=1)
    for bomb in ("fork", "memory"):
        result = attack.run(bomb=bomb)
        assert result.status is ExecutionStatus.FAILED, result
        assert result.error.startswith(f"{EXHAUSTED}: "), result.error
        calm = attack.run()
        assert calm.status is ExecutionStatus.SUCCESS, calm
        assert 8 <= calm.resource_usage.memory_mb < 40, calm.resource_usage
    attack.assert_still_serving()


_ABANDON = textwrap.dedent("""
    import os, sys
    from sandbox.cgroups import CgroupRoot

    root = CgroupRoot.create()
    root.finish(root.new_execution(8, 64 << 20))  # leaves a pooled child cgroup
    print(" ".join(root.parents.values()), flush=True)
    os.kill(os.getpid(), 9)
""")


@requires("processes")
def test_cgroups_of_a_killed_supervisor_are_swept_by_the_next() -> None:
    done = subprocess.run([sys.executable, "-c", _ABANDON], capture_output=True, text=True,
                          timeout=slow(30), cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    abandoned = done.stdout.split()
    assert done.returncode == -9 and len(abandoned) >= 2  # pids, memory (+ cpuacct)
    assert all(os.path.isdir(path) for path in abandoned)
    root = CgroupRoot.create()
    try:
        assert not any(os.path.exists(path) for path in abandoned)
    finally:
        root.close()
    assert not any(os.path.exists(path) for path in root.parents.values())


@requires("processes")
def test_skills_with_different_limits_share_the_cgroup_pool(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    code = "def run(input):\n    return len(b'z' * (input['mb'] << 20))\n"
    small = Skill.from_dir(skill_dir(code, "[limits]\nmemory_mb = 32\nmax_processes = 4\n"))
    large = Skill.from_dir(skill_dir(code, "[limits]\nmemory_mb = 256\nmax_processes = 64\n"))
    sandbox = make_sandbox(small, large, max_concurrency=1)
    for skill, mb in [(small, 8), (large, 100), (small, 8), (large, 100), (small, 8)]:
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id,
                                                  input=f'{{"mb": {mb}}}'.encode()))
        assert result.status is ExecutionStatus.SUCCESS, result
        assert result.json() == mb << 20
        assert result.resource_usage.memory_mb >= mb


_CHARGE = textwrap.dedent("""
    import os, sys
    with open(sys.argv[1], "w") as procs:  # into the execution's memory cgroup
        procs.write(str(os.getpid()))
    with open(sys.argv[2], "wb") as shm:  # tmpfs pages outlive the process: a leftover charge
        for _ in range(int(sys.argv[3])):
            shm.write(b"c" * (1 << 20))
""")

_ALLOCATE = "import os, sys\nopen(sys.argv[1], 'w').write(str(os.getpid()))\nb'a' * (40 << 20)\n"


def _in_memory_cgroup(script: str, memory_dir: str, *args: str) -> int:
    """Run `script` in a plain subprocess that joins the memory cgroup first; its exit code."""
    done = subprocess.run([sys.executable, "-c", script, os.path.join(memory_dir, "cgroup.procs"),
                           *args], capture_output=True, timeout=slow(30), check=False)
    return done.returncode


@requires("processes")
def test_a_cgroup_left_charged_is_never_handed_to_another_execution(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What an execution could leave behind (SysV shm, a tmpfs file, page cache) is played by a
    # test helper that charges 40 MB of tmpfs to the execution's cgroup as it ends.
    code = "def run(input):\n    return len(b'h' * (40 << 20))\n"
    skill = Skill.from_dir(skill_dir(code, "[limits]\nmemory_mb = 64\n"))
    sandbox = make_sandbox(skill, max_concurrency=1, prefork=False)
    root = sandbox._cgroups
    assert root is not None
    if root.version == 2:
        pytest.skip("cgroup v2 never hands a cgroup to a second execution (ExecutionCgroupV2)")
    leftovers: list[str] = []
    finish = root.finish

    def charge_then_finish(group: ExecutionCgroup, reuse: bool = True) -> None:
        if not leftovers and group.kill_all():
            leftovers.append(f"/dev/shm/skill-sandbox-test-{os.getpid()}-{len(leftovers)}")
            # As much as the limit lets it (it may be OOM-killed on the way: the file stays).
            _in_memory_cgroup(_CHARGE, group.memory, leftovers[-1], "100")
            assert int(Path(group.memory, "memory.usage_in_bytes").read_text()) >= 40 << 20
        finish(group, reuse)

    try:
        # Control: a charged cgroup OOM-kills an honest 40 MB process under a 64 MB limit.
        control = root.new_execution(16, 64 << 20)
        assert isinstance(control, ExecutionCgroup)  # v1 (v2 skipped above)
        leftovers.append(f"/dev/shm/skill-sandbox-test-{os.getpid()}-control")
        assert _in_memory_cgroup(_CHARGE, control.memory, leftovers[-1], "40") == 0
        usage = Path(control.memory, "memory.usage_in_bytes")
        assert int(usage.read_text()) >= 40 << 20
        assert _in_memory_cgroup(_ALLOCATE, control.memory) == -signal.SIGKILL
        root.finish(control)
        assert not os.path.exists(control.memory)  # removed, not pooled
        os.unlink(leftovers.pop())

        monkeypatch.setattr(root, "finish", charge_then_finish)
        request = ExecutionRequest(skill_id=skill.id, input=b"{}")
        for _ in range(4):
            result = sandbox.execute(request)
            assert result.status is ExecutionStatus.SUCCESS, result
            assert result.json() == 40 << 20
        assert leftovers  # the charge was left behind, after the first execution
    finally:
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
