"""Skill manifests: `skill.toml` (native) and openbotstack's `manifest.yaml` / `SKILL.md`, as one
pydantic model.

Both formats load into `SkillManifest`; every error names the file and the field, so the person
who wrote the manifest can fix it without reading this code.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sandbox.errors import SkillLoadError
from sandbox.validation import describe

NATIVE_MANIFEST = "skill.toml"
OPENBOTSTACK_MANIFEST = "manifest.yaml"
#: openbotstack's current skill file: YAML front matter (name, description) and a prompt body.
SKILL_MD = "SKILL.md"
#: A directory holding any of these is a skill directory.
MANIFEST_FILES = (NATIVE_MANIFEST, OPENBOTSTACK_MANIFEST, SKILL_MD)

logger = logging.getLogger(__name__)

#: openbotstack skill ids: `namespace/name` or a bare name.
SKILL_ID_PATTERN = re.compile(r"^[a-z0-9_.-]+(/[a-z0-9_.-]+)?$")
_ENTRYPOINT_PATTERN = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


#: How a skill runs: a Python entrypoint or an executable in a forked child, a WebAssembly
#: module inside one, or a prompt sent to the operator's LLM provider.
SkillKind = Literal["python", "command", "wasm", "declarative"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsConfig(_Strict):
    """Per-skill ceilings. Defaults follow openbotstack: 30 s wall, 5 s CPU, 128 MB."""

    #: Finite only: TOML's `inf` and YAML's `.inf` are floats too, and no deadline is infinite.
    timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False,
                           description="wall-clock seconds")
    cpu_time: float = Field(default=5.0, gt=0, allow_inf_nan=False,
                            description="CPU seconds, whole process tree")
    # Upper bounds the kernel takes (cgroup files and rlimits hold 64-bit counts, pid_max is
    # at most 2**22, nr_open 2**20): past them a write fails with EINVAL at execution time,
    # and that OSError escaped `execute` instead of a load error naming the field.
    memory_mb: int = Field(default=128, gt=0, le=1 << 40,
                           description="memory above the worker's baseline")
    max_processes: int = Field(default=32, gt=0, le=1 << 22,
                               description="processes and threads in the tree")
    max_output_bytes: int = Field(default=1 << 20, gt=0, le=1 << 40,
                                  description="result, stdout, stderr each")
    max_file_bytes: int = Field(default=16 << 20, gt=0, le=1 << 50,
                                description="largest file the skill may write")
    max_open_files: int = Field(default=256, ge=16, le=1 << 20)
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
    #: Running it twice with the same input does no harm: a fleet client may then resend a
    #: request whose worker died mid-run (`sandbox.fleet`); otherwise it is answered as failed.
    idempotent: bool = False
    preload: list[str] = Field(default_factory=list)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    permissions: Permissions = Field(default_factory=Permissions)
    #: What describes the skill without changing how it runs (openbotstack's `triggers`,
    #: `requires`, `risk_level`, `tags`, … and keys openbotstack itself ignores): kept, shown,
    #: never acted on.
    metadata: dict[str, Any] = Field(default_factory=dict)

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


#: Largest manifest file (skill.toml, manifest.yaml, SKILL.md) read: openbotstack's are a few KB
#: (a SKILL.md body is a prompt), none needs a megabyte; the supervisor and the daemon's
#: watcher read them whole, as the supervisor's user.
MAX_MANIFEST_BYTES = 1 << 20


def read_manifest(path: Path) -> str:
    """The text of the manifest file `path` of a skill directory (`path.parent`), read only if
    it is a regular file that really lies in that directory and holds at most
    `MAX_MANIFEST_BYTES`. The supervisor reads it as its own user (root), and what it read
    goes back to whoever loads the skill — its fields (openbotstack's unknown keys are kept as
    metadata, SKILL.md's body is the prompt sent to the LLM provider) and its errors (the
    daemon's /v1/skills): a symlink out of the directory would read a host file for the
    skill's author, a FIFO would stall the loader, a sparse gigabyte fill its memory."""
    try:  # O_NONBLOCK: a FIFO swapped in after the is_file() check does not block the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise SkillLoadError(f"{path}: cannot read: {exc.strerror}") from None
    with open(fd, "rb") as file:
        directory = path.parent.resolve()
        try:  # where the opened file is, whatever was swapped in since a check by name
            where = Path(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            where = path.resolve()
        if not where.is_relative_to(directory):
            raise SkillLoadError(f"{path}: resolves to {where}, outside the skill's directory "
                                 f"{directory}")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SkillLoadError(f"{path}: not a regular file")
        data = file.read(MAX_MANIFEST_BYTES + 1) if info.st_size <= MAX_MANIFEST_BYTES else b""
    if info.st_size > MAX_MANIFEST_BYTES or len(data) > MAX_MANIFEST_BYTES:
        raise SkillLoadError(f"{path}: {max(info.st_size, len(data))} bytes, larger than the "
                             f"{MAX_MANIFEST_BYTES} bytes a manifest may be")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkillLoadError(f"{path}: not UTF-8 (byte {exc.start})") from None


def load_native(path: Path) -> SkillManifest:
    try:
        data = tomllib.loads(read_manifest(path))
    except tomllib.TOMLDecodeError as exc:
        raise SkillLoadError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SkillLoadError(f"{path}: nested too deeply to parse") from None
    except OSError as exc:
        raise SkillLoadError(f"{path}: cannot read: {exc.strerror}") from None
    return _validate(path, data)


# -- openbotstack: manifest.yaml (v1.1.0 and current) and SKILL.md ------------------------------
#
# openbotstack reads manifest.yaml with Go's yaml.v3 into a struct: keys it does not know are
# ignored, `timeout` is a Go duration, `resources` holds `max_memory_mb`/`max_cpu_ms`. The current
# runtime reads SKILL.md first (front matter `name`/`description`, the body is the prompt), takes
# the id from the directory, and `execution.mode` (declarative or wasm) from manifest.yaml. The
# v1.1.0 examples say `type:` instead (code, wasm, deterministic, llm, declarative) with a
# `prompt:`; the wasip1 example says `entrypoint: main.wasm` and `limits.max_memory: 64MB`.

_GO_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0,
                      "m": 60.0, "h": 3600.0}
_GO_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

#: openbotstack's host capabilities (what a WASM or declarative skill may ask the host for).
HOST_PERMISSIONS = frozenset({"llm:generate", "http:fetch", "kv:read", "kv:write", "log:write"})
#: This project's earlier names for network access in a manifest.yaml permission list.
_NETWORK_PERMISSIONS = frozenset({"network", "net", "http", "internet"})
#: openbotstack-core's `ValidRiskLevels`.
RISK_LEVELS = frozenset({"info", "sensitive", "clinical", "critical"})

#: Every spelling of "how this skill runs" in openbotstack manifests (and this project's earlier
#: `runtime:`), mapped onto a kind. `llm` is decided by whether there is a prompt: with one it
#: is declarative; without one it is code that calls the LLM (v1.1.0's meeting-summarize).
_MODES: dict[str, SkillKind | Literal["llm"]] = {
    "wasm": "wasm", "deterministic": "wasm", "code": "wasm",
    "declarative": "declarative", "llm": "llm",
    "python": "python", "py": "python", "native": "python", "command": "command",
}
_MODE_KEYS = ("type", "runtime", "execution_mode", "mode")

#: Keys mapped onto the model (everything else is kept in `metadata`).
_MAPPED_KEYS = frozenset({
    "id", "version", "name", "description", "input_schema", "output_schema", "entrypoint",
    "command", "isolation", "preload", "wasm", "prompt", "timeout", "resources", "limits",
    "permissions", "execution", *_MODE_KEYS,
})
#: Keys openbotstack defines (or its examples use) that describe the skill without changing how
#: it runs here: kept in `metadata`, not an error, no warning.
INFORMATIONAL_KEYS = frozenset({"requires", "risk_level", "triggers", "tags", "author",
                                "license", "homepage", "examples", "category"})


def parse_duration(value: Any, path: Path, field: str) -> float:
    """Seconds in a Go duration (`"1m30s"`, `"500ms"`, `"1.5h"`), or a YAML number of seconds.

    Go's `time.ParseDuration` grammar, positive only: a duration string without a unit, such as
    `"45"`, is refused as Go refuses it (a bare YAML number is seconds, as before).
    """
    if (isinstance(value, int | float) and not isinstance(value, bool) and value > 0
            and math.isfinite(value)):
        return float(value)
    seconds = _go_duration(value.strip()) if isinstance(value, str) else None
    if seconds is None or seconds <= 0 or not math.isfinite(seconds):  # Go: "invalid duration"
        raise SkillLoadError(f"{path}: field '{field}': {value!r} is not a positive duration "
                             "such as '60s', '500ms', '1m30s' or '1.5h'")
    return seconds


def _go_duration(text: str) -> float | None:
    text = text.removeprefix("+")
    position, total = 0, 0.0
    for match in _GO_DURATION_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _GO_DURATION_UNITS[match.group(2)]
        position = match.end()
    return total if text and position == len(text) else None


def parse_size_mb(value: Any, path: Path, field: str) -> int:
    """Whole MiB (rounded up) in a size such as `"64MB"`, `"512KiB"` or `"1G"`.

    KB/MB/GB count in 1024s like KiB/MiB/GiB (as Docker's and most Go tools' size parsers do);
    a bare number is refused because nothing says whether it is bytes or megabytes.
    """
    match = _SIZE_PATTERN.match(value) if isinstance(value, str) else None
    if match:
        size = float(match.group(1)) * _SIZE_UNITS[match.group(2)[0].lower()]
        if 0 < size < float("inf"):  # digits past a float are no size either
            return max(1, -(-int(size) // (1 << 20)))
    raise SkillLoadError(f"{path}: field '{field}': {value!r} is not a positive size with a "
                         "unit, such as '64MB', '512KiB' or '1GiB'")


def _positive_number(value: Any, path: Path, field: str, what: str) -> float:
    if (not isinstance(value, int | float) or isinstance(value, bool) or value <= 0
            or not math.isfinite(value)):
        raise SkillLoadError(f"{path}: field '{field}': {value!r} is not a positive {what}")
    return float(value)


def _mapping(value: Any, path: Path, field: str, known: set[str]) -> dict[str, Any]:
    """A nested mapping this loader interprets: any key it does not interpret is an error."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SkillLoadError(f"{path}: field '{field}': must be a mapping")
    for key in value:
        if key not in known:
            raise SkillLoadError(f"{path}: field '{field}.{key}': unknown field (known: "
                                 f"{', '.join(sorted(known))})")
    return value


#: Most nodes a YAML manifest may stand for once its aliases are expanded. A document of a few
#: hundred bytes whose anchors alias each other level by level ("billion laughs") stands for
#: billions; loading shares them, but anything walking the result (the schema checks, a JSON
#: encoder) would not finish. yaml.v3, openbotstack's reader, refuses such aliasing too.
MAX_YAML_NODES = 100_000


def _read_yaml(path: Path, text: str | None = None) -> Any:
    """YAML from `text`, or from the file at `path`; errors name `path`."""
    import yaml  # only openbotstack's formats need it

    try:
        loader = yaml.SafeLoader(read_manifest(path) if text is None else text)
        try:  # yaml.safe_load, with the expanded size checked between composing and building
            node = loader.get_single_node()
            if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
                raise SkillLoadError(f"{path}: its YAML aliases expand to more than "
                                     f"{MAX_YAML_NODES} nodes")
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise SkillLoadError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:  # the parser recurses per nesting level
        raise SkillLoadError(f"{path}: nested too deeply to parse") from None
    except OSError as exc:
        raise SkillLoadError(f"{path}: cannot read: {exc.strerror}") from None


def _expanded_nodes(root: Any) -> int:
    """How many nodes `root` stands for with every alias expanded, counting no further than
    just past `MAX_YAML_NODES` (an alias is the same node object, visited once per use)."""
    import yaml

    count, stack = 0, [root]
    while stack and count <= MAX_YAML_NODES:
        node = stack.pop()
        count += 1
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(child for pair in node.value for child in pair)
    return count


def read_skill_md(path: Path) -> tuple[dict[str, Any], str]:
    """SKILL.md's front matter (a mapping, maybe empty) and its body, as openbotstack-core's
    `ParseSkillMDContent` splits them: front matter only when the file opens with exactly
    `---`, up to the next line that is `---`; both parts stripped."""
    content = read_manifest(path).replace("\r\n", "\n").strip()
    if not content:
        raise SkillLoadError(f"{path}: SKILL.md is empty")
    if not content.startswith("---") or content[3:4] == "-":
        return {}, content
    lines = content[3:].split("\n")
    for index, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            front = _read_yaml(path, "\n".join(lines[:index]).strip() or "{}")
            if not isinstance(front, dict):
                raise SkillLoadError(f"{path}: the front matter must be a mapping")
            return front, "\n".join(lines[index + 1:]).strip()
    raise SkillLoadError(f"{path}: unclosed front matter (no closing '---' line)")


def load_openbotstack(path: Path) -> SkillManifest:
    """Map an openbotstack skill directory (`path` is its manifest.yaml or SKILL.md) onto the
    native model; see docs/skills.md for the table. Nothing is dropped: what does not change how
    the skill runs lands in `metadata`, and what cannot be honoured is a load error naming it."""
    skill_dir = path.parent
    manifest_path = skill_dir / OPENBOTSTACK_MANIFEST
    data: Any = _read_yaml(manifest_path) if manifest_path.is_file() else {}
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SkillLoadError(f"{manifest_path}: the manifest must be a mapping")
    where = manifest_path if manifest_path.is_file() else path
    skill_md = skill_dir / SKILL_MD
    front, body = read_skill_md(skill_md) if skill_md.is_file() else ({}, "")
    for key in front:
        if key not in ("id", "name", "description", "version"):
            raise SkillLoadError(f"{skill_md}: front matter field '{key}': unknown field "
                                 "(known: description, id, name, version)")

    native: dict[str, Any] = {
        key: data[key]
        for key in ("version", "description", "input_schema", "output_schema", "command",
                    "isolation", "preload")
        if data.get(key) is not None
    }
    for key in ("id", "name", "description", "version"):
        if front.get(key) not in (None, ""):
            native[key] = front[key]
    native.setdefault("id", data.get("id") or skill_dir.name)
    native.setdefault("name", data.get("name") or skill_dir.name)
    if "version" in native:
        native["version"] = str(native["version"])

    metadata = {key: value for key, value in data.items() if key not in _MAPPED_KEYS}
    unknown = sorted(str(key) for key in metadata if key not in INFORMATIONAL_KEYS)
    if unknown:  # openbotstack ignores them too; say so rather than drop them unseen
        logger.warning("%s: openbotstack ignores unknown field(s) %s, and so does this loader "
                       "(kept in the manifest's metadata)", where, ", ".join(unknown))
    risk = data.get("risk_level")
    if risk not in (None, "") and risk not in RISK_LEVELS:
        raise SkillLoadError(f"{where}: field 'risk_level': {risk!r} is not one of "
                             f"{', '.join(sorted(RISK_LEVELS))}")
    if "requires" in data and not isinstance(data["requires"], list | type(None)):
        raise SkillLoadError(f"{where}: field 'requires': must be a list")

    permissions = _openbotstack_permissions(data.get("permissions"), where)
    _run_as(native, data, body, permissions, metadata, where)
    native["limits"] = _openbotstack_limits(data, where)
    native["permissions"] = permissions
    native["metadata"] = metadata
    return _validate(where, native)


def _mode(data: dict[str, Any], path: Path) -> tuple[str, str] | None:
    """(field, mode) from whichever of openbotstack's spellings the manifest uses."""
    found: list[tuple[str, str]] = []
    execution = _mapping(data.get("execution"), path, "execution", {"mode"})
    if execution.get("mode") not in (None, ""):
        found.append(("execution.mode", execution["mode"]))
    found += [(key, data[key]) for key in _MODE_KEYS if data.get(key) not in (None, "")]
    for field, mode in found:
        if not isinstance(mode, str) or mode.lower() not in _MODES:
            raise SkillLoadError(
                f"{path}: field '{field}': execution mode {mode!r} is not supported here (known: "
                f"{', '.join(sorted(_MODES))})")
    kinds = {_MODES[mode.lower()] for _, mode in found}
    if len(kinds) > 1:
        raise SkillLoadError(f"{path}: fields {', '.join(repr(f) for f, _ in found)} disagree "
                             "on how the skill runs")
    return (found[0][0], found[0][1].lower()) if found else None


def _run_as(native: dict[str, Any], data: dict[str, Any], body: str, permissions: dict[str, Any],
            metadata: dict[str, Any], path: Path) -> None:
    """Set exactly one of entrypoint / command / wasm / instructions in `native`."""
    prompt = data.get("prompt")
    if prompt is not None and not isinstance(prompt, str):
        raise SkillLoadError(f"{path}: field 'prompt': must be a string")
    if prompt and body and prompt.strip() != body:
        raise SkillLoadError(f"{path}: field 'prompt': SKILL.md's body is a prompt too; keep one")
    prompt = body or (prompt.strip() if prompt else "")
    entrypoint = data.get("entrypoint")
    wasm = data.get("wasm")
    if isinstance(entrypoint, str) and entrypoint.endswith(".wasm"):
        if wasm is not None and wasm != entrypoint:
            raise SkillLoadError(f"{path}: fields 'entrypoint' and 'wasm' name different modules")
        wasm, entrypoint = entrypoint, None
    mode = _mode(data, path)
    skill_dir = path.parent
    if mode is None:  # say nothing, get what the files suggest, as openbotstack does
        if entrypoint is not None or data.get("command") is not None:
            kind: str = "python" if entrypoint is not None else "command"
        elif wasm is not None or (skill_dir / "main.wasm").is_file():
            kind = "wasm"
        elif (skill_dir / "main.py").is_file():
            kind = "python"
        elif prompt:
            kind = "declarative"  # current openbotstack's default mode
        else:
            raise SkillLoadError(f"{path}: field 'entrypoint': missing, and there is no main.py "
                                 "('main:run'), main.wasm or SKILL.md prompt to default to")
    else:
        kind = _MODES[mode[1]]
        if kind == "llm":
            if prompt:
                kind = "declarative"
            else:  # code that asks the host's LLM (v1.1.0 `type: llm` without a prompt)
                kind = "wasm"
                permissions["host"] = sorted({*permissions.get("host", ()), "llm:generate"})
    if kind in ("python", "command") and "http:fetch" in permissions.get("host", ()):
        # Their own code makes the request. A WASM or declarative skill's fetch is made by the
        # supervisor (a host call), so its process keeps no network of its own.
        permissions["network"] = True
    if kind == "python":
        native["entrypoint"] = entrypoint if entrypoint is not None else "main:run"
        if entrypoint is None and not (skill_dir / "main.py").is_file():
            raise SkillLoadError(f"{path}: field 'entrypoint': missing, and there is no main.py "
                                 "to default to ('main:run')")
    elif kind == "command":
        if data.get("command") is None:
            raise SkillLoadError(f"{path}: field 'command': mode 'command' needs one")
    elif kind == "wasm":
        if entrypoint is not None:
            raise SkillLoadError(f"{path}: field 'entrypoint': {entrypoint!r} is not a .wasm "
                                 "module, and the skill runs as WebAssembly")
        native["wasm"] = wasm if wasm is not None else "main.wasm"
    elif not prompt:
        raise SkillLoadError(f"{path}: a declarative skill needs a prompt: SKILL.md's body or "
                             "'prompt'")
    else:
        native["instructions"] = prompt
    if kind != "declarative" and prompt:
        metadata["prompt"] = prompt  # openbotstack's LLM fallback for a failed wasm run


def _openbotstack_limits(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """`timeout`, `resources.max_memory_mb/max_cpu_ms` (v1.1.0 and current) and the wasip1
    example's `limits.max_memory/max_execution`, as the native `limits` table."""
    limits: dict[str, Any] = {}
    resources = _mapping(data.get("resources"), path, "resources",
                         {"max_memory_mb", "max_cpu_ms"})
    older = _mapping(data.get("limits"), path, "limits",
                     {"max_memory", "max_execution", "max_memory_mb", "max_cpu_ms"})
    if "timeout" in data and "max_execution" in older:
        raise SkillLoadError(f"{path}: fields 'timeout' and 'limits.max_execution' both set "
                             "the time limit; keep one")
    if data.get("timeout") is not None:
        limits["timeout"] = parse_duration(data["timeout"], path, "timeout")
    if older.get("max_execution") is not None:
        limits["timeout"] = parse_duration(older["max_execution"], path, "limits.max_execution")
    for table, name in ((resources, "resources"), (older, "limits")):
        if table.get("max_memory_mb") is not None:
            limits["memory_mb"] = table["max_memory_mb"]  # the model names a bad value
        if table.get("max_cpu_ms") is not None:
            cpu_ms = _positive_number(table["max_cpu_ms"], path, f"{name}.max_cpu_ms",
                                      "number of milliseconds")
            limits["cpu_time"] = cpu_ms / 1000.0
    if older.get("max_memory") is not None:
        limits["memory_mb"] = parse_size_mb(older["max_memory"], path, "limits.max_memory")
    return limits


def _openbotstack_permissions(value: Any, path: Path) -> dict[str, Any]:
    """openbotstack lists permissions by name (`[llm:generate, log:write]`); this project's
    earlier manifests also said `[network]` or `{network: true, env: {...}}`. An unknown name is
    an error: a skill that needs a capability it cannot get should not load as if it had it."""
    if value is None:
        return {}
    if isinstance(value, dict):
        table = _mapping(value, path, "permissions", {"network", "env", "host"})
        names = table.get("host") or []
        if not isinstance(names, list):
            raise SkillLoadError(f"{path}: field 'permissions.host': must be a list")
        result = _permission_names(names, path, "permissions.host")
        if table.get("network") is not None:
            if not isinstance(table["network"], bool):
                raise SkillLoadError(f"{path}: field 'permissions.network': must be true or "
                                     "false")
            result["network"] = table["network"] or result.get("network", False)
        if table.get("env") is not None:
            result["env"] = table["env"]
        return result
    if isinstance(value, list):
        return _permission_names(value, path, "permissions")
    raise SkillLoadError(f"{path}: field 'permissions': must be a list or a mapping")


def _permission_names(names: list[Any], path: Path, field: str) -> dict[str, Any]:
    host: set[str] = set()
    network = False
    for item in names:
        name = item.lower() if isinstance(item, str) else item
        if name in HOST_PERMISSIONS:
            host.add(name)
        elif name in _NETWORK_PERMISSIONS:
            network = True
        else:
            raise SkillLoadError(
                f"{path}: field '{field}': unknown permission {item!r} (known: "
                f"{', '.join(sorted(HOST_PERMISSIONS | _NETWORK_PERMISSIONS))})")
    result: dict[str, Any] = {"host": sorted(host)}
    if network:
        result["network"] = True
    return result


def load_manifest(skill_dir: Path) -> tuple[Path, SkillManifest]:
    """The manifest of a skill directory, native first."""
    native = skill_dir / NATIVE_MANIFEST
    if native.is_file():
        return native, load_native(native)
    for name in (OPENBOTSTACK_MANIFEST, SKILL_MD):
        if (skill_dir / name).is_file():
            return skill_dir / name, load_openbotstack(skill_dir / name)
    raise SkillLoadError(f"{skill_dir}: no {NATIVE_MANIFEST}, {OPENBOTSTACK_MANIFEST} or "
                         f"{SKILL_MD} found")


def wasm_module_problem(skill_dir: Path, manifest: SkillManifest) -> str | None:
    """Why a WebAssembly skill's module is not there to run, or None.

    openbotstack v1.1.0 loads a directory with Go sources and no compiled module (math-add,
    wordcount, meeting-summarize) and then answers its executions without running any code.
    Here such a directory loads as a skill that is not runnable (`Skill.not_runnable`): each
    execution fails at once with this text, which names the module and how to build it.
    """
    if manifest.wasm is None:
        return None
    if (skill_dir / manifest.wasm).is_file():
        return None  # the rest of the module's checks are the WASM runtime's (Skill.from_dir)
    sources = go_sources(skill_dir)
    why = (f": the directory holds Go sources only ({', '.join(sources)}); build the module "
           f"with Go 1.21 or later: `GOOS=wasip1 GOARCH=wasm go build -o {manifest.wasm}` in "
           "the skill's directory (its main must read the JSON input on stdin and write the "
           "answer on stdout), then load the skill again" if sources else "")
    return f"field 'wasm': no compiled module {manifest.wasm!r} in {skill_dir}{why}"


def go_sources(skill_dir: Path) -> list[str]:
    """The Go source files of a skill directory, tests left out."""
    return sorted(p.name for p in skill_dir.glob("*.go") if not p.name.endswith("_test.go"))
