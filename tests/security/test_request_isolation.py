"""What one request leaves behind for the next: nothing about a caller may reach the memory of
a process that later serves another caller (the zygote and its spares serve everyone)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

from sandbox import ExecutionRequest, ExecutionStatus, Sandbox, Skill
from tests.security.hostile import Hostile

#: Scans every readable mapping of the process for anything shaped like the ids the test
#: makes (`_marker`); the test never sends the ids it looks for, so a hit is a leak.
_SCAN = """
    import re

    def attack(input):
        shape = re.compile(rb"(?:tenant|user|request)-[0-9a-f]{32}")
        found = set()
        with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
            for line in maps:
                fields = line.split()
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if "r" not in fields[1] or (len(fields) > 5 and fields[5].startswith("[v")):
                    continue
                try:
                    mem.seek(start)
                    data = mem.read(end - start)
                except (OSError, ValueError, OverflowError):
                    continue
                found.update(m.decode() for m in shape.findall(data))
        return sorted(found)
"""


def _marker(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def test_an_execution_cannot_find_earlier_callers_ids_in_its_memory(
        hostile: Callable[..., Hostile]) -> None:
    attack = hostile(_SCAN, limits={"memory_mb": 256})
    earlier = {"tenant_id": _marker("tenant"), "user_id": _marker("user"),
               "request_id": _marker("request")}
    for _ in range(3):  # several, so a spare and forks on request both served one
        first = attack.sandbox.execute(ExecutionRequest(
            skill_id=attack.skill.id, input=b'{"probe": true}', tenant_id=earlier["tenant_id"],
            user_id=earlier["user_id"], request_id=earlier["request_id"]))
        assert first.status is ExecutionStatus.SUCCESS, first
    own = {"tenant_id": _marker("tenant"), "user_id": _marker("user"),
           "request_id": _marker("request")}
    later = attack.sandbox.execute(ExecutionRequest(
        skill_id=attack.skill.id, input=b"{}", tenant_id=own["tenant_id"],
        user_id=own["user_id"], request_id=own["request_id"]))
    assert later.status is ExecutionStatus.SUCCESS, later
    found = set(later.json())
    # Control: the scan finds what this execution was itself given, so it does look.
    assert {own["tenant_id"], own["user_id"], own["request_id"]} <= found, found
    assert not found & set(earlier.values()), f"earlier caller's ids readable: {found}"
    attack.assert_still_serving()


def test_a_spawned_interpreter_gets_the_skill_s_env_but_not_in_its_argv(
        make_sandbox: Callable[..., Sandbox], skill_dir: Callable[..., Path]) -> None:
    """argv is in /proc/<pid>/cmdline, readable by every uid; the environment is not."""
    secret = _marker("token")
    code = ("import os\ndef run(input):\n"
            "    with open('/proc/self/cmdline', 'rb') as f:\n"
            "        argv = f.read().decode()\n"
            "    return {'env': os.environ.get('API_TOKEN'), 'argv': argv}\n")
    skill = Skill.from_dir(skill_dir(code, f'isolation = "spawn"\n[permissions]\n'
                                           f'env = {{ API_TOKEN = "{secret}" }}\n'))
    result = make_sandbox(skill).execute(ExecutionRequest(skill_id=skill.id))
    assert result.ok, result
    seen = result.json()
    assert seen["env"] == secret  # control: the secret was delivered, through the environment
    assert "worker.spawn" in seen["argv"]  # control: this is the spawned interpreter's argv
    assert secret not in seen["argv"]
