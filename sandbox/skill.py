"""A loaded skill: its directory, its validated manifest and its compiled JSON Schemas."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sandbox import jsonbounds
from sandbox.errors import SkillLoadError
from sandbox.manifest import (
    MANIFEST_FILES,
    SkillManifest,
    go_sources,
    load_manifest,
    wasm_module_problem,
)
from worker.protocol import SkillCode

#: What an execution of a WASM skill may use beyond its module's linear memory: the store,
#: instance and WASI context, wasmtime's thread, the Python heap the child touches (measured:
#: 4-6 MB charged above the zygote for openbotstack's Go modules), with room to spare.
WASM_RUNTIME_MB = 32

if TYPE_CHECKING:  # jsonschema is loaded when a skill has a schema, not with this module
    from sandbox.schema import BoundedSchema


def _compile_schema(schema: dict[str, Any] | None, path: Path,
                    field_name: str) -> BoundedSchema | None:
    if schema is None:
        return None
    from sandbox.schema import SchemaProblem, compile_schema

    try:
        return compile_schema(schema)
    except SchemaProblem as exc:
        raise SkillLoadError(f"{path}: field '{field_name}': {exc}") from None


def _check(validator: BoundedSchema, data: Any, what: str) -> str:
    """Why `data` fails the skill author's schema, or "". Never raises: a schema that cannot
    be evaluated within its bounds fails the data (the schema is as untrusted as the skill)."""
    from sandbox.schema import SchemaBudgetExceeded  # loaded already: `validator` is one

    try:
        problem = validator.check(data)
    except SchemaBudgetExceeded as exc:
        return f"{what}_schema check stopped: {exc}"
    except Exception as exc:  # noqa: BLE001 - any failure of the check is a failed check
        return f"{what}_schema check failed: {type(exc).__name__}: {str(exc)[:200]}"
    return f"{what} does not match {what}_schema {problem}" if problem else ""


@dataclass(frozen=True)
class Skill:
    """A skill ready to load into a `Sandbox`. Build one with `from_dir` or `discover`."""

    path: Path
    manifest: SkillManifest
    manifest_path: Path
    _input_validator: BoundedSchema | None = field(default=None, repr=False, compare=False)
    _output_validator: BoundedSchema | None = field(default=None, repr=False, compare=False)
    #: Why the skill loads but cannot run (""/runnable): a WASM skill whose directory holds Go
    #: sources and no compiled module. Its executions fail at once saying so; no zygote starts.
    not_runnable: str = ""

    @property
    def id(self) -> str:
        return self.manifest.id

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> Skill:
        skill_dir = Path(path).resolve()
        if not skill_dir.is_dir():
            raise SkillLoadError(f"{skill_dir}: not a directory")
        manifest_path, manifest = load_manifest(skill_dir)
        not_runnable = ""
        if manifest.entrypoint is not None:
            module = manifest.entrypoint.partition(":")[0].split(".")[0]
            if not ((skill_dir / f"{module}.py").is_file() or (skill_dir / module).is_dir()):
                raise SkillLoadError(f"{manifest_path}: field 'entrypoint': no module "
                                     f"{module!r} in {skill_dir}")
            _check_inside(skill_dir, manifest_path, "entrypoint",
                          skill_dir / (f"{module}.py" if (skill_dir / f"{module}.py").is_file()
                                       else module))
        elif (problem := wasm_module_problem(skill_dir, manifest)) is not None:
            if not go_sources(skill_dir):  # nothing to build it from: a broken manifest
                raise SkillLoadError(f"{manifest_path}: {problem}")
            not_runnable = f"{manifest_path}: {problem}"
        elif manifest.wasm is not None:
            _check_wasm(skill_dir, manifest_path, manifest.wasm)
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
            not_runnable=not_runnable,
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
        """Why `input_bytes` is not acceptable input for this skill, or None. Bounded in
        depth and work like the output check: the schema is the skill author's."""
        data, problem = jsonbounds.decode(input_bytes)
        if problem:
            return f"input is {problem}"
        if self._input_validator is None:
            return None
        return _check(self._input_validator, data, "input") or None

    def output_problem(self, data: Any) -> str | None:
        """Why decoded output `data` (from `jsonbounds.decode`) fails the output schema."""
        if self._output_validator is None:
            return None
        return _check(self._output_validator, data, "output") or None

    def code(self) -> SkillCode:
        manifest = self.manifest
        return SkillCode(
            skill_dir=str(self.path),
            kind=manifest.kind,
            entrypoint=manifest.entrypoint or "",
            command=list(manifest.command or []),
            spawn=manifest.isolation == "spawn",
            wasm=str((self.path / manifest.wasm).resolve()) if manifest.wasm else "",
            host=sorted(manifest.permissions.host),
            wasm_memory_mb=manifest.limits.memory_mb if manifest.wasm else 0,
        )

    @property
    def process_memory_mb(self) -> int:
        """The memory limit of one execution's process tree (RLIMIT_DATA above the zygote's
        baseline, the cgroup): the manifest's memory_mb, plus the WASM runtime's own share for
        a WASM skill, whose memory_mb caps the module's linear memory (openbotstack's meaning:
        tax-calculator's 8 MB is exactly its linear memory's peak)."""
        extra = WASM_RUNTIME_MB if self.manifest.wasm is not None else 0
        return self.manifest.limits.memory_mb + extra


def _check_inside(skill_dir: Path, manifest_path: Path, field: str, path: Path) -> None:
    """`path` resolves inside the skill's directory: the zygote compiles the entrypoint as the
    supervisor's user before its layers, so a symlink out would have it read a host file on
    the skill's behalf (and echo it back in a compiler or NameError message)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(skill_dir):
        raise SkillLoadError(f"{manifest_path}: field {field!r}: {path.name!r} resolves to "
                             f"{resolved}, outside the skill's directory {skill_dir}")


def _check_wasm(skill_dir: Path, manifest_path: Path, module: str) -> None:
    """The module file exists and the runtime is installed: said at load, not at first run.
    The zygote compiles the module (seconds of CPU for a Go module), so a module that does
    not compile fails the skill's zygote boot as the skill's own fault."""
    path = (skill_dir / module).resolve()
    if not path.is_relative_to(skill_dir):
        # The zygote reads it before its layers, as the supervisor's user: a manifest (the
        # skill author's) must not make it open host files, devices or FIFOs.
        raise SkillLoadError(f"{manifest_path}: field 'wasm': {module!r} resolves to {path}, "
                             f"outside the skill's directory {skill_dir}")
    if not path.is_file():
        raise SkillLoadError(f"{manifest_path}: field 'wasm': {path} is not a file")
    from worker.wasm import RUNTIME_PACKAGE, runtime_available

    if not runtime_available():
        raise SkillLoadError(f"{manifest_path}: field 'wasm': WASM skills need the Python "
                             f"package {RUNTIME_PACKAGE!r}, which is not installed "
                             "(pip install 'skill-sandbox[wasm]')")


def _skill_dirs(root: Path) -> Iterator[Path]:
    if not root.is_dir():
        raise SkillLoadError(f"{root}: not a directory")
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if any(name in filenames for name in MANIFEST_FILES):
            dirnames[:] = []  # a skill's own subfolders are its business
            yield Path(dirpath)
