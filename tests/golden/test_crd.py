"""The committed CRD is the one the policy model generates, and it is structural."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from steer.render.crd import crd_yaml, policy_crd

COMMITTED = Path(__file__).parents[2] / "manifests" / "crd" / "httppolicies.steer.dev.yaml"


def test_committed_crd_is_current() -> None:
    if os.environ.get("STEER_REGEN_GOLDEN"):
        COMMITTED.write_text(crd_yaml())
    assert COMMITTED.read_text() == crd_yaml(), "stale CRD; run `make manifests`"


def _nodes(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(node, dict):
        return []
    found = [(path, node)]
    for key in ("properties", "additionalProperties"):
        children = node.get(key)
        if isinstance(children, dict) and key == "properties":
            for name, child in children.items():
                found += _nodes(child, f"{path}.{name}")
        elif isinstance(children, dict):
            found += _nodes(children, f"{path}.*")
    if isinstance(node.get("items"), dict):
        found += _nodes(node["items"], f"{path}[]")
    return found


def test_schema_is_structural() -> None:
    schema = policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    text = json.dumps(schema)
    for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "$defs", "const"):
        assert forbidden not in text
    for path, node in _nodes(schema):
        assert "type" in node, f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path


@pytest.mark.parametrize("field", ["podSelector", "ingress", "egress"])
def test_spec_fields_come_from_the_model(field: str) -> None:
    spec = policy_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert field in spec["properties"]
    assert spec["required"] == ["podSelector"]
