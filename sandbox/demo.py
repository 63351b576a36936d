"""`python -m sandbox.demo DIR`: run every example skill under DIR once and show what it cost.

This is what `make run` calls. Each skill directory carries an `example.json`, the input sent to
it. All examples run at once through one `Sandbox` (asyncio tasks over `aexecute`, queued by
its concurrency bound), so the misbehaving ones (CPU, memory, fork and output hogs) are shown
being stopped next to the well-behaved ones, without holding them up.

The exit status is 0 when every example ran and produced a result, whatever its status: a
skill that is meant to fail is expected to fail. It is 1 when a skill cannot be loaded or an
example input is missing or not JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec

from sandbox.capabilities import IsolationConfig
from sandbox.errors import SkillLoadError
from sandbox.sandbox import Sandbox
from sandbox.skill import Skill
from worker.protocol import ExecutionRequest, ExecutionResult

EXAMPLE_INPUT = "example.json"
#: The example skills' preloads, trusted by this demo as an operator would trust them.
EXAMPLES_PRELOAD = ("pydantic",)
_HEADERS = ("skill", "status", "ms", "cpu ms", "mem MB", "tokens", "output / error")
_RIGHT_ALIGNED = {2, 3, 4, 5}


@dataclass(frozen=True)
class Row:
    skill_id: str
    result: ExecutionResult | None  # None: the example could not be run at all
    problem: str = ""

    def cells(self) -> tuple[str, ...]:
        result = self.result
        if result is None:
            return (self.skill_id, "not run", "-", "-", "-", "-", self.problem)
        usage = result.resource_usage
        text = result.output.decode("utf-8", "replace") if result.ok else result.error
        return (self.skill_id, result.status.value, f"{result.duration * 1000:.1f}",
                str(usage.cpu_time_ms), str(usage.memory_mb), str(usage.tokens_used),
                _one_line(text))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def read_example(skill: Skill) -> bytes:
    """The example input of a skill, checked to be JSON; raises ValueError naming the file."""
    path = skill.path / EXAMPLE_INPUT
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    return data


async def run_examples(sandbox: Sandbox, skills: Sequence[Skill]) -> list[Row]:
    """Every skill's example, all submitted at once; rows in the order of `skills`."""

    async def one(skill: Skill) -> Row:
        try:
            data = read_example(skill)
        except ValueError as exc:
            return Row(skill.id, None, str(exc))
        result = await sandbox.aexecute(ExecutionRequest(skill_id=skill.id, input=data,
                                                         request_id=f"demo-{skill.id}"))
        return Row(skill.id, result)

    return list(await asyncio.gather(*(one(skill) for skill in skills)))


def format_table(rows: Sequence[Row], width: int) -> str:
    """Aligned columns; the last one is cut to fit `width` characters."""
    table = [_HEADERS, *(row.cells() for row in rows)]
    widths = [max(len(line[col]) for line in table) for col in range(len(_HEADERS) - 1)]
    fixed = sum(widths) + 2 * (len(widths))
    room = max(20, width - fixed)
    lines = []
    for line in table:
        cells = [cell.rjust(widths[col]) if col in _RIGHT_ALIGNED else cell.ljust(widths[col])
                 for col, cell in enumerate(line[:-1])]
        last = line[-1] if len(line[-1]) <= room else line[-1][: room - 1] + "…"
        lines.append("  ".join([*cells, last]).rstrip())
    lines.insert(1, "-" * min(width, max(len(line) for line in lines)))
    return "\n".join(lines)


def summary(rows: Sequence[Row], elapsed: float) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        key = row.result.status.value if row.result is not None else "not run"
        counts[key] = counts.get(key, 0) + 1
    parts = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    return f"{len(rows)} examples in {elapsed:.2f}s: {parts}"


def slowed(skill: Skill, factor: float) -> Skill:
    """`skill` with its wall and CPU limits multiplied by `factor`: the examples are sized for
    this project's machine, and the same work takes `factor` times longer on a slower host, so
    the honest ones would be cut off and the hogs stopped for the wrong limit."""
    if factor == 1:
        return skill
    limits = skill.manifest.limits
    scaled = limits.model_copy(update={"timeout": limits.timeout * factor,
                                       "cpu_time": limits.cpu_time * factor})
    return dataclasses.replace(skill, manifest=skill.manifest.model_copy(
        update={"limits": scaled}))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.demo", description=__doc__
                                     .splitlines()[0] if __doc__ else None)
    parser.add_argument("directory", type=Path, help="folder of skills, each with example.json")
    parser.add_argument("--max-concurrency", type=int, default=None,
                        help="executions at once (default: CPU count)")
    parser.add_argument("--slowdown", type=float, default=1.0,
                        help="multiply every example's wall and CPU limits, and the time a "
                             "zygote may take to start, by this, on a host that many times "
                             "slower than the one they were sized on (an emulated VM: make "
                             "test-vm)")
    args = parser.parse_args(argv)
    if not args.slowdown >= 1:
        parser.error(f"--slowdown must be at least 1, got {args.slowdown}")

    try:
        skills = Skill.discover(args.directory)
    except SkillLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not skills:
        print(f"error: no skills under {args.directory}", file=sys.stderr)
        return 1
    skills = [slowed(skill, args.slowdown) for skill in skills]
    started = time.monotonic()
    try:
        # Every example runs once, at the same time: boot their zygotes at load (warm), not
        # inside the execution slots their first requests would hold (with more skills than
        # slots, cold starts queue behind each other: seconds each on an emulated host).
        with Sandbox(skills, max_concurrency=args.max_concurrency,
                     isolation=IsolationConfig(trusted_preload=EXAMPLES_PRELOAD),
                     zygote_start_timeout=30 * args.slowdown, warm=True,
                     max_zygotes=None) as sandbox:
            rows = asyncio.run(run_examples(sandbox, skills))
    except SkillLoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started
    width = shutil.get_terminal_size((160, 24)).columns
    print(format_table(rows, width))
    print()
    print(summary(rows, elapsed))
    return 0 if all(row.result is not None for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
