"""`steer bench services` runs end to end on a real local node at its quick size and gives
well-formed results with the interface's keys. Figures are measured, never asserted."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.test_l4rules_memory import _run

pytestmark = pytest.mark.privileged


def test_services(tmp_path: Path) -> None:
    result = _run("services", tmp_path)
    keys = {f"{client}_{count}" for client in ("kube_proxy", "connect_lb") for count in (2, 20)}
    for figure in ("conn_per_s", "cpu_us_per_conn", "keepalive_p50_ms"):
        assert set(result[figure]) == keys, result[figure]
        assert all(value > 0 for value in result[figure].values()), result[figure]
    assert result["socket_errors"] == 0
    assert len(result["targets"]) == 2
    assert (tmp_path / "services.png").stat().st_size > 0
