"""openbotstack's skill directories as they are: v1.1.0 manifests (`type:`, `prompt:`,
`resources`), the wasip1 example (`entrypoint: main.wasm`, `limits.max_memory: 64MB`) and the
current SKILL.md-first format (`execution.mode`), read from the unchanged copies under
../shared/reference/openbotstack/ and from small manifests written here."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import (
    ErrorKind,
    ExecutionRequest,
    ExecutionStatus,
    Sandbox,
    Skill,
    SkillLoadError,
)
from sandbox.manifest import load_manifest
from tests.conftest import OPENBOTSTACK

REFERENCE = OPENBOTSTACK

needs_reference = pytest.mark.skipif(not REFERENCE.is_dir(),
                                     reason=f"openbotstack's skills are not at {REFERENCE}")

# directory: (id, kind, wasm, timeout s, memory MB, CPU s, host permissions, network)
EXPECTED: dict[str, tuple[str, str, str | None, float, int, float, set[str], bool]] = {
    "runtime-v1.1.0/tax-calculator":
        ("core/tax-calculator", "wasm", "main.wasm", 5.0, 8, 1.0, set(), False),
    "runtime-v1.1.0/math-add": ("core/math.add", "wasm", "main.wasm", 30.0, 128, 5.0, set(), False),
    "runtime-v1.1.0/wordcount":
        ("core/text.wordcount", "wasm", "main.wasm", 30.0, 128, 5.0, set(), False),
    "runtime-v1.1.0/meeting-summarize":
        ("core/meeting.summarize", "wasm", "main.wasm", 30.0, 128, 5.0, {"llm:generate"}, False),
    "runtime-v1.1.0/summarize":
        ("core/summarize", "declarative", None, 30.0, 128, 5.0, set(), False),
    "runtime-wasip1/hello-world":
        ("hello-world", "wasm", "main.wasm", 10.0, 64, 5.0, {"log:write"}, False),
    "runtime-head/classify": ("classify", "declarative", None, 120.0, 128, 5.0, set(), False),
    "runtime-head/summarize": ("summarize", "declarative", None, 120.0, 128, 5.0, set(), False),
    "runtime-head/extract_structured_data":
        ("extract_structured_data", "declarative", None, 120.0, 128, 5.0, set(), False),
}
GO_SOURCES_ONLY = ["runtime-v1.1.0/math-add", "runtime-v1.1.0/wordcount",
                   "runtime-v1.1.0/meeting-summarize"]


def skill_directories() -> set[str]:
    found = {p.parent for pattern in ("*/*/manifest.yaml", "*/*/SKILL.md")
             for p in REFERENCE.glob(pattern)}
    return {str(directory.relative_to(REFERENCE)) for directory in found}


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def yaml_skill(tmp_path: Path, text: str) -> Path:
    return write(tmp_path / "s", {"manifest.yaml": text})


def manifest_error(directory: Path) -> str:
    with pytest.raises(SkillLoadError) as caught:
        load_manifest(directory)
    return str(caught.value)


# -- the reference directories -----------------------------------------------------------------


@needs_reference
def test_every_reference_directory_is_in_the_table() -> None:
    assert skill_directories() == set(EXPECTED)


@needs_reference
@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_reference_directory_loads_with_its_kind_limits_and_permissions(relative: str) -> None:
    skill_id, kind, wasm, timeout, memory_mb, cpu_time, host, network = EXPECTED[relative]
    _, manifest = load_manifest(REFERENCE / relative)
    assert (manifest.id, manifest.kind, manifest.wasm) == (skill_id, kind, wasm)
    limits = manifest.limits
    assert (limits.timeout, limits.memory_mb, limits.cpu_time) == (timeout, memory_mb, cpu_time)
    assert (set(manifest.permissions.host), manifest.permissions.network) == (host, network)
    if kind == "declarative":
        assert manifest.instructions is not None and "{{.Input}}" in manifest.instructions


@needs_reference
def test_current_format_takes_name_and_prompt_from_skill_md() -> None:
    _, manifest = load_manifest(REFERENCE / "runtime-head" / "classify")
    assert manifest.name == "Text Classifier"
    assert manifest.instructions is not None
    assert manifest.instructions.startswith("You are a precise text classification assistant.")
    assert not manifest.instructions.startswith("---")
    assert manifest.input_schema is not None and manifest.input_schema["required"] == [
        "text", "categories"]


@needs_reference
def test_informational_fields_are_kept_in_metadata() -> None:
    _, hello = load_manifest(REFERENCE / "runtime-wasip1" / "hello-world")
    assert hello.metadata["triggers"] == [{"pattern": "hello"}, {"pattern": "hi"},
                                          {"pattern": "greet"}]
    _, tax = load_manifest(REFERENCE / "runtime-v1.1.0" / "tax-calculator")
    assert tax.metadata == {"requires": []}


@needs_reference
@pytest.mark.parametrize("relative", GO_SOURCES_ONLY)
def test_go_source_only_directory_loads_but_says_it_cannot_run(relative: str) -> None:
    skill = Skill.from_dir(REFERENCE / relative)
    assert skill.manifest.kind == "wasm"
    assert not (skill.path / "main.wasm").exists()
    assert "field 'wasm': no compiled module 'main.wasm'" in skill.not_runnable
    assert "Go sources only (main.go)" in skill.not_runnable
    assert "`GOOS=wasip1 GOARCH=wasm go build -o main.wasm`" in skill.not_runnable


@needs_reference
def test_go_source_only_skill_fails_each_execution_at_once_naming_the_build(
        make_sandbox: Callable[..., Sandbox]) -> None:
    """No zygote boots (not even with `warm`), the circuit never opens on it, and the
    skill's state says why it cannot run."""
    skill = Skill.from_dir(REFERENCE / "runtime-v1.1.0" / "math-add")
    sandbox = make_sandbox(skill, warm=True)
    for _ in range(8):  # beyond the circuit's failure threshold
        result = sandbox.execute(ExecutionRequest(skill_id=skill.id, input=b'{"a": 1, "b": 2}'))
        assert result.status is ExecutionStatus.FAILED
        assert result.error_kind is ErrorKind.SKILL_FAILED
        assert result.error.startswith("skill not runnable: ")
        assert "no compiled module 'main.wasm'" in result.error
        assert "GOOS=wasip1 GOARCH=wasm go build -o main.wasm" in result.error
    state = sandbox.skill_state(skill.id)
    assert state["state"] == "not-runnable" and state["pid"] == 0 and state["starts"] == 0
    assert "no compiled module" in state["not_runnable"]
    assert "no compiled module" in sandbox.ensure_zygote(skill.id)


