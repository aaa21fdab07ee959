"""The idle collector: frozen after a change, collected once quiet, cycles reclaimed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

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
    collector = IdleCollector(idle_s=3600.0)
    alive = _cycle_from_a_change(collector)
    collector.tick()
    assert alive() is not None
    assert gc.get_freeze_count() > 0


def test_collection_comes_back_on_when_a_change_fails() -> None:
    collector = IdleCollector(idle_s=3600.0)
    with pytest.raises(RuntimeError), collector.change():
        raise RuntimeError("a bad pass")
    assert gc.isenabled()
