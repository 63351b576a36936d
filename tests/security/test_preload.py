"""`preload` modules are imported in the zygote — as root, before the per-execution layers —
so a skill's author may name only modules the operator trusts."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import ExecutionRequest, Sandbox, Skill, SkillLoadError
from sandbox.capabilities import IsolationConfig

#: `this` prints the Zen of Python when imported: any installed module runs code on import.
SIDE_EFFECT_MODULE = "this"
SKILL = "def run(input):\n    return 'ran'\n"


def _skill_with_preload(skill_dir: Callable[..., Path], preload: str) -> Skill:
    return Skill.from_dir(skill_dir(SKILL, f"preload = [{preload!r}]"))


def test_importing_an_installed_module_runs_its_code_control() -> None:
    done = subprocess.run([sys.executable, "-I", "-c", f"import {SIDE_EFFECT_MODULE}"],
                          capture_output=True, timeout=30, check=True)
    assert b"Beautiful is better than ugly" in done.stdout


@pytest.mark.parametrize("module", [SIDE_EFFECT_MODULE, "antigravity", "os", "pydantic"])
def test_a_skill_cannot_preload_a_module_the_operator_did_not_trust(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
        module: str) -> None:
    skill = _skill_with_preload(skill_dir, module)
    with pytest.raises(SkillLoadError) as refused:
        make_sandbox(skill)
    message = str(refused.value)
    assert repr(module) in message and "trusted_preload" in message, message


def test_an_operator_trusted_preload_is_imported_and_the_skill_runs(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = _skill_with_preload(skill_dir, "json.decoder")
    sandbox = make_sandbox(skill, isolation=IsolationConfig(trusted_preload=("json",)))
    result = sandbox.execute(ExecutionRequest(skill_id=skill.id))
    assert result.ok and result.json() == "ran", result


def test_trusting_a_package_does_not_trust_a_sibling_with_the_same_prefix(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    skill = _skill_with_preload(skill_dir, "jsonschema")
    with pytest.raises(SkillLoadError, match="'jsonschema'"):
        make_sandbox(skill, isolation=IsolationConfig(trusted_preload=("json",)))


def test_trusted_preload_names_must_be_module_names() -> None:
    with pytest.raises(ValueError, match="trusted_preload"):
        IsolationConfig(trusted_preload=("json; import os",))
