"""Structured logs: one JSON object per line on stderr, so journald/Loki/jq can query them.

Events are logged as `log.info("execution", extra={"fields": {...}})`; the formatter lifts
`fields` to the top level, next to `ts`, `level`, `logger` and `event`.

Everything that reaches stderr through Python goes through the one handler `configure`
installs: the daemon's loggers, uvicorn's, asyncio's, the library's (`sandbox`, e.g. an
execution log that cannot be written), warnings, and uncaught exceptions in threads. A
traceback is a field of its event, never lines of its own. In text mode, control characters in
messages and values are escaped, so a caller's `tenant_id` cannot start a line of its own.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import types
from typing import Any

LOGGER_NAME = "skill_sandbox"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # ensure_ascii: no raw control or separator character can reach the line, and text
        # that cannot be encoded (a lone surrogate) is written as an escape, not an error
        return json.dumps(entry, default=str, separators=(",", ":"), ensure_ascii=True)


def escape(text: str) -> str:
    """`text` with backslashes and control/line-separator characters escaped (`\\n`,
    `\\x1b`, `\\u2028`), so it stays on one line and cannot emit terminal sequences."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char == "\n":
            out.append("\\n")
        elif char == "\r":
            out.append("\\r")
        elif char == "\t":
            out.append("\\t")
        elif not char.isprintable():  # controls, separators, format chars, surrogates
            out.append(f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"
                       if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
        else:
            out.append(char)
    return "".join(out)


def _text_value(value: Any) -> str:
    text = escape(str(value))
    if not text or any(char in text for char in ' ="'):  # one key=value pair stays one
        return '"' + text.replace('"', '\\"') + '"'
    return text


class TextFormatter(logging.Formatter):
    """For a terminal: the event, then key=value pairs; every line is one event (a traceback
    follows indented, each of its lines escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {}
        pairs = " ".join(f"{escape(str(key))}={_text_value(value)}"
                         for key, value in fields.items())
        line = (f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} "
                f"{escape(record.getMessage())}")
        text = f"{line} {pairs}".rstrip()
        if record.exc_info:
            text += "".join("\n    | " + escape(part)
                            for part in self.formatException(record.exc_info).splitlines())
        return text


#: Loggers routed to the handler besides the root (they do not propagate to it).
_OWN = (LOGGER_NAME, "uvicorn", "uvicorn.error")


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route every log record and stray traceback of the process to stderr in one format;
    idempotent (reload calls it)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    for name in _OWN:
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
    logging.getLogger("uvicorn.access").disabled = True  # we log requests ourselves
    root = logging.getLogger()  # asyncio, the library ("sandbox"), py.warnings, anything else
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))
    logging.captureWarnings(True)
    _route_uncaught()


def _route_uncaught() -> None:
    """Uncaught exceptions (main thread, other threads, `__del__`) as one logged event each,
    instead of Python writing a bare traceback to stderr."""
    log = get_logger("uncaught")

    def excepthook(kind: type[BaseException], value: BaseException,
                   tb: types.TracebackType | None) -> None:
        log.error("uncaught exception", exc_info=(kind, value, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        log.error("uncaught exception in thread",
                  exc_info=(args.exc_type, args.exc_value or args.exc_type(),
                            args.exc_traceback),
                  extra={"fields": {"thread": getattr(args.thread, "name", None)}})

    def unraisable_hook(unraisable: Any) -> None:
        value = unraisable.exc_value
        log.error("unraisable exception",
                  exc_info=(unraisable.exc_type, value, unraisable.exc_traceback)
                  if value is not None else None,
                  extra={"fields": {"where": unraisable.err_msg or repr(unraisable.object)}})

    sys.excepthook = excepthook
    threading.excepthook = thread_hook
    sys.unraisablehook = unraisable_hook


def get_logger(name: str = "") -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one structured event."""
    if logger.isEnabledFor(level):
        logger.log(level, name, extra={"fields": fields})


class RateLimited:
    """At most one event per `interval` seconds for each key; the next one says how many were
    left out. For errors that can repeat per connection attempt (accept() out of fds), so a
    flood of them is a line every few seconds, not a traceback per attempt."""

    def __init__(self, interval: float = 10.0,
                 clock: Any = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None to stay quiet, else the number of events left out since the last one."""
        now = self._clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return None
            if len(self._last) > 1000:  # keys are message texts: keep the table small
                self._last.clear()
            self._last[key] = now
            return self._skipped.pop(key, 0)
