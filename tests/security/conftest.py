"""The `hostile` fixture: see tests/security/hostile.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from sandbox import Sandbox
from tests.security.hostile import Hostile, hostile_factory


@pytest.fixture
def hostile(make_sandbox: Callable[..., Sandbox],
            skill_dir: Callable[..., Path]) -> Callable[..., Hostile]:
    """`hostile(code, limits={}, network=False, **sandbox_options)`: a loaded skill whose
    `attack(input)` is `code`, with the suite's small limits (`limits` overrides some)."""
    return hostile_factory(make_sandbox, skill_dir)
