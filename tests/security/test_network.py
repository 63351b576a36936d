"""Network: a listening TCP socket on 127.0.0.1 is out of reach without the manifest's
`network = true`, and reachable with it."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest

from sandbox import ExecutionStatus
from sandbox.capabilities import IsolationConfig
from tests.security.hostile import Hostile, host, requires

_CONNECT = """
    def attack(input):
        outcome = {}
        try:
            with socket.create_connection(("127.0.0.1", input["port"]), timeout=1) as conn:
                conn.sendall(b"hello from the skill")
            outcome["tcp"] = "connected"
        except OSError as exc:
            outcome["tcp"] = f"refused {errno.errorcode.get(exc.errno, exc.errno)}"
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.sendto(b"x", ("127.0.0.1", input["port"]))
            outcome["udp"] = "sent"
        except OSError as exc:
            outcome["udp"] = f"refused {errno.errorcode.get(exc.errno, exc.errno)}"
        return outcome
"""


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    server = socket.create_server(("127.0.0.1", 0))
    server.setblocking(False)
    try:
        yield server
    finally:
        server.close()


def _accepted(server: socket.socket) -> bytes | None:
    """What a queued connection sent, or None if nobody connected."""
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return None
    with conn:
        conn.settimeout(2)
        return conn.recv(100)


@requires("network")
def test_loopback_listener_is_unreachable_without_the_permission(
        hostile: Callable[..., Hostile], listener: socket.socket) -> None:
    attack = hostile(_CONNECT)
    result = attack.run(port=listener.getsockname()[1])
    assert result.status is ExecutionStatus.SUCCESS, result
    outcome = result.json()
    assert outcome["tcp"].startswith("refused "), outcome
    assert outcome["udp"].startswith("refused "), outcome
    assert _accepted(listener) is None
    attack.assert_still_serving()


@pytest.mark.skipif(not host().host.works("seccomp"), reason="seccomp is unavailable here")
def test_seccomp_alone_refuses_network_sockets(hostile: Callable[..., Hostile],
                                               listener: socket.socket) -> None:
    # The fallback for hosts without network namespaces: socket() limited to AF_UNIX.
    attack = hostile(_CONNECT, isolation=IsolationConfig(disabled=frozenset({"netns"})))
    assert attack.sandbox.capabilities().layer("network").status == "fallback"
    result = attack.run(port=listener.getsockname()[1])
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json() == {"tcp": "refused EACCES", "udp": "refused EACCES"}
    assert _accepted(listener) is None
    attack.assert_still_serving()


def test_loopback_listener_is_reachable_with_the_permission(
        hostile: Callable[..., Hostile], listener: socket.socket) -> None:
    attack = hostile(_CONNECT, network=True)
    result = attack.run(port=listener.getsockname()[1])
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.json() == {"tcp": "connected", "udp": "sent"}
    assert _accepted(listener) == b"hello from the skill"
    attack.assert_still_serving()
