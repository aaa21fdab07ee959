"""The eBPF datapath over a node's life: policy changes revoke exactly the affected
sockets, pods switch datapath without dropping connections, and established flows
survive kill -9 of the agent, which then re-adopts the pinned objects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from steer.constants import ANNOTATION_DATAPLANE, POLICY_DIR
from steer.lab.podproc import PodProcessError
from tests.e2e.conftest import HTTP_PORT, PodsNode, kill_agent, pods_node, restarted_agent
from tests.samples import policy_yaml

pytestmark = [pytest.mark.privileged, pytest.mark.envoy]
L4_PORT = 7000


@pytest.fixture(scope="module")
def node() -> Iterator[PodsNode]:
    with pods_node("ebpf") as running:
        running.workers["web"].serve_http(running.ip("web"), HTTP_PORT, "web")
        running.workers["api"].serve_http(running.ip("api"), L4_PORT, "api")
        yield running


@pytest.fixture(autouse=True)
def sample_policies(node: PodsNode) -> Iterator[None]:
    """Each test starts from the sample policies, and leaves them in force."""
    original = {p.name: p.read_text() for p in POLICY_DIR.glob("*.yaml")}
    yield
    if {p.name: p.read_text() for p in POLICY_DIR.glob("*.yaml")} != original:
        node.write_policies(original)
        node.wait_synced()


def closed(app: str) -> dict[str, str]:
    """`app`'s sample policy replaced by one admitting nothing."""
    text = policy_yaml(
        f"spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n"
        "  ingress: {defaultAction: Deny}\n",
        name=app,
    )
    return {f"{app}.yaml": text}


def get(node: PodsNode, conn: int, path: str = "/public/x") -> int:
    return node.workers["client"].http_request(conn, "GET", path).status


def open_direct_and_steered(node: PodsNode) -> tuple[int, int]:
    """Two working connections of the client's: to api (an L4 allow, so connect4 lets it
    go direct) and to web (L7, through Envoy)."""
    client = node.workers["client"]
    direct = client.http_open(node.ip("api"), L4_PORT)
    steered = client.http_open(node.ip("web"), HTTP_PORT)
    assert (get(node, direct, "/"), get(node, steered)) == (200, 200)
    return direct, steered


def close_api_and_check_only_direct_is_revoked(node: PodsNode, direct: int, steered: int) -> None:
    node.write_policies(closed("api"), replace=False)
    node.wait_synced()
    with pytest.raises(PodProcessError):
        get(node, direct, "/")
    assert get(node, steered) == 200, "a flow whose verdict stands must not be touched"


def test_policy_change_revokes_exactly_the_flows_it_affects(node: PodsNode) -> None:
    direct, steered = open_direct_and_steered(node)
    close_api_and_check_only_direct_is_revoked(node, direct, steered)
    node.workers["client"].http_close(steered)


def test_l7_flow_that_becomes_an_l4_deny_is_revoked(node: PodsNode) -> None:
    client = node.workers["client"]
    steered = client.http_open(node.ip("web"), HTTP_PORT)
    assert get(node, steered) == 200
    node.write_policies(closed("web"), replace=False)
    node.wait_synced()
    with pytest.raises(PodProcessError):
        get(node, steered)
    assert client.connect_outcome(node.ip("web"), HTTP_PORT)[0] == "refused"


def test_switching_datapath_keeps_established_connections(node: PodsNode) -> None:
    client = node.workers["client"]
    conn = client.http_open(node.ip("web"), HTTP_PORT)
    try:
        first = client.http_request(conn, "GET", "/public/x")
        for dataplane in ("iptables", "ebpf"):
            node.set_annotations("client", {ANNOTATION_DATAPLANE: dataplane})
            assert node.dataplane_of("client") == dataplane
            again = client.http_request(conn, "GET", "/public/x")
            assert (again.status, again.local_port) == (200, first.local_port)
            # New connections take the new datapath and keep the same verdicts.
            assert client.request(node.ip("web"), HTTP_PORT, "GET", "/admin").status == 403
    finally:
        client.http_close(conn)


def test_connections_opened_on_ebpf_are_revoked_after_the_pod_moved_to_iptables(
    node: PodsNode,
) -> None:
    """Neither iptables nor conntrack marks know these flows: the agent must remember the
    pod was on eBPF, and keep revoking what it opened there."""
    direct, steered = open_direct_and_steered(node)
    try:
        node.set_annotations("client", {ANNOTATION_DATAPLANE: "iptables"})
        assert node.dataplane_of("client") == "iptables"
        assert (get(node, direct, "/"), get(node, steered)) == (200, 200)
        close_api_and_check_only_direct_is_revoked(node, direct, steered)

        node.write_policies(closed("web"), replace=False)
        node.wait_synced()
        with pytest.raises(PodProcessError):
            get(node, steered)
    finally:
        node.set_annotations("client", {ANNOTATION_DATAPLANE: "ebpf"})
        assert node.dataplane_of("client") == "ebpf"


def test_flows_survive_kill_9_of_the_agent_and_a_restart_adopts_the_pins(node: PodsNode) -> None:
    client = node.workers["client"]
    steered = client.http_open(node.ip("web"), HTTP_PORT)
    direct = client.http_open(node.ip("api"), L4_PORT)
    assert (get(node, steered), get(node, direct, "/")) == (200, 200)

    kill_agent()
    # Attachments are legacy cgroup attachments and the maps are pinned: nothing depended
    # on the agent process being alive.
    assert (get(node, steered), get(node, direct, "/")) == (200, 200)
    assert client.request(node.ip("web"), HTTP_PORT, "GET", "/admin").status == 403
    assert client.connect_outcome(node.ip("web"), 9090)[0] == "refused"

    try:
        with restarted_agent() as log:
            assert "adopted pinned objects" in log.read_text()
            assert node.dataplane_of("client") == "ebpf"
            assert (get(node, steered), get(node, direct, "/")) == (200, 200)
    finally:
        client.http_close(steered)
        client.http_close(direct)
