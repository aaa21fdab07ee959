"""The churn scenario runs end to end on a real local node at its quick size and gives
well-formed results with the interface's keys. Figures are never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_l4rules_memory import _run

pytestmark = pytest.mark.privileged

KEYS = ("agent_rss_mb_start", "agent_rss_mb_end", "minutes", "changes", "p99_ms")


def test_churn(tmp_path: Path) -> None:
    result = _run("churn", tmp_path)
    for key in KEYS:
        assert isinstance(result[key], int | float), key
    assert result["changes"] > 0
    assert result["minutes"] > 0
    assert 0 < result["p50_ms"] <= result["p99_ms"]
    assert result["agent_rss_mb_start"] > 0 and result["agent_rss_mb_end"] > 0
    assert result["requests"]["ok"] > 0, "the traffic never got through"
    series = result["rss_series"]
    assert len(series["seconds"]) == len(series["agent_rss_mb"]) == len(series["control_rss_mb"])
