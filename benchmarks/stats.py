"""Percentile summaries of timing samples.

Benchmarks on a shared machine are noisy; p50 and p99 over many runs, next to baselines taken
in the same run, are what survive that noise. Linear interpolation between order statistics
(the "linear" method of numpy and `statistics.quantiles(method="inclusive")`) keeps small
smoke runs meaningful too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of an empty sample")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be within [0, 1], got {fraction}")
    position = fraction * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    weight = position - low
    return sorted_values[low] * (1.0 - weight) + sorted_values[high] * weight


@dataclass(frozen=True)
class Summary:
    """A latency distribution in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    def to_json(self) -> dict[str, Any]:
        return {key: round(value, 4) if isinstance(value, float) else value
                for key, value in asdict(self).items()}


def summarize(seconds: Sequence[float]) -> Summary:
    """Summarise durations given in seconds."""
    ordered = sorted(seconds)
    return Summary(
        n=len(ordered),
        p50_ms=percentile(ordered, 0.50) * 1e3,
        p99_ms=percentile(ordered, 0.99) * 1e3,
        mean_ms=sum(ordered) / len(ordered) * 1e3,
        min_ms=ordered[0] * 1e3,
        max_ms=ordered[-1] * 1e3,
    )
