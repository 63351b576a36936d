"""Entry point of a spawn-mode execution: a fresh interpreter per execution.

The zygote's child has already applied every limit and layer before exec'ing
`python -I -B -m worker.spawn ARGS`; this imports the skill's preloads (a fresh interpreter
pays for them every time — that is the point of spawn mode) and runs the skill. ARGS says how to
run it; who asks and the input come on the request pipe, as in fork mode.
"""

from __future__ import annotations

import importlib
import sys

import msgspec

from worker import runtime
from worker.protocol import REQUEST_FD, RESULT_FD, ForkCommand, SkillCode


class SpawnArgs(msgspec.Struct, frozen=True):
    code: SkillCode
    preload: list[str]
    command: ForkCommand


def encode_args(code: SkillCode, preload: list[str], command: ForkCommand) -> str:
    return msgspec.json.encode(SpawnArgs(code, preload, command)).decode()


def main() -> None:
    args = msgspec.json.decode(sys.argv[1], type=SpawnArgs)
    for name in args.preload:
        importlib.import_module(name)
    runtime.run_and_exit(args.code, args.command, None, RESULT_FD, REQUEST_FD)


if __name__ == "__main__":
    main()
