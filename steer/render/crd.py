"""The HTTPPolicy CustomResourceDefinition, generated from the same pydantic model that
validates local YAML, so the cluster and the local mode can never disagree on the schema.

Pydantic's JSON Schema is turned into a Kubernetes structural schema: references are
inlined, optional fields become `nullable`, titles and defaults go (the model applies the
defaults itself), and every node keeps an explicit type.
"""

from __future__ import annotations

from typing import Any

import yaml

from steer.constants import (
    API_GROUP,
    API_VERSION,
    POLICY_KIND,
    POLICY_PLURAL,
    POLICY_SHORT_NAMES,
    POLICY_SINGULAR,
)
from steer.model.policy import HTTPPolicySpec

_DROPPED = {"title", "default", "description"}

# What steer writes back; kept explicit so `kubectl explain` documents it.
STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "observedGeneration": {"type": "integer", "format": "int64"},
        "conditions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "observedGeneration": {"type": "integer", "format": "int64"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                },
            },
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
        "nodes": {
            "type": "object",
            "description": "Per node: the snapshot version its Envoy acknowledged.",
            "additionalProperties": {
                "type": "object",
                "properties": {
                    "ackedVersion": {"type": "string"},
                    "acked": {"type": "boolean"},
                },
            },
        },
        "ackedNodes": {"type": "integer"},
    },
}


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        return _structural(defs[node["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if len(branches) == 1 and len(branches) < len(node["anyOf"]):
            merged = _structural(branches[0], defs)
            return {**merged, "nullable": True}
    if "const" in node:
        return {"type": "string", "enum": [node["const"]]}
    out = {
        key: _structural(value, defs)
        for key, value in node.items()
        if key not in _DROPPED and key != "$defs"
    }
    if out.get("type") == "array" and "prefixItems" in out:
        out.pop("prefixItems")
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    if out.get("additionalProperties") is False:
        # Structural schemas forbid it; the API server prunes unknown fields instead, and
        # the validating webhook (the same model, extra="forbid") refuses them first.
        del out["additionalProperties"]
    return out


def spec_schema() -> dict[str, Any]:
    raw = HTTPPolicySpec.model_json_schema(by_alias=True)
    schema: dict[str, Any] = _structural(raw, raw.get("$defs", {}))
    return schema


def policy_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{POLICY_PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": POLICY_KIND,
                "plural": POLICY_PLURAL,
                "singular": POLICY_SINGULAR,
                "shortNames": list(POLICY_SHORT_NAMES),
                "listKind": f"{POLICY_KIND}List",
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {
                            "name": "Accepted",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Accepted")].status',
                        },
                        {
                            "name": "Programmed",
                            "type": "string",
                            "jsonPath": '.status.conditions[?(@.type=="Programmed")].status',
                        },
                        {"name": "Nodes", "type": "integer", "jsonPath": ".status.ackedNodes"},
                        {
                            "name": "Age",
                            "type": "date",
                            "jsonPath": ".metadata.creationTimestamp",
                        },
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated from steer/model/policy.py by `make manifests`; do not edit.\n"
    return header + yaml.safe_dump(policy_crd(), sort_keys=False)
