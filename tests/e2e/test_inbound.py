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
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

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
from steer.node.observe import LIVE_AFTER_S
from tests.e2e.conftest import HTTP_PORT, PodsNode, kill_agent, restarted_agent
from tests.e2e.test_observe import observe
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


def node_conntrack(command: str, sport: str) -> str:
    """The conntrack tool in the node's namespace, on the entry of a TCP flow from the
    host off the node (`-L` lists it; `-D` deletes it, and its destroy event follows)."""
    argv = ["ip", "netns", "exec", NODE_NETNS, "conntrack", command, "-p", "tcp"]
    argv += ["--orig-src", OFFNODE_SIDE, "--sport", sport]
    return subprocess.run(argv, check=False, capture_output=True, text=True).stdout


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


# --- their events in `steer observe` ---------------------------------------------------------

ECHO_PORT = 7070
UNDIALLED_PORT = 8443
Event = dict[str, Any]


def inbound_events(wanted: Callable[[Event], bool], count: int = 1) -> list[Event]:
    """The L4 events of flows from off the node that `wanted` picks, once `count` are in
    (or after 20 s: a flow let in is an event a moment after it closed here)."""
    deadline = time.monotonic() + 20
    while True:
        found = [
            e
            for e in observe("--last", "1000", "--layer", "l4")
            if e["src"].startswith(f"{OFFNODE_SIDE}:") and wanted(e)
        ]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def _at_or_after(event: Event, since: float) -> bool:
    return datetime.fromisoformat(event["time"]).timestamp() >= since


def test_a_refused_flow_from_off_the_node_is_an_event(node: PodsNode, offnode: PodProcess) -> None:
    """Its SYN is refused in the node's namespace and never reaches conntrack's table:
    the deny rules' NFLOG copy makes the event, with the server pod, policy and rule."""
    # A port no other test dials: the event of an earlier refusal can come after `since`.
    dst = f"{node.ip('api')}:{UNDIALLED_PORT}"
    since = time.time()
    assert offnode.connect_outcome(node.ip("api"), UNDIALLED_PORT)[0] != "connected"
    (event,) = inbound_events(lambda e: e["dst"] == dst and _at_or_after(e, since))
    assert (event["verdict"], event["direction"], event["end"]) == ("denied", "ingress", "refused")
    assert (event["namespace"], event["pod"], event["dataplane"]) == ("default", "api", "iptables")
    assert (event["policy"], event["rule"]) == ("default/api", "default-deny")
    assert event["pid"] is None and event["via_envoy"] is False


@pytest.fixture(scope="module")
def echo_on_client(node: PodsNode) -> str:
    """An echo server on the client pod, whose ingress no policy covers."""
    node.workers["client"].serve_echo(node.ip("client"), ECHO_PORT)
    return f"{node.ip('client')}:{ECHO_PORT}"


def test_flows_let_in_from_off_the_node_are_events_at_their_close(
    node: PodsNode, offnode: PodProcess, echo_on_client: str
) -> None:
    """A direct flow (no policy on the client pod's ingress) and one through Envoy's
    inbound listener each become an event at their close, while conntrack still holds
    their entries (two minutes of TIME_WAIT): with the pod, the verdict, the bytes each
    way, the duration and how it ended. When conntrack lets go of them, they are not told
    again."""
    since = time.time() - 0.05
    conn = offnode.open_tcp(node.ip("client"), ECHO_PORT)
    assert offnode.tcp_echo(conn, b"hello from off the node") == b"hello from off the node"
    offnode.tcp_close(conn)
    reply = offnode.request(node.ip("web"), HTTP_PORT, "GET", "/public/observed")
    assert reply.status == 200
    direct_dst = echo_on_client
    (direct,) = inbound_events(lambda e: e["dst"] == direct_dst and _at_or_after(e, since))
    assert (direct["verdict"], direct["direction"]) == ("allowed", "ingress")
    assert direct["pod"] == "client"
    assert (direct["via_envoy"], direct["end"], direct["backend"]) == (False, "fin", direct_dst)
    # Conntrack counts IP packets: the payload plus a header each.
    assert direct["bytes_sent"] > len(b"hello from off the node") < direct["bytes_received"]
    # Up to the client's FIN, not up to conntrack's letting go.
    assert 0 <= direct["duration_ms"] < 10_000
    source = f"{OFFNODE_SIDE}:{reply.local_port}"
    (l7,) = inbound_events(lambda e: e["src"] == source)
    assert (l7["verdict"], l7["pod"], l7["via_envoy"], l7["end"]) == ("allowed", "web", True, "fin")
    assert (l7["policy"], l7["rule"]) == ("default/web", "partners")
    assert l7["dst"] == f"{node.ip('web')}:{HTTP_PORT}" and l7["bytes_received"] > 0
    # Told before conntrack let go: its destroy event, brought on here, is not told again.
    sport = direct["src"].split(":")[1]
    assert "TIME_WAIT" in node_conntrack("-L", sport)
    node_conntrack("-D", sport)
    assert node_conntrack("-L", sport).strip() == ""
    time.sleep(2.0)  # the destroy event, were it told, would be in by now
    told = [e for e in observe("--last", "1000", "--layer", "l4") if e["src"] == direct["src"]]
    assert [e["end"] for e in told] == ["fin"]


