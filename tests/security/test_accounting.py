"""CPU and memory an execution can hide from its accounting: CPU burnt in processes nobody
reaps (orphans, zombies, processes killed by the skill itself), and memory that is not in any
process's RSS (shared anonymous mappings, memfd files, files in the tmpfs workdir).

Each attack also runs in a plain subprocess of the test, where it does what it claims (burns
more CPU than the limit, holds more memory than the limit): the sandbox must be what stops it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable

import pytest

from sandbox import ExecutionStatus, cgroups
from sandbox.capabilities import IsolationConfig
from tests.conftest import slow
from tests.security.hostile import EXHAUSTED, LIMITS, Hostile, requires

_BURNERS = """
    def burn(seconds):
        end = time.process_time() + seconds
        while time.process_time() < end:
            pass


    def attack(input):
        # Middle processes that nobody waits for; the CPU is burnt below them, by orphans
        # (reparented away from the execution), by children the middle reaps before it dies
        # unreaped, or by children it kills hot and never reaps.
        how = input["how"]
        for _ in range(input["rounds"]):
            done_r, done_w = os.pipe()
            middle = os.fork()
            if middle == 0:
                for _ in range(input["inner"]):
                    burner = os.fork()
                    if burner == 0:
                        os.close(done_r)
                        burn(input["each"])
                        os._exit(0)
                    if how == "middle reaps":
                        os.waitpid(burner, 0)
                    elif how == "middle kills":
                        time.sleep(input["each"] * 0.8)
                        os.kill(burner, signal.SIGKILL)
                os._exit(0)
            os.close(done_w)
            os.read(done_r, 1)  # EOF once the burners (and the middle) are gone
            os.close(done_r)
        return "done"
