"""The idle collector: frozen after a change, collected once quiet, cycles reclaimed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from steer import idlegc
from steer.idlegc import IdleCollector


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    yield
    gc.unfreeze()


def _cycle_from_a_change(collector: IdleCollector) -> weakref.ref[Node]:
    """A cycle that becomes garbage after the change that made it."""
    with collector.change():
        assert not gc.isenabled(), "automatic collection must be off during a change"
        garbage = Node()
    assert gc.isenabled()
    alive = weakref.ref(garbage)
    del garbage
    return alive


def test_frozen_cycles_survive_until_idle_then_are_collected() -> None:
    collector = IdleCollector(idle_s=0.0)
    alive = _cycle_from_a_change(collector)
    gc.collect()  # what an automatic collection during the next change would do
    assert alive() is not None, "a frozen object was scanned"
    collector.tick()
    assert alive() is None


def test_nothing_is_collected_before_the_inputs_are_quiet() -> None:
    # No churn limit can trip, whatever else this test process holds.
    collector = IdleCollector(idle_s=3600.0, max_interval_s=3600.0, floor=10**12)
    alive = _cycle_from_a_change(collector)
    collector.tick()
    assert alive() is not None
    assert gc.get_freeze_count() > 0


def test_collection_comes_back_on_when_a_change_fails() -> None:
    collector = IdleCollector(idle_s=3600.0)
    with pytest.raises(RuntimeError), collector.change():
        raise RuntimeError("a bad pass")
    assert gc.isenabled()


def test_under_endless_churn_cycles_are_still_reclaimed() -> None:
    """The agent's memory grew without bound when changes never paused for idle_s: every
    change froze its cyclic garbage, and only an idle collection unfroze it."""
    # A growth limit small next to what the whole test process holds, so that each change
    # below trips it however large the rest of the heap is.
    collector = IdleCollector(
        idle_s=3600.0, max_interval_s=3600.0, growth=1.001, floor=1_000, growth_check_s=0.0
    )
    alive = []
    for _ in range(20):
        with collector.change():
            garbage = [Node() for _ in range(10_000)]
        alive.append(weakref.ref(garbage[0]))
        del garbage
        collector.tick()  # between changes, as the agent and control plane call it
    assert collector.collections >= 1, "the frozen set kept growing without a collection"
    assert alive[0]() is None, "cycles from the first changes were never reclaimed"
    # Bounded: only the garbage of the changes since the last collection is still held,
    # never every change's.
    assert sum(ref() is not None for ref in alive) < len(alive) / 2


def test_a_collection_is_due_after_max_interval_even_without_growth() -> None:
    collector = IdleCollector(idle_s=3600.0, max_interval_s=0.0, floor=10**9)
    alive = _cycle_from_a_change(collector)
    collector.tick()
    assert alive() is None


def test_a_changes_own_cyclic_garbage_is_reclaimed_as_it_ends() -> None:
    """Without a full collection: what the change allocated is all the young generation
    holds, so collecting just that finds it, and it is never frozen."""
    collector = IdleCollector(idle_s=3600.0, max_interval_s=3600.0, floor=10**12)
    with collector.change():
        garbage = Node()
        alive = weakref.ref(garbage)
        del garbage
        assert alive() is not None, "automatic collection ran inside the change"
    assert alive() is None
    assert collector.collections == 0


def test_garbage_made_between_changes_is_reclaimed_at_the_next_change_not_frozen() -> None:
    """What runs between changes (gRPC streams, status writes) makes cycles too."""
    collector = IdleCollector(idle_s=3600.0, max_interval_s=3600.0, floor=10**12)
    gc.disable()  # no automatic collection gets there first
    try:
        garbage = Node()
        alive = weakref.ref(garbage)
        del garbage
        with collector.change():
            pass
    finally:
        gc.enable()
    assert alive() is None
    assert collector.collections == 0


def test_the_frozen_set_is_measured_at_most_once_per_growth_check(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gc.get_freeze_count() walks the whole frozen list; tick() runs after every change and
    every status write, and measuring each time cost a third of the control plane's CPU."""
    reads = []
    real = gc.get_freeze_count
    monkeypatch.setattr(gc, "get_freeze_count", lambda: reads.append(1) or real())
    collector = IdleCollector(idle_s=3600.0, max_interval_s=3600.0, floor=10**12)
    for _ in range(50):
        with collector.change():
            pass
        collector.tick()
    assert len(reads) <= 1
    assert collector.collections == 0


def test_freed_heap_is_handed_back_at_most_once_per_trim_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RSS crept up under churn with flat live objects: glibc kept what changes freed."""
    trims: list[int] = []
    monkeypatch.setattr(idlegc, "_TRIM", lambda pad: trims.append(pad) or 0)
    collector = IdleCollector(idle_s=3600.0, max_interval_s=3600.0, floor=10**12)
    for _ in range(20):
        with collector.change():
            pass
    assert trims == [0]
    collector.trim_every_s = 0.0
    with collector.change():
        pass
    assert trims == [0, 0]
