"""A supervisor run by an ordinary user (started through `as_user.py`); prints one JSON object.

`doctor`: the layers this user gets. `probe`: what an execution holds (capabilities, whether
it can unshare) and what its zygote holds. `bomb fork|thread [DISABLED,...]`: a skill with
`max_processes` = MAX_PROCESSES starts up to CHILDREN sleeping children (`fork`) or threads
(`thread`) as fast as it can; its tree is sampled from outside (every descendant of this
supervisor, every millisecond) and the peak number of tasks above the idle zygote and spare is
reported with the execution's result, and how many the skill itself says it started (on its
stderr, kept even when the execution is killed). `signal [DISABLED,...]`: whether an execution
can name this supervisor, its zygote and a concurrent execution (signal 0 and a pidfd only).
`figures`: what the VM stage (`make test-vm`) reports and checks for each host kind: the
memory_mb of 200 MB under a 400 MB limit, the verdict and peak of 300 MB under a 100 MB limit,
and the fork bomb's peak; exits 1 if one falls short.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time

import psutil

from sandbox import ExecutionRequest, Sandbox, Skill
from sandbox.capabilities import IsolationConfig, report

MAX_PROCESSES = 8
CHILDREN = 40
_BOMB = f'''
import os, resource, threading, time


def run(input):
    os.write(2, f"NPROC {{resource.getrlimit(resource.RLIMIT_NPROC)[0]}}\\n".encode())
    threading.stack_size(1 << 16)  # threads cost tasks, not memory
    started, refused = 0, ""
    for _ in range({CHILDREN}):
        try:
            if input["kind"] == "thread":  # ~20x faster than a fork: it outruns the tree watch
                threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
            elif os.fork() == 0:
                time.sleep(2)
                os._exit(0)
        except (OSError, RuntimeError) as exc:
            refused = str(exc)
            break
        started += 1
        os.write(2, b"+")  # progress the supervisor keeps even if it kills the execution
    time.sleep(0.5)  # the tree at its largest, for the sampler to see
    return {{"started": started, "refused": refused}}
'''


_PROBE = """
import ctypes, errno


def run(input):
    status = open("/proc/self/status").read()
    caps = {line.split(":")[0]: line.split()[1] for line in status.splitlines()
            if line.startswith(("CapEff", "CapPrm"))}
    libc = ctypes.CDLL(None, use_errno=True)
    refused = {}
    for name, flags in (("userns", 0x10000000), ("mountns", 0x20000)):
        libc.unshare(flags)
        refused[name] = errno.errorcode.get(ctypes.get_errno(), "none")
    return {"caps": caps, "unshare": refused}
"""


_SIGNAL = """
import os, time


def run(input):
    if input.get("sleep"):
        time.sleep(input["sleep"])
        return "slept"
    outcome = {}
    for who, pid in input["targets"].items():
        try:
            os.kill(pid, 0)  # the probe of a signal: delivered nowhere
            outcome[f"kill {who}"] = "sent"
        except OSError as exc:
            outcome[f"kill {who}"] = exc.strerror
        try:
            os.close(os.pidfd_open(pid))
            outcome[f"pidfd {who}"] = "opened"
        except OSError as exc:
            outcome[f"pidfd {who}"] = exc.strerror
    return outcome