"""

#: The burners burn CPU seconds, which a slower host does not stretch: their limit stays 1 s
#: (not the suite's scaled one); only the wall limit scales.
_CPU_LIMIT = 1.0
_BURNER_LIMITS = {"cpu_time": _CPU_LIMIT, "timeout": slow(20)}
#: How each variant spreads its CPU: how, (rounds, burners per middle, CPU seconds each):
#: 2.4 s in all, over the limit of 1 s, never more than 0.3 s in one process.
_VARIANTS = {
    "orphans": ("orphans", 8, 1, 0.3),
    "middle reaps": ("middle reaps", 8, 1, 0.3),
    # each burner lives less than one sampling interval; its middle reaps it, then dies unreaped
    "short-lived, middle reaps": ("middle reaps", 4, 30, 0.02),
    "middle kills": ("middle kills", 8, 1, 0.3),
}


_CONTROL = """
import ctypes, json, os, resource, signal, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: every orphan comes back here
{code}
if os.fork() == 0:
    attack(json.loads(sys.argv[1]))
    os._exit(0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(usage.ru_utime + usage.ru_stime)
"""


def _plain_cpu_seconds(code: str, **input: object) -> float:
    """CPU the attack burns in a plain subprocess, every descendant reaped and counted."""
    script = _CONTROL.format(code=textwrap.dedent(code))
    done = subprocess.run([sys.executable, "-c", script, json.dumps(input)],
                          capture_output=True, text=True, timeout=slow(60), check=True)
    return float(done.stdout)


def _no_cgroups() -> IsolationConfig:
    return IsolationConfig(disabled=frozenset({"cgroups"}))


@requires("processes")
@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_cpu_burnt_by_unreaped_descendants_counts_against_the_cpu_limit(
        hostile: Callable[..., Hostile], variant: str) -> None:
    input = dict(zip(("how", "rounds", "inner", "each"), _VARIANTS[variant], strict=True))
    assert _plain_cpu_seconds(_BURNERS, **input) > _CPU_LIMIT
    attack = hostile(_BURNERS, limits=_BURNER_LIMITS)
    result = attack.run(**input)
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error.startswith(f"{EXHAUSTED}: cpu time"), result.error
    assert result.resource_usage.cpu_time_ms >= _CPU_LIMIT * 1000, result.resource_usage
    attack.assert_still_serving()


@pytest.mark.parametrize("variant", ["middle reaps", "short-lived, middle reaps",
                                     "middle kills"])
@pytest.mark.parametrize("host", [
    "no cgroups", pytest.param("cgroups without cpuacct", marks=requires("processes"))])
def test_cpu_of_dead_descendants_counts_without_cpuacct(
        hostile: Callable[..., Hostile], monkeypatch: pytest.MonkeyPatch, variant: str,
        host: str) -> None:
    """Without cpuacct the tree watch keeps the last sample of every process it saw (orphans
    that die before a sample are the gap: not tested here, see the module docstring)."""
    input = dict(zip(("how", "rounds", "inner", "each"), _VARIANTS[variant], strict=True))
    assert _plain_cpu_seconds(_BURNERS, **input) > _CPU_LIMIT
    options: dict[str, object] = {"isolation": _no_cgroups()}
    if host == "cgroups without cpuacct":
        monkeypatch.setattr(cgroups, "OPTIONAL_CONTROLLERS", ())
        options = {}
    attack = hostile(_BURNERS, limits=_BURNER_LIMITS, **options)
    if host == "cgroups without cpuacct":
        assert attack.sandbox._cgroups is not None
        assert "cpuacct" not in attack.sandbox._cgroups.parents
    result = attack.run(**input)
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error.startswith(f"{EXHAUSTED}: cpu time"), result.error
    assert result.resource_usage.cpu_time_ms >= _CPU_LIMIT * 1000, result.resource_usage
    attack.assert_still_serving()


# -- memory outside RSS ------------------------------------------------------------------

_HOARDERS = """
    import mmap


    def hold(input):
        mb = input["mb"]
        kind = input["kind"]
        kept = []
        if kind == "shared anonymous":
            area = mmap.mmap(-1, mb << 20, flags=mmap.MAP_SHARED)
            for offset in range(0, mb << 20, 4096):
                area[offset] = 1
            kept.append(area)
        elif kind == "shared anonymous, forked":  # mapped by 3 processes: in no one's USS
            area = mmap.mmap(-1, mb << 20, flags=mmap.MAP_SHARED)
            for offset in range(0, mb << 20, 4096):
                area[offset] = 1
            for _ in range(2):
                if os.fork() == 0:
                    for offset in range(0, mb << 20, 4096):  # map every page here too
                        area[offset]
                    time.sleep(30)
                    os._exit(0)
            kept.append(area)
        elif kind == "memfd":  # files in no mapping at all, each under the file-size limit
            for _ in range(mb // 8):
                fd = os.memfd_create("hoard")
                os.write(fd, b"m" * (8 << 20))
                kept.append(fd)
        elif kind == "workdir files":  # tmpfs pages, under the workdir's own size cap
            for index in range(mb // 8):
                with open(f"hoard{index}", "wb") as handle:
                    handle.write(b"f" * (8 << 20))
            kept.append(b"a" * (24 << 20))
        return kept


    def attack(input):
        kept = hold(input)
        time.sleep(0.5)  # long enough for the supervisor to sample it
        return len(kept)
"""

_HOLD_CONTROL = """
import json, os, sys, time
{code}
print(len(hold(json.loads(sys.argv[1]))))
"""


def _holds_in_plain_subprocess(**input: object) -> bool:
    """Whether the hoard is held by a plain subprocess (workdir files in a tmpfs directory)."""
    script = _HOLD_CONTROL.format(code=textwrap.dedent(_HOARDERS))
    with tempfile.TemporaryDirectory(dir="/dev/shm") as workdir:
        done = subprocess.run([sys.executable, "-c", script, json.dumps(input)], cwd=workdir,
                              capture_output=True, text=True, timeout=60, check=False)
    return done.returncode == 0 and int(done.stdout) > 0


_MEMORY = LIMITS["memory_mb"]  # 64 MB; every hoard holds 96 MB (the workdir one 48 + 24)


_KINDS = ["shared anonymous", "shared anonymous, forked", "memfd", "workdir files"]


# Without cgroups, workdir files count against the workdir quota only: that pair is not run.
@pytest.mark.parametrize(("kind", "cgroups"), [
    *(pytest.param(kind, True, id=f"{kind}-cgroups", marks=requires("processes"))
      for kind in _KINDS),
    *(pytest.param(kind, False, id=f"{kind}-no cgroups")
      for kind in _KINDS if kind != "workdir files"),
])
def test_memory_outside_rss_counts_against_the_memory_limit(
        hostile: Callable[..., Hostile], kind: str, cgroups: bool) -> None:
    mb = 48 if kind == "workdir files" else 96
    assert _holds_in_plain_subprocess(kind=kind, mb=mb)
    options = {} if cgroups else {"isolation": _no_cgroups()}
    attack = hostile(_HOARDERS, limits={"timeout": 10}, **options)
    result = attack.run(kind=kind, mb=mb)
    assert result.status is ExecutionStatus.FAILED, result
    assert result.error.startswith(f"{EXHAUSTED}: memory"), result.error
    attack.assert_still_serving()


@pytest.mark.parametrize("cgroups", [pytest.param(True, id="cgroups", marks=requires("processes")),
                                     pytest.param(False, id="no cgroups")])
def test_memory_under_the_limit_passes_and_is_reported(
        hostile: Callable[..., Hostile], cgroups: bool) -> None:
    """The stricter accounting leaves an honest execution its `memory_mb`."""
    options = {} if cgroups else {"isolation": _no_cgroups()}
    attack = hostile(_HOARDERS, limits={"timeout": 10}, **options)
    result = attack.run(kind="shared anonymous, forked", mb=32)
    assert result.status is ExecutionStatus.SUCCESS, result
    assert 32 <= result.resource_usage.memory_mb < _MEMORY, result.resource_usage
    attack.assert_still_serving()
