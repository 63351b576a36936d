"""Skill manifests: `skill.toml` (native) and openbotstack's `manifest.yaml`, as one pydantic model.

Both formats load into `SkillManifest`; every error names the file and the field, so the person
who wrote the manifest can fix it without reading this code.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.errors import SkillLoadError
from sandbox.validation import describe

NATIVE_MANIFEST = "skill.toml"
OPENBOTSTACK_MANIFEST = "manifest.yaml"

#: openbotstack skill ids: `namespace/name` or a bare name.
SKILL_ID_PATTERN = re.compile(r"^[a-z0-9_.-]+(/[a-z0-9_.-]+)?$")
_ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_DURATION_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


#: How a skill runs: a Python entrypoint or an executable in a forked child, a WebAssembly
#: module inside one, or a prompt sent to the operator's LLM provider.
SkillKind = Literal["python", "command", "wasm", "declarative"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Strict):
    """Per-skill ceilings. Defaults follow openbotstack: 30 s wall, 5 s CPU, 128 MB."""

    timeout: float = Field(default=30.0, gt=0, description="wall-clock seconds")
    cpu_time: float = Field(default=5.0, gt=0, description="CPU seconds, whole process tree")
    memory_mb: int = Field(default=128, gt=0, description="memory above the worker's baseline")
    max_processes: int = Field(default=32, gt=0, description="processes and threads in the tree")
    max_output_bytes: int = Field(default=1 << 20, gt=0, description="result, stdout, stderr each")
    max_file_bytes: int = Field(default=16 << 20, gt=0,
                                description="largest file the skill may write")
    max_open_files: int = Field(default=256, ge=16)
    cpus: float | None = Field(default=None, gt=0, le=4096,
                               description="CPU share of the whole tree, in CPUs (1.5: one and "
                                           "a half); cgroup v2 `cpu.max`, not enforced on v1")


class Permissions(_Strict):
    network: bool = False
    env: dict[str, str] = Field(default_factory=dict)
    #: openbotstack host capabilities a WASM or declarative skill may call, by openbotstack's
    #: names (`llm:generate`, `http:fetch`, `kv:read`, `kv:write`, `log:write`).
    host: frozenset[str] = Field(default_factory=frozenset)

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for name in env:
            if not name or "=" in name or "\0" in name:
                raise ValueError(f"invalid environment variable name {name!r}")
        return env


class SkillManifest(_Strict):
    id: str
    version: str = "0.0.0"
    name: str = ""
    description: str = ""
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    entrypoint: str | None = None
    command: list[str] | None = None
    #: A WebAssembly module (WASI command or openbotstack reactor), relative to the skill.
    wasm: str | None = None
    #: A declarative skill's prompt template (SKILL.md's body; `{{.Input}}` is the input).
    instructions: str | None = None
    isolation: Literal["fork", "spawn"] = "fork"
    preload: list[str] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    permissions: Permissions = Field(default_factory=Permissions)

    @field_validator("id")
    @classmethod
    def _check_id(cls, value: str) -> str:
        if not SKILL_ID_PATTERN.match(value):
            raise ValueError(
                f"{value!r} is not a skill id: use lowercase letters, digits and '_.-', "
                "optionally one '/' (e.g. 'core/text.wordcount')"
            )
        return value

    @field_validator("entrypoint")
    @classmethod
    def _check_entrypoint(cls, value: str | None) -> str | None:
        if value is not None and not _ENTRYPOINT_PATTERN.match(value):
            raise ValueError(f"{value!r} is not of the form 'module:function'")
        return value

    @field_validator("preload")
    @classmethod
    def _check_preload(cls, value: list[str]) -> list[str]:
        for module in value:
            if not re.match(r"^[A-Za-z_][\w.]*$", module):
                raise ValueError(f"{module!r} is not a module name")
        return value

    @model_validator(mode="after")
    def _one_way_to_run(self) -> SkillManifest:
        ways = [self.entrypoint, self.command, self.wasm, self.instructions]
        if sum(way is not None for way in ways) != 1:
            raise ValueError("give exactly one of 'entrypoint' (Python), 'command' (executable), "
                             "'wasm' (WebAssembly module) or 'instructions' (declarative)")
        if self.isolation == "spawn" and self.entrypoint is None and self.command is None:
            raise ValueError("'isolation = \"spawn\"' applies to Python entrypoints only")
        if self.command is not None:
            if not self.command or not self.command[0]:
                raise ValueError("'command' needs at least the program to run")
            if self.isolation == "spawn":
                raise ValueError("'isolation = \"spawn\"' applies to Python entrypoints only; "
                                 "a command already runs as a fresh process")
        return self

    @property
    def kind(self) -> SkillKind:
        if self.entrypoint is not None:
            return "python"
        if self.command is not None:
            return "command"
        return "wasm" if self.wasm is not None else "declarative"


def _validate(path: Path, data: Any) -> SkillManifest:
    if not isinstance(data, dict):
        raise SkillLoadError(f"{path}: the manifest must be a table/mapping, "
                             f"got {type(data).__name__}")
    try:
        return SkillManifest.model_validate(data)
    except ValidationError as exc:
        raise SkillLoadError(describe(exc, str(path), "(manifest)")) from None


def load_native(path: Path) -> SkillManifest:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise SkillLoadError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SkillLoadError(f"{path}: nested too deeply to parse") from None
    except OSError as exc:
        raise SkillLoadError(f"{path}: cannot read: {exc.strerror}") from None
    return _validate(path, data)


def parse_duration(value: Any, path: Path, field: str) -> float:
    """openbotstack durations: `"60s"`, `"500ms"`, `"2m"`, or a number of seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    match = _DURATION_PATTERN.match(str(value)) if isinstance(value, str) else None
    if not match or float(match.group(1)) <= 0:
        raise SkillLoadError(f"{path}: field '{field}': {value!r} is not a positive duration "
                             "such as '60s', '500ms' or '2m'")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


