"""A policy that selects pods steer does not steer says so: the PodsProtected condition in
its status and a Warning Event on it, naming the pods and why (opted out, not opted in,
host network). Pods shaped as the API server sends them."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from steer.constants import ANNOTATION_INJECT, LABEL_ALLOW_OPT_OUT, READINESS_GATE
from steer.control.kubeplane import (
    PODS_PROTECTED,
    UNPROTECTED_LISTED,
    Coverage,
    KubeControlPlane,
    pods_protected_condition,
    policy_coverage,
    policy_event,
    status_with_coverage,
)
from steer.model.enforce import resolve
from steer.model.pod import Unsteered
from steer.model.policy import HTTPPolicy
from steer.source.kubeobjects import (
    host_network_pods,
    pod_from_object,
    pods_from_objects,
    policy_from_object,
    policy_status,
)

NOW = "2026-11-26T10:00:01Z"
LATER = "2026-11-26T10:05:00Z"


def api_namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def api_pod(
    name: str,
    ip: str,
    *,
    namespace: str = "shop",
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    host_network: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "nodeName": "worker-2",
        "containers": [{"name": name, "image": "registry.local/app:1"}],
    }
    if host_network:
        spec |= {"hostNetwork": True, "dnsPolicy": "ClusterFirstWithHostNet"}
    else:
        spec["readinessGates"] = [{"conditionType": READINESS_GATE}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "resourceVersion": "4711",
            "labels": {"app": "web", **(labels or {})},
            "annotations": annotations or {},
        },
        "spec": spec,
        "status": {
            "phase": "Running",
            "hostIP": "172.18.0.3",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
        },
    }


def api_policy(selector: dict[str, Any], namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {
            "name": "web-egress",
            "namespace": namespace,
            "uid": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
            "generation": 2,
            "resourceVersion": "812",
        },
        "spec": {"podSelector": selector, "egress": {"defaultAction": "Deny"}},
    }


def policy(selector: dict[str, Any] | None = None, namespace: str = "shop") -> HTTPPolicy:
    item = policy_from_object(api_policy({} if selector is None else selector, namespace))
    assert item.policy is not None
    return item.policy


NAMESPACES = [
    api_namespace("shop", **{ANNOTATION_INJECT: "enabled"}),
    api_namespace("batch", **{ANNOTATION_INJECT: "enabled", LABEL_ALLOW_OPT_OUT: "true"}),
    api_namespace("legacy"),
]
DISABLED = {ANNOTATION_INJECT: "disabled"}
PODS = [
    api_pod("web-1", "10.244.2.17"),
    # A tenant's own opt-out in a namespace that does not allow it: still steered.
    api_pod("web-2", "10.244.2.18", annotations=DISABLED),
    api_pod("exporter", "172.18.0.3", host_network=True),
    api_pod("job-1", "10.244.2.30", namespace="batch", annotations=DISABLED),
    api_pod("job-2", "10.244.2.31", namespace="batch"),
    api_pod("old-1", "10.244.2.40", namespace="legacy"),
    api_pod("old-2", "10.244.2.41", namespace="legacy", labels={ANNOTATION_INJECT: "enabled"}),
]


def all_pods() -> list[Any]:
    return pods_from_objects(PODS, NAMESPACES) + host_network_pods(PODS, NAMESPACES)


# --- pod parsing -----------------------------------------------------------------------


def test_host_network_pods_never_reach_the_resolver() -> None:
    # Its address is the node's: as a peer, a pod selector would match the node itself.
    assert "shop/exporter" not in {p.key for p in pods_from_objects(PODS, NAMESPACES)}
    assert pod_from_object(PODS[2], {}) is None


def test_host_network_pods_are_kept_for_the_status_marked_as_such() -> None:
    [pod] = host_network_pods(PODS, NAMESPACES)
    assert (pod.key, pod.ip, pod.host_network) == ("shop/exporter", "172.18.0.3", True)
    steered = pod_from_object(PODS[0], {}, host_network=True)
    assert steered is not None and not steered.host_network


def test_a_host_network_pod_without_an_address_yet_is_still_listed() -> None:
    obj = api_pod("exporter", "172.18.0.3", host_network=True)
    del obj["status"]["podIP"], obj["status"]["podIPs"]
    [pod] = host_network_pods([obj], NAMESPACES)
    assert (pod.ip, pod.host_network) == ("", True)


# --- coverage --------------------------------------------------------------------------


def test_coverage_names_each_unsteered_pod_with_its_reason() -> None:
    policies = [policy(), policy(namespace="batch"), policy(namespace="legacy")]
    coverage = policy_coverage(policies, all_pods())
    assert coverage["shop/web-egress"] == Coverage(3, (("shop/exporter", Unsteered.HOST_NETWORK),))
    assert coverage["batch/web-egress"] == Coverage(2, (("batch/job-1", Unsteered.OPTED_OUT),))
    assert coverage["legacy/web-egress"] == Coverage(2, (("legacy/old-1", Unsteered.NOT_OPTED_IN),))


def test_coverage_agrees_with_the_resolver() -> None:
    # What the status calls steered is exactly what the agent and control plane steer.
    policies = [policy(), policy(namespace="batch"), policy(namespace="legacy")]
    pods = pods_from_objects(PODS, NAMESPACES)
    steered = {m.pod.key for m in resolve(policies, pods).pods}
    coverage = policy_coverage(policies, pods)
    unprotected = {key for c in coverage.values() for key, _ in c.unprotected}
    assert steered == {p.key for p in pods} - unprotected


def test_a_tenants_own_opt_out_does_not_make_it_unprotected() -> None:
    [web_2] = [p for p in all_pods() if p.key == "shop/web-2"]
    coverage = policy_coverage([policy({"matchLabels": {"app": "web"}})], [web_2])
    assert coverage["shop/web-egress"] == Coverage(1, ())


def test_coverage_is_per_namespace_and_per_selector() -> None:
    coverage = policy_coverage([policy({"matchLabels": {"app": "db"}})], all_pods())
    assert coverage["shop/web-egress"] == Coverage(0, ())


# --- the condition ---------------------------------------------------------------------


def test_all_steered_is_true() -> None:
    condition = pods_protected_condition(Coverage(2, ()), 2, [], NOW)
    assert (condition["type"], condition["status"], condition["reason"]) == (
        PODS_PROTECTED,
        "True",
        "AllSteered",
    )
    assert condition["observedGeneration"] == 2
    assert pods_protected_condition(Coverage(0, ()), 2, [], NOW)["reason"] == "NoPodsSelected"


def test_host_network_pod_gives_reason_host_network() -> None:
    coverage = Coverage(3, (("shop/exporter", Unsteered.HOST_NETWORK),))
    condition = pods_protected_condition(coverage, 2, [], NOW)
    assert (condition["status"], condition["reason"]) == ("False", "HostNetwork")
    assert condition["message"].startswith("1 of 3 selected pods are not steered")
    assert (
        "shop/exporter (HostNetwork: uses the node's network (spec.hostNetwork)"
        in (condition["message"])
    )
    assert "fix:" in condition["message"]


def test_mixed_reasons_and_a_bounded_list() -> None:
    unprotected = tuple(
        (f"shop/pod-{i:02}", Unsteered.OPTED_OUT if i % 2 else Unsteered.NOT_OPTED_IN)
        for i in range(UNPROTECTED_LISTED + 5)
    )
    condition = pods_protected_condition(Coverage(40, unprotected), 2, [], NOW)
    assert condition["reason"] == "SeveralReasons"
    message = condition["message"]
    assert f"shop/pod-{UNPROTECTED_LISTED - 1:02}" in message
    assert f"shop/pod-{UNPROTECTED_LISTED:02}" not in message
    assert "and 5 more" in message


def test_last_transition_time_moves_only_with_the_status() -> None:
    coverage = Coverage(3, (("shop/exporter", Unsteered.HOST_NETWORK),))
    first = pods_protected_condition(coverage, 2, [], NOW)
    again = pods_protected_condition(Coverage(4, coverage.unprotected), 2, [first], LATER)
    assert again["lastTransitionTime"] == NOW
    fixed = pods_protected_condition(Coverage(3, ()), 2, [again], LATER)
    assert fixed["lastTransitionTime"] == LATER


def test_status_carries_the_condition_after_accepted_and_programmed() -> None:
    item = policy_from_object(api_policy({}))
    base = policy_status(item, None, {"worker-2": "v1"}, 1, NOW)
    coverage = Coverage(3, (("shop/exporter", Unsteered.HOST_NETWORK),))
    status = status_with_coverage(base, coverage, item.generation, None, NOW)
    assert [c["type"] for c in status["conditions"]] == ["Accepted", "Programmed", PODS_PROTECTED]
    assert status["conditions"][2]["status"] == "False"


def test_invalid_policy_has_no_pods_protected_condition() -> None:
    item = policy_from_object(api_policy({"matchLabels": "web"}))
    assert item.policy is None
    base = policy_status(item, None, {}, 1, NOW)
    assert status_with_coverage(base, None, item.generation, None, NOW) == base


# --- the Event -------------------------------------------------------------------------


def test_event_on_the_policy_for_unprotected_pods() -> None:
    from datetime import UTC, datetime

    coverage = Coverage(3, (("shop/exporter", Unsteered.HOST_NETWORK),))
    condition = pods_protected_condition(coverage, 2, [], NOW)
    event = policy_event(api_policy({}), condition, datetime(2026, 11, 26, 10, 0, 1, tzinfo=UTC))
    assert event is not None
    assert event["involvedObject"] == {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "name": "web-egress",
        "namespace": "shop",
        "uid": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a",
    }
    assert (event["type"], event["reason"]) == ("Warning", "PodsUnprotected")
    assert event["message"] == condition["message"]
    assert event["metadata"] == {"generateName": "web-egress.", "namespace": "shop"}
    fine = pods_protected_condition(Coverage(3, ()), 2, [], NOW)
    assert policy_event(api_policy({}), fine, datetime.now(UTC)) is None


class _Recorder:
    def __init__(self, *_: Any) -> None:
        pass

    statuses: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    events: ClassVar[list[tuple[str, dict[str, Any]]]] = []

    def patch_namespaced_custom_object_status(self, *args: Any) -> None:
        _Recorder.statuses.append((args[4], args[5]))

    def create_namespaced_event(self, namespace: str, body: dict[str, Any]) -> None:
        _Recorder.events.append((namespace, body))


def recording_plane(
    monkeypatch: pytest.MonkeyPatch,
    policies: dict[str, dict[str, Any]] | None = None,
    **kwargs: Any,
) -> KubeControlPlane:
    """A control plane over these pods and namespaces whose API writes (status patches,
    Events) go to _Recorder instead of an API server."""
    import kubernetes.client

    _Recorder.statuses, _Recorder.events = [], []
    plane = KubeControlPlane(api_client=None, **kwargs)
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", _Recorder)
    plane._custom = _Recorder()
    plane.reflectors["pods"].items = {f"{i}": p for i, p in enumerate(PODS)}
    plane.reflectors["namespaces"].items = {n["metadata"]["name"]: n for n in NAMESPACES}
    plane.reflectors["httppolicies"].items = (
        policies if policies is not None else {"shop/web-egress": api_policy({})}
    )
    return plane


def test_control_plane_writes_the_condition_and_one_event_per_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    plane = recording_plane(monkeypatch)
    plane.refresh()
    plane.write_statuses()
    [(name, body)] = _Recorder.statuses
    [condition] = [c for c in body["status"]["conditions"] if c["type"] == PODS_PROTECTED]
    assert (name, condition["status"], condition["reason"]) == (
        "web-egress",
        "False",
        "HostNetwork",
    )
    [(namespace, event)] = _Recorder.events
    assert namespace == "shop" and event["message"] == condition["message"]
    # Nothing changed: no second Event.
    plane.write_statuses()
    assert len(_Recorder.events) == 1
    # The host-network pod goes away: the condition turns True, and no Event is sent.
    plane.reflectors["pods"].items.pop("2")
    plane.refresh()
    plane.write_statuses()
    assert len(_Recorder.events) == 1
    conditions = _Recorder.statuses[-1][1]["status"]["conditions"]
    assert [c["status"] for c in conditions if c["type"] == PODS_PROTECTED] == ["True"]