def test_a_flow_let_in_that_lives_long_is_an_event_while_open_then_at_its_close(
    node: PodsNode, offnode: PodProcess, echo_on_client: str
) -> None:
    """Once, about five seconds after conntrack confirmed it: no end, no bytes yet, the
    duration so far; then its close, as any other."""
    since = time.time() - 0.05
    conn = offnode.open_tcp(node.ip("client"), ECHO_PORT)
    try:
        assert offnode.tcp_echo(conn, b"kept open") == b"kept open"
        (opened,) = inbound_events(
            lambda e: e["dst"] == echo_on_client and e["end"] is None and _at_or_after(e, since)
        )
        source = opened["src"]
        assert (opened["verdict"], opened["pod"], opened["direction"]) == (
            "allowed",
            "client",
            "ingress",
        )
        assert opened["bytes_sent"] is None and opened["bytes_received"] is None
        assert opened["duration_ms"] >= 5000
        assert offnode.tcp_echo(conn, b"still open") == b"still open"
    finally:
        offnode.tcp_close(conn)
    told = inbound_events(lambda e: e["src"] == source, count=2)
    assert [e["end"] for e in told] == [None, "fin"]
    assert told[1]["bytes_sent"] > len(b"kept open") + len(b"still open")


CLIENT_CLOSED = policy_yaml(
    "spec:\n  podSelector: {matchLabels: {app: client}}\n"
    "  ingress:\n    defaultAction: Allow\n    rules:\n"
    "      - name: closed-to-partners\n        action: Deny\n"
    f"        from: [{{cidr: {OFFNODE_SIDE}/32}}]\n"
    f"        ports: [{{port: {ECHO_PORT}}}]\n",
    name="client-closed",
)


def test_a_flow_from_off_the_node_a_policy_change_revokes_ends_revoked(
    node: PodsNode, offnode: PodProcess, echo_on_client: str
) -> None:
    """The agent drops the live flow's conntrack entry: the flow's event ends `revoked`,
    with what it carried. Its next packet walks the new rules and is refused: an event
    of its own, naming the policy that refused it even though that policy is gone again
    before the event is read."""
    conn = offnode.open_tcp(node.ip("client"), ECHO_PORT)
    try:
        assert offnode.tcp_echo(conn, b"before") == b"before"
        since = time.time()
        node.write_policies({"client-closed.yaml": CLIENT_CLOSED}, replace=False)
        node.wait_synced()
        assert offnode.tcp_echo(conn, b"after") is None
    finally:
        offnode.tcp_close(conn)
        (node.policy_dir / "client-closed.yaml").unlink()
        node.wait_synced()
    (flow,) = inbound_events(lambda e: e["dst"] == echo_on_client and e["end"] == "revoked")
    assert (flow["verdict"], flow["pod"], flow["direction"]) == ("allowed", "client", "ingress")
    assert flow["bytes_sent"] > len(b"before") < flow["bytes_received"]
    (refusal,) = inbound_events(
        lambda e: e["dst"] == echo_on_client and e["verdict"] == "denied" and _at_or_after(e, since)
    )
    assert (refusal["end"], refusal["src"]) == ("refused", flow["src"])
    assert (refusal["policy"], refusal["rule"]) == ("default/client-closed", "closed-to-partners")


def test_a_pods_own_refused_flow_is_one_event(node: PodsNode, offnode: PodProcess) -> None:
    """A pod of the node whose socket hooks record its flows: its refusal on iptables is
    copied to NFLOG like any other, and the agent leaves it to the hooks' event."""
    client = node.workers["client"]
    since = time.time() - 0.05
    assert client.connect_outcome(node.ip("api"), 9999)[0] != "connected"
    dst = f"{node.ip('api')}:9999"

    def picked(event: Event) -> bool:
        return event["dst"] == dst and _at_or_after(event, since)

    deadline = time.monotonic() + 10
    while not (found := [e for e in observe("--last", "1000", "--layer", "l4") if picked(e)]):
        assert time.monotonic() < deadline, "the pod's own refusal never became an event"
        time.sleep(0.2)
    time.sleep(1.0)  # an NFLOG copy read as a second event would be in by now
    found = [e for e in observe("--last", "1000", "--layer", "l4") if picked(e)]
    assert [(e["direction"], e["pid"]) for e in found] == [("egress", client.pid)]


# Last in the module: it restarts the agent, and the node then has none.
def test_a_flow_let_in_before_the_agent_started_is_told_while_open_then_at_its_close(
    node: PodsNode, offnode: PodProcess, echo_on_client: str
) -> None:
    """Conntrack's event of the flow's start went by while no agent read it: the new
    agent finds the flow in conntrack's table, open longer than the delay of an open
    event already, tells of it while open at once, and then at its close, as any
    other."""
    conn = offnode.open_tcp(node.ip("client"), ECHO_PORT)
    assert offnode.tcp_echo(conn, b"before the restart") == b"before the restart"
    kill_agent()
    time.sleep(LIVE_AFTER_S)  # an agent down that long: the flow is told from the table
    with restarted_agent():
        try:
            (opened,) = inbound_events(lambda e: e["dst"] == echo_on_client and e["end"] is None)
            assert (opened["verdict"], opened["pod"], opened["direction"]) == (
                "allowed",
                "client",
                "ingress",
            )
            assert opened["duration_ms"] >= 5000 and opened["bytes_sent"] is None
            assert offnode.tcp_echo(conn, b"after the restart") == b"after the restart"
        finally:
            offnode.tcp_close(conn)
        told = inbound_events(lambda e: e["src"] == opened["src"], count=2)
        assert [e["end"] for e in told] == [None, "fin"]
        assert told[1]["bytes_sent"] > len(b"before the restart") + len(b"after the restart")
