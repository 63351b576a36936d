"""Shared fixtures: every test ends with no process of ours left alive."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest

from sandbox import ExecutionRequest, ExecutionResult, Sandbox, Skill

if TYPE_CHECKING:
    from daemon_util import Daemon

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "skills_examples"
#: openbotstack's real skills and WASM host: ../shared/reference/openbotstack/ beside the
#: checkout (read-only test data, never copied into the project).
OPENBOTSTACK = ROOT.parent / "shared" / "reference" / "openbotstack"
#: How much slower than this machine the host running the tests is (an emulated VM: 10-20):
#: every test timeout, the hostile suite's wall and CPU limits and the waits for processes to
#: go are multiplied by it. Tests never assert on wall time, so nothing else changes.
SLOWDOWN = max(1.0, float(os.environ.get("SKILL_SANDBOX_TEST_SLOWDOWN") or 1))
#: pytest-timeout's default in pyproject.toml (`timeout`), for tests without a mark of their own.
_DEFAULT_TIMEOUT = 60.0


def slow(seconds: float) -> float:
    """`seconds` on this machine, on the host the tests run on (see `SLOWDOWN`)."""
    return seconds * SLOWDOWN


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Scale every test's timeout (its own `timeout` mark, or the default) by `SLOWDOWN`."""
    if SLOWDOWN == 1.0:
        return
    for item in items:
        mark = item.get_closest_marker("timeout")
        seconds = float(mark.args[0]) if mark is not None and mark.args else _DEFAULT_TIMEOUT
        item.add_marker(pytest.mark.timeout(slow(seconds)), append=False)


def descendants() -> list[psutil.Process]:
    try:
        return psutil.Process(os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:  # pragma: no cover
        return []


def wait_until_gone(pids: set[int], timeout: float = 5.0) -> set[int]:
    """The pids among `pids` still alive (not zombies) after `timeout` seconds (scaled)."""
    deadline = time.monotonic() + slow(timeout)
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if _alive(pid)}
        if alive:
            time.sleep(0.02)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _resident_spares(zygotes: set[int]) -> set[int]:
    """Idle spare children of processes that were there before the test (a zygote of a daemon
    shared by several tests forks a new spare after each execution): residents, not leftovers.
    Spares of zygotes the test itself started are not excused."""
    spares = set()
    for pid in zygotes:
        try:
            spares.update(spare_pids(psutil.Process(pid)))
        except psutil.NoSuchProcess:
            continue
    return spares


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Fail any test that leaves a child, grandchild or escaped process of this test behind."""
    before = {p.pid for p in descendants()}
    yield
    leftovers = {p.pid for p in descendants()} - before - _resident_spares(before)
    survivors = wait_until_gone(leftovers)
    if survivors:
        for pid in survivors:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
        pytest.fail(f"processes left running after the test: {sorted(survivors)}")


@pytest.fixture
def example() -> Callable[[str], Skill]:
    """Load an example skill by directory name."""
    return lambda name: Skill.from_dir(EXAMPLES / name)


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Sandbox]]:
    """Build sandboxes that are closed (and so reaped) at the end of the test."""
    opened: list[Sandbox] = []

    def make(*skills: Skill | str | os.PathLike[str], **options: object) -> Sandbox:
        sandbox = Sandbox(skills, **options)  # type: ignore[arg-type]
        opened.append(sandbox)
        return sandbox

    yield make
    for sandbox in opened:
        sandbox.close()


@pytest.fixture
def start_daemon() -> Iterator[Callable[..., Daemon]]:
    """Start real daemon processes: `start_daemon(skill_dirs, **options)` → a `Daemon` (not yet
    started; call `.start()`), stopped and reaped at the end of the test. (Modules that share
    one daemon among their tests call their module-scoped fixture `daemon`.)"""
    from daemon_util import Daemon  # the daemon's client dependencies, only where used

    started: list[Daemon] = []

    def make(skills: list[Path], **options: Any) -> Daemon:
        item = Daemon(skills, **options)
        started.append(item)
        return item

    yield make
    for item in started:
        item.close()


@pytest.fixture
def skill_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a throw-away skill: `skill_dir(code, manifest_extra="...")` → its directory."""
    counter = iter(range(1_000_000))

    def write(code: str, manifest_extra: str = "", skill_id: str | None = None) -> Path:
        index = next(counter)
        directory = tmp_path / f"skill{index}"
        directory.mkdir()
        (directory / "main.py").write_text(code)
        (directory / "skill.toml").write_text(
            f'id = "{skill_id or f"test/skill{index}"}"\nversion = "0.1.0"\n'
            f'entrypoint = "main:run"\n{manifest_extra}\n'
        )
        return directory

    return write


@pytest.fixture
def run_skill(make_sandbox: Callable[..., Sandbox],
              skill_dir: Callable[..., Path]) -> Callable[..., ExecutionResult]:
    """Write a skill, load it into its own sandbox and execute it once:
    `run_skill(code, input=b"{}", manifest_extra="", **request_fields)` → its result."""

    def run(code: str, input: bytes | str = b"{}", manifest_extra: str = "",
            **request: Any) -> ExecutionResult:
        skill = Skill.from_dir(skill_dir(code, manifest_extra))
        sandbox = make_sandbox(skill)
        data = input.encode() if isinstance(input, str) else input
        return sandbox.execute(ExecutionRequest(skill_id=skill.id, input=data, **request))

    return run


#: `ps` name of a zygote's pre-forked spare child (worker.spare.SPARE_NAME) until it takes a
#: request: it is no execution.
SPARE_NAME = "sbx-spare"
#: `ps` name of a shared base zygote (worker.base.BASE_NAME).
BASE_NAME = "sbx-base"


def zygotes_below(pid: int | None = None) -> set[int]:
    """The zygote processes that are children of `pid` (default: this test process, whose
    sandboxes' zygotes are its children): exec'd (`worker.zygote`) or forked from a shared
    base (`worker.base`'s command line, not the base's own name)."""
    found = set()
    for child in psutil.Process(pid).children():
        try:
            cmdline = child.cmdline()
            if "worker.zygote" in cmdline or ("worker.base" in cmdline
                                              and child.name() != BASE_NAME):
                found.add(child.pid)
        except psutil.NoSuchProcess:
            continue
    return found


def execution_children(zygote: psutil.Process) -> list[psutil.Process]:
    """The zygote's children that are executions (not its idle spare)."""
    found = []
    for child in zygote.children():
        try:
            if child.name() != SPARE_NAME:
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


def spare_pids(zygote: psutil.Process) -> list[int]:
    """The pid of the zygote's idle spare child ([] while it has none)."""
    pids = []
    for child in zygote.children():
        try:
            if child.name() == SPARE_NAME and _alive(child.pid):
                pids.append(child.pid)
        except psutil.NoSuchProcess:
            continue
    return pids


def execution_survivors(sandbox: Sandbox, timeout: float = 5.0) -> set[int]:
    """Processes still alive below the sandbox's zygotes (its executions and anything they
    left behind, whatever pid namespace they see themselves in, but not an idle spare) after up
    to `timeout` s (scaled)."""
    deadline = time.monotonic() + slow(timeout)
    while True:
        alive: set[int] = set()
        for skill in sandbox.skills():
            info = sandbox.zygote_info(skill.id, start=False)  # a cold skill ran nothing
            if not info["pid"]:
                continue
            try:
                zygote = psutil.Process(info["pid"])
                spares = set(spare_pids(zygote))
                alive |= {p.pid for p in zygote.children(recursive=True)
                          if p.pid not in spares and _alive(p.pid)}
            except psutil.NoSuchProcess:
                continue
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)