"""


#: Where this run writes its skills; removed when the script exits, however it exits.
_ROOT = tempfile.TemporaryDirectory(prefix="user-supervisor-")
os.chmod(_ROOT.name, 0o755)


def _write_skill(name: str, code: str, limits: str = "") -> Skill:
    directory = os.path.join(_ROOT.name, name)
    os.mkdir(directory, 0o755)
    with open(os.path.join(directory, "main.py"), "w") as main:
        main.write(code)
    with open(os.path.join(directory, "skill.toml"), "w") as manifest:
        manifest.write(f'id = "user/{name}"\nversion = "0.1.0"\nentrypoint = "main:run"\n'
                       f"[limits]\n{limits}\n")
    return Skill.from_dir(directory)


def _probe() -> dict[str, object]:
    """What an execution holds, and (the control) what its zygote holds."""
    skill = _write_skill("probe", _PROBE)
    with Sandbox([skill]) as sandbox:
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b"{}"))
        zygotes = psutil.Process().children()
        zygote_caps = {}
        for zygote in zygotes:
            with open(f"/proc/{zygote.pid}/status") as status:
                zygote_caps[zygote.pid] = next(line.split()[1] for line in status
                                           if line.startswith("CapEff"))
    return {"status": result.status.value, "error": result.error,
            "execution": json.loads(result.output or b"{}"), "zygotes": zygote_caps}


def _tasks_below(pid: int) -> int:
    total = 0
    for process in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += process.num_threads()
    return total


def _bomb(kind: str, disabled: frozenset[str]) -> dict[str, object]:
    skill = _write_skill("bomb", _BOMB, _BOMB_LIMITS)
    with Sandbox([skill], isolation=IsolationConfig(disabled=disabled)) as sandbox:
        return _sampled_bomb(sandbox, skill, kind)


_BOMB_LIMITS = f"max_processes = {MAX_PROCESSES}\ntimeout = 20"


def _sampled_bomb(sandbox: Sandbox, skill: Skill, kind: str) -> dict[str, object]:
    """Runs the bomb twice (the first warms up) and samples the second from outside."""
    peak = 0
    done = threading.Event()

    def sample(baseline: int) -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tasks_below(os.getpid()) - baseline)
            time.sleep(0.001)

    request = ExecutionRequest(skill_id=skill.id, input=json.dumps({"kind": kind}).encode())
    warm = sandbox.execute(request)
    time.sleep(0.5)  # the spare forked after the warm-up is idle by now
    baseline = _tasks_below(os.getpid())
    sampler = threading.Thread(target=sample, args=(baseline,))
    sampler.start()
    try:
        result = sandbox.execute(request)
    finally:
        done.set()
        sampler.join(timeout=10)
    return {"warm": warm.status.value, "status": result.status.value, "error": result.error,
            "output": result.output.decode(errors="replace"), "peak": peak,
            "started": result.stderr.count("+"), "nproc": _nproc(result.stderr)}


def _nproc(stderr: str) -> int:
    """The RLIMIT_NPROC the bomb reported it ran under (-1: unlimited or not said)."""
    for line in stderr.splitlines():
        if line.startswith("NPROC "):
            return int(line.split()[1])
    return -1


def _signal(disabled: frozenset[str]) -> dict[str, object]:
    """An execution's reach: this supervisor, its zygote, another execution running now."""
    skill = _write_skill("signal", _SIGNAL, "timeout = 20")
    with Sandbox([skill], isolation=IsolationConfig(disabled=disabled),
                 max_concurrency=2) as sandbox:
        zygote = sandbox.zygote_info(skill.id)["pid"]
        sleeper = threading.Thread(target=sandbox.execute, args=(ExecutionRequest(
            skill_id=skill.id, input=b'{"sleep": 3}'),))
        sleeper.start()
        try:
            victim = None
            for _ in range(2000):
                busy = [child for child in psutil.Process(zygote).children()
                        if child.name() != "sbx-spare"]
                if busy:
                    victim = busy[0].pid
                    break
                time.sleep(0.005)
            targets = {"supervisor": os.getpid(), "zygote": zygote, "execution": victim}
            result = sandbox.execute(ExecutionRequest(
                skill_id=skill.id, input=json.dumps({"targets": targets}).encode()))
        finally:
            sleeper.join(timeout=20)
    return {"status": result.status.value, "error": result.error,
            "reach": json.loads(result.output or b"{}")}


_ALLOCATE = """
def run(input):
    blocks = []
    for _ in range(input["mb"]):  # 1 MB at a time: the limit stops it part way, at its peak
        block = bytearray(1 << 20)
        block[::4096] = b"x" * 256
        blocks.append(block)
    return len(blocks)
"""


def _figures() -> tuple[dict[str, object], list[str]]:
    """What issue 10 asks of every host kind, measured in one sandbox: a 200 MB allocation
    reports 190-260 memory_mb; 300 MB under memory_mb = 100 fails as resource exhausted with
    the real peak (90-110); a fork bomb never has more than max_processes tasks (plus the
    runtime's own few) at any moment, sampled from outside. Returns them and what fell short."""
    generous = _write_skill("allocate-400", _ALLOCATE, "memory_mb = 400\ntimeout = 300\n"
                                                      "cpu_time = 300")
    tight = _write_skill("allocate-100", _ALLOCATE, "memory_mb = 100\ntimeout = 300\n"
                                                   "cpu_time = 300")
    bomb = _write_skill("bomb", _BOMB, _BOMB_LIMITS)
    with Sandbox([generous, tight, bomb]) as sandbox:
        results = {name: sandbox.execute(ExecutionRequest(
                       skill_id=skill.id, input=json.dumps({"mb": megabytes}).encode()))
                   for name, skill, megabytes in (("200 MB", generous, 200),
                                                  ("300 MB under 100", tight, 300))}
        bombed = _sampled_bomb(sandbox, bomb, "fork")
    figures: dict[str, object] = {
        name: {"status": result.status.value, "error": result.error,
               "memory_mb": result.resource_usage.memory_mb}
        for name, result in results.items()}
    figures["fork bomb"] = bombed
    short = []
    fits, over = results["200 MB"], results["300 MB under 100"]
    if not (fits.ok and 190 <= fits.resource_usage.memory_mb <= 260):
        short.append("200 MB: not a success reporting 190-260 memory_mb")
    if not (over.error.startswith("runtime: resource exhausted: memory")
            and 90 <= over.resource_usage.memory_mb <= 110):
        short.append("300 MB under 100: not resource exhausted with a peak of 90-110 MB")
    if not (bombed["status"] == "failed" and isinstance(bombed["peak"], int)
            and bombed["peak"] <= MAX_PROCESSES + 3):
        short.append(f"fork bomb: not stopped within {MAX_PROCESSES} + 3 tasks")
    return figures, short


def main() -> None:
    command = sys.argv[1]
    if command == "doctor":
        print(json.dumps({"euid": os.geteuid(), "layers": {
            layer.name: [layer.status, layer.detail] for layer in report().layers}}))
    elif command == "probe":
        print(json.dumps(_probe()))
    elif command == "signal":
        print(json.dumps(_signal(frozenset(
            name for name in sys.argv[2:3] for name in name.split(",") if name))))
    elif command == "figures":
        figures, short = _figures()
        print(json.dumps(figures))
        if short:
            raise SystemExit("; ".join(short))
    elif command == "bomb":
        disabled = frozenset(name for name in sys.argv[3:4] for name in name.split(",") if name)
        print(json.dumps(_bomb(sys.argv[2], disabled)))
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main()
