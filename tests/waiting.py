"""Waiting for a condition in a test: poll against a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Timeout(AssertionError):
    """The condition did not hold in time."""


def eventually(
    check: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    interval: float = 0.2,
    max_interval: float | None = None,
    not_yet: tuple[type[BaseException], ...] = (),
) -> T:
    """`check()`'s first truthy result, polled until `timeout` seconds have passed. An
    exception in `not_yet` counts as not yet (the object may not exist yet). With
    `max_interval`, the pause grows by half each time up to it. Raises Timeout naming the
    last answer or exception."""
    deadline = time.monotonic() + timeout
    last: object = None
    delay = interval
    while True:
        try:
            result = check()
        except not_yet as exc:
            result, last = None, exc
        else:
            last = result
        if result:
            return result
        if time.monotonic() >= deadline:
            raise Timeout(f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}")
        time.sleep(delay)
        if max_interval is not None:
            delay = min(delay * 1.5, max_interval)
