"""Manifests: skill.toml and openbotstack's manifest.yaml load into one model, and every mistake
is a `SkillLoadError` naming the file and the field at fault."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandbox import Skill, SkillLoadError

EXAMPLES = Path(__file__).resolve().parent.parent / "skills_examples"

RUN = "def run(input):\n    return input\n"


def write_skill(directory: Path, manifest: str, *, name: str = "skill.toml",
                files: dict[str, str] | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(manifest)
    for filename, text in (files if files is not None else {"main.py": RUN}).items():
        (directory / filename).write_text(text)
    return directory


def load_error(directory: Path) -> str:
    with pytest.raises(SkillLoadError) as caught:
        Skill.from_dir(directory)
    return str(caught.value)


# -- skill.toml ---------------------------------------------------------------------------------


def test_minimal_manifest_gets_openbotstack_default_limits(tmp_path: Path) -> None:
    skill = Skill.from_dir(write_skill(tmp_path / "s", 'id = "ns/ok"\nentrypoint = "main:run"\n'))
    assert skill.id == "ns/ok"
    limits = skill.manifest.limits
    assert (limits.timeout, limits.cpu_time, limits.memory_mb) == (30.0, 5.0, 128)
    assert skill.manifest.isolation == "fork"
    assert skill.manifest.permissions.network is False
    assert skill.manifest.kind == "python"


@pytest.mark.parametrize("skill_id", ["core/text.wordcount", "echo", "a-b_c.d/e-f_1.2"])
def test_skill_ids_in_openbotstack_style_are_accepted(tmp_path: Path, skill_id: str) -> None:
    directory = write_skill(tmp_path / "s", f'id = "{skill_id}"\nentrypoint = "main:run"\n')
    assert Skill.from_dir(directory).id == skill_id


@pytest.mark.parametrize("skill_id", ["Core/Text", "a/b/c", "", "has space", "/lead", "trail/"])
def test_bad_id_is_an_error_naming_file_and_field(tmp_path: Path, skill_id: str) -> None:
    directory = write_skill(tmp_path / "s", f'id = "{skill_id}"\nentrypoint = "main:run"\n')
    message = load_error(directory)
    assert str(directory / "skill.toml") in message
    assert "field 'id'" in message
    assert "not a skill id" in message


def test_both_entrypoint_and_command_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s",
                            'id = "x"\nentrypoint = "main:run"\ncommand = ["/bin/cat"]\n')
    message = load_error(directory)
    assert str(directory / "skill.toml") in message
    assert "exactly one of 'entrypoint'" in message and "'command'" in message


def test_neither_entrypoint_nor_command_is_an_error(tmp_path: Path) -> None:
    message = load_error(write_skill(tmp_path / "s", 'id = "x"\n'))
    assert "skill.toml" in message
    assert "exactly one of 'entrypoint'" in message


@pytest.mark.parametrize(("manifest", "kind"), [
    ('wasm = "main.wasm"\n', "wasm"),
    ('instructions = "Summarize {{.Input}}"\n', "declarative"),
])
def test_wasm_and_declarative_manifests_name_their_kind(tmp_path: Path, manifest: str,
                                                        kind: str) -> None:
    from sandbox.manifest import load_native

    directory = write_skill(tmp_path / "s", 'id = "x"\n' + manifest, files={})
    assert load_native(directory / "skill.toml").kind == kind


def test_wasm_with_an_entrypoint_is_an_error(tmp_path: Path) -> None:
    message = load_error(write_skill(tmp_path / "s",
                                     'id = "x"\nentrypoint = "main:run"\nwasm = "m.wasm"\n'))
    assert "exactly one of 'entrypoint'" in message and "'wasm'" in message


def test_invalid_toml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = main:run\n')
    message = load_error(directory)
    assert str(directory / "skill.toml") in message
    assert "not valid TOML" in message


def test_invalid_input_schema_is_an_error_naming_the_field(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main:run"\n'
                                            '[input_schema]\ntype = "no-such-type"\n')
    message = load_error(directory)
    assert str(directory / "skill.toml") in message
    assert "field 'input_schema'" in message
    assert "not a valid JSON Schema" in message


def test_invalid_output_schema_is_an_error_naming_the_field(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main:run"\n'
                                            '[output_schema]\nrequired = "not-a-list"\n')
    assert "field 'output_schema'" in load_error(directory)


def test_unknown_manifest_field_is_named(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main:run"\ncolour = 1\n')
    assert "field 'colour'" in load_error(directory)


def test_bad_limit_value_names_the_nested_field(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main:run"\n'
                                            '[limits]\ntimeout = -1\n')
    message = load_error(directory)
    assert "field 'limits.timeout'" in message
    assert "greater than 0" in message


def test_entrypoint_not_module_colon_function_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main.run"\n')
    message = load_error(directory)
    assert "field 'entrypoint'" in message and "module:function" in message


def test_entrypoint_module_missing_from_directory_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "nowhere:run"\n')
    message = load_error(directory)
    assert "field 'entrypoint'" in message and "'nowhere'" in message


def test_command_that_is_not_executable_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\ncommand = ["./prog.sh"]\n',
                            files={"prog.sh": "#!/bin/sh\n"})
    message = load_error(directory)
    assert "field 'command'" in message and "not an executable" in message


def test_spawn_isolation_with_a_command_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s",
                            'id = "x"\ncommand = ["/bin/cat"]\nisolation = "spawn"\n')
    assert "'isolation = \"spawn\"' applies to Python entrypoints only" in load_error(directory)


def test_unknown_isolation_mode_is_named(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s",
                            'id = "x"\nentrypoint = "main:run"\nisolation = "vm"\n')
    assert "field 'isolation'" in load_error(directory)


def test_bad_environment_variable_name_is_named(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "x"\nentrypoint = "main:run"\n'
                                            '[permissions]\nenv = { "A=B" = "1" }\n')
    message = load_error(directory)
    assert "field 'permissions.env'" in message and "'A=B'" in message


def test_directory_without_manifest_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    message = load_error(tmp_path / "empty")
    assert "no skill.toml, manifest.yaml or SKILL.md" in message


def test_missing_directory_is_an_error(tmp_path: Path) -> None:
    assert "not a directory" in load_error(tmp_path / "absent")


# -- openbotstack manifest.yaml -----------------------------------------------------------------

OPENBOTSTACK = """\
id: core/text.summarize
version: 1.2
name: Summarize
description: Summarizes text
permissions: [network]
timeout: "60s"
resources:
  max_memory_mb: 256
  max_cpu_ms: 1500
