"""Host Unix-socket services (D-Bus, /dev/log, a container runtime's socket) stay out of reach
of a skill without `network = true`: Landlock does not cover connect() on pathname sockets,
and a network namespace does not hide them. Socket families beyond what the permission needs
are refused at creation (created only, never connected: no vsock address is ever used)."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sandbox import ExecutionStatus
from sandbox.capabilities import IsolationConfig
from tests.security.hostile import Hostile, host, requires

_REACH = """
import errno, socket


def _try(action):
    try:
        action()
        return "reached"
    except OSError as exc:
        return f"refused {errno.errorcode.get(exc.errno, exc.errno)}"


def _stream(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(2)
        conn.connect(address)
        conn.sendall(b"hello")


def _seqpacket_to(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.sendto(b"hello", address)


def _dgram(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as conn:
        conn.sendto(b"hello", address)


def _dgram_msg(address):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as conn:
        conn.sendmsg([b"hello"], [], 0, address)


def _pair_dgram_to(address):
    # A datagram socketpair is connected, yet sendto() with an address would go elsewhere.
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with left, right:
        left.sendto(b"hello", address)


def reach(paths):
    return {
        "stream": _try(lambda: _stream(paths["stream"])),
        "abstract": _try(lambda: _stream(paths["abstract"].encode("latin-1"))),
        "seqpacket sendto": _try(lambda: _seqpacket_to(paths["stream"])),
        "dgram sendto": _try(lambda: _dgram(paths["dgram"])),
        "dgram sendmsg": _try(lambda: _dgram_msg(paths["dgram"])),
        "socketpair dgram sendto": _try(lambda: _pair_dgram_to(paths["dgram"])),
    }
"""

_ATTACK = _REACH + """

def attack(input):
    return reach(input)
"""

#: (family, type) pairs a skill might try, by name; created only, never connected.
_FAMILIES = {
    "unix stream": (1, 1), "unix seqpacket": (1, 5), "unix stream cloexec nonblock": (1, 0o2004001),
    "unix dgram": (1, 2), "unix raw": (1, 3), "inet stream": (2, 1), "inet dgram": (2, 2),
    "inet6 stream": (10, 1), "netlink": (16, 3), "packet": (17, 3), "bluetooth": (31, 1),
    "alg": (38, 5), "vsock stream": (40, 1), "vsock dgram": (40, 2), "xdp": (44, 3),
    "can": (29, 3), "tipc": (30, 5), "rds": (21, 5), "qipcrtr": (42, 2), "smc": (43, 1),
}

_CREATE = """
def attack(input):
    outcome = {}
    for name, (family, kind) in input["families"].items():
        try:
            socket.socket(family, kind).close()
            outcome[name] = "created"
        except OSError as exc:
            outcome[name] = errno.errorcode.get(exc.errno, exc.errno)
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"x")
        outcome["socketpair"] = right.recv(1).decode()
    import asyncio

    async def main():
        await asyncio.sleep(0)
        return "ran"

    outcome["asyncio"] = asyncio.run(main())
    return outcome
"""


@dataclass
class _Services:
    paths: dict[str, str]
    stream: socket.socket
    abstract: socket.socket
    dgram: socket.socket

    def received(self) -> dict[str, bool]:
        """Which services heard anything (non-blocking)."""
        heard = {}
        for name, server in (("stream", self.stream), ("abstract", self.abstract)):
            try:
                conn, _ = server.accept()
            except BlockingIOError:
                heard[name] = False
            else:
                conn.close()
                heard[name] = True
        count = 0
        while True:
            try:
                self.dgram.recv(100)
            except BlockingIOError:
                break
            count += 1
        heard["dgram"] = count > 0
        return heard


@pytest.fixture
def services() -> Iterator[_Services]:
    """A world-connectable stream service and a /dev/log-like datagram socket in a 0777 dir
    under /tmp, and an abstract stream service, as a host might have them."""
    directory = tempfile.mkdtemp(prefix="sbx-sockets-")
    os.chmod(directory, 0o777)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    paths = {"stream": os.path.join(directory, "service.sock"),
             "dgram": os.path.join(directory, "log"),
             "abstract": f"\0sbx-test-{uuid.uuid4().hex}"}
    try:
        stream.bind(paths["stream"])
        dgram.bind(paths["dgram"])
        abstract.bind(paths["abstract"].encode("latin-1"))
        for name in ("stream", "dgram"):
            os.chmod(paths[name], 0o777)
        for server in (stream, abstract):
            server.listen(8)
        for server in (stream, abstract, dgram):
            server.setblocking(False)
        yield _Services(paths, stream, abstract, dgram)
    finally:
        for server in (stream, abstract, dgram):
            server.close()
        for name in ("stream", "dgram"):
            if os.path.exists(paths[name]):
                os.unlink(paths[name])
        os.rmdir(directory)


def _plain(code: str, call: str) -> Any:
    """Run `code` then print `call` in a plain subprocess of the test (no sandbox)."""
    done = subprocess.run([sys.executable, "-c", code + f"\nprint(repr({call}))"],
                          capture_output=True, text=True, timeout=30, check=True)
    return ast.literal_eval(done.stdout)


def test_plain_processes_reach_the_host_socket_services(services: _Services) -> None:
    # The control: the same code, outside the sandbox, reaches every service.
    outcome = _plain(_REACH, f"reach({services.paths!r})")
    assert outcome == {"stream": "reached", "abstract": "reached",
                       "seqpacket sendto": "refused ENOTCONN", "dgram sendto": "reached",
                       "dgram sendmsg": "reached", "socketpair dgram sendto": "reached"}
    assert services.received() == {"stream": True, "abstract": True, "dgram": True}


@pytest.mark.parametrize("isolation", [
    pytest.param(IsolationConfig(), id="all layers"),
    pytest.param(IsolationConfig(disabled=frozenset({"netns", "landlock"})),
                 id="seccomp alone"),
])
@requires("seccomp")
def test_host_socket_services_are_unreachable_without_the_network_permission(
        hostile: Callable[..., Hostile], services: _Services, isolation: IsolationConfig) -> None:
    attack = hostile(_ATTACK, isolation=isolation)
    result = attack.run(**services.paths)
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    assert all(value.startswith("refused ") for value in outcome.values()), outcome
    assert outcome["stream"] == "refused EACCES"
    assert services.received() == {"stream": False, "abstract": False, "dgram": False}
    attack.assert_still_serving()


def test_host_socket_services_are_reachable_with_the_network_permission(
        hostile: Callable[..., Hostile], services: _Services) -> None:
    attack = hostile(_ATTACK, network=True, isolation=IsolationConfig(
        disabled=frozenset({"landlock"})))  # Landlock's abstract-socket scope aside
    result = attack.run(**services.paths)
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json()["stream"] == "reached"
    assert services.received()["stream"]
    attack.assert_still_serving()


@requires("seccomp")
def test_only_unix_stream_sockets_can_be_created_without_the_network_permission(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile(_CREATE)
    result = attack.run(families=_FAMILIES)
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    allowed = {"unix stream", "unix seqpacket", "unix stream cloexec nonblock"}
    assert {name: outcome[name] for name in allowed} == dict.fromkeys(allowed, "created")
    assert {name: outcome[name] for name in _FAMILIES if name not in allowed} == \
        dict.fromkeys(set(_FAMILIES) - allowed, "EACCES")
    assert (outcome["socketpair"], outcome["asyncio"]) == ("x", "ran")
    attack.assert_still_serving()


@pytest.mark.skipif(not host().host.works("seccomp"), reason="seccomp is unavailable here")
def test_network_permission_opens_only_the_internet_families(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile(_CREATE, network=True)
    outcome = attack.run(families=_FAMILIES).json()
    # AF_UNIX SOCK_RAW is a datagram socket to Linux: why the no-network rule checks the type.
    opened = {"unix stream", "unix seqpacket", "unix stream cloexec nonblock", "unix dgram",
              "unix raw", "inet stream", "inet dgram", "inet6 stream", "netlink"}
    assert {name: outcome[name] for name in opened} == dict.fromkeys(opened, "created")
    refused = set(_FAMILIES) - opened
    assert {name: outcome[name] for name in refused} == dict.fromkeys(refused, "EACCES")
    # The control for the refusals: the host itself can create at least the packet and
    # netlink-adjacent families the filter refuses (as root, AF_PACKET works).
    plain = _plain("import socket\n"
                   "def make(f, t):\n"
                   "    try:\n        socket.socket(f, t).close(); return 'created'\n"
                   "    except OSError as exc:\n        return exc.errno\n",
                   "make(17, 3)")
    if os.geteuid() == 0:
        assert plain == "created"
    attack.assert_still_serving()


_SQUAT = """
def attack(input):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
            server.bind(input["name"].encode("latin-1"))
            server.listen(1)
        return "bound"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, exc.errno)
"""


@requires("seccomp")
def test_a_skill_without_network_cannot_squat_an_abstract_name(
        hostile: Callable[..., Hostile]) -> None:
    # Without a netns the abstract namespace is the host's: a name bound by the skill is one a
    # host client (an X11 or D-Bus address) would connect to. Control: a plain process binds it.
    name = f"\0sbx-squat-{uuid.uuid4().hex}"
    assert _plain("import errno, socket\n" + _SQUAT, f"attack({{'name': {name!r}}})") == "bound"
    attack = hostile(_SQUAT, isolation=IsolationConfig(disabled=frozenset({"netns"})))
    result = attack.run(name=name)
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json() == "EACCES"
    attack.assert_still_serving()
