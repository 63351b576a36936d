"""`skill-sandbox worker` and `skill-sandbox fleet status`: the fleet's commands.

Kept here, beside the fleet, and added to the main group by `sandbox.cli`; Celery and redis
are imported only when a command runs, so the rest of the CLI works without the `fleet` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from sandbox.fleet.protocol import DEFAULT_GROUP, DEFAULT_HEARTBEAT_TTL, DEFAULT_PREFIX

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
FLEET_EXTRA = frozenset({"celery", "redis", "kombu"})

broker_option = click.option(
    "--broker", envvar="SKILL_SANDBOX_BROKER", required=True, metavar="URL",
    help="Redis broker URL, e.g. redis://127.0.0.1:6379/0 [env SKILL_SANDBOX_BROKER]")
redis_option = click.option("--redis", "redis_url", default=None, metavar="URL",
                            help="Redis for the fleet's state, if not the broker's")
prefix_option = click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
                             help="prefix of the fleet's Redis keys (one per fleet)")


def _missing_extra(exc: ModuleNotFoundError) -> None:
    if (exc.name or "").split(".")[0] not in FLEET_EXTRA:
        raise exc
    click.echo(f"skill-sandbox: {exc.name} is not installed: the fleet needs "
               "pip install 'skill-sandbox[fleet]'", err=True)
    sys.exit(69)


@click.command(context_settings=CONTEXT)
@broker_option
@redis_option
@prefix_option
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              envvar="SKILL_SANDBOX_CONFIG",
              help="the daemon's TOML config: skills, isolation, policy, circuit, execution "
                   "log, limits [env SKILL_SANDBOX_CONFIG]")
@click.option("--skills", "skills", multiple=True, type=click.Path(path_type=Path),
              help="skill directory (repeatable; replaces the config's)")
@click.option("--execution-log", default=None, help="this node's execution log (.jsonl or SQLite)")
@click.option("--max-concurrency", type=int, default=None,
              help="executions at once in this worker (default: CPU count)")
@click.option("--group", default=DEFAULT_GROUP, show_default=True,
              help="skill group: the worker consumes queue skill-sandbox.GROUP only")
@click.option("--node", default=None, help="node name in results and logs (default: hostname)")
@click.option("--pool", type=click.Choice(["threads", "solo"]), default="threads",
              show_default=True, help="Celery pool (never prefork: it would fork the supervisor)")
@click.option("--heartbeat-ttl", type=float, default=DEFAULT_HEARTBEAT_TTL, show_default=True,
              help="seconds without a heartbeat after which clients count this worker dead")
@click.option("--shared-state/--local-state", default=True, show_default=True,
              help="circuit breaker and policy counters in Redis (fleet-wide) or in memory")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--metrics-port", type=int, default=None,
              help="serve Prometheus metrics on 127.0.0.1:PORT (needs the daemon extra)")
@click.option("--json", "as_json", is_flag=True,
              help="log one JSON object per line (as the daemon does) instead of text")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="write the worker id here once it consumes (for supervisors and tests)")
def worker(broker: str, redis_url: str | None, prefix: str, config_path: Path | None,
           skills: tuple[Path, ...], execution_log: str | None, max_concurrency: int | None,
           group: str, node: str | None, pool: str, heartbeat_ttl: float, shared_state: bool,
           log_level: str, metrics_port: int | None, as_json: bool,
           ready_file: Path | None) -> None:
    """Run a fleet worker: a Celery worker owning one Sandbox with the config's skills.

    SIGTERM/SIGINT drain: stop taking requests, finish the running ones, then leave.
    """
    from sandbox.daemon.config import ConfigError, load_config

    flags: dict[str, Any] = {}
    if skills:
        flags["skills"] = [str(path) for path in skills]
    if execution_log is not None:
        flags["execution_log"] = execution_log
    if max_concurrency is not None:
        flags["max_concurrency"] = max_concurrency
    from sandbox.daemon.jsonlog import configure

    configure(log_level, "json" if as_json else "text")
    try:
        config = load_config(config_path, flags=flags)
        from sandbox.fleet.worker import run_worker

        code = run_worker(config, broker=broker, redis_url=redis_url, node=node, group=group,
                          prefix=prefix, pool=pool,  # type: ignore[arg-type]
                          heartbeat_ttl=heartbeat_ttl, shared_state=shared_state,
                          loglevel=log_level.upper(), ready_file=ready_file,
                          metrics_port=metrics_port)
    except ConfigError as exc:
        click.echo(f"skill-sandbox: {exc}", err=True)
        sys.exit(2)
    except ModuleNotFoundError as exc:
        _missing_extra(exc)
        raise
    sys.exit(code)


@click.group(context_settings=CONTEXT)
def fleet() -> None:
    """Look at the fleet of workers (`worker`) through its Redis."""


@fleet.command("status", context_settings=CONTEXT)
@broker_option
@redis_option
@prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def status(broker: str, redis_url: str | None, prefix: str, as_json: bool) -> None:
    """Live workers (node, skills, load), where each skill is routed, and queue depths."""
    try:
        from sandbox.fleet.client import FleetClient

        with FleetClient(broker, redis_url=redis_url, prefix=prefix) as client:
            data = client.status()
    except ModuleNotFoundError as exc:
        _missing_extra(exc)
        raise
    except Exception as exc:
        if type(exc).__module__.startswith("redis"):
            click.echo(f"skill-sandbox: cannot reach the fleet's Redis at {redis_url or broker}:"
                       f" {exc}", err=True)
            sys.exit(69)
        raise
    from sandbox.cliformat import emit_json, table

    if as_json:
        emit_json(data)
        return
    click.echo(table([(w["node"], w["worker_id"], w["queue"], w["concurrency"], w["inflight"],
                       w["executed"], "draining" if w["draining"] else "up", len(w["skills"]))
                      for w in data["workers"]],
                     ["NODE", "WORKER", "QUEUE", "THREADS", "INFLIGHT", "DONE", "STATE",
                      "SKILLS"]))
    click.echo("")
    click.echo(table([(skill_id, info["queue"], info["workers"],
                       "yes" if info["idempotent"] else "no",
                       ", ".join(info["unrouted_on"]) or "-")
                      for skill_id, info in data["skills"].items()],
                     ["SKILL", "QUEUE", "WORKERS", "IDEMPOTENT", "ALSO LOADED ON (UNUSED)"]))
    click.echo("")
    click.echo(table(list(data["queues"].items()), ["QUEUE", "WAITING"]))
