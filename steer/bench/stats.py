"""Round ordering and summaries shared by the scenarios."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def abba(configs: Sequence[T], rounds: int) -> Iterator[T]:
    """Interleaved order: A B C, C B A, A B C, ... so drift hits every config alike."""
    for index in range(rounds):
        yield from (configs if index % 2 == 0 else tuple(reversed(configs)))
