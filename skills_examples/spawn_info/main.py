"""A spawn-mode skill: nothing is inherited from a warm zygote, at the cost of a fresh start."""

import os
import sys
from typing import Any


def run(input: dict[str, Any], ctx: Any) -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        # "worker.spawn" here; a fork-mode skill would see the zygote's "worker.zygote".
        "started_as": getattr(sys.modules["__main__"].__spec__, "name", ""),
        "in_workdir": os.getcwd() == ctx.workdir,
        "greeting": f"hello, {input.get('name', 'world')}",
    }
