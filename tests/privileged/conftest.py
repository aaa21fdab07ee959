"""Privileged fixtures: a real lab node (namespaces, veths, cgroups), torn down even on failure.

The tests here carry the `privileged` marker; tests/conftest.py skips them when not root."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from steer.constants import ENVOY_OUTBOUND_PORT, NODE_NETNS
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_up
from steer.model.pod import Pod
from steer.node.bpfobjects import BpfObjects
from steer.node.datapath import IptablesDatapath, NodeDatapath
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabState]:
    state_file = tmp_path_factory.mktemp("lab") / "lab.json"
    try:
        yield lab_up(default_lab_specs(), state_file=state_file)
    finally:
        lab_down(state_file=state_file)


@pytest.fixture
def lab_state_file(lab: LabState, tmp_path: Path) -> Path:
    return tmp_path


def unload_rules() -> None:
    """steer's iptables and ip6tables rules out of the calling thread's namespace."""
    IptablesDatapath().unload()


@pytest.fixture
def node_clean(lab: LabState) -> Iterator[None]:
    """Each test starts and ends with no steer rules in the node namespace."""
    run_in_netns(NODE_NETNS, unload_rules)
    try:
        yield
    finally:
        run_in_netns(NODE_NETNS, unload_rules)


def unload_everything() -> None:
    BpfObjects.unload_all(HostKernel())
    run_in_netns(NODE_NETNS, lambda: NodeDatapath().unload())


@pytest.fixture
def node(lab: LabState) -> Iterator[NodeDatapath]:
    """A node datapath that starts and ends with no BPF object and no steer rule."""
    unload_everything()
    datapath = NodeDatapath()
    try:
        yield datapath
    finally:
        datapath.close()
        unload_everything()


@pytest.fixture
def client(lab: LabState) -> Iterator[PodProcess]:
    """A worker in the lab's client pod (its netns and its cgroup)."""
    pod = lab.pod("default", "client")
    with PodProcess.start(pod.netns, pod.cgroup) as worker:
        yield worker


def through_envoy(
    lab: LabState,
    client: PodProcess,
    address: str,
    port: int,
    envoy_port: int = ENVOY_OUTBOUND_PORT,
) -> tuple[list[tuple[str, int]], tuple[str, int]]:
    """Connect from `client` to address:port with a stand-in for Envoy listening on
    `envoy_port` in the node: the original destination Envoy would be told, and the peer
    the client's application sees."""
    with PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy:
        listener = envoy.listen("0.0.0.0", envoy_port)
        seen: list[tuple[str, int]] = []
        accept = threading.Thread(target=lambda: seen.append(envoy.accept_original_dst(listener)))
        accept.start()
        conn = client.open_tcp(address, port)
        accept.join(timeout=5)
        peer = client.peername(conn)
        client.tcp_close(conn)
    return seen, peer


def served_by(client: PodProcess, address: str, port: int, rounds: int) -> Counter[str]:
    """Which pod answered each of `rounds` requests to address:port (the lab's HTTP
    servers name themselves in their JSON body)."""
    served: Counter[str] = Counter()
    for _ in range(rounds):
        body = client.request(address, port, "GET", "/").body
        served[body.split(b'"pod": "')[1].split(b'"')[0].decode()] += 1
    return served


def lab_pods(
    lab: LabState,
    annotations: dict[str, dict[str, str]] | None = None,
    namespace_labels: dict[str, str] | None = None,
) -> list[Pod]:
    """The lab's pods as the agent sees them, with per-pod annotations."""
    annotations = annotations or {}
    return [
        Pod(
            p.name,
            p.namespace,
            p.ip,
            dict(p.labels),
            annotations.get(p.name, {}),
            interface=p.veth,
            namespace_labels=namespace_labels or {},
            cgroup=p.cgroup,
            netns=p.netns,
        )
        for p in lab.pods
    ]
