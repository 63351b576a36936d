"""Daemon configuration: one pydantic model, filled from defaults < TOML file < env < flags.

Every key has a dotted name (`limits.timeout`), an environment variable
(`SKILL_SANDBOX_LIMITS_TIMEOUT`) and a flag (`--limits-timeout`), all derived from the model so
they cannot drift apart. A bad value is reported with where it came from: the file and field,
the variable, or the flag — the operator should never have to guess which of the three to fix.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "SKILL_SANDBOX_"
#: Variables with the prefix that are not config keys (read by the CLI and the client).
NON_CONFIG_ENV = frozenset({"SKILL_SANDBOX_CONFIG", "SKILL_SANDBOX_URL"})
MIN_TOKEN_LENGTH = 16


class ConfigError(ValueError):
    """A configuration value that cannot be used; the text names its source and field."""


def default_socket_path() -> Path:
    """Where the daemon listens and the client connects when nothing says otherwise."""
    if os.geteuid() == 0:
        return Path("/run/skill-sandbox/sandbox.sock")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "skill-sandbox.sock"
    return Path(f"/tmp/skill-sandbox-{os.geteuid()}/sandbox.sock")


def default_execution_log() -> str:
    """systemd's StateDirectory= when set, else the conventional per-user/per-host place."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return str(Path(state.split(":")[0]) / "executions.db")
    if os.geteuid() == 0:
        return "/var/lib/skill-sandbox/executions.db"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return str(Path(base) / "skill-sandbox" / "executions.db")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LimitsDefaults(_Strict):
    """Limits for skills whose manifest does not set them (a manifest's own value wins)."""

    timeout: float | None = Field(default=None, gt=0, description="wall-clock seconds")
    cpu_time: float | None = Field(default=None, gt=0,
                                   description="CPU seconds, whole process tree")
    memory_mb: int | None = Field(default=None, gt=0,
                                  description="MB above the worker's baseline")
    max_processes: int | None = Field(default=None, gt=0,
                                      description="processes and threads per run")
    max_output_bytes: int | None = Field(default=None, gt=0,
                                         description="result, stdout, stderr each")
    max_file_bytes: int | None = Field(default=None, gt=0,
                                       description="largest file a skill may write")
    max_open_files: int | None = Field(default=None, ge=16, description="open file descriptors")


class CircuitConfig(_Strict):
    """Per-skill circuit breaker (see the execution-control docs)."""

    enabled: bool = Field(default=True, description="trip a skill's circuit on repeated failures")
    failure_threshold: int = Field(default=5, gt=0, description="consecutive failures that open it")
    cooldown: float = Field(default=30.0, gt=0, description="seconds open before half-open probes")


