"""`skill-sandbox`: the operator's command line (also `python -m sandbox`).

Every command takes `--json` (one JSON document on stdout, for scripts) and `--help`. Human
output is tables. Exit codes say what happened, so shell scripts need not parse anything:

    0 success   1 skill failed / command failed   2 usage or config error   3 rejected
    4 timeout   5 canceled   69 daemon unavailable   77 token refused
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from sandbox.cliformat import emit_json, pairs, table
from sandbox.errors import SandboxError
from sandbox.skilltext import printable

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_TIMEOUT = 4
EXIT_CANCELED = 5
EXIT_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE
EXIT_NOPERM = 77  # sysexits EX_NOPERM
#: What `pip install 'skill-sandbox[daemon]'` adds; the daemon's commands need them.
DAEMON_EXTRA = frozenset({"starlette", "uvicorn", "prometheus_client"})
STATUS_EXIT = {"success": EXIT_OK, "failed": EXIT_FAILED, "rejected": EXIT_REJECTED,
               "timeout": EXIT_TIMEOUT, "canceled": EXIT_CANCELED}

F = TypeVar("F", bound=Callable[..., Any])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- output --------------------------------------------------------------------------------------


def fail(message: str, code: int, as_json: bool, reason: str = "error") -> NoReturn:
    if as_json:
        emit_json({"error": message, "code": reason})
    else:
        click.echo(f"skill-sandbox: {message}", err=True)
    sys.exit(code)


def json_option(function: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print one JSON document on stdout instead of text.")(function)


def handle_errors(function: F) -> F:
    """Turn the library's errors into a message and an exit code, never a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from sandbox.client import DaemonUnavailable, Unauthorized
        from sandbox.daemon.config import ConfigError

        as_json = bool(kwargs.get("as_json"))
        try:
            return function(*args, **kwargs)
        except DaemonUnavailable as exc:
            fail(str(exc), EXIT_UNAVAILABLE, as_json, "daemon_unavailable")
        except Unauthorized as exc:
            fail(str(exc), EXIT_NOPERM, as_json, "unauthorized")
        except ConfigError as exc:
            fail(str(exc), EXIT_USAGE, as_json, "invalid_config")
        except SandboxError as exc:
            fail(str(exc), EXIT_FAILED, as_json, type(exc).__name__)
        except ModuleNotFoundError as exc:
            if (exc.name or "").split(".")[0] not in DAEMON_EXTRA:
                raise
            fail(f"{exc.name} is not installed: this command needs the daemon's dependencies "
                 "(pip install 'skill-sandbox[daemon]')", EXIT_UNAVAILABLE, as_json,
                 "missing_dependency")

    return wrapper  # type: ignore[return-value]


def client_options(function: F) -> F:
    """Where the daemon is: `--socket` (default), or `--url` with a token."""
    options = [
        click.option("--socket", type=click.Path(dir_okay=False, path_type=Path),
                     help="Daemon Unix socket [env SKILL_SANDBOX_SOCKET; default "
                     "/run/skill-sandbox/sandbox.sock as root, else $XDG_RUNTIME_DIR/"
                     "skill-sandbox.sock]"),
        click.option("--url", help="Daemon over TCP, e.g. http://127.0.0.1:8700 "
                     "[env SKILL_SANDBOX_URL]"),
        click.option("--token", help="Bearer token for --url [env SKILL_SANDBOX_TOKEN or "
                     "SKILL_SANDBOX_TOKEN_FILE]"),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def make_client(socket: Path | None, url: str | None, token: str | None,
                timeout: float | None = None) -> Any:
    from sandbox.client import DEFAULT_TIMEOUT, SandboxClient

    return SandboxClient(socket, url=url, token=token, timeout=timeout or DEFAULT_TIMEOUT)


# -- the group -----------------------------------------------------------------------------------


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="skill-sandbox", message="%(prog)s %(version)s")
def main() -> None:
    """Run untrusted skills in isolated, resource-limited workers.

    Start the daemon with `serve`; run a skill once in-process with `run`, or through the
    daemon with `exec`. Exit codes: 0 success, 1 failed, 2 usage/config error, 3 rejected,
    4 timeout, 5 canceled, 69 daemon unavailable, 77 token refused.
    """


