"""The fault drills run end to end on a real local node at their quick size, on both
datapaths, and give well-formed results with the interface's keys. Figures (failed,
unchecked, recovery) are measured and reported, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from steer.bench.faults import DATAPLANES, DRILLS
from tests.bench.test_l4rules_memory import _run

pytestmark = pytest.mark.privileged

KEYS = {"name", "dataplane", "requests", "failed", "unchecked", "recovery_s"}


def test_faults(tmp_path: Path) -> None:
    result = _run("faults", tmp_path)
    drills = result["drills"]
    assert [(d["name"], d["dataplane"]) for d in drills] == [
        (name, dataplane) for dataplane in DATAPLANES for name in DRILLS
    ]
    for d in drills:
        assert set(d) >= KEYS, d
        assert d["requests"] > 0, d
        assert isinstance(d["failed"], int) and isinstance(d["unchecked"], int)
        assert d["recovery_s"] is None or d["recovery_s"] >= 0
