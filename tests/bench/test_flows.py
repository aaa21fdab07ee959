"""`steer bench flows` runs end to end on a real local node at its quick size and gives
well-formed results. Figures are measured, never asserted; the bookkeeping is (every
connection an event or a counted loss is what the scenario checks, not a timing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_l4rules_memory import _run

pytestmark = pytest.mark.privileged


def test_flows(tmp_path: Path) -> None:
    result = _run("flows", tmp_path)
    assert result["connections"] > 0 and result["flows_per_s"] > 0
    assert result["events"] + result["lost"] >= result["connections"], result
    assert set(result["targets"]) == {"every flow an event or a counted loss", "no event lost"}
    assert (tmp_path / "flows.png").stat().st_size > 0