# -- serve ---------------------------------------------------------------------------------------


def _serve_options(function: F) -> F:
    from sandbox.daemon.config import CONFIG_KEYS

    for key in reversed(CONFIG_KEYS):
        param = key.name.replace(".", "__")
        help_text = f"{key.description} [env {key.env}]".strip()
        if key.is_bool:
            option = click.option(f"{key.flag}/--no-{key.flag[2:]}", param, default=None,
                                  help=help_text)
        elif key.is_list or key.is_dict:
            option = click.option(key.flag, param, multiple=True,
                                  metavar="NAME=URL" if key.is_dict else "PATH",
                                  help=help_text + " (repeatable)")
        else:
            option = click.option(key.flag, param, default=None, help=help_text)
        function = option(function)
    return function


def _flags(values: dict[str, Any]) -> dict[str, Any]:
    from sandbox.daemon.config import CONFIG_KEYS, parse_pairs

    flags: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        value = values.get(key.name.replace(".", "__"))
        if value is None or (isinstance(value, tuple) and not value):
            continue
        if key.is_dict:
            value = parse_pairs(list(value), key.flag)
        elif key.is_list:
            value = list(value)
        flags[key.name] = value
    return flags


@main.command(context_settings=CONTEXT)
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="SKILL_SANDBOX_CONFIG", help="TOML config file [env SKILL_SANDBOX_CONFIG]")
@click.option("--check", is_flag=True, help="Validate the config, print it, and exit.")
@json_option
@_serve_options
@handle_errors
def serve(config_path: Path | None, check: bool, as_json: bool, **values: Any) -> None:
    """Run the daemon (HTTP API on a Unix socket, optionally TCP with a token).

    Settings come from defaults < --config file < SKILL_SANDBOX_* variables < flags.
    SIGTERM/SIGINT drain and stop, SIGHUP reloads skills, policy and token.
    """
    from sandbox.daemon.config import load_config
    from sandbox.daemon.server import serve as run_daemon

    flags = _flags(values)
    if as_json and "log_format" not in flags:
        flags["log_format"] = "json"
    if check:
        config = load_config(config_path, flags=flags)
        data = config.model_dump(mode="json")
        if data.get("token"):
            data["token"] = "<set>"
        if as_json:
            emit_json(data)
        else:
            click.echo(pairs((key, value) for key, value in data.items()))
        return
    sys.exit(run_daemon(config_path, flags))


# -- run / exec ----------------------------------------------------------------------------------


def read_input(value: str) -> bytes:
    """`--input`: literal JSON, `@file`, or `-` for stdin; checked to be JSON here, so a typo is
    a usage error and not a rejected execution."""
    if value == "-":
        data = sys.stdin.buffer.read()
        source = "stdin"
    elif value.startswith("@"):
        try:
            data = Path(value[1:]).read_bytes()
        except OSError as exc:
            raise click.BadParameter(f"cannot read {value[1:]}: {exc.strerror}",
                                     param_hint="--input") from None
        source = value[1:]
    else:
        data, source = value.encode(), "the argument"
    try:
        json.loads(data)
    except ValueError as exc:
        raise click.BadParameter(f"{source} is not valid JSON: {exc}",
                                 param_hint="--input") from None
    return data


