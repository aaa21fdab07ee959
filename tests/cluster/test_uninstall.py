"""Uninstalling as docs/install-kubernetes.md says (webhooks, the node DaemonSet, the
cleanup DaemonSet, then `kubectl delete -k`) leaves the node as it was: no steer iptables
chain, no BPF pin, no steer object in the API. Runs last in this directory (file order);
a later test installs steer again."""

from __future__ import annotations

import pytest

from tests.cluster.kube import CLEANUP_OVERLAY, OVERLAY, SYSTEM, Cluster, eventually
from tests.cluster.test_policy import web_and_client, web_policy

pytestmark = pytest.mark.privileged


def test_uninstall_leaves_the_node_clean(cluster: Cluster) -> None:
    # Something to clean up on both datapaths.
    for dataplane in ("iptables", "ebpf"):
        namespace, _ = web_and_client(cluster, dataplane)
        cluster.apply(web_policy(namespace))
    assert "STEER" in cluster.node("iptables-legacy-save")
    assert cluster.node("ls", "/sys/fs/bpf/steer").split()

    cluster.installed = False  # whatever happens below, a later test installs again
    cluster.kubectl("delete", "mutatingwebhookconfiguration", "steer-pods")
    cluster.kubectl("delete", "validatingwebhookconfiguration", "steer-httppolicies")
    cluster.kubectl("-n", SYSTEM, "delete", "daemonset", "steer-node")
    cluster.kubectl("-n", SYSTEM, "wait", "--for=delete", "pod",
                    "-l", "app.kubernetes.io/component=node", "--timeout=120s",
                    timeout=150)  # fmt: skip
    cluster.kubectl("apply", "-k", str(CLEANUP_OVERLAY))
    cluster.kubectl("-n", SYSTEM, "rollout", "status", "daemonset/steer-cleanup",
                    "--timeout=180s", timeout=200)  # fmt: skip
    eventually(
        lambda: (
            "steer datapath removed"
            in cluster.kubectl(
                "-n", SYSTEM, "logs", "-l", "app.kubernetes.io/component=cleanup"
            ).stdout
        ),
        "the cleanup pod's report",
    )
    cluster.kubectl("delete", "-k", str(CLEANUP_OVERLAY), "--wait=true", timeout=120)
    cluster.kubectl("delete", "-k", str(OVERLAY), "--ignore-not-found", timeout=300)

    rules = cluster.node("iptables-legacy-save")
    assert "STEER" not in rules and "steer/" not in rules, rules
    assert cluster.node("sh", "-c", "ls -A /sys/fs/bpf/steer 2>/dev/null; true").strip() == ""
    left = cluster.kubectl("get", "crd,clusterrole,clusterrolebinding,namespace",
                           "-o", "name", timeout=60).stdout  # fmt: skip
    assert not [
        line for line in left.splitlines() if "steer" in line and "steer-kube-t" not in line
    ]
