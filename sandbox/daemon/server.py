"""The daemon process: listeners, the uvicorn servers, signals, drain, exit codes.

As in gunicorn's arbiter, signal handlers only record what was asked; the main coroutine does
the work. SIGTERM/SIGINT: stop taking work, let in-flight executions finish for up to
`grace_period`, then cancel what is left, answer those callers, stop every zygote and exit; a
second SIGTERM/SIGINT skips the wait. SIGHUP: reload config, skills and policy without
dropping in-flight work. Zygotes exit on EOF of their control socket, so even a `kill -9` of the
daemon leaves none behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import signal
import socket
import stat
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from sandbox.daemon import jsonlog, notify
from sandbox.daemon.app import build_app
from sandbox.daemon.config import (
    ConfigError,
    DaemonConfig,
    TcpAddress,
    env_values,
    load_config,
)
from sandbox.daemon.protocol import Listener, protocol_for
from sandbox.daemon.service import Service

log = jsonlog.get_logger("server")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2  # bad config: fix it, restarting will not help
EXIT_BIND = 3  # the socket or port is taken, or cannot be created
_BACKLOG = 512
#: File descriptors kept free of connections: the event loop, the execution log, zygote
#: control sockets, and per running execution its pipes, pidfd and cgroup files.
FD_RESERVE_BASE = 128
FD_RESERVE_PER_EXECUTION = 16
#: asyncio accepts up to `backlog` connections per readiness event before any of their
#: protocols runs, so a connection storm holds that many fds (twice, across two loop turns)
#: beyond the connection bound. uvicorn is given this small backlog, which bounds the batch;
#: the kernel's queue is set back to `_BACKLOG` once the servers listen.
ACCEPT_BATCH = 16
MIN_CONNECTIONS = 8


class BindError(RuntimeError):
    """A listener cannot be created; the text says which and why."""


# -- listeners -------------------------------------------------------------------------------


def bind_unix(path: Path) -> socket.socket:
    """Listen on `path`, created mode 0600 (only this uid may connect).

    A socket file left by a daemon that died is removed; one a live daemon answers on is not:
    two daemons on one socket would split the traffic silently.
    """
    path = path.absolute()
    if len(os.fsencode(path)) >= 108:
        raise BindError(f"{path}: Unix socket paths must be shorter than 108 bytes")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None:
        if not stat.S_ISSOCK(info.st_mode):
            raise BindError(f"{path} exists and is not a socket; refusing to replace it")
        if _answers(path):
            raise BindError(f"{path}: another process is listening on this socket (is a daemon "
                            "already running?)")
        os.unlink(path)
        jsonlog.event(log, logging.WARNING, "removed stale socket", socket=str(path))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # created 0600 from the start: no window where others connect
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise BindError(f"{path}: cannot create socket: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(_BACKLOG)
    sock.setblocking(False)
    return sock


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
    finally:
        probe.close()
    return True


def bind_tcp(address: TcpAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        sock = socket.create_server((address.host, address.port), family=family,
                                    backlog=_BACKLOG)
    except OSError as exc:
        raise BindError(f"tcp {address}: cannot listen: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def _socket_identity(path: Path) -> tuple[int, int] | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


# -- uvicorn -----------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _server(app: ASGIApp, config: DaemonConfig, listener: Listener) -> _Server:
    """uvicorn's own knobs where it has them (keep-alive, head size, backlog); the head and
    body deadlines and the connection bound come from `BoundedH11Protocol`."""
    server_config = uvicorn.Config(
        app, http=protocol_for(listener), ws="none", lifespan="off", log_config=None,
        access_log=False, server_header=False, proxy_headers=False,
        timeout_keep_alive=config.keepalive_timeout,  # type: ignore[arg-type]
        timeout_graceful_shutdown=5, h11_max_incomplete_event_size=64 * 1024,
        backlog=ACCEPT_BATCH,
    )
    return _Server(server_config)


def connection_limits(config: DaemonConfig, listeners: int,
                      max_concurrency: int) -> tuple[int, dict[str, int]]:
    """Connections allowed per listener: `max_connections`, lowered so that all listeners'
    connections plus a reserve for workers fit under the soft RLIMIT_NOFILE. With the bound
    in place accept() cannot fail for lack of fds, and the Unix socket keeps its own share
    however many TCP connections arrive. Returns the limit and the figures behind it."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    reserve = FD_RESERVE_BASE + FD_RESERVE_PER_EXECUTION * max_concurrency + \
        2 * ACCEPT_BATCH * listeners
    if soft == resource.RLIM_INFINITY:
        share = config.max_connections
    else:
        share = max(MIN_CONNECTIONS, (soft - reserve) // listeners)
    return min(config.max_connections, share), {"nofile": int(soft), "fd_reserve": reserve}


async def _relisten(servers: list[_Server], listeners: list[socket.socket]) -> None:
    """Once uvicorn listens (with `ACCEPT_BATCH` as asyncio's backlog, which also sizes its
    accept batches), give the kernel queue its full length again."""
    deadline = asyncio.get_running_loop().time() + 10
    while not all(server.started for server in servers):
        if asyncio.get_running_loop().time() > deadline:
            return  # a server that failed to start is reported by _serve
        await asyncio.sleep(0.01)
    for sock in listeners:
        sock.listen(_BACKLOG)


def _loop_errors(limiter: jsonlog.RateLimited) -> Callable[[asyncio.AbstractEventLoop,
                                                            dict[str, Any]], None]:
    """asyncio's exception handler, rate-limited: a repeating error (accept() out of fds,
    once per attempt) is one JSON line per interval with a count, not a traceback each."""
    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "event loop error")
        exception = context.get("exception")
        key = f"{message}:{type(exception).__name__}"
        skipped = limiter.allow(key)
        if skipped is None:
            return
        fields: dict[str, Any] = {"error": repr(exception) if exception else None}
        if skipped:
            fields["similar_events_not_logged"] = skipped
        quiet = isinstance(exception, OSError)  # the errno says it all; no traceback
        log.error(message, exc_info=None if quiet or exception is None else exception,
                  extra={"fields": fields})
    return handler