def execution_options(function: F) -> F:
    options = [
        click.option("--input", "-i", "input_value", default="{}", show_default=True,
                     help="The skill's input: JSON, @FILE, or - for stdin."),
        click.option("--timeout", type=click.FloatRange(min=0, min_open=True),
                     help="Wall-clock seconds (overrides the skill's timeout)."),
        click.option("--tenant", default="", help="Tenant id (policy, logs)."),
        click.option("--user", default="", help="User id (logs)."),
        click.option("--request-id", help="Request id (default: generated)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _request(skill_id: str, input_value: str, timeout: float | None, tenant: str, user: str,
             request_id: str | None) -> Any:
    from worker.protocol import ExecutionRequest

    fields: dict[str, Any] = {"skill_id": skill_id, "input": read_input(input_value),
                              "timeout": timeout, "tenant_id": tenant, "user_id": user}
    if request_id:
        fields["request_id"] = request_id
    return ExecutionRequest(**fields)


def show_result(result: Any, as_json: bool) -> NoReturn:
    from sandbox.daemon.schemas import result_to_json

    data = result_to_json(result)
    if as_json:
        emit_json(data)
    else:
        usage = data["resource_usage"]
        click.echo(pairs([
            ("status", data["status"]), ("error", data["error"]),
            ("skill", data["skill_id"]), ("request", data["request_id"]),
            ("duration", f"{data['duration'] * 1000:.1f} ms"),
            ("cpu", f"{usage['cpu_time_ms']} ms"), ("memory", f"{usage['memory_mb']} MB"),
            ("tokens", usage["tokens_used"] or None),
        ]))
        if data["output"] is not None:
            click.echo("output:")
            click.echo(json.dumps(data["output"], indent=2))
        for name in ("stdout", "stderr"):
            if data[name]:
                click.echo(f"{name}:")
                click.echo(printable(data[name].rstrip("\n")))  # the skill's bytes
    sys.exit(STATUS_EXIT.get(data["status"], EXIT_FAILED))


def _skill_for_run(target: str, skills_dirs: Sequence[Path], config: Any) -> Any:
    from sandbox.daemon.config import LimitsDefaults
    from sandbox.daemon.skills import discover, with_defaults
    from sandbox.skill import Skill

    defaults = LimitsDefaults()
    roots = list(skills_dirs)
    if config is not None:
        defaults = config.limits
        roots = roots or list(config.skills)
    if Path(target).is_dir():
        return with_defaults(Skill.from_dir(target), defaults)
    if not roots:
        env_dirs = os.environ.get("SKILL_SANDBOX_SKILLS", "")
        roots = [Path(item) for item in env_dirs.split(os.pathsep) if item]
    if not roots:
        raise click.BadParameter(f"{target!r} is not a directory; to run a skill by id, say "
                                 "where skills are with --skills DIR (or --config)",
                                 param_hint="SKILL")
    found = discover(roots, defaults)
    if target in found.skills:
        return found.skills[target].skill
    problems = "".join(f"\n  {error}" for error in found.errors)
    known = ", ".join(sorted(found.skills)) or "none"
    raise click.BadParameter(f"no skill {target!r} under {', '.join(map(str, roots))} "
                             f"(found: {known}){problems}", param_hint="SKILL")


@main.command(context_settings=CONTEXT)
@click.argument("skill")
@execution_options
@click.option("--skills", "skills_dirs", multiple=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where to find SKILL by id (repeatable) [env SKILL_SANDBOX_SKILLS].")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Daemon config to take skills dirs and default limits from.")
@json_option
@handle_errors
def run(skill: str, input_value: str, timeout: float | None, tenant: str, user: str,
        request_id: str | None, skills_dirs: tuple[Path, ...], config_path: Path | None,
        as_json: bool) -> None:
    """Run SKILL (a directory, or an id under --skills) once, in-process, and print the result.

    The exit code reflects the result's status (0 success, 1 failed, 3 rejected, 4 timeout,
    5 canceled).
    """
    from sandbox.daemon.config import load_config
    from sandbox.sandbox import Sandbox

    config = load_config(config_path) if config_path is not None else None
    loaded = _skill_for_run(skill, skills_dirs, config)
    request = _request(loaded.id, input_value, timeout, tenant, user, request_id)
    llm = _llm_for_run(loaded, config)
    try:
        with Sandbox([loaded], circuit_breaker=False, llm=llm) as sandbox:
            result = sandbox.execute(request)
    finally:
        if llm is not None:
            llm.close()
    show_result(result, as_json)


def _llm_for_run(skill: Any, config: Any) -> Any:
    """The daemon config's `[llm]` provider (file or SKILL_SANDBOX_LLM_* variables), for the
    skills that can call one: declarative skills, and those granted `llm:generate` (a WASM or
    Python skill's host call). Others never read the key."""
    from sandbox.daemon.config import ConfigError, load_config

    if skill.manifest.kind != "declarative" \
            and "llm:generate" not in skill.manifest.permissions.host:
        return None
    llm = (config if config is not None else load_config(None)).llm
    try:
        return llm.to_provider()
    except ValueError as exc:
        raise ConfigError(f"field 'llm': {exc}") from None


@main.command("exec", context_settings=CONTEXT)
@click.argument("skill_id")
@execution_options
@client_options
@json_option
@handle_errors
def exec_(skill_id: str, input_value: str, timeout: float | None, tenant: str, user: str,
          request_id: str | None, socket: Path | None, url: str | None, token: str | None,
          as_json: bool) -> None:
    """Run SKILL_ID through the daemon and print the result (exit code as for `run`)."""
    request = _request(skill_id, input_value, timeout, tenant, user, request_id)
    with make_client(socket, url, token) as client:
        result = client.execute(request)
    show_result(result, as_json)


@main.command(context_settings=CONTEXT)
@click.argument("request_id")
@client_options
@json_option
@handle_errors
def cancel(request_id: str, socket: Path | None, url: str | None, token: str | None,
           as_json: bool) -> None:
    """Cancel a running or queued execution (its caller gets status 'canceled')."""
    with make_client(socket, url, token) as client:
        canceled = client.cancel(request_id)
    if as_json:
        emit_json({"request_id": request_id, "canceled": canceled})
    else:
        click.echo(f"{request_id}: {'canceled' if canceled else 'not in flight'}")
    sys.exit(EXIT_OK if canceled else EXIT_FAILED)


# -- skills --------------------------------------------------------------------------------------


@main.group(context_settings=CONTEXT)
def skills() -> None:
    """List, validate and inspect skills (on disk or loaded in the daemon)."""


def _zygote_state(zygote: dict[str, Any] | None) -> str | None:
    """`warm`, `cold`, `evicted`, or `DOWN` (started, then died and not restarted yet)."""
    if zygote is None:
        return None
    state = str(zygote.get("state", "warm"))
    return "DOWN" if state == "warm" and not zygote["alive"] else state


def _last_use(zygote: dict[str, Any] | None) -> str | None:
    if zygote is None or not zygote.get("last_used"):
        return None if zygote is None else "never"
    return f"{_age(max(0.0, time.time() - zygote['last_used']))} ago"


def _skill_rows(items: list[dict[str, Any]]) -> list[list[Any]]:
    rows = []
    for item in items:
        limits = item["limits"]
        zygote = item.get("zygote")
        pss = zygote.get("pss_kb") if zygote else None
        rows.append([
            item["id"], item["version"], item["kind"], item["isolation"],
            f"{limits['timeout']:g}s", f"{limits['cpu_time']:g}s", f"{limits['memory_mb']}MB",
            "yes" if item["permissions"]["network"] else "no",
            _zygote_state(zygote), _last_use(zygote),
            f"{pss / 1024:.1f}MB" if pss else None,
            item.get("circuit"),
        ])
    return rows


_SKILL_HEADERS = ["ID", "VERSION", "KIND", "ISOLATION", "TIMEOUT", "CPU", "MEMORY", "NETWORK",
                  "ZYGOTE", "LAST USE", "ZYGOTE PSS", "CIRCUIT"]


@skills.command("list", context_settings=CONTEXT)
@click.option("--dir", "dirs", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="List skills found on disk here instead of asking the daemon (repeatable).")
@client_options
@json_option
@handle_errors
def skills_list(dirs: tuple[Path, ...], socket: Path | None, url: str | None,
                token: str | None, as_json: bool) -> None:
    """Skills loaded in the daemon (or found under --dir)."""
    from sandbox.daemon.service import skill_summary
    from sandbox.daemon.skills import discover

    if dirs:
        from sandbox.daemon.config import LimitsDefaults

        found = discover(dirs, LimitsDefaults())
        items = [skill_summary(found.skills[key].skill) for key in sorted(found.skills)]
        errors = found.errors
    else:
        with make_client(socket, url, token) as client:
            answer = client.skills_report()
        items, errors = answer["skills"], answer["errors"]
    if as_json:
        emit_json({"skills": items, "errors": errors})
    else:
        click.echo(table(_skill_rows(items), _SKILL_HEADERS))
        for error in errors:
            click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_FAILED if errors else EXIT_OK)


