"""Services on the real node, next to the real kube-proxy (iptables mode): a request to a
ClusterIP or to a NodePort gets exactly what a request to the backend pod gets, on both
datapaths. On eBPF connect4 balances before kube-proxy sees anything; on iptables flows
are decided after kube-proxy's DNAT, or sent to Envoy before it where the backend has
HTTP rules (docs/architecture.md, "Services")."""

from __future__ import annotations

import json

import pytest

from tests.cluster.kube import Cluster, eventually
from tests.cluster.test_policy import DATAPLANES, web_and_client, web_policy

pytestmark = pytest.mark.privileged


def web_service(namespace: str) -> str:
    return json.dumps(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": namespace},
            "spec": {
                "type": "NodePort",
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "debug", "port": 9090, "targetPort": 9090},
                ],
            },
        }
    )


def serve_web(cluster: Cluster, namespace: str, policy: str) -> tuple[str, str, int]:
    """web's Service and `policy` applied: its ClusterIP, and the node address and port of
    its http NodePort."""
    cluster.apply(web_service(namespace))
    cluster.apply(policy)
    service = cluster.get("-n", namespace, "service", "web")
    node_port = next(p["nodePort"] for p in service["spec"]["ports"] if p["name"] == "http")
    node_ip = cluster.get("-n", namespace, "pod", "web")["status"]["hostIP"]
    return service["spec"]["clusterIP"], node_ip, node_port


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_clusterip_and_node_port_get_the_backends_verdicts(
    cluster: Cluster, dataplane: str
) -> None:
    namespace, web = web_and_client(cluster, dataplane)
    vip, node_ip, node_port = serve_web(cluster, namespace, web_policy(namespace))

    def agent_balances_it() -> bool:
        listed = {
            f"{s['namespace']}/{s['name']}": s for s in cluster.agent_status().get("services", [])
        }
        entry = listed.get(f"{namespace}/web")
        return entry is not None and any(f"{web}:8080" in f["backends"] for f in entry["frontends"])

    eventually(agent_balances_it, "the agent to balance the Service over the web pod")
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403,
        "the policy to deny /admin/",
    )
    for base in (f"http://{vip}:80", f"http://{node_ip}:{node_port}"):
        assert cluster.http(namespace, "client", f"{base}/admin/").status == 403, base
        assert cluster.http(namespace, "client", f"{base}/public/").status == 200, base
    # Port 9090 is denied at L4: refused through the ClusterIP exactly as directly.
    assert cluster.http(namespace, "client", f"http://{web}:9090/public/").refused
    through = cluster.http(namespace, "client", f"http://{vip}:9090/public/")
    assert through.refused, through


def backends_of(cluster: Cluster, namespace: str, dataplane: str) -> set[str]:
    """The backends a new connection to web's http port can reach. The agent's maps (its
    status is written once they are updated) choose on eBPF (connect4), and on iptables for
    a backend with HTTP rules (the flow reaches Envoy before kube-proxy, and Envoy's
    original destination comes from the maps); kube-proxy's rules choose the other
    iptables flows. On iptables both are counted."""
    chosen: set[str] = set()
    for entry in cluster.agent_status().get("services", []):
        if (entry["namespace"], entry["name"]) == (namespace, "web"):
            chosen |= {
                backend.rsplit(":", 1)[0]
                for frontend in entry["frontends"]
                if frontend["port_name"] == "http"
                for backend in frontend["backends"]
            }
    if dataplane == "iptables":
        # kube-proxy writes with the node's default iptables (nft on Debian), steer with
        # legacy.
        rules = cluster.node("iptables-save", "-t", "nat")
        chosen |= {
            line.split("--to-destination ")[1].split(":")[0]
            for line in rules.splitlines()
            if "--to-destination" in line and f"{namespace}/web:http" in line
        }
    return chosen


# Requests one after the other from the client pod until /tmp/stop exists, each line the
# backend that answered (its page is its name) or "failed".
LOAD = (
    "while [ ! -e /tmp/stop ]; do"
    " timeout 5 wget -q -O - http://{vip}/public/ 2>/dev/null || echo failed; done"
    " >/tmp/answers"
)