@needs_reference
def test_every_reference_directory_is_discovered_and_loads(
        make_sandbox: Callable[..., Sandbox]) -> None:
    from sandbox.daemon.service import skill_summary

    pytest.importorskip("wasmtime", reason="WASM skills need the wasm extra")
    skills = Skill.discover(REFERENCE)
    assert {str(skill.path.relative_to(REFERENCE)) for skill in skills} == set(EXPECTED)
    sandbox = make_sandbox(*skills)
    assert {skill.id for skill in sandbox.skills()} == {skill.id for skill in skills}
    summaries = {skill.id: skill_summary(skill) for skill in skills}
    for relative in GO_SOURCES_ONLY:
        summary = summaries[EXPECTED[relative][0]]
        assert summary["runnable"] is False and "main.wasm" in summary["not_runnable"]
    assert summaries["core/tax-calculator"]["runnable"] is True


def test_missing_module_without_go_sources_is_still_a_load_error(tmp_path: Path) -> None:
    """Nothing to build it from: a broken manifest, not a skill waiting for its build.
    Control: the same directory with a Go source loads (not runnable)."""
    directory = write(tmp_path / "s", {"manifest.yaml": "id: t/nomodule\ntype: wasm\n"})
    with pytest.raises(SkillLoadError, match=r"no compiled module 'main\.wasm'"):
        Skill.from_dir(directory)
    (directory / "main.go").write_text("package main\n\nfunc main() {}\n")
    assert "Go sources only (main.go)" in Skill.from_dir(directory).not_runnable


@needs_reference
@pytest.mark.parametrize("relative", sorted(set(EXPECTED) - set(GO_SOURCES_ONLY)))
def test_reference_directory_with_something_to_run_loads_as_a_skill(relative: str) -> None:
    if EXPECTED[relative][1] == "wasm":
        pytest.importorskip("wasmtime", reason="WASM skills need the wasm extra")
    skill = Skill.from_dir(REFERENCE / relative)
    assert (skill.id, skill.manifest.kind) == EXPECTED[relative][:2]


# -- mapping rules, on manifests written here ----------------------------------------------------


def test_skill_md_alone_takes_its_id_from_the_directory(tmp_path: Path) -> None:
    directory = write(tmp_path / "word_counter", {
        "SKILL.md": "---\nname: Word Counter\ndescription: Counts\n---\n\nCount: {{.Input}}\n"})
    path, manifest = load_manifest(directory)
    assert path.name == "SKILL.md"
    assert (manifest.id, manifest.name, manifest.description) == (
        "word_counter", "Word Counter", "Counts")
    assert (manifest.kind, manifest.instructions) == ("declarative", "Count: {{.Input}}")


def test_skill_md_front_matter_id_wins_over_the_directory(tmp_path: Path) -> None:
    directory = write(tmp_path / "dir", {"SKILL.md": "---\nid: ns/given\n---\nSay {{.Input}}\n"})
    assert load_manifest(directory)[1].id == "ns/given"