@skills.command("validate", context_settings=CONTEXT)
@click.argument("paths", nargs=-1, required=True,
                type=click.Path(exists=True, file_okay=False, path_type=Path))
@json_option
@handle_errors
def skills_validate(paths: tuple[Path, ...], as_json: bool) -> None:
    """Check skill directories (or trees of them): manifests, schemas, entrypoints.

    Exits 1 if any skill is invalid; each error names the file and the field.
    """
    from sandbox.daemon.config import LimitsDefaults
    from sandbox.daemon.skills import discover

    found = discover(paths, LimitsDefaults())
    valid = [{"id": skill_id, "path": str(item.skill.path)}
             for skill_id, item in found.skills.items()]
    if not valid and not found.errors:
        found.errors.append("no skill.toml, manifest.yaml or SKILL.md under "
                            f"{', '.join(map(str, paths))}")
    if as_json:
        emit_json({"valid": valid, "errors": found.errors})
    else:
        for item in valid:
            click.echo(f"ok     {item['id']}  ({item['path']})")
        for error in found.errors:
            click.echo(f"error  {error}")
    sys.exit(EXIT_FAILED if found.errors else EXIT_OK)


@skills.command("show", context_settings=CONTEXT)
@click.argument("skill")
@client_options
@json_option
@handle_errors
def skills_show(skill: str, socket: Path | None, url: str | None, token: str | None,
                as_json: bool) -> None:
    """One skill in detail: a directory on disk, or an id loaded in the daemon."""
    from sandbox.daemon.service import skill_summary
    from sandbox.skill import Skill

    if Path(skill).is_dir():
        info = skill_summary(Skill.from_dir(skill))
    else:
        with make_client(socket, url, token) as client:
            info = client.skill(skill)
    if as_json:
        emit_json(info)
        return
    limits = info["limits"]
    zygote = info.get("zygote") or {}
    click.echo(pairs([
        ("id", info["id"]), ("version", info["version"]), ("name", info["name"]),
        ("description", info["description"]), ("kind", info["kind"]),
        ("isolation", info["isolation"]),
        ("entrypoint", info["entrypoint"] or " ".join(info["command"] or [])),
        ("path", info["path"]), ("manifest", info["manifest"]),
        ("limits", ", ".join(f"{key}={value}" for key, value in limits.items())),
        ("network", "allowed" if info["permissions"]["network"] else "denied"),
        ("env", ", ".join(info["permissions"]["env"])),
        ("zygote", f"{_zygote_state(zygote)}, {'up' if zygote['alive'] else 'not running'}, "
                   f"pid {zygote['pid']}, started "
                   f"{zygote['starts']}x, rss {zygote['rss_kb']} kB, pss "
                   f"{zygote.get('pss_kb', 0)} kB, last use {_last_use(zygote)}"
         if zygote else None),
        ("circuit", info.get("circuit")),
    ]))
    for name in ("input_schema", "output_schema"):
        if info.get(name):
            click.echo(f"{name}:")
            click.echo(json.dumps(info[name], indent=2))


