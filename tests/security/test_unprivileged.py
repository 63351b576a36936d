"""An ordinary user's supervisor: the layers it gets and a process cap that holds before growth.

Each test runs `user_supervisor.py` as an unprivileged uid through `as_user.py` (which needs
root to become that uid; as an ordinary user the whole suite runs unprivileged already).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import slow
from tests.security import user_supervisor

HERE = Path(__file__).parent
#: Above the sandbox's uid pool and any real account: only these tests' processes run as it.
TEST_UID = 1_999_999_000
#: The execution's own tasks may reach max_processes + 2 (the runtime's own: the execution
#: process and a thread); the zygote forks one new spare meanwhile.
RUNTIME_TASKS = 3

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="becoming another uid needs root (as an ordinary user, "
                                       "every test already runs unprivileged)")


def as_user(*args: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(HERE / "as_user.py"), str(TEST_UID),
         str(HERE / "user_supervisor.py"), *args],
        capture_output=True, text=True, timeout=slow(50), check=False)
    assert done.returncode == 0, done.stderr
    answer: dict[str, Any] = json.loads(done.stdout)
    return answer


@pytest.fixture(scope="module")
def user_layers() -> dict[str, list[str]]:
    answer = as_user("doctor")
    assert answer["euid"] == TEST_UID
    layers: dict[str, list[str]] = answer["layers"]
    if "no user namespace" in layers["identity"][1]:
        pytest.skip(f"no unprivileged user namespaces here: {layers['identity'][1]}")
    return layers


def test_an_ordinary_user_gets_network_ipc_and_mount_namespaces(
        user_layers: dict[str, list[str]]) -> None:
    assert user_layers["identity"][0] == "fallback"
    assert "each in a user namespace of its own" in user_layers["identity"][1]
    assert user_layers["network"][0] == "active", user_layers["network"]
    assert "an IPC namespace per zygote" in user_layers["ipc"][1]
    assert "mount namespace" in user_layers["filesystem"][1]
    assert "no mount namespace" not in user_layers["filesystem"][1]


@pytest.mark.timeout(150)
def test_an_ordinary_users_fork_and_thread_bombs_never_exceed_the_process_limit(
        user_layers: dict[str, list[str]]) -> None:
    processes = user_layers["processes"]
    assert processes[0] == "active" or "RLIMIT_NPROC in each execution's own user namespace" \
        in processes[1], processes  # a delegated cgroup (v2), else the user namespace
    for kind in ("fork", "thread"):
        contained = as_user("bomb", kind)
        assert contained["peak"] <= user_supervisor.MAX_PROCESSES + RUNTIME_TASKS, contained
        assert contained["started"] < user_supervisor.MAX_PROCESSES + 2, contained
    # Control: without the per-execution user namespace (nor a delegated cgroup) no rlimit caps
    # the tree, and on this machine the same threads outgrow the bound above before the tree
    # watch (first sample after 20 ms) sees them. (In an emulated VM threads start ten times
    # slower against the same wall-clock watch, so there only the missing cap is checked.)
    # On a loaded machine the watch can win a round, so the bomb gets three tries; a capped
    # tree never gets past the bound however slow the watch is.
    for _ in range(3):
        uncapped = as_user("bomb", "thread", "userns,cgroups")
        assert uncapped["nproc"] == -1 or uncapped["nproc"] > 100, uncapped  # as_user: 400
        if slow(1) != 1 or uncapped["started"] > user_supervisor.MAX_PROCESSES + RUNTIME_TASKS:
            break
    else:
        pytest.fail(f"the uncapped bomb never outgrew the bound in three tries: {uncapped}")


def test_an_ordinary_users_executions_cannot_reach_the_supervisor_or_each_other(
        user_layers: dict[str, list[str]]) -> None:
    # Landlock off stands for a kernel whose Landlock cannot scope signals (ABI < 6, e.g.
    # Debian 12's 6.1): then each execution's own PID namespace is what keeps the supervisor,
    # the zygote and the other executions of the same uid out of its reach.
    contained = as_user("signal", "landlock")
    assert contained["status"] == "success", contained
    assert set(contained["reach"].values()) == {"No such process"}, contained
    assert len(contained["reach"]) == 6, contained
    # Control: without the PID namespace, the same uid reaches every one of them.
    exposed = as_user("signal", "landlock,pidns")
    assert exposed["status"] == "success", exposed
    assert set(exposed["reach"].values()) == {"sent", "opened"}, exposed


def test_an_ordinary_users_execution_holds_no_capability_and_makes_no_namespace(
        user_layers: dict[str, list[str]]) -> None:
    answer = as_user("probe")
    assert answer["status"] == "success", answer
    execution = answer["execution"]
    assert execution["caps"] == {"CapPrm": "0" * 16, "CapEff": "0" * 16}
    assert execution["unshare"] == {"userns": "EPERM", "mountns": "EPERM"}
    # Control: its zygote holds every capability of its user namespace (which owns its mount,
    # network and IPC namespaces); the execution child drops them after entering its own.
    assert answer["zygotes"] and all(int(caps, 16) != 0 for caps in answer["zygotes"].values())