_SUPPORTED_RUNTIMES = {None, "python", "py", "command", "native"}


def load_openbotstack(path: Path) -> SkillManifest:
    """Map openbotstack's `manifest.yaml` onto the native model."""
    import yaml  # only openbotstack's manifest.yaml needs it

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SkillLoadError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SkillLoadError(f"{path}: nested too deeply to parse") from None
    except OSError as exc:
        raise SkillLoadError(f"{path}: cannot read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise SkillLoadError(f"{path}: the manifest must be a mapping")
    for key in ("runtime", "type", "execution_mode", "mode"):
        mode = data.get(key)
        if isinstance(mode, str) and mode.lower() not in _SUPPORTED_RUNTIMES:
            raise SkillLoadError(
                f"{path}: field '{key}': execution mode {mode!r} is not supported here; this "
                "sandbox runs Python entrypoints and executables ('command')"
            )
    native: dict[str, Any] = {
        key: data[key]
        for key in ("id", "version", "name", "description", "input_schema", "output_schema",
                    "entrypoint", "command", "isolation", "preload")
        if data.get(key) is not None
    }
    if "version" in native:
        native["version"] = str(native["version"])
    if native.get("entrypoint") is None and native.get("command") is None:
        default = path.parent / "main.py"
        if not default.is_file():
            raise SkillLoadError(f"{path}: field 'entrypoint': missing, and there is no main.py "
                                 "to default to ('main:run')")
        native["entrypoint"] = "main:run"
    limits: dict[str, Any] = {}
    if "timeout" in data:
        limits["timeout"] = parse_duration(data["timeout"], path, "timeout")
    resources = data.get("resources") or {}
    if not isinstance(resources, dict):
        raise SkillLoadError(f"{path}: field 'resources': must be a mapping")
    if "max_memory_mb" in resources:
        limits["memory_mb"] = resources["max_memory_mb"]
    if "max_cpu_ms" in resources:
        cpu_ms = resources["max_cpu_ms"]
        if not isinstance(cpu_ms, int | float) or isinstance(cpu_ms, bool) or cpu_ms <= 0:
            raise SkillLoadError(f"{path}: field 'resources.max_cpu_ms': {cpu_ms!r} is not a "
                                 "positive number of milliseconds")
        limits["cpu_time"] = cpu_ms / 1000.0
    native["limits"] = limits
    native["permissions"] = _openbotstack_permissions(data.get("permissions"), path)
    return _validate(path, native)


def _openbotstack_permissions(value: Any, path: Path) -> dict[str, Any]:
    """openbotstack lists permissions as names (`[network]`) or maps them (`network: true`)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return {"network": bool(value.get("network", False)), "env": value.get("env") or {}}
    if isinstance(value, list):
        names = {str(item).lower() for item in value}
        return {"network": bool(names & {"network", "net", "http", "internet"})}
    raise SkillLoadError(f"{path}: field 'permissions': must be a list or a mapping")


def load_manifest(skill_dir: Path) -> tuple[Path, SkillManifest]:
    """The manifest of a skill directory, native first."""
    native = skill_dir / NATIVE_MANIFEST
    if native.is_file():
        return native, load_native(native)
    legacy = skill_dir / OPENBOTSTACK_MANIFEST
    if legacy.is_file():
        return legacy, load_openbotstack(legacy)
    raise SkillLoadError(f"{skill_dir}: no {NATIVE_MANIFEST} or {OPENBOTSTACK_MANIFEST} found")
