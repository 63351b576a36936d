"""Helpers for the hostile-skill suite (the `hostile` fixture is in conftest.py): a skill that
attacks on demand, and the checks every attack test ends with (right status, zygote untouched
and still serving, nothing left alive).

Each hostile skill answers `{"probe": true}` with "alive": the same zygote that served the
attack must serve that next execution. Skills report pids they spawned on stderr as
`PID <n>` lines, so a test can check that each one is gone.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest

from sandbox import ExecutionRequest, ExecutionResult, ExecutionStatus, Sandbox, Skill
from sandbox.capabilities import CapabilityReport, IsolationConfig, report
from tests.conftest import slow, wait_until_gone

#: Small limits keep every attack short (each test stays well under 5 s). Wall and CPU time
#: scale with the host's slowness (SKILL_SANDBOX_TEST_SLOWDOWN: an emulated VM spends seconds of
#: CPU starting an interpreter); memory and processes do not.
LIMITS: dict[str, float] = {"timeout": slow(2), "cpu_time": slow(1), "memory_mb": 64,
                            "max_processes": 16}
EXHAUSTED = "runtime: resource exhausted"

_TEMPLATE = '''\
import ctypes, errno, json, os, signal, socket, sys, time


def run(input):
    if input.get("probe"):
        return "alive"
    return attack(input)


def report_pid(pid):
    sys.stderr.write(f"PID {{pid}}\\n")
    sys.stderr.flush()


def host_pid():
    """This process's pid as the host names it (in its own PID namespace os.getpid() is 1)."""
    return int(os.readlink("/proc/self"))


def zygote_pid():
    """The parent's pid as the host names it (os.getppid() is 0 in a PID namespace)."""
    with open("/proc/self/stat", "rb") as stat:
        return int(stat.read().rsplit(b")", 1)[1].split()[1])


{code}
'''

_HOST: CapabilityReport | None = None


def host() -> CapabilityReport:
    """The capability report of this host, with the default isolation settings (cached)."""
    global _HOST
    if _HOST is None:
        _HOST = report()
    return _HOST


def requires(*layers: str) -> pytest.MarkDecorator:
    """Skip, naming the reason, unless every one of `layers` is active on this host."""
    missing = [f"{layer.name} is {layer.status}: {layer.detail}"
               for layer in (host().layer(name) for name in layers) if layer.status != "active"]
    return pytest.mark.skipif(bool(missing), reason="; ".join(missing))


_VARIANTS: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    # name: (mechanisms switched off, layers that must be active for the variant to mean much)
    "all layers": (frozenset(), ()),
    # As root with no uid switch, no read-only mount view and no PID namespace, only Landlock
    # stands in the way.
    "landlock alone": (frozenset({"uid", "mountns", "pidns"}), ("filesystem",)),
    # No Landlock and no PID namespace: the unprivileged uid (and seccomp) must hold by
    # themselves.
    "uid alone": (frozenset({"landlock", "pidns"}), ("identity",)),
    # An execution running as root (no uid switch), with no Landlock: only its own PID
    # namespace keeps other processes out of its reach.
    "pidns alone": (frozenset({"uid", "mountns", "landlock"}), ("supervisor hidden",)),
}


def layer_variants(*names: str) -> pytest.MarkDecorator:
    """Run the test once per named variant, passing `isolation` (an `IsolationConfig`)."""
    params = []
    for name in names:
        disabled, needed = _VARIANTS[name]
        params.append(pytest.param(IsolationConfig(disabled=disabled), id=name,
                                   marks=[requires(*needed)] if needed else []))
    return pytest.mark.parametrize("isolation", params)


@dataclass
class Hostile:
    sandbox: Sandbox
    skill: Skill
    zygote_pid: int

    def run(self, **input: Any) -> ExecutionResult:
        return self.sandbox.execute(ExecutionRequest(skill_id=self.skill.id,
                                                     input=msgspec.json.encode(input)))

    def assert_still_serving(self) -> None:
        """The attack's zygote was neither killed nor restarted, and serves the next call."""
        info = self.sandbox.zygote_info(self.skill.id)
        assert info["alive"] and info["pid"] == self.zygote_pid and info["starts"] == 1
        probe = self.run(probe=True)
        assert probe.status is ExecutionStatus.SUCCESS, probe
        assert probe.json() == "alive"
        assert self.sandbox.zygote_info(self.skill.id)["pid"] == self.zygote_pid


def reported_pids(result: ExecutionResult) -> set[int]:
    return {int(pid) for pid in re.findall(r"^PID (\d+)$", result.stderr, re.MULTILINE)}


def assert_gone(pids: set[int]) -> None:
    assert pids, "the attack reported no pid to check"
    assert wait_until_gone(pids) == set(), f"processes of the execution survived: {pids}"


def hostile_factory(make_sandbox: Callable[..., Sandbox],
                    skill_dir: Callable[..., Path]) -> Callable[..., Hostile]:
    """`hostile(code, limits={}, network=False, manifest_extra="", **sandbox_options)`: a loaded
    skill whose `attack(input)` is `code`, with the suite's small limits (`limits` overrides
    some); `manifest_extra` adds top-level manifest lines (e.g. a hostile `output_schema`)."""

    def build(code: str, limits: dict[str, float] | None = None, network: bool = False,
              manifest_extra: str = "", **options: Any) -> Hostile:
        source = _TEMPLATE.format(code=textwrap.dedent(code))
        table = "".join(f"{key} = {value}\n" for key, value in {**LIMITS, **(limits or {})}.items())
        manifest = (f"{manifest_extra}\n[limits]\n{table}[permissions]\n"
                    f"network = {str(network).lower()}\n")
        skill = Skill.from_dir(skill_dir(source, manifest))
        sandbox = make_sandbox(skill, **options)
        return Hostile(sandbox, skill, sandbox.zygote_info(skill.id)["pid"])

    return build
