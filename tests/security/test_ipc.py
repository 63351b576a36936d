"""SysV IPC and POSIX message queues: no channel between executions, skills or the host.

A SysV segment, queue or semaphore set (or a POSIX queue) made by one execution is found by
key (or name) by anyone in the same IPC namespace, and outlives the execution: a channel to a
later execution or another skill, and host memory pinned after the execution ends. The
sandbox answers with seccomp (the calls are off the allow-list: EPERM) and, as root, an IPC
namespace per zygote whose SysV objects are removed after each execution.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sandbox import ExecutionStatus
from sandbox.capabilities import IsolationConfig
from tests.security.hostile import Hostile, host, requires

#: Create or find one object of each kind by key (SysV) or name (POSIX mq); remove them.
_IPC = """
import ctypes, errno, os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mq_open.restype = ctypes.c_int
IPC_CREAT, IPC_RMID = 0o1000, 0


def _outcome(result):
    return "ok" if result != -1 else errno.errorcode.get(ctypes.get_errno(), "?")


def _each(key, creating):
    flags = IPC_CREAT | 0o666 if creating else 0
    name = f"/sbx-test-{key}".encode()
    mq_flags = os.O_RDWR | (os.O_CREAT if creating else 0)
    return {
        "shm": lambda: _libc.shmget(key, 4096 if creating else 0, flags),
        "msg": lambda: _libc.msgget(key, flags),
        "sem": lambda: _libc.semget(key, 1 if creating else 0, flags),
        "mq": lambda: _libc.mq_open(name, mq_flags, 0o666, None),
    }


def ipc(op, key):
    outcome = {}
    for kind, call in _each(key, op == "create").items():
        ctypes.set_errno(0)
        outcome[kind] = _outcome(call())
    return outcome


def remove(key):
    ids = {kind: call() for kind, call in _each(key, False).items()}
    if ids["shm"] != -1:
        _libc.shmctl(ids["shm"], IPC_RMID, None)
    if ids["msg"] != -1:
        _libc.msgctl(ids["msg"], IPC_RMID, None)
    if ids["sem"] != -1:
        _libc.semctl(ids["sem"], 0, IPC_RMID)
    if ids["mq"] != -1:
        os.close(ids["mq"])
    _libc.mq_unlink(f"/sbx-test-{key}".encode())
"""

_ATTACK = _IPC + """

def attack(input):
    return ipc(input["op"], input["key"])
"""

_KINDS = ("shm", "msg", "sem", "mq")
_HOST_CODE: dict[str, Any] = {}
exec(_IPC, _HOST_CODE)  # the same helpers, for the control and the clean-up


def _plain(op: str, key: int) -> dict[str, str]:
    """`ipc(op, key)` in a plain subprocess of the test: no sandbox at all."""
    done = subprocess.run([sys.executable, "-c", _IPC + f"\nprint(ipc({op!r}, {key}))"],
                          capture_output=True, text=True, timeout=30, check=True)
    outcome: dict[str, str] = ast.literal_eval(done.stdout)
    return outcome


@pytest.fixture
def key() -> Iterator[int]:
    """A fresh SysV key (and mq name); whatever the host ends up holding under it is removed."""
    chosen = random.randrange(1 << 24, 1 << 30)
    try:
        yield chosen
    finally:
        _HOST_CODE["remove"](chosen)


def test_plain_processes_share_sysv_objects_and_queues(key: int) -> None:
    # The control: without the sandbox, what one process makes the next one finds.
    assert _plain("create", key) == dict.fromkeys(_KINDS, "ok")
    assert _plain("find", key) == dict.fromkeys(_KINDS, "ok")


@requires("seccomp")
def test_sysv_and_mq_calls_are_refused(hostile: Callable[..., Hostile], key: int) -> None:
    first = hostile(_ATTACK)
    made = first.run(op="create", key=key)
    assert made.status is ExecutionStatus.SUCCESS, made
    assert made.json() == dict.fromkeys(_KINDS, "EPERM")
    later = first.run(op="find", key=key)
    assert later.json() == dict.fromkeys(_KINDS, "EPERM")
    other = hostile(_ATTACK).run(op="find", key=key)
    assert other.json() == dict.fromkeys(_KINDS, "EPERM")
    assert _HOST_CODE["ipc"]("find", key) == dict.fromkeys(_KINDS, "ENOENT")
    first.assert_still_serving()


@pytest.mark.skipif(not host().host.works("ipcns"), reason="no IPC namespace on this host")
def test_ipc_namespace_alone_keeps_objects_from_later_executions_and_the_host(
        hostile: Callable[..., Hostile], key: int) -> None:
    # Seccomp off: the calls work, inside the zygote's own IPC namespace.
    no_seccomp = IsolationConfig(disabled=frozenset({"seccomp"}))
    first = hostile(_ATTACK, isolation=no_seccomp)
    made = first.run(op="create", key=key)
    assert made.status is ExecutionStatus.SUCCESS, made
    created = made.json()
    # mq_open resolves a path on the namespace's internal mqueue mount, which Landlock (where
    # active) refuses like any path outside its rules.
    assert created == {"shm": "ok", "msg": "ok", "sem": "ok", "mq": created["mq"]}
    assert created["mq"] == ("EACCES" if "Landlock ABI" in host().layer("filesystem").detail
                             else "ok")
    # SysV objects are removed when the execution ends (POSIX queues are not: see the module
    # docstring of worker.namespaces); nothing reaches the host or another skill.
    later = first.run(op="find", key=key).json()
    assert {kind: later[kind] for kind in ("shm", "msg", "sem")} == \
        dict.fromkeys(("shm", "msg", "sem"), "ENOENT")
    other = hostile(_ATTACK, isolation=no_seccomp).run(op="find", key=key)
    assert other.json() == dict.fromkeys(_KINDS, "ENOENT")
    assert _HOST_CODE["ipc"]("find", key) == dict.fromkeys(_KINDS, "ENOENT")
    first.assert_still_serving()


def test_without_seccomp_or_ipc_namespace_a_later_execution_finds_the_objects(
        hostile: Callable[..., Hostile], key: int) -> None:
    # The control inside the sandbox: both layers off, the channel is open (and reaches the
    # host, whose objects the `key` fixture removes).
    attack = hostile(_ATTACK, isolation=IsolationConfig(disabled=frozenset({"seccomp",
                                                                            "ipcns"})))
    made = attack.run(op="create", key=key).json()
    assert {kind: made[kind] for kind in ("shm", "msg", "sem")} == \
        dict.fromkeys(("shm", "msg", "sem"), "ok")
    later = attack.run(op="find", key=key).json()
    assert {kind: later[kind] for kind in ("shm", "msg", "sem")} == \
        dict.fromkeys(("shm", "msg", "sem"), "ok")
    found = _HOST_CODE["ipc"]("find", key)
    assert {kind: found[kind] for kind in ("shm", "msg", "sem")} == \
        dict.fromkeys(("shm", "msg", "sem"), "ok")


@requires("seccomp")
def test_sysv_calls_are_refused_without_an_ipc_namespace(
        hostile: Callable[..., Hostile], key: int) -> None:
    attack = hostile(_ATTACK, isolation=IsolationConfig(disabled=frozenset({"ipcns"})))
    made = attack.run(op="create", key=key)
    assert made.json() == dict.fromkeys(_KINDS, "EPERM")
    assert _HOST_CODE["ipc"]("find", key) == dict.fromkeys(_KINDS, "ENOENT")
    attack.assert_still_serving()
