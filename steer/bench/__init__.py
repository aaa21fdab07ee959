"""`steer bench`: measured figures, never asserted in tests.

Every scenario is a module under steer/bench/ with three functions:

    run(options: BenchOptions) -> dict   one JSON-able result; "scenario" names it
    table(result: dict) -> str           the result for a person
    plot(result: dict, path: Path)       one PNG (matplotlib, Agg backend)

Scenarios take `options.rounds` interleaved rounds (ABBA where they compare
configurations) and report medians with min and max; `options.quick` shrinks every size so
the test suite can check a scenario runs and produces well-formed output in seconds.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

# name -> module under steer.bench
SCENARIOS: dict[str, str] = {
    "datapath": "datapath",
    "l4-rules": "l4rules",
    "propagation": "propagation",
    "render": "render",
    "memory": "memory",
    "l7-rules": "l7rules",
    "churn": "churn",
    "faults": "faults",
    "services": "services",
    "flows": "flows",
    "cost": "cost",
}


def _silent(step: str) -> None:
    return


@dataclass(frozen=True)
class BenchOptions:
    rounds: int = 4
    quick: bool = False
    progress: Callable[[str], None] = field(default=_silent)


class Scenario(Protocol):
    def run(self, options: BenchOptions) -> dict[str, Any]: ...

    def table(self, result: dict[str, Any]) -> str: ...

    def plot(self, result: dict[str, Any], path: Path) -> None: ...


def scenario(name: str) -> ModuleType:
    if name not in SCENARIOS:
        raise KeyError(f"unknown scenario {name!r}; choose from {', '.join(SCENARIOS)}")
    return importlib.import_module(f"steer.bench.{SCENARIOS[name]}")
