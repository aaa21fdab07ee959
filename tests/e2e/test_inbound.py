"""Traffic from off the node reaches a pod through Envoy's inbound listener (15006).

A host outside the node is a network namespace of the test's own, joined to the node's
namespace by a veth on a network of its own (10.99.0.0/24), with a route to the pods. Its
connections are not from a local pod, so no outbound rule matches them: the ingress side
of the destination decides, and an L7 verdict is REDIRECTed to 15006, whose filter chain
for the destination applies that pod's route configuration. The destination pod runs on
either datapath: ingress from off the node is iptables' to enforce in both cases.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from steer.constants import (
    CGROUP_SUBTREE,
    INBOUND_LISTENER,
    LAB_GATEWAY_IP,
    NODE_NETNS,
)
from steer.lab.podproc import PodProcess
from steer.node.cgroups import cgroup2_root
from steer.node.envoy import admin_get
from tests.e2e.conftest import HTTP_PORT, PodsNode
from tests.samples import policy_yaml

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]

OFFNODE_NETNS = "steer-test-offnode"
NODE_SIDE, OFFNODE_SIDE = "10.99.0.1", "10.99.0.2"

WEB_FROM_OFF_NODE = policy_yaml(
    "spec:\n  podSelector: {matchLabels: {app: web}}\n"
    "  ingress:\n    defaultAction: Deny\n    rules:\n"
    "      - name: partners\n"
    f"        from: [{{cidr: {OFFNODE_SIDE}/32}}]\n"
    f"        ports: [{{port: {HTTP_PORT}}}]\n"
    "        http: {methods: [GET], paths: [{prefix: /public/}]}\n",
    name="web",
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def offnode(http_servers: None, node: PodsNode) -> Iterator[PodProcess]:
    """A worker on a host outside the node; everything it needed is removed afterwards."""
    cgroup = cgroup2_root() / CGROUP_SUBTREE / "test-offnode"
    _ip("netns", "add", OFFNODE_NETNS)
    try:
        _ip("link", "add", "sto-node", "type", "veth", "peer", "name", "sto-host")
        _ip("link", "set", "sto-node", "netns", NODE_NETNS)
        _ip("link", "set", "sto-host", "netns", OFFNODE_NETNS)
        _ip("-n", NODE_NETNS, "addr", "add", f"{NODE_SIDE}/24", "dev", "sto-node")
        _ip("-n", NODE_NETNS, "link", "set", "sto-node", "up")
        _ip("-n", OFFNODE_NETNS, "addr", "add", f"{OFFNODE_SIDE}/24", "dev", "sto-host")
        _ip("-n", OFFNODE_NETNS, "link", "set", "sto-host", "up")
        _ip("-n", OFFNODE_NETNS, "link", "set", "lo", "up")
        _ip("-n", OFFNODE_NETNS, "route", "add", "10.244.0.0/16", "via", NODE_SIDE)
        cgroup.mkdir()
        try:
            node.write_policies({"web.yaml": WEB_FROM_OFF_NODE}, replace=False)
            node.wait_synced()
            with PodProcess.start(OFFNODE_NETNS, str(cgroup)) as worker:
                yield worker
        finally:
            cgroup.rmdir()
    finally:
        # Deleting the namespace deletes its end of the veth, and with it the node's end.
        subprocess.run(["ip", "netns", "delete", OFFNODE_NETNS], check=False)


def inbound_connections() -> int:
    """Connections Envoy's inbound listener has accepted, from its admin in the node (one
    of the stats the node's Envoy keeps: steer.render.bootstrap.STATS_CONFIG)."""
    stat = f"http.{INBOUND_LISTENER}.downstream_cx_total"
    # The admin is a Unix socket: a path, reachable from any network namespace.
    text = admin_get(f"/stats?filter=^{stat}$")[1]
    return int(text.split(":")[1]) if text.strip() else 0


def test_an_allowed_request_goes_through_envoy_inbound(node: PodsNode, offnode: PodProcess) -> None:
    before = inbound_connections()
    reply = offnode.request(node.ip("web"), HTTP_PORT, "GET", "/public/x")
    assert reply.status == 200
    # Envoy opened the connection to web from the node: the server sees the node's side.
    assert json.loads(reply.body)["peer"] == LAB_GATEWAY_IP
    assert inbound_connections() == before + 1


def test_the_destinations_http_rules_apply(node: PodsNode, offnode: PodProcess) -> None:
    assert offnode.request(node.ip("web"), HTTP_PORT, "GET", "/admin").status == 403
    assert offnode.request(node.ip("web"), HTTP_PORT, "POST", "/public/x").status == 403


def test_a_port_no_rule_admits_is_refused_before_envoy(node: PodsNode, offnode: PodProcess) -> None:
    outcome, _ = offnode.connect_outcome(node.ip("api"), HTTP_PORT)
    assert outcome != "connected"
