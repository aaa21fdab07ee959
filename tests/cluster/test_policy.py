"""HTTPPolicy applied with kubectl, enforced between real pods on both datapaths: HTTP rules
(200/403), a port denied at L4 (refused at once), and a policy change reaching a keep-alive
connection that is already open."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.kube import Cluster, eventually, pod_entry

pytestmark = pytest.mark.privileged

DATAPLANES = ["iptables", "ebpf"]


def web_policy(namespace: str, public_prefix: str = "/public/") -> str:
    """steer/samples/web.yaml in the test's namespace: the client may GET the web pod's
    public prefix on 8080; port 9090 is denied at L4; everything else is denied."""
    policy: dict[str, Any] = {
        "apiVersion": "steer.dev/v1alpha1",
        "kind": "HTTPPolicy",
        "metadata": {"name": "web", "namespace": namespace},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": {
                "defaultAction": "Deny",
                "rules": [
                    {
                        "name": "public-read",
                        "from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                        "ports": [{"port": 8080}],
                        "http": {"methods": ["GET", "HEAD"], "paths": [{"prefix": public_prefix}]},
                    },
                    {"name": "no-debug-port", "action": "Deny", "ports": [{"port": 9090}]},
                ],
            },
        },
    }
    return json.dumps(policy)


def web_and_client(cluster: Cluster, dataplane: str) -> tuple[str, str]:
    """A namespace with the web and client pods, both steered by `dataplane`, Ready (so
    steered, with Envoy holding their routes); returns it and the web pod's IP."""
    namespace = cluster.namespace()
    annotations = {"steer.dev/dataplane": dataplane}
    cluster.web_pod(namespace, annotations=annotations)
    cluster.pod(namespace, "client", {"app": "client"}, annotations=annotations)
    cluster.wait_ready(namespace, "web", "client")
    status = cluster.agent_status()
    for name in ("web", "client"):
        entry = pod_entry(status, namespace, name)
        assert entry is not None and entry["dataplane"] == dataplane, entry
    return namespace, cluster.pod_ip(namespace, "web")


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_http_rules_and_an_l4_deny_between_real_pods(cluster: Cluster, dataplane: str) -> None:
    namespace, web = web_and_client(cluster, dataplane)
    cluster.apply(web_policy(namespace))

    def admin_denied() -> bool:
        return cluster.http(namespace, "client", f"http://{web}:8080/admin/").status == 403

    eventually(admin_denied, "the policy to deny /admin/")
    assert cluster.http(namespace, "client", f"http://{web}:8080/public/").status == 200
    denied_port = cluster.http(namespace, "client", f"http://{web}:9090/public/")
    assert denied_port.refused, denied_port


KEEPALIVE = r"""
rm -f /tmp/ka.*; mkfifo /tmp/ka.in
nc {ip} 8080 </tmp/ka.in >/tmp/ka.out 2>&1 &
exec 3>/tmp/ka.in
while [ ! -e /tmp/ka.stop ]; do
  printf 'GET /public/ HTTP/1.1\r\nHost: web\r\n\r\n' >&3 || exit 0
  usleep 100000
done
"""


@pytest.mark.parametrize("dataplane", DATAPLANES)
def test_a_policy_change_reaches_an_open_keepalive_connection(
    cluster: Cluster, dataplane: str
) -> None:
    namespace, web = web_and_client(cluster, dataplane)
    cluster.apply(web_policy(namespace))
    eventually(
        lambda: cluster.http(namespace, "client", f"http://{web}:8080/public/").status == 200,
        "the policy to allow /public/",
    )
    # One connection, one request every 100 ms, in the background of the client pod.
    script = KEEPALIVE.format(ip=web)
    cluster.kubectl("-n", namespace, "exec", "client", "--", "sh", "-c",
                    f"({script}) >/dev/null 2>&1 &")  # fmt: skip

    def statuses() -> list[str]:
        out = cluster.kubectl("-n", namespace, "exec", "client", "--", "cat", "/tmp/ka.out").stdout
        return [line.split()[1] for line in out.splitlines() if line.startswith("HTTP/1.1 ")]

    eventually(lambda: "200" in statuses(), "a 200 on the keep-alive connection")
    cluster.apply(web_policy(namespace, public_prefix="/other/"))

    def denied() -> list[str] | None:
        seen = statuses()
        return seen if seen and seen[-1] == "403" else None

    seen = eventually(denied, "a 403 on the same connection")
    assert seen[0] == "200", seen
    # Still that one connection: nc runs as long as its connection stays open.
    alive = cluster.kubectl("-n", namespace, "exec", "client", "--", "pidof", "nc", check=False)
    cluster.kubectl("-n", namespace, "exec", "client", "--", "touch", "/tmp/ka.stop")
    assert alive.returncode == 0, "the keep-alive connection was closed"