class IsolationSettings(_Strict):
    """The kernel layers around every execution (see `skill-sandbox doctor`); unset keys keep
    the library's defaults, which use every layer the host has."""

    uid_base: int | None = Field(default=None, gt=0,
                                 description="first uid of the per-execution uid pool (as root)")
    uid_count: int | None = Field(default=None, gt=0, description="size of the uid pool")
    workdir_mb: int | None = Field(default=None, gt=0,
                                   description="size of each execution's tmpfs workdir")
    read_only: list[str] = Field(default_factory=list,
                                 description="extra absolute paths every skill may read")
    disabled: list[str] = Field(default_factory=list,
                                description="mechanisms to switch off (uid, mountns, netns, ipcns, "
                                "landlock, seccomp, cgroups)")
    required: list[str] = Field(default_factory=list,
                                description="mechanisms without which the daemon refuses to "
                                "start")
    trusted_preload: list[str] = Field(default_factory=list,
                                       description="modules (and their submodules) a skill may "
                                       "preload: imported in its zygote as root, before the "
                                       "execution's layers")

    @model_validator(mode="after")
    def _valid(self) -> IsolationSettings:
        self.to_config()  # the library's own checks, reported against these keys
        return self

    def to_config(self) -> Any:
        """A `sandbox.capabilities.IsolationConfig` (imported here: it is not light)."""
        from sandbox.capabilities import IsolationConfig

        values: dict[str, Any] = {key: value for key in ("uid_base", "uid_count", "workdir_mb")
                                  if (value := getattr(self, key)) is not None}
        return IsolationConfig(read_only=tuple(self.read_only),
                               trusted_preload=tuple(self.trusted_preload),
                               disabled=frozenset(self.disabled),
                               required=frozenset(self.required), **values)


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_tcp(value: str) -> TcpAddress:
    """`HOST:PORT` or `[V6]:PORT`; port 0 asks the kernel for a free port (logged at start)."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. '127.0.0.1:8700')")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{value!r}: host must be an IP address or 'localhost'") from None
    return TcpAddress(host, int(port_text))


class LLMSettings(_Strict):
    """The LLM provider declarative skills and plans' `llm` steps call (an OpenAI-compatible
    chat-completions endpoint); unset base_url: none, and such skills fail naming it."""

    base_url: str | None = Field(default=None, description="OpenAI-compatible API base URL "
                                 "(POST {base_url}/chat/completions), e.g. "
                                 "https://api.openai.com/v1")
    model: str | None = Field(default=None, description="model name sent with every request")
    api_key_env: str = Field(default="OPENAI_API_KEY",
                             description="environment variable holding the API key ('' = send "
                             "none); the key itself is never a config value")
    max_tokens: int | None = Field(default=None, gt=0,
                                   description="max_tokens sent with every request")
    temperature: float | None = Field(default=None, ge=0, le=2,
                                      description="sampling temperature sent with every request")
    max_response_bytes: int = Field(default=4 << 20, gt=0,
                                    description="largest provider response read")

    @model_validator(mode="after")
    def _complete(self) -> LLMSettings:
        if (self.base_url is None) != (self.model is None):
            raise ValueError("give both base_url and model (or neither)")
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url {self.base_url!r} is not an http(s) URL")
        return self

    def to_provider(self) -> Any:
        """A `sandbox.llm.OpenAICompatibleProvider`, or None when none is configured; raises
        `ValueError` naming the variable when api_key_env is set but missing."""
        if self.base_url is None or self.model is None:
            return None
        from sandbox.llm import OpenAICompatibleProvider

        return OpenAICompatibleProvider(self.base_url, self.model,
                                        api_key_env=self.api_key_env or None,
                                        max_tokens=self.max_tokens,
                                        temperature=self.temperature,
                                        max_response_bytes=self.max_response_bytes)


class DaemonConfig(_Strict):
    """Everything `skill-sandbox serve` reads. See the README's config reference."""

    skills: list[Path] = Field(default_factory=list,
                               description="directories scanned for skills (any depth)")
    socket: Path = Field(default_factory=default_socket_path,
                         description="Unix socket to listen on (created mode 0600)")
    tcp: str | None = Field(default=None, description="also listen on HOST:PORT (needs a token)")
    token: str | None = Field(default=None, description="bearer token for TCP clients (prefer "
                              "token_file: a flag is visible in ps)")
    token_file: Path | None = Field(default=None, description="file holding the bearer token")
    max_concurrency: int | None = Field(default=None, gt=0,
                                        description="executions at once (default: CPU count)")
    max_queue: int = Field(default=64, ge=0, description="executions waiting for a slot before 429")
    max_body_bytes: int = Field(default=4 << 20, gt=0, description="largest accepted request body")
    header_timeout: float = Field(default=10.0, gt=0, le=3600,
                                  description="seconds a connection may take to send a "
                                  "request's head (line and headers), from when it opens or "
                                  "its previous response ended; then 408 and close")
    body_timeout: float = Field(default=30.0, gt=0, le=3600,
                                description="seconds a request may take to send its body "
                                "after the head; then 408 and close")
    keepalive_timeout: float = Field(default=5.0, gt=0, le=3600,
                                     description="seconds an idle keep-alive connection stays "
                                     "open after a response")
    max_connections: int = Field(default=1024, ge=1,
                                 description="open connections per listener (Unix socket, "
                                 "TCP); lowered at start to fit the fd limit; beyond it a new "
                                 "connection gets 503 and is closed")
    grace_period: float = Field(default=30.0, ge=0,
                                description="seconds SIGTERM waits for in-flight executions")
    policy: Path | None = Field(default=None, description="policy file (TOML or YAML)")
    execution_log: str = Field(default_factory=default_execution_log,
                               description="SQLite file (or .jsonl) of executions; '' = off")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="daemon log level")
    log_format: Literal["json", "text"] = Field(default="json",
                                                description="one JSON object per line, or text")
    workdir_root: Path | None = Field(default=None, description="where per-execution workdirs go")
    zygote_check_interval: float = Field(default=1.0, gt=0,
                                         description="seconds between zygote liveness checks")
    zygote_backoff_max: float = Field(default=30.0, gt=0,
                                      description="longest wait between zygote restart attempts")
    warm: list[str] = Field(default_factory=list,
                            description="skill ids (or glob patterns) whose zygote starts at "
                            "load; every other skill's starts on its first execution")
    max_zygotes: int = Field(default=64, ge=0,
                             description="zygotes running at once; starting one more evicts "
                             "the least recently used idle one (0 = no bound)")
    zygote_idle_ttl: float = Field(default=600.0, ge=0,
                                   description="seconds a zygote may sit unused before it is "
                                   "evicted (0 = never)")
    max_wasm_compiles: int = Field(default=0, ge=0,
                                   description="zygotes of WASM skills booting (compiling their "
                                   "module: seconds of CPU, up to 1 GiB) at once "
                                   "(0 = min(4, CPUs))")
    base_zygote: bool = Field(default=True,
                              description="fork skills' zygotes from a shared base interpreter "
                              "(the worker runtime preloaded) instead of exec'ing one each")
    notify: bool = Field(default=True,
                         description="sd_notify READY/RELOADING/STOPPING if NOTIFY_SOCKET")
    tools: dict[str, str] = Field(default_factory=dict,
                                  description="plan tool name -> base URL of an openbotstack "
                                  "tool registry (POST {url}/invoke)")
    limits: LimitsDefaults = LimitsDefaults()
    circuit: CircuitConfig = CircuitConfig()
    isolation: IsolationSettings = IsolationSettings()
    llm: LLMSettings = LLMSettings()

    @field_validator("tcp")
    @classmethod
    def _check_tcp(cls, value: str | None) -> str | None:
        if value:
            parse_tcp(value)
        return value or None

    @field_validator("tools")
    @classmethod
    def _check_tools(cls, value: dict[str, str]) -> dict[str, str]:
        for name, url in value.items():
            if not name or name != name.strip():
                raise ValueError(f"tool name {name!r} is empty or has surrounding whitespace")
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"tool {name!r}: {url!r} is not an http(s) URL")
        return value

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: str | None) -> str | None:
        return _valid_token(value) if value else None

    @field_validator("token_file")
    @classmethod
    def _check_token_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            _valid_token(_read_token(value))
        return value

    @model_validator(mode="after")
    def _tcp_needs_token(self) -> DaemonConfig:
        if self.tcp and not (self.token or self.token_file):
            raise ValueError("[tcp] refusing to listen on TCP without a bearer token: set "
                             f"token_file (or {ENV_PREFIX}TOKEN)")
        if self.token and self.token_file:
            raise ValueError("[token] give token or token_file, not both")
        return self

    @property
    def tcp_address(self) -> TcpAddress | None:
        return parse_tcp(self.tcp) if self.tcp else None

    def bearer_token(self) -> str | None:
        """The token, read from token_file each call so a rotated file takes effect on reload."""
        if self.token:
            return self.token
        if self.token_file is not None:
            return _valid_token(_read_token(self.token_file))
        return None