@skills.command("reload", context_settings=CONTEXT)
@click.option("--force", is_flag=True, help="Restart every skill's zygote, changed or not.")
@client_options
@json_option
@handle_errors
def skills_reload(force: bool, socket: Path | None, url: str | None, token: str | None,
                  as_json: bool) -> None:
    """Ask the daemon to reload config, skills and policy (like SIGHUP)."""
    with make_client(socket, url, token) as client:
        report = client.reload(force=force)
    if as_json:
        emit_json(report)
    else:
        click.echo(pairs((key, ", ".join(value)) for key, value in report.items()
                         if key != "errors"))
        for error in report["errors"]:
            click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_FAILED if report["errors"] else EXIT_OK)


# -- status / logs -------------------------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{days}d{hours}h{minutes}m" if days else \
        f"{hours}h{minutes}m" if hours else f"{minutes}m{secs}s"
    return text


def _isolation_summary(layers: list[dict[str, str]]) -> str:
    active = sum(layer["status"] == "active" for layer in layers)
    weak = [f"{layer['name']} {layer['status']}" for layer in layers
            if layer["status"] != "active"]
    return f"{active}/{len(layers)} layers active" + (f" ({', '.join(weak)})" if weak else "")


@main.command(context_settings=CONTEXT)
@client_options
@json_option
@handle_errors
def status(socket: Path | None, url: str | None, token: str | None, as_json: bool) -> None:
    """Daemon health, readiness, skills, zygotes, circuit states and work in flight.

    Exits 0 when ready, 1 when serving but not ready, 69 when no daemon answers.
    """
    with make_client(socket, url, token) as client:
        data = client.status()
        ready = client.ready()
    data["ready"] = ready
    if as_json:
        emit_json(data)
    else:
        listening = ", ".join(f"{kind} {where}" for kind, where in data["listening"].items())
        click.echo(pairs([
            ("daemon", f"{data['status']} (pid {data['pid']}, up {_age(data['uptime'])})"),
            ("ready", "yes" if ready else "NO"),
            ("listening", listening),
            ("in flight", f"{data['inflight']} (running {data['running']}, queued "
                          f"{data['queue_depth']}; max {data['max_concurrency']} + queue "
                          f"{data['max_queue']})"),
            ("exec log", data["execution_log"] or "off"),
            ("isolation", _isolation_summary(data.get("isolation") or [])),
        ]))
        click.echo()
        rows = [[item["id"], item["version"], item["zygote_pid"] or None,
                 _zygote_state({"state": item.get("zygote_state", "warm"),
                                "alive": item["zygote_up"]}),
                 item["zygote_starts"], item["running"], item["circuit"]]
                for item in data["skills"]]
        click.echo(table(rows, ["SKILL", "VERSION", "ZYGOTE", "STATE", "STARTS", "RUNNING",
                                "CIRCUIT"]))
        for error in data["skill_errors"]:
            click.echo(f"error: {error}", err=True)
    sys.exit(EXIT_OK if ready else EXIT_FAILED)


