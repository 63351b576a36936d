"""Finding the daemon's skills on disk, one directory at a time, so one broken skill cannot keep
the others from loading, and telling which ones changed since the last (re)load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.daemon.config import LimitsDefaults
from sandbox.errors import SkillLoadError
from sandbox.manifest import MANIFEST_FILES
from sandbox.skill import Skill

#: Files hashed per skill before giving up on detail (a huge tree is re-loaded on every reload).
MAX_FINGERPRINT_FILES = 5000


@dataclass(frozen=True)
class Found:
    skill: Skill
    fingerprint: str


@dataclass
class Discovery:
    skills: dict[str, Found] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    broken: set[Path] = field(default_factory=set)  # skill directories that failed to load


def skill_dirs(root: Path) -> Iterator[Path]:
    """Directories under `root` holding a manifest; a skill's own subfolders are not searched."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
        if any(name in filenames for name in MANIFEST_FILES):
            dirnames[:] = []
            yield Path(dirpath)


def fingerprint(skill_dir: Path) -> str:
    """Changes when any file of the skill changes (name, size or mtime)."""
    digest = hashlib.sha256()
    count = 0
    for dirpath, dirnames, filenames in os.walk(skill_dir):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                info = os.stat(path)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(path, skill_dir)}\0{info.st_size}\0"
                          f"{info.st_mtime_ns}\n".encode())
            count += 1
            if count >= MAX_FINGERPRINT_FILES:
                return "unbounded:" + os.urandom(8).hex()
    return digest.hexdigest()


def with_defaults(skill: Skill, defaults: LimitsDefaults) -> Skill:
    """The skill with the daemon's default limits filling in what its manifest left unset."""
    manifest = skill.manifest
    unset = {name: value for name, value in defaults.model_dump().items()
             if value is not None and name not in manifest.limits.model_fields_set}
    if not unset:
        return skill
    limits = manifest.limits.model_copy(update=unset)
    return dataclasses.replace(skill, manifest=manifest.model_copy(update={"limits": limits}))


def discover(roots: Iterable[Path], defaults: LimitsDefaults) -> Discovery:
    found = Discovery()
    for root in roots:
        if not root.is_dir():
            found.errors.append(f"{root}: skills directory does not exist")
            continue
        for directory in skill_dirs(root):
            try:
                skill = with_defaults(Skill.from_dir(directory), defaults)
            except SkillLoadError as exc:
                found.errors.append(str(exc))
                found.broken.add(directory.resolve())
                continue
            other = found.skills.get(skill.id)
            if other is not None:
                found.errors.append(f"{skill.manifest_path}: field 'id': {skill.id!r} is also "
                                    f"the id of {other.skill.manifest_path}; keeping that one")
                continue
            found.skills[skill.id] = Found(skill, fingerprint(skill.path))
    return found