def _read_token(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {path}: {exc.strerror}") from None


def _valid_token(token: str) -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the bearer token must be at least {MIN_TOKEN_LENGTH} characters "
                         "(e.g. `openssl rand -hex 32`)")
    if any(ch.isspace() for ch in token) or not token.isprintable():
        raise ValueError("the bearer token must be printable and contain no whitespace")
    return token


# -- keys, environment variables and flags ----------------------------------------------------


@dataclass(frozen=True)
class ConfigKey:
    """One settable key: its dotted name, env variable, flag, and whether it takes a list."""

    name: str
    env: str
    flag: str
    description: str
    is_list: bool
    is_path: bool
    is_dict: bool = False
    is_bool: bool = False


def _keys(model: type[BaseModel], prefix: str = "") -> list[ConfigKey]:
    keys: list[ConfigKey] = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(_keys(annotation, f"{prefix}{name}."))
            continue
        dotted = prefix + name
        is_list = get_origin(annotation) is list
        inner = get_args(annotation)[0] if is_list else annotation
        is_path = inner is Path or Path in get_args(inner)
        keys.append(ConfigKey(
            name=dotted, env=ENV_PREFIX + dotted.replace(".", "_").upper(),
            flag="--" + dotted.replace(".", "-").replace("_", "-"),
            description=info.description or "", is_list=is_list, is_path=is_path,
            is_dict=get_origin(annotation) is dict, is_bool=annotation is bool,
        ))
    return keys