@main.command(context_settings=CONTEXT)
@click.option("--request-id", help="Records of one request (all its plan steps).")
@click.option("--tenant", help="Only this tenant.")
@click.option("--skill", help="Only this skill id (or tool name).")
@click.option("--status", "status_", type=click.Choice(["success", "failed", "timeout",
                                                         "canceled", "rejected"]),
              help="Only this status.")
@click.option("--since", help="Newer than an age (15m, 2h, 7d) or an ISO time.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--db", type=click.Path(dir_okay=False, path_type=Path),
              help="Read this execution log file (SQLite or .jsonl) directly, without the "
              "daemon.")
@client_options
@json_option
@handle_errors
def logs(request_id: str | None, tenant: str | None, skill: str | None, status_: str | None,
         since: str | None, limit: int, db: Path | None, socket: Path | None, url: str | None,
         token: str | None, as_json: bool) -> None:
    """Query the execution log, newest first."""
    from sandbox.daemon import logquery

    filters = {"request_id": request_id, "tenant_id": tenant, "skill_id": skill,
               "status": status_, "since": since, "limit": str(limit)}
    if db is not None:
        try:
            records = logquery.query(db, logquery.Filters.from_strings(filters))
        except (ValueError, OSError) as exc:
            fail(str(exc), EXIT_USAGE, as_json, "invalid_query")
    else:
        with make_client(socket, url, token) as client:
            records = client.executions(**filters)
    if as_json:
        emit_json({"records": records})
        return
    rows = [[record["timestamp"][:23], record["request_id"], record["step_name"],
             record["step_type"], record["status"], f"{record['duration_ms']:.1f}ms",
             f"{record['cpu_ms']}ms", f"{record['memory_mb']}MB", record["tenant_id"] or None,
             (record["error"] or "").partition("\n")[0][:60] or None] for record in records]
    click.echo(table(rows, ["TIME", "REQUEST", "SKILL", "TYPE", "STATUS", "DURATION", "CPU",
                            "MEMORY", "TENANT", "ERROR"]))


