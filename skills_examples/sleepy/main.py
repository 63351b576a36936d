"""Shows how a skill honours its deadline: it stops early rather than being killed."""

import time
from typing import Any

#: Stop this long before the deadline so the answer is written before the supervisor kills us.
MARGIN = 0.2


def run(input: dict[str, Any], ctx: Any) -> dict[str, Any]:
    wanted = float(input["seconds"])
    allowed = max(0.0, min(wanted, ctx.time_left() - MARGIN))
    started = time.monotonic()
    time.sleep(allowed)
    return {"requested": wanted, "slept": round(time.monotonic() - started, 3),
            "cut_short": allowed < wanted}