input_schema:
  type: object
  required: [text]
output_schema:
  type: object
"""


def test_openbotstack_manifest_maps_onto_the_native_model(tmp_path: Path) -> None:
    skill = Skill.from_dir(write_skill(tmp_path / "s", OPENBOTSTACK, name="manifest.yaml"))
    manifest = skill.manifest
    assert skill.id == "core/text.summarize"
    assert manifest.version == "1.2"
    assert manifest.name == "Summarize"
    assert manifest.entrypoint == "main:run"  # the default when main.py exists
    assert manifest.limits.timeout == 60.0
    assert manifest.limits.memory_mb == 256
    assert manifest.limits.cpu_time == 1.5
    assert manifest.permissions.network is True
    assert skill.input_problem(b'{"text": "x"}') is None
    assert "'text' is a required property" in (skill.input_problem(b"{}") or "")
    assert skill.manifest_path.name == "manifest.yaml"


@pytest.mark.parametrize(("timeout", "seconds"),
                         [('"60s"', 60.0), ('"500ms"', 0.5), ('"2m"', 120.0), ("45", 45.0)])
def test_openbotstack_durations(tmp_path: Path, timeout: str, seconds: float) -> None:
    directory = write_skill(tmp_path / "s", f"id: x\ntimeout: {timeout}\n", name="manifest.yaml")
    assert Skill.from_dir(directory).manifest.limits.timeout == seconds


def test_openbotstack_bad_duration_names_timeout(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id: x\ntimeout: "soon"\n', name="manifest.yaml")
    message = load_error(directory)
    assert str(directory / "manifest.yaml") in message
    assert "field 'timeout'" in message and "'soon'" in message


def test_openbotstack_bad_cpu_ms_names_the_resource_field(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", "id: x\nresources:\n  max_cpu_ms: -5\n",
                            name="manifest.yaml")
    assert "field 'resources.max_cpu_ms'" in load_error(directory)


def test_openbotstack_bad_memory_names_the_limit_field(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", "id: x\nresources:\n  max_memory_mb: 0\n",
                            name="manifest.yaml")
    assert "field 'limits.memory_mb'" in load_error(directory)


def test_openbotstack_unknown_runtime_is_a_clear_load_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", "id: x\nruntime: jvm\n", name="manifest.yaml")
    message = load_error(directory)
    assert str(directory / "manifest.yaml") in message
    assert "field 'runtime'" in message and "'jvm' is not supported" in message


def test_openbotstack_without_entrypoint_or_main_py_is_an_error(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", "id: x\n", name="manifest.yaml", files={})
    message = load_error(directory)
    assert "field 'entrypoint'" in message and "main.py" in message


def test_openbotstack_bad_yaml_is_an_error_naming_the_file(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", "id: [unclosed\n", name="manifest.yaml")
    message = load_error(directory)
    assert "manifest.yaml" in message and "not valid YAML" in message


def test_native_manifest_wins_over_openbotstack(tmp_path: Path) -> None:
    directory = write_skill(tmp_path / "s", 'id = "native"\nentrypoint = "main:run"\n')
    (directory / "manifest.yaml").write_text("id: legacy\n")
    assert Skill.from_dir(directory).id == "native"


# -- discover -----------------------------------------------------------------------------------


def test_discover_finds_nested_skills_sorted_by_id(tmp_path: Path) -> None:
    write_skill(tmp_path / "b", 'id = "ns/b"\nentrypoint = "main:run"\n')
    write_skill(tmp_path / "group" / "a", 'id = "ns/a"\nentrypoint = "main:run"\n')
    write_skill(tmp_path / "group" / "c", "id: ns/c\n", name="manifest.yaml")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "skill.toml").write_text("this is not toml = = =")
    assert [skill.id for skill in Skill.discover(tmp_path)] == ["ns/a", "ns/b", "ns/c"]


def test_discover_rejects_duplicate_ids_naming_both_files(tmp_path: Path) -> None:
    first = write_skill(tmp_path / "one", 'id = "ns/same"\nentrypoint = "main:run"\n')
    second = write_skill(tmp_path / "two", "id: ns/same\n", name="manifest.yaml")
    with pytest.raises(SkillLoadError) as caught:
        Skill.discover(tmp_path)
    message = str(caught.value)
    assert "field 'id'" in message and "'ns/same'" in message
    assert str(first / "skill.toml") in message and str(second / "manifest.yaml") in message


def test_discover_reports_the_broken_skill(tmp_path: Path) -> None:
    write_skill(tmp_path / "good", 'id = "good"\nentrypoint = "main:run"\n')
    broken = write_skill(tmp_path / "broken", 'id = "BAD"\nentrypoint = "main:run"\n')
    with pytest.raises(SkillLoadError, match="field 'id'") as caught:
        Skill.discover(tmp_path)
    assert str(broken / "skill.toml") in str(caught.value)


def test_discover_of_a_missing_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SkillLoadError, match="not a directory"):
        Skill.discover(tmp_path / "nope")


def test_every_example_skill_loads_and_has_a_json_example() -> None:
    skills = Skill.discover(EXAMPLES)
    ids = {skill.id for skill in skills}
    assert {"examples/echo", "text/word_count", "data/json_transform", "math/fib",
            "examples/sleepy", "text/token_counter", "units/temperature", "core/text.reverse",
            "unix/wc", "examples/spawn_info", "misbehaving/cpu_hog", "misbehaving/memory_hog",
            "misbehaving/fork_bomb", "misbehaving/output_flood"} <= ids
    for skill in skills:
        assert skill.input_problem((skill.path / "example.json").read_bytes()) is None, skill.id
    kinds = {skill.id: (skill.manifest.kind, skill.manifest.isolation) for skill in skills}
    assert kinds["unix/wc"] == ("command", "fork")
    assert kinds["examples/spawn_info"] == ("python", "spawn")


def test_cpu_share_is_a_positive_number_of_cpus(tmp_path: Path) -> None:
    base = 'id = "t/cpus"\nentrypoint = "main:run"\n[limits]\n'
    skill = Skill.from_dir(write_skill(tmp_path / "ok", base + "cpus = 1.5\n"))
    assert skill.manifest.limits.cpus == 1.5
    assert Skill.from_dir(write_skill(tmp_path / "none", base)).manifest.limits.cpus is None
    error = load_error(write_skill(tmp_path / "zero", base + "cpus = 0\n"))
    assert "skill.toml" in error and "limits.cpus" in error
