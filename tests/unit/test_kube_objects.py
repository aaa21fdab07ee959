"""API objects, shaped as the API server sends them, to the model; policy status."""

from __future__ import annotations

from typing import Any

import pytest

from steer.constants import READINESS_GATE
from steer.control.kubeplane import render_node_snapshots
from steer.render.xds import LISTENER_TYPE, ROUTE_TYPE
from steer.source.kubeobjects import (
    PolicyValidator,
    gate_is_true,
    has_readiness_gate,
    pod_from_object,
    policy_from_object,
    policy_status,
)
from tests.samples import sample_policies

NAMESPACES = {"shop": {"steer.dev/inject": "enabled"}}


def api_pod(name: str, ip: str | None, node: str = "node-a", **extra: Any) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "uid": "5f0b1a2c-8d9e-4f00-9a1b-2c3d4e5f6a7b",
            "resourceVersion": "4711",
            "labels": {"app": name},
            "annotations": {"steer.dev/dataplane": "auto"},
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-7d9f"}
            ],
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": name, "image": "registry.local/app:1"}],
            "readinessGates": [{"conditionType": READINESS_GATE}],
        },
        "status": {"phase": "Running", "qosClass": "Burstable", "conditions": []},
    }
    if ip is not None:
        pod["status"]["podIP"] = ip
        pod["status"]["podIPs"] = [{"ip": ip}]
    for path, value in extra.items():
        section, key = path.split("__")
        pod[section][key] = value
    return pod


def test_a_running_pod_becomes_a_model_pod_with_its_namespace_labels() -> None:
    pod = pod_from_object(api_pod("web", "10.1.0.5"), NAMESPACES)
    assert pod is not None
    assert (pod.key, pod.ip, pod.node, dict(pod.namespace_labels)) == (
        "shop/web",
        "10.1.0.5",
        "node-a",
        NAMESPACES["shop"],
    )


@pytest.mark.parametrize(
    "obj",
    [
        api_pod("pending", None),
        api_pod("host", "10.0.0.1", spec__hostNetwork=True),
        api_pod("done", "10.1.0.6", status__phase="Succeeded"),
        api_pod("going", "10.1.0.7", metadata__deletionTimestamp="2026-11-26T10:00:00Z"),
        api_pod("v6", "fd00::1"),
    ],
    ids=["no-ip-yet", "host-network", "finished", "terminating", "ipv6-only"],
)
def test_pods_with_nothing_to_steer_are_skipped(obj: dict[str, Any]) -> None:
    assert pod_from_object(obj, NAMESPACES) is None


def test_in_a_cluster_steering_is_opt_in() -> None:
    unlabelled = pod_from_object(api_pod("web", "10.1.0.5"), {})
    assert unlabelled is not None and unlabelled.inject_default is False
    snapshots = render_node_snapshots([], [unlabelled], {"node-a"})
    assert "steer-dst-10.1.0.5-32" not in set(snapshots["node-a"].get(ROUTE_TYPE))


def test_readiness_gate_presence_and_state() -> None:
    obj = api_pod("web", "10.1.0.5")
    assert has_readiness_gate(obj) and not gate_is_true(obj)
    obj["status"]["conditions"] = [{"type": READINESS_GATE, "status": "True"}]
    assert gate_is_true(obj)


def api_policy(spec: dict[str, Any], generation: int = 3) -> dict[str, Any]:
    return {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {
            "name": "web",
            "namespace": "shop",
            "generation": generation,
            "uid": "0c1d",
            "resourceVersion": "99",
            "creationTimestamp": "2026-11-26T10:00:00Z",
            "managedFields": [{"manager": "kubectl-client-side-apply"}],
        },
        "spec": spec,
    }


def test_valid_policy_is_accepted_and_programmed_once_every_node_acked() -> None:
    item = policy_from_object(api_policy({"podSelector": {}, "ingress": {}}))
    pending = policy_status(item, None, {"node-a": "v1"}, 2, "2026-11-26T10:00:01Z")
    assert [c["status"] for c in pending["conditions"]] == ["True", "False"]
    assert pending["conditions"][1]["reason"] == "Pending"
    done = policy_status(item, pending, {"node-a": "v1", "node-b": "v1"}, 2, "2026-11-26T10:00:02Z")
    accepted, programmed = done["conditions"]
    assert (programmed["status"], done["ackedNodes"], done["observedGeneration"]) == ("True", 2, 3)
    # lastTransitionTime moves only when the status moves.
    assert accepted["lastTransitionTime"] == "2026-11-26T10:00:01Z"
    assert programmed["lastTransitionTime"] == "2026-11-26T10:00:02Z"


def test_policies_are_validated_once_per_resource_version() -> None:
    validator = PolicyValidator()
    first = api_policy({"podSelector": {}, "ingress": {}})
    [before] = validator.validate([first])
    [again] = validator.validate([api_policy({"podSelector": {}, "ingress": {}})])
    assert again is before  # same resourceVersion: not parsed again
    edited = api_policy({"podSelector": {}, "ingress": {"rules": [{"portz": []}]}})
    edited["metadata"]["resourceVersion"] = "100"
    [after] = validator.validate([edited])
    assert after.policy is None and "portz" in str(after.errors[0])
    assert validator.validate([]) == []
    [back] = validator.validate([first])
    assert back is not before  # forgotten once deleted, so parsed anew
    assert back.policy == before.policy


def test_invalid_policy_is_refused_with_the_field_path() -> None:
    item = policy_from_object(
        api_policy({"podSelector": {}, "ingress": {"rules": [{"portz": []}]}})
    )
    status = policy_status(item, None, {}, 1, "2026-11-26T10:00:01Z")
    accepted, programmed = status["conditions"]
    assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
    assert "spec.ingress.rules[0].portz" in accepted["message"]
    assert programmed["reason"] == "Invalid"


def test_each_node_gets_only_its_own_pods_as_destinations() -> None:
    pods = [
        pod_from_object(api_pod("client", "10.1.0.2", node="node-a"), NAMESPACES),
        pod_from_object(api_pod("web", "10.1.0.3", node="node-b"), NAMESPACES),
    ]
    snapshots = render_node_snapshots(
        sample_policies(), [p for p in pods if p], {"node-a", "node-b"}
    )
    routes = {node: set(s.get(ROUTE_TYPE)) for node, s in snapshots.items()}
    assert "steer-dst-10.1.0.2-32" in routes["node-a"]
    assert "steer-dst-10.1.0.3-32" not in routes["node-a"]
    assert "steer-dst-10.1.0.3-32" in routes["node-b"]
    assert all(s.get(LISTENER_TYPE) for s in snapshots.values())