CONFIG_KEYS: tuple[ConfigKey, ...] = tuple(_keys(DaemonConfig))
_BY_NAME = {key.name: key for key in CONFIG_KEYS}
assert len({key.env for key in CONFIG_KEYS}) == len(CONFIG_KEYS), "env names collide"


def _set(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        if isinstance(value, Mapping) and prefix + name not in _BY_NAME:
            flat.update(_flatten(value, f"{prefix}{name}."))
        else:
            flat[prefix + name] = value
    return flat


def _resolve_paths(key: ConfigKey, value: Any, base: Path) -> Any:
    """Relative paths in a file are relative to that file, as operators expect."""
    if not key.is_path or value in (None, ""):
        return value
    if key.is_list and isinstance(value, list):
        return [str(base / item) if isinstance(item, str) else item for item in value]
    return str(base / value) if isinstance(value, str) else value


def read_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    return data


def env_values(env: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """Config values from the environment, and unknown `SKILL_SANDBOX_*` names (likely typos)."""
    by_env = {key.env: key for key in CONFIG_KEYS}
    values: dict[str, Any] = {}
    unknown = []
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        key = by_env.get(name)
        if key is None:
            unknown.append(name)
            continue
        if key.is_list:
            values[key.name] = [item for item in raw.split(os.pathsep) if item]
        elif key.is_dict:
            values[key.name] = parse_pairs(raw.split(","), key.env)
        else:
            values[key.name] = raw
    return values, sorted(unknown)


def parse_pairs(items: list[str], source: str) -> dict[str, str]:
    """`NAME=VALUE` items (env: comma-separated; flags: repeated) as a mapping."""
    pairs: dict[str, str] = {}
    for item in items:
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{source}: {item!r} is not NAME=VALUE")
        pairs[name.strip()] = value.strip()
    return pairs


def load_config(path: str | os.PathLike[str] | None = None, *,
                env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> DaemonConfig:
    """Build the config; `flags` maps dotted key names to values given on the command line."""
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}
    if path is not None:
        file_path = Path(path).resolve()
        raw = _flatten(read_file(file_path))
        for name, value in raw.items():
            key = _BY_NAME.get(name)
            merged[name] = _resolve_paths(key, value, file_path.parent) if key else value
            sources[name] = f"{file_path}: field '{name}'"
    from_env, _ = env_values(os.environ if env is None else env)
    for name, value in from_env.items():
        merged[name] = value
        sources[name] = f"environment variable {_BY_NAME[name].env} (field '{name}')"
    for name, value in (flags or {}).items():
        if name not in _BY_NAME:
            raise ConfigError(f"unknown config key {name!r}")
        merged[name] = value
        sources[name] = f"flag {_BY_NAME[name].flag} (field '{name}')"
    tree: dict[str, Any] = {}
    for name, value in merged.items():
        _set(tree, name, value)
    try:
        return DaemonConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, sources, path)) from None


def _describe(error: ValidationError, sources: Mapping[str, str],
              path: str | os.PathLike[str] | None) -> str:
    problems = []
    for item in error.errors():
        parts = [str(part) for part in item["loc"] if not isinstance(part, int)]
        dotted = ".".join(parts)
        message = item["msg"].removeprefix("Value error, ")
        if not parts and message.startswith("["):  # a model-level check names its key
            key, _, message = message[1:].partition("] ")
            parts, dotted = [key], key
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        source = None
        for end in range(len(parts), 0, -1):
            source = sources.get(".".join(parts[:end]))
            if source:
                break
        if source is None and dotted:  # a check on a whole section: name who set its keys
            children = [value for key, value in sources.items() if key.startswith(dotted + ".")]
            source = "; ".join(children) or None
        if source is None:
            where = f"{Path(path).resolve()}: " if path is not None else "config: "
            source = f"{where}field '{dotted}'" if dotted else where.rstrip(": ")
        problems.append(f"{source}: {message}")
    return "; ".join(problems)
