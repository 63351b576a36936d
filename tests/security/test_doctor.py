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

LAYERS = ["hygiene", "identity", "supervisor hidden", "seccomp", "network", "filesystem",
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
    plan = plan_layers(not_root, IsolationConfig())  # not required: runs, and says so
    layers = {layer.name: layer for layer in capability_report(not_root, plan).layers}
    assert layers["identity"].status == "unavailable"
    assert "not root" in layers["identity"].detail


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
