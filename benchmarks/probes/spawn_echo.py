"""Spawn-per-execution: a fresh interpreter that imports the worker runtime and runs one skill.

`python -I -B spawn_echo.py SKILL_DIR [ENTRYPOINT]` reads the JSON input on stdin, runs the
skill through `worker.runtime.call_skill` (the same code path a forked execution uses) and
writes the JSON output on stdout; a failure is a message on stderr and exit status 1. This is
the design of code-jail style runners, without their isolation: a lower bound on their cost.
"""

from __future__ import annotations

import os
import sys
import time

from worker import runtime
from worker.protocol import ExecutionInput, ForkCommand, Limits, SkillCode


def main() -> int:
    skill_dir = sys.argv[1]
    entrypoint = sys.argv[2] if len(sys.argv) > 2 else "main:run"
    code = SkillCode(skill_dir=skill_dir, kind="python", entrypoint=entrypoint)
    command = ForkCommand(exec_id="spawn", limits=Limits(), workdir=os.getcwd(), env={})
    request = ExecutionInput(request_id="spawn", skill_id="bench/spawn",
                             deadline=time.time() + 30.0, input=sys.stdin.buffer.read())
    result = runtime.call_skill(code, command, None, request)
    if not result.ok:
        sys.stderr.write(f"spawn_echo: {result.error}\n")
        return 1
    sys.stdout.buffer.write(result.output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