# -- the daemon --------------------------------------------------------------------------------


class Daemon:
    def __init__(self, config: DaemonConfig,
                 reread_config: Callable[[], DaemonConfig] | None = None) -> None:
        self.config = config
        self.reread_config = reread_config
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._stop.is_set():
            jsonlog.event(log, logging.WARNING, "second stop signal: not waiting for in-flight "
                          "executions", signal=name)
            self._force.set()
        else:
            jsonlog.event(log, logging.INFO, "stop signal", signal=name)
            self._stop.set()

    def _on_hup(self, service: Service) -> None:
        jsonlog.event(log, logging.INFO, "reload signal", signal="SIGHUP")
        self._spawn(self._reload(service))

    async def _reload(self, service: Service) -> None:
        if self.config.notify:
            notify.reloading()
        report = await service.reload()
        if self.config.notify:
            notify.ready(f"reloaded: {len(service.sandbox.skills())} skills, "
                         f"{len(report.errors)} errors")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        config = self.config
        socket_path = config.socket.absolute()
        try:
            unix = bind_unix(socket_path)
        except BindError as exc:
            jsonlog.event(log, logging.ERROR, "cannot listen", error=str(exc))
            return EXIT_BIND
        identity = _socket_identity(socket_path)
        listeners = [unix]
        try:
            if config.tcp_address is not None:
                listeners.append(bind_tcp(config.tcp_address))
        except BindError as exc:
            jsonlog.event(log, logging.ERROR, "cannot listen", error=str(exc))
            _close_unix(unix, socket_path, identity)
            return EXIT_BIND
        loop.set_exception_handler(_loop_errors(jsonlog.RateLimited()))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        service: Service | None = None
        try:
            service = Service(config, self.reread_config)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup, service)
            return await self._serve(service, listeners, socket_path)
        except ConfigError as exc:
            jsonlog.event(log, logging.ERROR, "invalid configuration", error=str(exc))
            return EXIT_CONFIG
        except Exception:
            log.exception("daemon failed", extra={"fields": {"pid": os.getpid()}})
            return EXIT_FAILURE
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            if service is not None:
                await service.close()
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=5)
            for sock in listeners:
                sock.close()
            _close_unix(None, socket_path, identity)
            jsonlog.event(log, logging.INFO, "stopped", pid=os.getpid())

    async def _serve(self, service: Service, listeners: list[socket.socket],
                     socket_path: Path) -> int:
        config = self.config
        report = await service.start()
        apps = [build_app(service)]
        listening = {"socket": str(socket_path)}
        if len(listeners) > 1:
            apps.append(build_app(service, require_token=True))
            host, port = listeners[1].getsockname()[:2]
            listening["tcp"] = str(TcpAddress(host, port))
        service.listening = listening
        limit, figures = connection_limits(config, len(listeners),
                                           service.sandbox.max_concurrency)
        names = ["unix", "tcp"][:len(listeners)]
        bounds = [Listener(name, limit, config.header_timeout, config.body_timeout,
                           on_refused=service.metrics.connection_refused,
                           on_timeout=service.metrics.connection_timed_out)
                  for name in names]
        servers = [_server(app, config, bound) for app, bound in zip(apps, bounds, strict=True)]
        for bound, server in zip(bounds, servers, strict=True):
            bound.open_connections = lambda server=server: len(  # type: ignore[misc]
                server.server_state.connections)
        service.metrics.open_connections = {bound.name: bound.open_connections
                                            for bound in bounds}
        jsonlog.event(log, logging.WARNING if limit < config.max_connections else logging.INFO,
                      "connection limits", **{name: limit for name in names},
                      max_connections=config.max_connections, header_timeout=config.header_timeout,
                      body_timeout=config.body_timeout,
                      keepalive_timeout=config.keepalive_timeout, **figures)
        serving = [asyncio.create_task(server.serve(sockets=[sock]))
                   for server, sock in zip(servers, listeners, strict=True)]
        await _relisten(servers, listeners)
        self._spawn(service.watch_zygotes())
        weak = {layer["name"]: f"{layer['status']}: {layer['detail']}"
                for layer in service.isolation_layers() if layer["status"] != "active"}
        if weak:
            jsonlog.event(log, logging.WARNING, "isolation layers not fully active", **weak)
        jsonlog.event(log, logging.INFO, "listening", pid=os.getpid(), **listening,
                      skills=len(service.sandbox.skills()), skill_errors=len(report.errors))
        if config.notify:
            notify.ready(f"serving {len(service.sandbox.skills())} skills")
        stop = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait({stop, *serving}, return_when=asyncio.FIRST_COMPLETED)
        failed = [task for task in serving if task in done]
        if failed:  # a server stopped by itself: report why, then shut down the rest
            stop.cancel()
            for task in failed:
                if task.exception() is not None:
                    jsonlog.event(log, logging.ERROR, "server failed",
                                  error=repr(task.exception()))
        await self._drain(service)
        for server in servers:
            server.should_exit = True
        await asyncio.wait(serving, timeout=10)
        return EXIT_FAILURE if failed else EXIT_OK

    async def _drain(self, service: Service) -> None:
        grace = self.config.grace_period
        if self.config.notify:
            notify.stopping(f"draining {len(service.inflight)} executions")
        drain = asyncio.create_task(service.drain(grace))
        force = asyncio.create_task(self._force.wait())
        await asyncio.wait({drain, force}, return_when=asyncio.FIRST_COMPLETED)
        force.cancel()
        finished = drain.done() and drain.result()
        if not finished:
            drain.cancel()
            jsonlog.event(log, logging.WARNING, "grace period over: canceling executions",
                          inflight=sorted(service.inflight))
        await service.close()


def _close_unix(sock: socket.socket | None, path: Path,
                identity: tuple[int, int] | None) -> None:
    if sock is not None:
        sock.close()
    if identity is not None and _socket_identity(path) == identity:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- entry point -------------------------------------------------------------------------------


def serve(config_path: str | os.PathLike[str] | None = None,
          flags: Mapping[str, Any] | None = None,
          env: Mapping[str, str] | None = None) -> int:
    """Run the daemon until it is told to stop; the process exit code."""
    def reread() -> DaemonConfig:
        return load_config(config_path, env=env, flags=flags)

    try:
        config = reread()
    except ConfigError as exc:
        jsonlog.configure()
        jsonlog.event(log, logging.ERROR, "invalid configuration", error=str(exc))
        return EXIT_CONFIG
    jsonlog.configure(config.log_level, config.log_format)
    _, unknown = env_values(os.environ if env is None else env)
    if unknown:
        jsonlog.event(log, logging.WARNING, "unknown SKILL_SANDBOX_* environment variables "
                      "ignored", names=unknown)
    return asyncio.run(Daemon(config, reread).run())
