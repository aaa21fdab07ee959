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
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

IDLE_S = 5.0


@dataclass
class IdleCollector:
    idle_s: float = IDLE_S
    _pending: bool = False
    _settled_at: float = field(default=0.0)

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
            gc.freeze()
            self._pending = True
            self._settled_at = time.monotonic()

    def tick(self) -> None:
        """Call periodically; collects fully once the last change is `idle_s` old."""
        if self._pending and time.monotonic() - self._settled_at >= self.idle_s:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self._pending = False
