"""Full garbage collections while idle, never in the middle of a policy change.

At 1k pods and 10k rules the control plane and the agent hold a few hundred thousand
container objects (resolved rules, rendered iptables rules, cached routes). CPython's
automatic full collection walks all of them, about 110 ms on the benchmark machine, at a
moment chosen by allocation counts: in practice in the middle of a render, where it lands
on the policy-change latency. So automatic collection is off while a change is handled
(what a render allocates is almost all acyclic and freed by reference counting), the
survivors are frozen afterwards (`gc.freeze`: no automatic collection scans them again),
and once inputs have been quiet for a while everything is unfrozen and collected in one
go, so cyclic garbage is still reclaimed.

Quiet may never come: in a cluster, pod churn does not stop for 5 s. Frozen objects are
never collected, so every change's cyclic garbage then stayed for good (the agent grew by
~65 MB/s under a policy rewrite every few hundred ms). So the cyclic garbage made since the
last freeze is collected as each change ends (frozen objects are not scanned, so this
costs what was allocated since, not the heap), and a full collection is also due, between
changes, once the frozen set has doubled since the last one or the last one is
`max_interval_s` old, whichever comes first: memory stays bounded under churn, and the
collection still never lands inside a change. (Measured at 1k pods under churn: with the
per-change collection, a full one freed under 2% of the frozen set and took ~150 ms, so
it is kept rare.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

IDLE_S = 5.0
MAX_INTERVAL_S = 300.0
# The frozen set may grow to this multiple of what survived the last collection (and at
# least by FLOOR objects, so that a small process does not collect after every change).
GROWTH = 2.0
FLOOR = 200_000
# How often the frozen set's size may be read: `gc.get_freeze_count()` walks the whole frozen
# list (19 ms at 2M objects), and tick() runs after every change and status write; reading
# it each time was a fifth of the agent's and a third of the control plane's CPU under churn.
GROWTH_CHECK_S = 10.0
# How often freed heap memory is handed back to the kernel (glibc's malloc_trim): what a
# change frees in large blocks (status documents, restore texts, parsed lab states) is
# otherwise kept in glibc's free lists, scattered so that the heap cannot shrink, and RSS
# crept up under churn although the live objects did not. ~4 ms at a 100 MB heap.
TRIM_EVERY_S = 10.0


def _malloc_trim() -> Callable[[int], int]:
    """glibc's malloc_trim, or a no-op where the C library has none (musl)."""
    name = ctypes.util.find_library("c")
    trim: Callable[[int], int] | None = (
        getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    )
    return trim if trim is not None else (lambda _pad: 0)


_TRIM = _malloc_trim()


@dataclass
class IdleCollector:
    idle_s: float = IDLE_S
    max_interval_s: float = MAX_INTERVAL_S
    growth: float = GROWTH
    floor: int = FLOOR
    growth_check_s: float = GROWTH_CHECK_S
    trim_every_s: float = TRIM_EVERY_S
    _pending: bool = False
    _settled_at: float = field(default=0.0)
    _collected_at: float = field(default_factory=time.monotonic)
    _survivors: int = 0
    _growth_checked_at: float = field(default_factory=time.monotonic)
    _trimmed_at: float = 0.0
    collections: int = 0
    # The last full collection: how long it took, what it started from and why it ran.
    last: dict[str, object] = field(default_factory=dict)

    def status(self) -> dict[str, object]:
        return {"collections": self.collections, "last": self.last}

    @contextmanager
    def change(self) -> Iterator[None]:
        """Handle one change inside this block: no automatic collection runs in it, and
        what exists after it is treated as long-lived state."""
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if was_enabled:
                gc.enable()
            # Before freezing: a collection skips frozen objects, so this one scans only
            # what was allocated since the last freeze (this change, and what ran between
            # changes: gRPC streams, status writes), and frees its cyclic garbage in a few
            # ms. Leaving that garbage to be frozen grew the frozen set until a full
            # collection (100+ ms at 1k pods) was due every few seconds under churn.
            gc.collect()
            gc.freeze()
            self._pending = True
            self._settled_at = time.monotonic()
            if self._settled_at - self._trimmed_at >= self.trim_every_s:
                self._trim()

    def tick(self) -> None:
        """Call between changes (and periodically): collects fully once the last change is
        `idle_s` old, or sooner when churn has gone on long enough (see the module doc)."""
        if not self._pending:
            return
        now = time.monotonic()
        if now - self._settled_at >= self.idle_s:
            why, frozen = "idle", gc.get_freeze_count()
        elif now - self._collected_at >= self.max_interval_s:
            why, frozen = "interval", gc.get_freeze_count()
        elif now - self._growth_checked_at >= self.growth_check_s:
            self._growth_checked_at = now
            limit = max(self._survivors * self.growth, self._survivors + self.floor)
            frozen = gc.get_freeze_count()
            if frozen <= limit:
                return
            why = "growth"
        else:
            return
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._pending = False
        self._trim()
        self._collected_at = self._growth_checked_at = time.monotonic()
        self._survivors = gc.get_freeze_count()
        self.collections += 1
        self.last = {
            "ms": (self._collected_at - now) * 1000,
            "why": why,
            "frozen_before": frozen,
            "survivors": self._survivors,
        }

    def _trim(self) -> None:
        _TRIM(0)
        self._trimmed_at = time.monotonic()
