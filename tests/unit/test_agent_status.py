"""The Kubernetes agent writes the status `steer status` reads, after every sync, in the
local agent's shape (one builder, `steer.node.agent.status_document`) plus what only a
cluster has: the node's name and each pod's readiness gate. Root-free: a fake API client,
pods shaped as the API server sends them, the recording kernel."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any, ClassVar

import pytest

from steer.constants import READINESS_GATE
from steer.lab.spec import LabState
from steer.model.pod import Pod
from steer.node import kubeagent
from steer.node.agent import LocalAgent, StatusWriter, status_document
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.fakekernel import RecordingKernel
from steer.node.features import Features
from steer.node.kubeagent import KubeAgent
from steer.render.xds import route_name
from steer.source.local import LocalInputs
from tests.unit.test_unprotected_pods import NAMESPACES, api_pod, api_policy

NODE = "worker-2"
NO_EBPF = Features(ebpf=False, skmsg=False, ebpf_reason="off in this test", skmsg_reason="off")
# Every document has these, local or in a cluster.
SHARED_KEYS = {
    "pods",
    "features",
    "ipv6",
    "last_sync",
    "ruleset_digest",
    "iptables_repairs",
    "services",
    "loaded_at",
    "loop_errors",
    "gc",
    "mode",
    "lock",
}
POD_KEYS = {"name", "namespace", "ip", "dataplane", "reason", "ebpf_counters"}


class _Core:
    """CoreV1Api as the agent uses it: records gate patches and Events."""

    patched: ClassVar[list[tuple[str, str, Any]]] = []
    events: ClassVar[list[Any]] = []

    def __init__(self, api_client: object = None) -> None:
        pass

    def patch_namespaced_pod_status(self, name: str, namespace: str, body: Any, **_: Any) -> None:
        self.patched.append((namespace, name, body))

    def create_namespaced_event(self, namespace: str, event: Any) -> None:
        from kubernetes.client import ApiException

        names = {(e.metadata.namespace, e.metadata.name) for e in self.events}
        if event.metadata.name and (namespace, event.metadata.name) in names:
            raise ApiException(status=409, reason="AlreadyExists")
        self.events.append(event)

    def list_pod_for_all_namespaces(self, **_: Any) -> Any:
        raise AssertionError("the test fills the reflectors itself")

    list_namespace = list_pod_for_all_namespaces
    list_service_for_all_namespaces = list_pod_for_all_namespaces
    list_endpoints_for_all_namespaces = list_pod_for_all_namespaces
    list_node = list_pod_for_all_namespaces


def web_policy() -> dict[str, Any]:
    obj = copy.deepcopy(api_policy({"matchLabels": {"app": "web"}}))
    obj["spec"] = {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": {"defaultAction": "Deny", "rules": [{"http": {"paths": [{"prefix": "/a"}]}}]},
    }
    return obj


def refused_policy() -> dict[str, Any]:
    obj = web_policy()
    obj["metadata"]["name"] = "broken"
    obj["spec"]["ingress"]["defaultAction"] = "Maybe"
    return obj


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> KubeAgent:
    import kubernetes.client

    _Core.patched, _Core.events = [], []
    monkeypatch.setattr(kubernetes.client, "CoreV1Api", _Core)
    gated = api_pod("web-1", "10.244.2.17")  # the webhook's readiness gate
    plain = api_pod("web-2", "10.244.2.18")
    del plain["spec"]["readinessGates"]
    remote = api_pod("web-9", "10.244.3.9")
    remote["spec"]["nodeName"] = "worker-3"
    built = KubeAgent(
        None,
        NODE,
        tmp_path / "cgroup",  # no pod cgroups: every pod stays on iptables
        NodeDatapath(kernel=RecordingKernel(), features=NO_EBPF, bpf_state_file=tmp_path / "b"),
        envoy_admin=str(tmp_path / "no-envoy.sock"),
        status_file=tmp_path / "agent-status.json",
    )
    items = {
        "local-pods": [gated, plain],
        "pods": [gated, plain, remote],
        "namespaces": NAMESPACES,
        "httppolicies": [web_policy()],
    }
    for kind, objects in items.items():
        built.reflectors[kind].items = {str(i): o for i, o in enumerate(objects)}
    return built


def read(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(path.read_text())
    return document


def test_kube_agent_writes_the_status_of_its_own_pods_after_a_sync(agent: KubeAgent) -> None:
    assert not agent.status_file.exists()
    before = time.time()
    report = agent.sync()
    text = agent.status_file.read_text()
    document = json.loads(text)
    assert document.keys() >= SHARED_KEYS
    assert document["mode"] == "kubernetes"
    assert document["node"] == NODE
    assert document["loaded_at"] >= before
    assert document["loop_errors"] == 0
    # Only this node's pods; the remote one is a peer, not steered here.
    assert [(p["namespace"], p["name"]) for p in document["pods"]] == [
        ("shop", "web-1"),
        ("shop", "web-2"),
    ]
    for pod in document["pods"]:
        assert pod.keys() >= POD_KEYS
        assert pod["dataplane"] == "iptables"
        assert (pod["dataplane"], pod["reason"]) == report.dataplanes[f"shop/{pod['name']}"]
    assert document["ruleset_digest"] is not None
    assert document["ruleset_digest"] == agent.datapath.iptables.applied_digest
    assert document["features"]["ebpf"] is False
    assert document["last_sync"]["errors"] == []
    assert document["last_sync"]["applied"] is True
    # Compact: at 1k pods an indented encoding costs tens of milliseconds per sync.
    assert text == json.dumps(document, separators=(",", ":"))


def test_kube_agent_status_shows_readiness_gates_waiting_then_set(
    agent: KubeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent.sync()
    document = read(agent.status_file)
    gates = {p["name"]: p.get("readiness_gate") for p in document["pods"]}
    assert gates["web-2"] is None  # no gate to open
    assert gates["web-1"].startswith("waiting: Envoy's admin is not reachable")
    assert document["gates_waiting"] == 1

    from ipaddress import IPv4Network

    served = {route_name(IPv4Network("10.244.2.17/32"))}
    monkeypatch.setattr(kubeagent, "envoy_route_names", lambda admin: served)
    agent.sync()
    document = read(agent.status_file)
    gates = {p["name"]: p.get("readiness_gate") for p in document["pods"]}
    assert gates["web-1"] == "True"
    assert document["gates_waiting"] == 0
    assert [(ns, name) for ns, name, _ in _Core.patched] == [("shop", "web-1")]
    condition = _Core.patched[0][2]["status"]["conditions"][0]
    assert condition["type"] == READINESS_GATE


def test_kube_agent_status_lists_refused_policies_with_the_sync_errors(
    agent: KubeAgent,
) -> None:
    agent.reflectors["httppolicies"].items["broken"] = refused_policy()
    report = agent.sync()
    errors = read(agent.status_file)["last_sync"]["errors"]
    assert errors and all("broken" in e or "Maybe" in e for e in errors), errors
    # The report itself (what the agent logs as its own errors) is unchanged.
    assert report.errors == []


def _service(name: str, cluster_ip: str, target: object) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "shop", "uid": f"uid-{name}"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "selector": {"app": name},
            "ports": [{"name": "http", "port": 80, "targetPort": target, "protocol": "TCP"}],
        },
    }


def test_kube_agent_lists_services_and_reports_their_problems_as_events(
    agent: KubeAgent,
) -> None:
    agent.reflectors["services"].items = {
        "web": _service("web", "10.96.0.10", "http"),
        "idle": _service("idle", "10.96.0.11", 8080),
    }
    agent.reflectors["endpoints"].items = {
        "web": {
            "metadata": {"name": "web", "namespace": "shop"},
            "subsets": [
                {
                    "addresses": [{"ip": "10.244.2.17"}],
                    "notReadyAddresses": [{"ip": "10.244.2.18"}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                }
            ],
        },
    }
    agent.sync()
    services = {s["name"]: s for s in read(agent.status_file)["services"]}
    assert services["web"]["frontends"][0]["backends"] == ["10.244.2.17:8080"]
    assert services["web"]["problems"] == []
    assert [p["reason"] for p in services["idle"]["problems"]] == ["NoReadyEndpoints"]
    (event,) = [e for e in _Core.events if e.involved_object.kind == "Service"]
    assert (event.involved_object.name, event.reason) == ("idle", "NoReadyEndpoints")
    # Reported once, not on every sync.
    agent.sync()
    assert len([e for e in _Core.events if e.involved_object.kind == "Service"]) == 1
    # Nor once per node: every agent finds the same fact and names its Event after it, so
    # the API server refuses the second node's as a duplicate.
    assert event.source.host is None
    agent.node_name = "worker-3"
    agent._events_sent.clear()
    agent.sync()
    assert len([e for e in _Core.events if e.involved_object.kind == "Service"]) == 1


def test_kube_agent_status_is_rewritten_on_every_sync(agent: KubeAgent) -> None:
    agent.sync()
    first = read(agent.status_file)
    agent.reflectors["local-pods"].items.pop("1")
    agent.reflectors["pods"].items.pop("1")
    agent.sync()
    second = read(agent.status_file)
    assert [p["name"] for p in second["pods"]] == ["web-1"]
    assert second["loaded_at"] >= first["loaded_at"]


def test_a_status_write_that_fails_does_not_fail_the_sync(
    agent: KubeAgent, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    agent.status_file = blocker / "agent-status.json"
    report = agent.sync()
    assert report.applied
    assert "status for steer status not written" in caplog.text


def test_local_and_kube_agents_write_the_same_shape(agent: KubeAgent, tmp_path: Path) -> None:
    agent.sync()
    kube = read(agent.status_file)
    policies = tmp_path / "policies"
    policies.mkdir()
    lab = tmp_path / "lab.json"
    state = LabState(
        node_netns="steer-node",
        node_name="lab-node",
        gateway_ip="10.244.0.1",
        pod_cidr="10.244.0.0/24",
        pods=(),
        node_cgroup="",
    )
    lab.write_text(json.dumps(state.to_json()))
    local = LocalAgent(
        LocalInputs(policies, lab),
        status_file=tmp_path / "local-status.json",
        datapath=NodeDatapath(
            kernel=RecordingKernel(), features=NO_EBPF, bpf_state_file=tmp_path / "bpf.json"
        ),
    )
    local.sync()
    document = read(local.status_file)
    assert document.keys() >= SHARED_KEYS
    assert document["mode"] == "local"
    assert set(document) - SHARED_KEYS == {"policy_digest"}
    assert set(kube) - SHARED_KEYS == {"node", "gates_waiting"}
    assert set(document["last_sync"]) == set(kube["last_sync"])


def test_the_status_lock_is_held_while_the_writer_lives(tmp_path: Path) -> None:
    import fcntl
    import os

    writer = StatusWriter(tmp_path / "agent-status.json")
    writer.write({"pods": []})
    lock = read(writer.path)["lock"]
    assert lock == str(tmp_path / "agent-status.json.lock")
    fd = os.open(lock, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        writer.close()  # as the kernel does when the agent dies
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(fd)


def test_status_of_a_thousand_pods_costs_little(tmp_path: Path) -> None:
    """Built and written on every sync: it must stay small next to the sync itself."""
    pods = [
        Pod(name=f"pod-{i}", namespace="shop", ip=f"10.1.{i // 250}.{i % 250}") for i in range(1000)
    ]
    report = SyncReport(True, 4000, 0, 3.0)
    report.dataplanes = {
        p.key: ("iptables", "annotation steer.dev/dataplane=iptables") for p in pods
    }
    datapath = NodeDatapath(
        kernel=RecordingKernel(), features=NO_EBPF, bpf_state_file=tmp_path / "b"
    )
    writer = StatusWriter(tmp_path / "agent-status.json")
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        writer.write(status_document(pods, report, datapath, loaded_at=1.0, loop_errors=0))
        best = min(best, time.perf_counter() - started)
    assert len(read(writer.path)["pods"]) == 1000
    assert best < 0.05, f"{best * 1000:.1f} ms for 1k pods"
