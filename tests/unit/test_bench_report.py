"""docs/benchmarks.md is generated from saved results: every scenario present is shown,
with the machine described."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from steer.bench import SCENARIOS
from steer.bench.report import BENCH_DIR, write_report

# The report describes the machine, Envoy's version included (`envoy --version`).
pytestmark = pytest.mark.envoy


def test_report_shows_every_saved_scenario_and_the_machine(tmp_path: Path) -> None:
    saved = tmp_path / "bench"
    shutil.copytree(BENCH_DIR, saved)
    text = write_report(saved, tmp_path / "benchmarks.md").read_text()
    assert "## Machine" in text and "- kernel:" in text
    for name in SCENARIOS:
        if (saved / f"{name}.json").exists():
            assert f"## {name} (`steer bench {name}`)" in text
            assert f"![{name}](bench/{name}.png)" in text


def test_a_missing_result_is_left_out(tmp_path: Path) -> None:
    saved = tmp_path / "bench"
    saved.mkdir()
    shutil.copy(BENCH_DIR / "render.json", saved / "render.json")
    text = write_report(saved, tmp_path / "benchmarks.md").read_text()
    assert "## render" in text and "## datapath" not in text
