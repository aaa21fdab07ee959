"""Per-pod datapath on a real node: the annotation switches a running pod between eBPF and
iptables with its policy still in force, and a deleted pod leaves no steer state behind
(status, iptables rules, eBPF slots and attachments)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from typing import Any

import pytest

from tests.cluster.kube import (
    GATE,
    Cluster,
    attached_programs,
    condition,
    container_cgroup,
    eventually,
    pod_cgroup_dir,
    pod_entry,
    steered_cgroup_ids,
)
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
            lambda: dataplane_of(cluster, namespace, "client") == dataplane,  # noqa: B023
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
    pod_dir = pod_cgroup_dir(uid)
    assert pod_dir is not None
    cgroup_id = pod_dir.stat().st_ino  # what connect4 matches the pod by
    rules, bpf = steer_state(cluster)
    if dataplane == "iptables":
        assert f"{ip}/32" in rules, rules
    else:
        assert key in bpf.get("slots", {}), bpf
        assert any(uid in a["cgroup"] for a in bpf.get("attachments", [])), bpf
        assert "steer_connect4" in attached_programs(pod_dir)
        assert cgroup_id in steered_cgroup_ids(cluster)

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
    # In the kernel too. kubelet on this hybrid node leaves the pod's v2 directory behind:
    # nothing of steer may stay attached to it.
    assert cgroup_id not in steered_cgroup_ids(cluster)
    if pod_dir.exists():
        assert not attached_programs(pod_dir)


def test_a_restarted_container_is_still_steered(cluster: Cluster) -> None:
    """Same pod (UID), new container: a new cgroup below the pod's, which the agent never
    registered. connect4 finds the pod among the process's cgroup ancestors, so the new
    container is steered from its first connect, with no agent sync in between."""
    namespace, web = web_and_client(cluster, "ebpf")
    cluster.apply(web_policy(namespace))
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403,
        "the policy to deny /admin/",
    )
    before = cluster.get("-n", namespace, "pod", "client")
    old_cgroup = container_cgroup(before, "main")
    # As a crash or an OOM kill would: every process of the container, from the node.
    for pid in (old_cgroup / "cgroup.procs").read_text().split():
        # Killing the container's PID 1 ends the others with it: some may be gone already.
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)

    def restarted() -> dict[str, Any] | None:
        pod = cluster.get("-n", namespace, "pod", "client")
        [status] = pod["status"]["containerStatuses"]
        running = status["restartCount"] >= 1 and "running" in status["state"]
        return pod if running and status.get("ready") else None

    after = eventually(restarted, "the client's container to be restarted and ready")
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    new_cgroup = container_cgroup(after, "main")
    assert new_cgroup != old_cgroup and new_cgroup.parent == old_cgroup.parent
    gate = condition(after, GATE)
    assert gate is not None and gate["status"] == "True", gate
    assert dataplane_of(cluster, namespace, "client") == "ebpf"
    # kubectl exec joins the new container's cgroup: what runs there is steered.
    assert cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403
    assert cluster.http(namespace, "client", f"http://{web}:8080/public/").status == 200
    assert cluster.http(namespace, "client", f"http://{web}:9090/").refused