def test_skill_md_without_front_matter_is_all_prompt(tmp_path: Path) -> None:
    directory = write(tmp_path / "plain", {"SKILL.md": "Echo {{.Input}}\n"})
    manifest = load_manifest(directory)[1]
    assert (manifest.id, manifest.name, manifest.instructions) == ("plain", "plain",
                                                                   "Echo {{.Input}}")


def test_skill_md_unclosed_front_matter_is_an_error(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"SKILL.md": "---\nname: x\nbody without a close\n"})
    message = manifest_error(directory)
    assert "SKILL.md" in message and "unclosed front matter" in message


def test_skill_md_front_matter_unknown_field_is_named(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"SKILL.md": "---\nnmae: typo\n---\nHi {{.Input}}\n"})
    assert "front matter field 'nmae': unknown field" in manifest_error(directory)


def test_execution_mode_wasm_defaults_to_main_wasm(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"SKILL.md": "---\nname: W\n---\nFallback prompt\n",
                                       "manifest.yaml": "execution:\n  mode: wasm\n"})
    manifest = load_manifest(directory)[1]
    assert (manifest.kind, manifest.wasm, manifest.instructions) == ("wasm", "main.wasm", None)
    assert manifest.metadata["prompt"] == "Fallback prompt"


@pytest.mark.parametrize(("yaml_text", "field", "value"), [
    ("execution:\n  mode: native-go\n", "execution.mode", "'native-go'"),
    ("type: quantum\n", "type", "'quantum'"),
])
def test_unknown_mode_is_an_error_naming_field_and_value(tmp_path: Path, yaml_text: str,
                                                         field: str, value: str) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml": "id: x\n" + yaml_text})
    message = manifest_error(directory)
    assert f"field '{field}'" in message and value in message and "manifest.yaml" in message


def test_disagreeing_modes_are_an_error(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml":
                                       "id: x\ntype: declarative\nexecution:\n  mode: wasm\n"})
    assert "fields 'execution.mode', 'type' disagree on how the skill runs" in manifest_error(
        directory)


@pytest.mark.parametrize("permission", ["llm:delete", "fs:write", "network:all"])
def test_unknown_permission_is_an_error_naming_it(tmp_path: Path, permission: str) -> None:
    directory = yaml_skill(tmp_path, f"id: x\ntype: wasm\npermissions: [log:write, {permission}]\n")
    message = manifest_error(directory)
    assert "field 'permissions'" in message and f"unknown permission '{permission}'" in message


def test_host_permissions_map_onto_host_and_a_wasm_fetch_grants_no_network(
        tmp_path: Path) -> None:
    """A WASM skill's http_fetch is made by the supervisor (a host call): its process keeps no
    network, so code that got past wasmtime still cannot reach the host's."""
    directory = write(tmp_path / "s", {"manifest.yaml": (
        "id: x\ntype: wasm\npermissions: [llm:generate, http:fetch, kv:read, kv:write, "
        "log:write]\n")})
    permissions = load_manifest(directory)[1].permissions
    assert permissions.host == {"llm:generate", "http:fetch", "kv:read", "kv:write", "log:write"}
    assert permissions.network is False


@pytest.mark.parametrize(("duration", "seconds"), [
    ("1m30s", 90.0), ("500ms", 0.5), ("1.5h", 5400.0), ("2h45m", 9900.0), (".5s", 0.5),
    ("250us", 0.00025), ("1h0m0.5s", 3600.5)])
def test_go_durations(tmp_path: Path, duration: str, seconds: float) -> None:
    directory = yaml_skill(tmp_path, f"id: x\ntype: wasm\ntimeout: {duration}\n")
    assert load_manifest(directory)[1].limits.timeout == pytest.approx(seconds)


@pytest.mark.parametrize("duration", ['"10"', "5 s", "1m30x", "-5s", "0s", "soon", "s"])
def test_bad_duration_is_an_error_naming_field_and_value(tmp_path: Path, duration: str) -> None:
    directory = yaml_skill(tmp_path, f"id: x\ntype: wasm\ntimeout: {duration}\n")
    message = manifest_error(directory)
    assert "field 'timeout'" in message and "not a positive duration" in message
    assert duration.strip('"') in message


@pytest.mark.parametrize(("size", "megabytes"), [
    ("64MB", 64), ("512KiB", 1), ("1GiB", 1024), ("1.5G", 1536), ("3mb", 3), ("100M", 100)])
def test_sizes_with_units(tmp_path: Path, size: str, megabytes: int) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml":
                                       f"id: x\ntype: wasm\nlimits:\n  max_memory: {size}\n"})
    assert load_manifest(directory)[1].limits.memory_mb == megabytes


