"""The one figure a skill reports itself: tokens, via ctx.report_tokens."""

from typing import Any


def run(input: dict[str, str], ctx: Any) -> dict[str, int]:
    tokens = len(input["text"].split())
    ctx.report_tokens(tokens)
    return {"tokens": tokens}
