"""`doctor` and `Sandbox.capabilities()`: every layer reported, none dropped silently."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import pytest

from sandbox import Sandbox, Skill
from sandbox.capabilities import (
    MECHANISMS,
    IsolationConfig,
    IsolationUnavailable,
    capability_report,
    detect,
    main,
    plan_layers,
    report,
)

LAYERS = ["hygiene", "identity", "supervisor hidden", "seccomp", "network", "ipc", "filesystem",
          "processes"]


def test_doctor_prints_every_layer_and_fails_unless_all_are_active(
        capsys: pytest.CaptureFixture[str]) -> None:
    status = main()
    printed = capsys.readouterr().out
    result = report()
    for layer in result.layers:
        assert f"{layer.status:<12} {layer.name}" in printed
    assert [layer.name for layer in result.layers] == LAYERS
    assert f"Linux {os.uname().release}" in printed
    assert status == (0 if result.all_active else 1)


@pytest.mark.skipif(os.geteuid() != 0, reason="not root: the uid switch, namespaces and "
                                              "cgroups need root")
def test_every_layer_is_active_on_this_root_host() -> None:
    # The project's machines have every layer; a host that lost one must not quietly skip
    # the hostile suite's tests for it.
    inactive = {layer.name: layer.detail for layer in report().layers
                if layer.status != "active"}
    assert inactive == {}


def test_sandbox_reports_what_it_applies(make_sandbox: Callable[..., Sandbox],
                                         example: Callable[[str], Skill]) -> None:
    sandbox = make_sandbox(example("echo"))
    assert sandbox.capabilities() == report()
    disabled = make_sandbox(example("echo"),
                            isolation=IsolationConfig(disabled=frozenset({"landlock", "netns"})))
    layers = {layer.name: layer for layer in disabled.capabilities().layers}
    assert layers["filesystem"].status != "active"
    assert "disabled by IsolationConfig" in layers["filesystem"].detail
    assert layers["network"].status != "active"
    assert "disabled by IsolationConfig" in layers["network"].detail


def test_everything_disabled_is_reported_as_such() -> None:
    plan = plan_layers(detect(), IsolationConfig(disabled=frozenset(MECHANISMS)))
    result = capability_report(detect(), plan)
    assert not result.all_active
    statuses = {layer.name: layer.status for layer in result.layers}
    assert statuses["identity"] == "unavailable"
    assert statuses["seccomp"] == "unavailable"
    assert statuses["network"] == "unavailable"
    assert statuses["filesystem"] == "unavailable"
    assert statuses["processes"] == "fallback"


def test_a_required_layer_the_host_lacks_stops_the_sandbox_with_the_reason() -> None:
    no_landlock = dataclasses.replace(detect(), landlock_abi=0)
    with pytest.raises(IsolationUnavailable, match="landlock: the kernel has no Landlock"):
        plan_layers(no_landlock, IsolationConfig(required=frozenset({"landlock"})))
    not_root = dataclasses.replace(detect(), euid=1000)
    with pytest.raises(IsolationUnavailable, match=r"uid: the supervisor is not root"):
        plan_layers(not_root, IsolationConfig(required=frozenset({"uid", "seccomp"})))
    refused = "PermissionError: [Errno 1] unshare(0x10000000): Operation not permitted"
    no_userns = dataclasses.replace(not_root, probes={**not_root.probes, "userns": refused})
    # Not required: runs, and says so (cgroups off: on v2 they would cap processes instead).
    plan = plan_layers(no_userns, IsolationConfig(disabled=frozenset({"cgroups"})))
    layers = {layer.name: layer for layer in capability_report(no_userns, plan).layers}
    assert layers["identity"].status == "unavailable"
    assert "not root" in layers["identity"].detail
    assert "apparmor_restrict_unprivileged_userns" in layers["identity"].detail
    assert "no mount namespace" in layers["filesystem"].detail
    assert "the tree watch kills a tree only after it has grown" in layers["processes"].detail


def test_an_ordinary_user_with_user_namespaces_is_planned_every_namespace() -> None:
    not_root = dataclasses.replace(detect(), euid=1000,
                                   probes={**detect().probes, "userns_nproc": ""})
    plan = plan_layers(not_root, IsolationConfig())
    assert (plan.uid, plan.userns, plan.userns_nproc) == (False, True, True)
    assert plan.mountns and plan.netns and plan.ipcns
    settings = plan.zygote_settings(network=False, workdir_root="/tmp")
    assert settings.user_ns and settings.execution_user_ns and settings.net_ns
    old_kernel = dataclasses.replace(not_root, probes={
        **not_root.probes, "userns_nproc": "RuntimeError: RLIMIT_NPROC=3 ... (Linux 5.14+)"})
    plan = plan_layers(old_kernel, IsolationConfig(disabled=frozenset({"cgroups"})))
    assert plan.userns and not plan.userns_nproc and plan.mountns
    processes = capability_report(old_kernel, plan).layer("processes").detail
    assert "no per-execution RLIMIT_NPROC (RuntimeError: RLIMIT_NPROC=3" in processes
    root_plan = plan_layers(detect(), IsolationConfig())
    assert not root_plan.userns and root_plan.uid


@pytest.mark.parametrize("config, message", [
    ({"disabled": frozenset({"selinux"})}, "unknown mechanism"),
    ({"required": frozenset({"uid"}), "disabled": frozenset({"uid"})},
     "both required and disabled"),
    ({"uid_base": 0}, "not a valid range"),
    ({"workdir_mb": 0}, "workdir_mb must be at least 1"),
    ({"read_only": ("relative/path",)}, "not an absolute path"),
])
def test_bad_isolation_config_names_the_problem(config: dict[str, object],
                                                message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IsolationConfig(**config)  # type: ignore[arg-type]


def test_doctor_names_the_allow_list_socket_rules_and_ipc_mechanisms() -> None:
    from worker import seccomp

    plan = plan_layers(detect(), IsolationConfig())
    layers = {layer.name: layer for layer in capability_report(detect(), plan).layers}
    if plan.seccomp:
        detail = layers["seccomp"].detail
        for profile in seccomp.PROFILES:
            assert f"{profile} profile {len(seccomp.allowed_calls(profile))} syscalls" in detail
        assert "AF_UNIX stream/seqpacket only, connect and bind denied" in detail
        assert "seccomp refuses SysV IPC" in layers["ipc"].detail
        assert "host Unix sockets" in layers["network"].detail
    if plan.ipcns:
        assert "an IPC namespace per zygote" in layers["ipc"].detail


def test_a_host_without_seccomp_or_ipc_namespace_says_why_ipc_and_unix_sockets_are_off(
        ) -> None:
    bare = dataclasses.replace(detect(), euid=1000, probes={
        **detect().probes, "seccomp": "EINVAL: no seccomp", "userns": "EPERM: no userns"})
    plan = plan_layers(bare, IsolationConfig())
    layers = {layer.name: layer for layer in capability_report(bare, plan).layers}
    assert layers["ipc"].status == "unavailable"
    assert layers["ipc"].detail.startswith("off, because there is neither seccomp")
    assert "EINVAL: no seccomp" in layers["ipc"].detail
    assert "the supervisor is not root" in layers["ipc"].detail
    assert layers["network"].status == "unavailable"
    assert "host Unix sockets are reachable" in layers["network"].detail
    only_ns = dataclasses.replace(detect(), probes={**detect().probes,
                                                    "seccomp": "EINVAL: no seccomp"})
    if only_ns.euid == 0 and only_ns.works("ipcns"):
        layers = {layer.name: layer for layer in capability_report(
            only_ns, plan_layers(only_ns, IsolationConfig())).layers}
        assert layers["ipc"].status == "fallback"
        assert "removed after each execution" in layers["ipc"].detail
        assert "off for host Unix sockets" in layers["network"].detail


def test_an_ordinary_user_on_an_old_landlock_is_told_executions_can_signal_the_supervisor(
        ) -> None:
    # Without user namespaces (so without a PID namespace per execution) only Landlock ABI 6
    # could scope signals.
    no_userns = {**detect().probes, "userns": "EPERM (simulated)", "userns_nproc": ""}
    old = dataclasses.replace(detect(), euid=1000, landlock_abi=2, probes=no_userns)
    hidden = capability_report(old, plan_layers(old, IsolationConfig())).layer(
        "supervisor hidden")
    assert hidden.status == "fallback"
    assert "can signal the supervisor and every process of its user" in hidden.detail
    assert "no PID namespace per execution" in hidden.detail
    new = dataclasses.replace(old, landlock_abi=6)
    hidden = capability_report(new, plan_layers(new, IsolationConfig())).layer(
        "supervisor hidden")
    assert "NOT signals" not in hidden.detail


def test_an_ordinary_user_with_user_namespaces_keeps_signals_in_by_a_pid_namespace() -> None:
    probes = {**detect().probes, "userns": "", "userns_nproc": "", "pidns": ""}
    old = dataclasses.replace(detect(), euid=1000, landlock_abi=2, probes=probes)
    plan = plan_layers(old, IsolationConfig())
    assert plan.pidns and plan.zygote_settings(False, "/tmp").pid_ns
    hidden = capability_report(old, plan).layer("supervisor hidden")
    assert "NOT signals" not in hidden.detail
    assert "a PID namespace per execution" in hidden.detail
    assert hidden.status == ("active" if old.works("seccomp") else "fallback")
    off = plan_layers(old, IsolationConfig(disabled=frozenset({"pidns"})))
    assert not off.pidns
    assert "NOT signals" in capability_report(old, off).layer("supervisor hidden").detail
