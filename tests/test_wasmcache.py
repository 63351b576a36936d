"""The supervisor's store of compiled WASM modules: memfds kept by skill id, within a byte
budget, least recently used out first, every fd closed when dropped."""

from __future__ import annotations

import os

import pytest

from sandbox.wasmcache import CompiledModules


def _artifact(size: int) -> int:
    fd = os.memfd_create("test-artifact", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_the_least_recently_used_module_leaves_first_when_over_budget() -> None:
    modules = CompiledModules(budget=300)
    first, second, third = _artifact(100), _artifact(100), _artifact(150)
    modules.keep("a", first, "sha-a")
    modules.keep("b", second, "sha-b")
    taken = modules.take("a")  # "a" used: "b" is now the least recently used
    assert taken is not None and taken[1] == "sha-a"
    os.close(taken[0])
    modules.keep("c", third, "sha-c")
    assert modules.take("b") is None and not _is_open(second)
    assert len(modules) == 2 and modules.bytes == 250
    modules.close()
    assert not _is_open(first) and not _is_open(third) and len(modules) == 0


def test_a_taken_fd_is_a_duplicate_that_outlives_the_modules_eviction() -> None:
    modules = CompiledModules(budget=100)
    kept = _artifact(100)
    modules.keep("a", kept, "sha")
    taken = modules.take("a")
    assert taken is not None and taken[0] != kept
    modules.forget("a")
    assert not _is_open(kept) and _is_open(taken[0])  # a boot still reading it is unharmed
    os.close(taken[0])


@pytest.mark.parametrize("size", [101, 1000])
def test_a_module_larger_than_the_budget_is_not_kept(size: int) -> None:
    modules = CompiledModules(budget=100)
    fd = _artifact(size)
    modules.keep("a", fd, "sha")
    assert modules.take("a") is None and not _is_open(fd) and modules.bytes == 0
