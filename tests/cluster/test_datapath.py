"""Per-pod datapath on a real node: the annotation switches a running pod between eBPF and
iptables with its policy still in force, and a deleted pod leaves no steer state behind
(status, iptables rules, eBPF slots and attachments)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.kube import Cluster, eventually, pod_entry
from tests.cluster.test_policy import web_and_client, web_policy

pytestmark = pytest.mark.privileged


def dataplane_of(cluster: Cluster, namespace: str, name: str) -> str | None:
    entry = pod_entry(cluster.agent_status(), namespace, name)
    return None if entry is None else str(entry["dataplane"])


def test_the_annotation_switches_a_running_pod_between_datapaths(cluster: Cluster) -> None:
    namespace, web = web_and_client(cluster, "ebpf")
    cluster.apply(web_policy(namespace))
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403,
        "the policy to deny /admin/",
    )
    for dataplane in ("iptables", "ebpf"):
        cluster.kubectl("-n", namespace, "annotate", "pod", "client", "--overwrite",
                        f"steer.dev/dataplane={dataplane}")  # fmt: skip
        eventually(
            lambda d=dataplane: dataplane_of(cluster, namespace, "client") == d,
            f"the client pod on {dataplane}",
        )
        assert cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403
        assert cluster.http(namespace, "client", f"http://{web}:8080/public/").status == 200
        assert cluster.http(namespace, "client", f"http://{web}:9090/").refused


def steer_state(cluster: Cluster) -> tuple[str, dict[str, Any]]:
    """The node's steer iptables rules (legacy backend, as steer writes) and the agent's
    eBPF state file."""
    rules = cluster.node("iptables-legacy-save")
    raw = cluster.node("sh", "-c", "cat /run/steer/bpf-state.json 2>/dev/null || echo {}")
    return rules, json.loads(raw)


@pytest.mark.parametrize("dataplane", ["iptables", "ebpf"])
def test_a_deleted_pod_leaves_no_steer_state(cluster: Cluster, dataplane: str) -> None:
    namespace, web = web_and_client(cluster, dataplane)
    client = cluster.get("-n", namespace, "pod", "client")
    ip, uid = client["status"]["podIP"], client["metadata"]["uid"]
    key = f"{namespace}/client"
    rules, bpf = steer_state(cluster)
    if dataplane == "iptables":
        assert f"{ip}/32" in rules, rules
    else:
        assert key in bpf.get("slots", {}), bpf
        assert any(uid in a["cgroup"] for a in bpf.get("attachments", [])), bpf

    cluster.kubectl("-n", namespace, "delete", "pod", "client", "--wait=true", timeout=120)

    def gone() -> bool:
        rules, bpf = steer_state(cluster)
        return (
            pod_entry(cluster.agent_status(), namespace, "client") is None
            and f"{ip}/32" not in rules
            and key not in bpf.get("slots", {})
            and not any(uid in a["cgroup"] for a in bpf.get("attachments", []))
        )

    eventually(gone, f"no steer state for the deleted pod {key} ({ip})")
    assert pod_entry(cluster.agent_status(), namespace, "web") is not None
    assert web
