"""Imports go down the layers only (docs/architecture.md): the product's core never
depends on the local lab or on test support, and the pure layers never on side effects."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

STEER = Path(__file__).resolve().parents[2] / "steer"
CORE = ("node", "control", "render", "model")
PURE = ("render", "model")
SIDE_EFFECT_LIBS = ("bcc", "iptc", "pyroute2", "grpc", "aiohttp", "kubernetes", "steer.node")


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(*packages: str) -> list[Path]:
    return sorted(p for package in packages for p in (STEER / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules(*CORE), ids=lambda p: str(p.relative_to(STEER)))
def test_core_modules_never_import_the_lab_or_test_support(path: Path) -> None:
    bad = {m for m in imports_of(path) if m.startswith(("steer.lab", "tests", "steer.bench"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", modules(*PURE), ids=lambda p: str(p.relative_to(STEER)))
def test_pure_layers_import_no_side_effect_library(path: Path) -> None:
    bad = {
        m
        for m in imports_of(path)
        if m.split(".")[0] in SIDE_EFFECT_LIBS or m.startswith("steer.node")
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_there_is_no_test_support_package_in_the_product() -> None:
    assert not (STEER / "testing").exists()
