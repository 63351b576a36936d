"""Hostile manifests: a skill author's manifest.yaml / SKILL.md chosen to make loading (in the
supervisor, and in the daemon's directory watcher) take unbounded time or memory, or raise
something other than a `SkillLoadError` naming the file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from sandbox.errors import SkillLoadError
from sandbox.manifest import MAX_YAML_NODES

MAIN = "def run(input):\n    return {}\n"


def alias_bomb(levels: int = 11, width: int = 9) -> str:
    """Billion laughs in YAML: each level a list of `width` aliases of the level below, so the
    document is a few hundred bytes and expands to width**levels scalars."""
    lines = [f"l0: &l0 [{', '.join(['x'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def expanded_nodes(node: yaml.Node, cap: int) -> int:
    """How many nodes `node` stands for once every alias is expanded, counting up to `cap`."""
    count, stack = 0, [node]
    while stack and count < cap:
        item = stack.pop()
        count += 1
        if isinstance(item, yaml.SequenceNode):
            stack.extend(item.value)
        elif isinstance(item, yaml.MappingNode):
            stack.extend(child for pair in item.value for child in pair)
    return count


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(mode=0o755)
    (directory / name).write_text(text)
    (directory / "main.py").write_text(MAIN)
    return directory


@pytest.mark.parametrize("where", ["tags", "input_schema"])
def test_a_yaml_alias_bomb_in_manifest_yaml_is_refused_at_load(tmp_path: Path,
                                                               where: str) -> None:
    bomb = alias_bomb()
    # CONTROL: the document really stands for billions of nodes (what a walker would visit:
    # before the bound, loading hung in the input schema's depth check).
    composed = yaml.compose(bomb)
    assert composed is not None
    assert expanded_nodes(composed, 10 * MAX_YAML_NODES) == 10 * MAX_YAML_NODES
    use = ("tags: *l10\n" if where == "tags" else
           "input_schema:\n  type: object\n  properties:\n    p: {enum: *l10}\n")
    directory = write(tmp_path / "bomb", "manifest.yaml", bomb + use)
    with pytest.raises(SkillLoadError, match="aliases expand to more than"):
        Skill.from_dir(directory)


def test_a_yaml_alias_bomb_in_skill_md_front_matter_is_refused_at_load(tmp_path: Path) -> None:
    # Only id/name/description/version are allowed up there, so the bomb nests in one of
    # them (and `version` is str()-ed: billions of items before the bound).
    front = "version:\n" + "".join(f"  - {line.split(': ', 1)[1]}\n"
                                     for line in alias_bomb().splitlines())
    directory = write(tmp_path / "bomb", "SKILL.md", f"---\n{front}---\nSay {{{{.Input}}}}\n")
    with pytest.raises(SkillLoadError, match="aliases expand to more than"):
        Skill.from_dir(directory)


def test_a_few_yaml_aliases_still_load(tmp_path: Path) -> None:
    # CONTROL for the bound: ordinary anchors and aliases are YAML, and openbotstack's reader
    # (yaml.v3) takes them.
    text = "tags: &t [a, b]\ncategory: *t\n"
    directory = write(tmp_path / "ok", "manifest.yaml", text)
    skill = Skill.from_dir(directory)
    assert skill.manifest.metadata["category"] == ["a", "b"]


@pytest.mark.parametrize(("text", "field"), [
    ('limits:\n  max_memory: "' + "9" * 400 + 'GB"\n', "limits.max_memory"),
    ('timeout: "' + "9" * 400 + 's"\n', "timeout"),
    ('limits:\n  max_execution: "' + "9" * 400 + 'h"\n', "limits.max_execution"),
    ("timeout: .inf\n", "timeout"),
    ("resources:\n  max_cpu_ms: .inf\n", "resources.max_cpu_ms"),
])
def test_sizes_and_durations_past_a_float_are_refused_naming_the_field(
        tmp_path: Path, text: str, field: str) -> None:
    # CONTROL: the digits really overflow a float (what the parsers multiply).
    assert float("9" * 400) == float("inf")
    directory = write(tmp_path / "big", "manifest.yaml", text)
    with pytest.raises(SkillLoadError, match=f"field '{field}'"):
        Skill.from_dir(directory)


@pytest.mark.parametrize("field", ["timeout", "cpu_time"])
def test_an_infinite_native_limit_is_refused_naming_the_field(tmp_path: Path, field: str) -> None:
    # CONTROL: TOML reads `inf` as a float, which passes a plain "greater than 0" check.
    import tomllib
    assert tomllib.loads(f"{field} = inf")[field] > 0
    directory = write(tmp_path / "inf", "skill.toml", f'id = "t/inf"\nentrypoint = "main:run"\n'
                                                     f"[limits]\n{field} = inf\n")
    with pytest.raises(SkillLoadError, match=field):
        Skill.from_dir(directory)


@pytest.mark.parametrize("field", ["memory_mb", "max_processes", "max_output_bytes",
                                   "max_file_bytes", "max_open_files"])
def test_a_limit_past_what_the_kernel_takes_is_refused_at_load(tmp_path: Path,
                                                                field: str) -> None:
    # Before: memory_mb = 10**23 loaded, and the execution's cgroup write raised
    # OSError(EINVAL) out of Sandbox.execute.
    directory = write(tmp_path / "huge", "skill.toml", f'id = "t/huge"\nentrypoint = "main:run"\n'
                                                      f"[limits]\n{field} = {10 ** 23}\n")
    with pytest.raises(SkillLoadError, match=field):
        Skill.from_dir(directory)


def test_the_largest_memory_limit_allowed_still_executes(
        tmp_path: Path, make_sandbox: Callable[..., Sandbox]) -> None:
    # CONTROL for the bound: at the bound itself the cgroup write and rlimits are accepted.
    directory = tmp_path / "big"
    directory.mkdir(mode=0o755)
    (directory / "main.py").write_text(MAIN)
    (directory / "skill.toml").write_text(f'id = "t/big"\nentrypoint = "main:run"\n'
                                          f"[limits]\nmemory_mb = {1 << 40}\n")
    sandbox = make_sandbox(directory)
    result = sandbox.execute(ExecutionRequest(skill_id="t/big", input=b"{}"))
    assert result.status is ExecutionStatus.SUCCESS, result.error