# -- doctor / bench ------------------------------------------------------------------------------


@main.command(context_settings=CONTEXT)
@json_option
def doctor(as_json: bool) -> None:
    """Which isolation layers this host supports (and which are off, and why)."""
    import importlib

    try:
        capabilities: Any = importlib.import_module("sandbox.capabilities")
    except ModuleNotFoundError:
        fail("the capability report (sandbox.capabilities) is not part of this build",
             EXIT_FAILED, as_json, "unavailable")
    if as_json:
        import dataclasses

        report = capabilities.report() if hasattr(capabilities, "report") \
            else capabilities.detect()
        data = dataclasses.asdict(report) \
            if dataclasses.is_dataclass(report) and not isinstance(report, type) else report
        all_active = getattr(report, "all_active", True)
        if isinstance(data, dict):
            data["all_active"] = all_active
        emit_json(data)
        sys.exit(EXIT_OK if all_active else EXIT_FAILED)
    sys.exit(capabilities.main() or EXIT_OK)


def _benchmarks(checkout: Path | None = None) -> Any:
    """The harness, from the source checkout this package runs from (an editable install or
    the checkout's root on sys.path); None from a wheel, which does not ship it."""
    checkout = checkout or Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        return None
    if str(checkout) not in sys.path:
        sys.path.append(str(checkout))
    import importlib

    module = importlib.import_module("benchmarks")
    found = Path(module.__file__ or "").resolve().parent.parent
    return module if found == checkout else None


@main.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@json_option
def bench(args: tuple[str, ...], as_json: bool) -> None:
    """Run the benchmarks (arguments go to `python -m benchmarks`; try `bench -- --help`).

    With --json, print the results file instead of the table.
    """
    benchmarks = _benchmarks()
    if benchmarks is None:
        fail("the benchmark harness (benchmarks/) is not shipped in the wheel: it needs the "
             "source tree; run `make bench` in a checkout", EXIT_FAILED, as_json, "unavailable")
    argv = list(args)
    if not as_json:
        sys.exit(benchmarks.main(argv))
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "bench.json"
        if "--output" not in argv and "-o" not in argv:
            argv += ["--output", str(output)]
        else:
            flag = "--output" if "--output" in argv else "-o"
            output = Path(argv[argv.index(flag) + 1])
        stdout = sys.stdout
        sys.stdout = sys.stderr  # the table goes to stderr; stdout carries only the JSON
        try:
            code = benchmarks.main(argv)
        finally:
            sys.stdout = stdout
        if output.is_file():
            click.echo(output.read_text())
    sys.exit(code)


def _add_fleet_commands() -> None:
    """`worker` and `fleet` live with the fleet; they import Celery only when run."""
    from sandbox.fleet.cli import fleet, worker

    main.add_command(worker)
    main.add_command(fleet)


_add_fleet_commands()


if __name__ == "__main__":  # pragma: no cover
    main()