def answers(cluster: Cluster, namespace: str) -> list[str]:
    out = cluster.kubectl("-n", namespace, "exec", "client", "--", "cat", "/tmp/answers")
    return out.stdout.split()


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_backends_spread_and_a_removed_one_gets_no_new_connections_under_load(
    cluster: Cluster, dataplane: str
) -> None:
    namespace, web = web_and_client(cluster, dataplane)
    cluster.web_pod(namespace, "web2", annotations={"steer.dev/dataplane": dataplane})
    cluster.wait_ready(namespace, "web2")
    web2 = cluster.pod_ip(namespace, "web2")
    vip, _, _ = serve_web(cluster, namespace, web_policy(namespace))
    eventually(
        lambda: backends_of(cluster, namespace, dataplane) == {web, web2},
        "web's Service to be balanced over both pods",
    )
    cluster.kubectl(
        "-n", namespace, "exec", "client", "--", "sh", "-c",
        f"({LOAD.format(vip=vip)}) </dev/null >/dev/null 2>&1 &",
    )  # fmt: skip
    try:
        # Both answer: the policy of each admits the client's GET through the ClusterIP.
        eventually(lambda: {"web", "web2"} <= set(answers(cluster, namespace)), "both to answer")
        cluster.kubectl("-n", namespace, "delete", "pod", "web2", "--wait=false")
        eventually(
            lambda: backends_of(cluster, namespace, dataplane) == {web},
            "web2 to be taken out of the balancing",
        )
        # One request may have connected before that and be answered after it.
        removed_at = len(answers(cluster, namespace)) + 1
        eventually(
            lambda: len(answers(cluster, namespace)) >= removed_at + 20,
            "20 more requests",
        )
        after = answers(cluster, namespace)[removed_at:]
        assert set(after) == {"web"}, after
    finally:
        cluster.kubectl("-n", namespace, "exec", "client", "--", "touch", "/tmp/stop")


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_the_application_sees_the_clusterip_it_dialled(cluster: Cluster, dataplane: str) -> None:
    """getpeername() on the client's socket returns the ClusterIP and port it dialled, not
    the backend: on eBPF getpeername4 reverses connect4's translation, on iptables
    kube-proxy's DNAT never changed the socket."""
    namespace, web = web_and_client(cluster, dataplane)
    vip, _, _ = serve_web(cluster, namespace, web_policy(namespace))
    eventually(
        lambda: backends_of(cluster, namespace, dataplane) == {web},
        "web's Service to be balanced",
    )
    seen = cluster.kubectl("-n", namespace, "exec", "client", "--", "peername", vip, "80")
    assert seen.stdout.strip() == f"{vip}:80", seen


def through_the_service_only(namespace: str) -> str:
    """web takes GETs of /public/ on 8080 only when they came through its Service."""
    policy = json.loads(web_policy(namespace))
    policy["spec"]["ingress"]["rules"][0]["http"]["services"] = ["web"]
    return json.dumps(policy)


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_envoy_knows_the_service_dialled(cluster: Cluster, dataplane: str) -> None:
    """The control plane and the agent agree on web's Service listener: a rule naming the
    Service admits a request through the ClusterIP and the NodePort, not to the pod's own
    address; the agent shows the listener."""
    namespace, web = web_and_client(cluster, dataplane)
    vip, node_ip, node_port = serve_web(cluster, namespace, through_the_service_only(namespace))

    def listener() -> int | None:
        for entry in cluster.agent_status().get("services", []):
            if (entry["namespace"], entry["name"]) == (namespace, "web"):
                for frontend in entry["frontends"]:
                    if frontend["port_name"] == "http" and f"{web}:8080" in frontend["backends"]:
                        return frontend["envoy_listener"]  # type: ignore[no-any-return]
        return None

    eventually(lambda: listener() is not None, "the agent to give web's port its listener")
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{vip}/public/").status == 200,
        "a request through the Service to be admitted",
    )
    assert cluster.http(namespace, "client", f"http://{node_ip}:{node_port}/public/").status == 200
    assert cluster.http(namespace, "client", f"http://{web}:8080/public/").status == 403