@pytest.mark.parametrize("size", ["64", "lots", "0MB", "64 parsecs"])
def test_bad_size_is_an_error_naming_field_and_value(tmp_path: Path, size: str) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml":
                                       f"id: x\ntype: wasm\nlimits:\n  max_memory: {size}\n"})
    message = manifest_error(directory)
    assert "field 'limits.max_memory'" in message and size in message


@pytest.mark.parametrize(("yaml_text", "field"), [
    ("resources:\n  max_gpu: 1\n", "resources.max_gpu"),
    ("limits:\n  max_disk: 1GB\n", "limits.max_disk"),
    ("execution:\n  mode: wasm\n  entry: x\n", "execution.entry"),
])
def test_unknown_nested_field_is_an_error_naming_it(tmp_path: Path, yaml_text: str,
                                                     field: str) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml": "id: x\ntype: wasm\n" + yaml_text})
    assert f"field '{field}': unknown field" in manifest_error(directory)


def test_unknown_top_level_key_is_kept_and_warned_about_as_openbotstack_ignores_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml":
                                       "id: x\ntype: wasm\ntimout: 5s\nrisk_level: clinical\n"})
    with caplog.at_level(logging.WARNING, logger="sandbox.manifest"):
        manifest = load_manifest(directory)[1]
    assert manifest.metadata == {"timout": "5s", "risk_level": "clinical"}
    assert manifest.limits.timeout == 30.0
    assert "timout" in caplog.text and "risk_level" not in caplog.text


def test_bad_risk_level_is_an_error_naming_it(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml": "id: x\ntype: wasm\nrisk_level: lethal\n"})
    message = manifest_error(directory)
    assert "field 'risk_level'" in message and "'lethal'" in message


@pytest.mark.parametrize(("files", "kind", "host"), [
    ({"manifest.yaml": "id: x\ntype: llm\nprompt: Summarize {{.Input}}\n"}, "declarative", set()),
    ({"manifest.yaml": "id: x\ntype: llm\n"}, "wasm", {"llm:generate"}),
])
def test_type_llm_is_declarative_with_a_prompt_and_llm_assisted_code_without(
        tmp_path: Path, files: dict[str, str], kind: str, host: set[str]) -> None:
    manifest = load_manifest(write(tmp_path / "s", files))[1]
    assert (manifest.kind, set(manifest.permissions.host)) == (kind, host)


def test_prompt_and_a_different_skill_md_body_is_an_error(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml": "id: x\ntype: declarative\nprompt: A\n",
                                       "SKILL.md": "B\n"})
    assert "field 'prompt'" in manifest_error(directory)


def test_declarative_without_a_prompt_is_an_error(tmp_path: Path) -> None:
    directory = write(tmp_path / "s", {"manifest.yaml": "id: x\nexecution:\n  mode: declarative\n"})
    assert "declarative skill needs a prompt" in manifest_error(directory)


# -- python and command skills in openbotstack's format run through Skill.from_dir --------------


def test_python_skill_in_openbotstack_format_loads_with_mapped_limits(tmp_path: Path) -> None:
    directory = write(tmp_path / "py", {
        "manifest.yaml": ("id: ns/py\nversion: 1.0.0\nexecution:\n  mode: native\n"
                          "timeout: 1m30s\nresources:\n  max_memory_mb: 64\n  max_cpu_ms: 250\n"
                          "permissions: [http:fetch]\nrisk_level: info\nrequires: [llm]\n"),
        "main.py": "def run(input):\n    return input\n"})
    skill = Skill.from_dir(directory)
    manifest = skill.manifest
    assert (manifest.kind, manifest.entrypoint) == ("python", "main:run")
    assert (manifest.limits.timeout, manifest.limits.memory_mb, manifest.limits.cpu_time) == (
        90.0, 64, 0.25)
    assert manifest.permissions.network is True
    assert manifest.metadata == {"risk_level": "info", "requires": ["llm"]}


def test_command_skill_in_openbotstack_format_loads(tmp_path: Path) -> None:
    directory = write(tmp_path / "cmd", {
        "manifest.yaml": "id: ns/cmd\ntype: command\ncommand: [./run.sh]\ntimeout: 2s\n",
        "run.sh": "#!/bin/sh\ncat\n"})
    (directory / "run.sh").chmod(0o755)
    manifest = Skill.from_dir(directory).manifest
    assert (manifest.kind, manifest.command, manifest.limits.timeout) == (
        "command", ["./run.sh"], 2.0)


def test_native_manifest_accepts_a_metadata_table(tmp_path: Path) -> None:
    directory = write(tmp_path / "n", {
        "skill.toml": 'id = "n"\nentrypoint = "main:run"\n[metadata]\ntags = ["a"]\n',
        "main.py": "def run(input):\n    return input\n"})
    metadata: dict[str, Any] = Skill.from_dir(directory).manifest.metadata
    assert metadata == {"tags": ["a"]}
