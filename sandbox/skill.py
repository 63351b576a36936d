"""A loaded skill: its directory, its validated manifest and its compiled JSON Schemas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import msgspec

from sandbox.errors import SkillLoadError
from sandbox.manifest import NATIVE_MANIFEST, OPENBOTSTACK_MANIFEST, SkillManifest, load_manifest
from worker.protocol import SkillCode


def _compile_schema(schema: dict[str, Any] | None, path: Path, field_name: str) -> Any:
    if schema is None:
        return None
    validator_class = jsonschema.validators.validator_for(schema)
    try:
        validator_class.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SkillLoadError(f"{path}: field '{field_name}': not a valid JSON Schema: "
                             f"{exc.message}") from None
    return validator_class(schema)


def _describe(error: jsonschema.ValidationError) -> str:
    where = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}"
                          for p in error.absolute_path)
    return f"at {where}: {error.message}"


@dataclass(frozen=True)
class Skill:
    """A skill ready to load into a `Sandbox`. Build one with `from_dir` or `discover`."""

    path: Path
    manifest: SkillManifest
    manifest_path: Path
    _input_validator: Any = field(default=None, repr=False, compare=False)
    _output_validator: Any = field(default=None, repr=False, compare=False)

    @property
    def id(self) -> str:
        return self.manifest.id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Skill:
        skill_dir = Path(path).resolve()
        if not skill_dir.is_dir():
            raise SkillLoadError(f"{skill_dir}: not a directory")
        manifest_path, manifest = load_manifest(skill_dir)
        if manifest.entrypoint is not None:
            module = manifest.entrypoint.partition(":")[0].split(".")[0]
            if not ((skill_dir / f"{module}.py").is_file() or (skill_dir / module).is_dir()):
                raise SkillLoadError(f"{manifest_path}: field 'entrypoint': no module "
                                     f"{module!r} in {skill_dir}")
        elif manifest.command is not None and "/" in manifest.command[0]:
            program = (skill_dir / manifest.command[0]).resolve()
            if not program.is_file() or not os.access(program, os.X_OK):
                raise SkillLoadError(f"{manifest_path}: field 'command': {program} is not an "
                                     "executable file")
        return cls(
            path=skill_dir,
            manifest=manifest,
            manifest_path=manifest_path,
            _input_validator=_compile_schema(manifest.input_schema, manifest_path,
                                             "input_schema"),
            _output_validator=_compile_schema(manifest.output_schema, manifest_path,
                                              "output_schema"),
        )

    @classmethod
    def discover(cls, root: str | os.PathLike[str]) -> list[Skill]:
        """Every skill under `root` (any depth), sorted by id; duplicate ids are an error."""
        found: dict[str, Skill] = {}
        for skill_dir in _skill_dirs(Path(root)):
            skill = cls.from_dir(skill_dir)
            if skill.id in found:
                raise SkillLoadError(f"{skill.manifest_path}: field 'id': {skill.id!r} is also "
                                     f"the id of {found[skill.id].manifest_path}")
            found[skill.id] = skill
        return [found[key] for key in sorted(found)]

    def input_problem(self, input_bytes: bytes) -> str | None:
        """Why `input_bytes` is not acceptable input for this skill, or None."""
        try:
            data = msgspec.json.decode(input_bytes)
        except msgspec.DecodeError as exc:
            return f"input is not JSON: {exc}"
        if self._input_validator is None:
            return None
        error = jsonschema.exceptions.best_match(self._input_validator.iter_errors(data))
        return None if error is None else f"input does not match input_schema {_describe(error)}"

    def output_problem(self, data: Any) -> str | None:
        if self._output_validator is None:
            return None
        error = jsonschema.exceptions.best_match(self._output_validator.iter_errors(data))
        return None if error is None else f"output does not match output_schema {_describe(error)}"

    @property
    def has_output_schema(self) -> bool:
        return self._output_validator is not None

    def code(self) -> SkillCode:
        manifest = self.manifest
        return SkillCode(
            skill_dir=str(self.path),
            kind=manifest.kind,
            entrypoint=manifest.entrypoint or "",
            command=list(manifest.command or []),
            spawn=manifest.isolation == "spawn",
        )


def _skill_dirs(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        raise SkillLoadError(f"{root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if NATIVE_MANIFEST in filenames or OPENBOTSTACK_MANIFEST in filenames:
            dirnames[:] = []  # a skill's own subfolders are its business
            yield Path(dirpath)
