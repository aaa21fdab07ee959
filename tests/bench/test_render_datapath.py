"""The render and datapath scenarios run on small sizes and produce well-formed output.
Figures are never asserted: that is what `steer bench` is for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from steer.bench import BenchOptions, scenario

pytestmark = pytest.mark.privileged
PNG = b"\x89PNG\r\n\x1a\n"


def check_output(name: str, result: dict[str, Any], tmp_path: Path) -> None:
    module = scenario(name)
    assert result["scenario"] == name
    assert module.table(result).strip()
    module.plot(result, tmp_path / f"{name}.png")
    assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)


def test_render_reports_render_ms_and_apply_s_by_rule_count(tmp_path: Path) -> None:
    result = scenario("render").run(BenchOptions(rounds=1, quick=True))
    for key in ("render_ms", "apply_s", "cold_ms", "iptables_render_ms"):
        assert set(result[key]) == {"10", "100"}
        assert all(value > 0 for value in result[key].values())
    assert set(result["targets"]) == {"render_ms 100 <= 100", "apply_s 100 <= 0.3"}
    assert all(isinstance(met, bool) for met in result["targets"].values())
    check_output("render", result, tmp_path)


def test_datapath_reports_every_config(tmp_path: Path) -> None:
    result = scenario("datapath").run(BenchOptions(rounds=1, quick=True))
    assert set(result["configs"]) == {
        "direct",
        "iptables",
        "ebpf",
        "ebpf_skmsg",
        "l4_direct",
        "iptables_observed",
        "ebpf_skmsg_observed",
    }
    assert set(result["ratios"]["vs_unobserved"]) == {"iptables_observed", "ebpf_skmsg_observed"}
    for figures in result["configs"].values():
        for key in ("p50_ms_c1", "p99_ms_c1", "rps_c16", "cpu_user_s_per_10k", "cpu_sys_s_per_10k"):
            assert figures[key] > 0
    check_output("datapath", result, tmp_path)
