"""A skill on a fleet worker must never reach the fleet's Redis: whoever writes there decides
what every caller is told (answers, claims, the circuit breaker, tenant counters).

Two walls, each attacked from a skill on a real worker (the broker URL passed as deploy/'s unit
passes it, in SKILL_SANDBOX_BROKER) against a password-protected redis-server on 127.0.0.1:
a skill without `network` has a network namespace of its own, so the host's loopback Redis is
not there; a skill granted `network` reaches it, and then only the password stands between it
and the fleet's keys, so the password must be nowhere it can read.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from tests.fleet_util import NEEDS_REDIS, RedisServer, Worker

pytest.importorskip("celery", reason="the fleet extra (celery) is not installed")
pytest.importorskip("redis", reason="the fleet extra (redis) is not installed")

from sandbox.fleet import FleetClient
from worker.protocol import ExecutionRequest, ExecutionStatus

pytestmark = NEEDS_REDIS

#: The attack: look for the broker URL wherever this process can read, then talk to Redis
#: (with a password only when the test hands it one: the control of what a leak would allow).
REACH = '''
import glob, socket

MARKS = (b"redis://", b"SKILL_SANDBOX_BROKER")


def hunt():
    """Every readable environment and command line that names the broker."""
    found = []
    for path in ["/proc/self/environ", *glob.glob("/proc/[0-9]*/environ"),
                 *glob.glob("/proc/[0-9]*/cmdline")]:
        try:
            with open(path, "rb") as source:
                data = source.read()
        except OSError:
            continue
        if any(mark in data for mark in MARKS):
            found.append(path)
    return found


def talk(port, password):
    commands = ([f"AUTH {password}"] if password else []) + ["PING", "SET sbx:forged yes"]
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as conn:
            replies = []
            for command in commands:
                conn.sendall(command.encode() + b"\\r\\n")
                replies.append(conn.recv(256).decode(errors="replace").strip())
            return replies
    except OSError as exc:
        return [f"unreachable: {exc.strerror or exc}"]


def run(input):
    return {"found": hunt(), "replies": talk(input["port"], input.get("password", ""))}
'''


@pytest.fixture(scope="module")
def locked_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"), password=secrets.token_hex(16))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reach_skills(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reach-skills")
    for name, network in (("offline", "false"), ("online", "true")):
        directory = root / name
        directory.mkdir()
        (directory / "main.py").write_text(REACH)
        (directory / "skill.toml").write_text(
            f'id = "reach/{name}"\nentrypoint = "main:run"\n'
            f"[limits]\ntimeout = 20\n[permissions]\nnetwork = {network}\n")
    return root


@pytest.fixture
def fleet(locked_redis: RedisServer, reach_skills: Path,
          tmp_path: Path) -> Iterator[tuple[FleetClient, Worker]]:
    prefix = f"reach-{uuid.uuid4().hex[:8]}"
    worker = Worker(locked_redis.url, reach_skills, "reach-node", tmp_path, prefix,
                    broker_in_env=True)
    try:
        with FleetClient(locked_redis.url, prefix=prefix, poll=0.2) as client:
            yield client, worker
    finally:
        worker.terminate()


@pytest.fixture(autouse=True)
def unforged(locked_redis: RedisServer) -> None:
    """Each test starts with no forged key (a control of another test may have written it)."""
    import redis

    with redis.Redis.from_url(locked_redis.url) as conn:
        conn.delete("sbx:forged")


def attack(fleet: tuple[FleetClient, Worker], skill: str,
           **payload: object) -> dict[str, list[str]]:
    client, _worker = fleet
    result = client.execute(ExecutionRequest(skill_id=f"reach/{skill}", timeout=30,
                                             input=msgspec.json.encode(payload)))
    assert result.status is ExecutionStatus.SUCCESS, result
    assert result.node == "reach-node", result
    answer: dict[str, list[str]] = msgspec.json.decode(result.output)
    return answer


def _forged(server: RedisServer) -> bool:
    import redis

    with redis.Redis.from_url(server.url) as conn:
        return bool(conn.exists("sbx:forged"))


@pytest.mark.timeout(120)
def test_a_skill_without_network_cannot_reach_the_fleets_redis_even_with_its_password(
        fleet: tuple[FleetClient, Worker], locked_redis: RedisServer) -> None:
    offline = attack(fleet, "offline", port=locked_redis.port, password=locked_redis.password)
    assert len(offline["replies"]) == 1 and offline["replies"][0].startswith("unreachable"), \
        offline
    assert not _forged(locked_redis)
    # Control: granted network, the same skill is at Redis's door (it answers, asking for the
    # password): only the network namespace kept the first one out.
    online = attack(fleet, "online", port=locked_redis.port)
    assert online["replies"][0].startswith("-NOAUTH"), online


@pytest.mark.timeout(120)
def test_a_skill_granted_network_finds_no_password_and_cannot_write_to_redis(
        fleet: tuple[FleetClient, Worker], locked_redis: RedisServer) -> None:
    online = attack(fleet, "online", port=locked_redis.port)
    assert online["found"] == [], online  # no environment or command line names the broker
    assert all(reply.startswith("-NOAUTH") for reply in online["replies"]), online
    assert not _forged(locked_redis)
    # Controls. The same hunt from a process outside the sandbox finds the URL in the worker's
    # environment (it is there to be found) ...
    scope: dict[str, object] = {}
    exec(compile(REACH, "reach", "exec"), scope)  # the skill's own code, as a control
    assert f"/proc/{fleet[1].pid}/environ" in scope["hunt"]()  # type: ignore[operator]
    # ... and with the password a skill granted network would write the fleet's keys: the
    # password is the only wall left, so its staying out of reach is what matters.
    leaked = attack(fleet, "online", port=locked_redis.port, password=locked_redis.password)
    assert leaked["replies"] == ["+OK", "+PONG", "+OK"], leaked
    assert _forged(locked_redis)
