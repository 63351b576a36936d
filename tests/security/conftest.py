"""The `hostile` fixture: see tests/security/hostile.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandbox import Sandbox
from tests.security.hostile import Hostile, hostile_factory

#: Suites whose hostile skills also run with exec'd zygotes (`base_zygote=False`); all run with
#: zygotes forked from the shared base, the default. The layers must hold on both paths.
BOTH_ZYGOTE_PATHS = {"test_processes", "test_filesystem", "test_ipc", "test_resources",
                     "test_kernel"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "zygote_path" in metafunc.fixturenames:
        module = metafunc.module.__name__.rsplit(".", 1)[-1]
        paths = ["base", "exec"] if module in BOTH_ZYGOTE_PATHS else ["base"]
        metafunc.parametrize("zygote_path", paths)


@pytest.fixture
def hostile(make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path],
            zygote_path: str) -> Callable[..., Hostile]:
    """`hostile(code, limits={}, network=False, **sandbox_options)`: a loaded skill whose
    `attack(input)` is `code`, with the suite's small limits (`limits` overrides some); its
    zygote forked from the shared base or exec'd, as `zygote_path` says (checked)."""
    build = hostile_factory(make_sandbox, skill_dir)

    def on_path(code: str, **options: Any) -> Hostile:
        options.setdefault("base_zygote", zygote_path == "base")
        attack = build(code, **options)
        info = attack.sandbox.zygote_info(attack.skill.id)
        assert info["from_base"] == options["base_zygote"], info
        return attack

    return on_path
