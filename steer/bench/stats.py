"""Round ordering and summaries shared by the scenarios."""

from __future__ import annotations

import statistics
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def abba(configs: Sequence[T], rounds: int) -> Iterator[T]:
    """Interleaved order: A B C, C B A, A B C, ... so drift hits every config alike."""
    for index in range(rounds):
        yield from (configs if index % 2 == 0 else tuple(reversed(configs)))


def summarize(samples: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per figure the median, with the min and max under "min" and "max", and the number
    of rounds: the shape every comparing scenario reports."""
    out: dict[str, Any] = {f: statistics.median(v) for f, v in samples.items()}
    out["min"] = {f: min(v) for f, v in samples.items()}
    out["max"] = {f: max(v) for f, v in samples.items()}
    out["rounds"] = min((len(v) for v in samples.values()), default=0)
    return out
