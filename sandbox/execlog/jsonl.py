"""JSON Lines execution log: one record per line, appended with one `write(2)` per record.

The file is opened `O_APPEND` and each record goes out as a single write of a complete line
under a lock, so concurrent writers in this process never interleave and a killed writer
leaves at most its last, unacknowledged line partial. `fsync=True` also survives power loss.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import msgspec

from sandbox.execlog.records import (
    DEFAULT_MAX_OUTPUT_BYTES,
    ExecutionLogRecord,
    RecordLogger,
    decode_record,
)


class JsonlExecutionLogger(RecordLogger):
    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False,
                 max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES) -> None:
        super().__init__(max_output_bytes)
        self.path = Path(path)
        self.fsync = fsync
        self._encoder = msgspec.json.Encoder()
        self._lock = threading.Lock()
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:  # private like the SQLite log: a file an older version made 0640 is tightened
            if os.fstat(self._fd).st_mode & 0o077:
                os.fchmod(self._fd, 0o600)
        except PermissionError:
            pass

    def write(self, record: ExecutionLogRecord) -> None:
        line = self._encoder.encode(record) + b"\n"
        with self._lock:
            if self._fd is None:
                raise ValueError(f"{self.path}: the execution log is closed")
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def iter_jsonl(path: str | os.PathLike[str]) -> Iterator[ExecutionLogRecord]:
    """Records of a JSON Lines log in order. A last line without its newline (a writer killed
    mid-write) is skipped; any other undecodable line is an error naming its number."""
    with open(path, "rb") as handle:
        data = handle.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]
    del tail  # partial (unacknowledged) last line, if any
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            yield decode_record(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{path}: line {number} is not an execution log record: "
                             f"{exc}") from None


def read_jsonl(path: str | os.PathLike[str]) -> list[ExecutionLogRecord]:
    return list(iter_jsonl(path))
