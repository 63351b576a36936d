"""Per-execution cgroups: reused without carrying one execution's limit hits into the next, and
not left behind by a supervisor that was killed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from sandbox.cgroups import CgroupRoot
from tests.conftest import ROOT
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
                          timeout=30, cwd=ROOT, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    abandoned = done.stdout.split()
    assert done.returncode == -9 and len(abandoned) == 2
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
