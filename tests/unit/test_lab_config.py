"""Lab files: pods with labels, annotations and their namespace's labels."""

from __future__ import annotations

import pytest

from steer.lab.spec import LabError, lab_specs_from_yaml

GOOD = """
namespaces:
  shop: {steer.dev/allow-exclusions: "true"}
pods:
  - {name: web, namespace: shop, labels: {app: web},
     annotations: {steer.dev/exclude-outbound-ports: "5432"}}
  - {name: client}
"""


def test_pods_carry_their_namespace_labels() -> None:
    web, client = lab_specs_from_yaml(GOOD, "lab.yaml")
    assert web.namespace_labels == {"steer.dev/allow-exclusions": "true"}
    assert web.annotations == {"steer.dev/exclude-outbound-ports": "5432"}
    assert (client.namespace, dict(client.namespace_labels)) == ("default", {})


@pytest.mark.parametrize(
    "text, message",
    [
        ("pods: [{name: a, labelz: {}}]", "unknown field"),
        ("pods: [{namespace: x}]", "needs at least a 'name'"),
        ("pods: [{name: Bad_Name}]", "not a valid Kubernetes name"),
        ("pods: [{name: a, labels: {app: [1]}}]", "must map strings to strings"),
        ("pods: {name: a}", "'pods' a list"),
        ("podz: []", "expected a mapping"),
        ("pods: [", "malformed YAML"),
    ],
)
def test_bad_lab_files_name_the_place_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(LabError, match=message) as info:
        lab_specs_from_yaml(text, "lab.yaml")
    assert str(info.value).startswith("lab.yaml")
