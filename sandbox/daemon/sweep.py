"""Removing the per-execution workdirs a killed daemon left behind, at the next start.

An execution's workdir is removed when its run ends; a `kill -9` of the daemon (or a power
loss) skips that. Only what this project made is touched, recognised by name:

- no `workdir_root` configured: the library made `<tmp>/skill-sandbox-<pid>-<random>/` (its
  per-process root, with `exec-<id>` dirs inside). Such a directory is removed when it is a
  real directory owned by our uid and its `<pid>` is not a live process, or is our own pid
  (the sweep runs before this daemon makes its own root: a directory with our pid is from an
  earlier process that had it, e.g. pid 1 of a restarted container).
- `workdir_root` configured: the `exec-<id>` directories directly inside it. Two daemons may be
  configured with one root, so the sweep only runs while holding an exclusive lock on
  `<root>/.skill-sandbox.lock`, which each daemon keeps for its lifetime; a daemon that cannot
  get it sweeps nothing.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

_LIBRARY_ROOT = re.compile(r"^skill-sandbox-(\d+)-[A-Za-z0-9_]+$")
_EXECUTION_DIR = re.compile(r"^exec-[A-Za-z0-9_-]+$")
LOCK_NAME = ".skill-sandbox.lock"


@dataclass
class Swept:
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock_fd: int | None = None  # held for the daemon's lifetime (closed with the process)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ours(path: Path, any_owner: bool = False) -> bool:
    """A real directory (not a symlink), owned by us unless `any_owner` (execution dirs may
    belong to an execution uid)."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and (any_owner or info.st_uid == os.geteuid())


def _remove(path: Path, swept: Swept) -> None:
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        swept.errors.append(f"{path}: {exc.strerror or exc}")
        return
    swept.removed.append(str(path))


def sweep_workdirs(workdir_root: Path | None) -> Swept:
    """Remove leftover workdirs (see the module docstring); what was removed and what failed."""
    swept = Swept()
    if workdir_root is None:
        base = Path(tempfile.gettempdir())
        try:
            names = sorted(os.listdir(base))
        except OSError as exc:
            swept.errors.append(f"{base}: {exc.strerror or exc}")
            return swept
        for name in names:
            match = _LIBRARY_ROOT.match(name)
            if match and not _pid_alive(int(match.group(1))) and _ours(base / name):
                _remove(base / name, swept)
        return swept
    root = Path(workdir_root)
    if not root.is_dir():
        return swept
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        swept.errors.append(f"{root / LOCK_NAME}: {exc.strerror or exc}")
        return swept
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        swept.errors.append(f"{root}: another daemon holds {LOCK_NAME}; not sweeping")
        return swept
    swept.lock_fd = fd
    for name in sorted(os.listdir(root)):
        if _EXECUTION_DIR.match(name) and _ours(root / name, any_owner=True):
            _remove(root / name, swept)
    return swept
