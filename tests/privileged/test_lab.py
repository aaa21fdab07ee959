"""The local node lab against the real kernel.

Namespace and cgroup names are global constants, so these tests own the machine's
one lab while they run; they refuse to start if a lab already exists rather than
tear down someone's running demo.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from steer.constants import (
    CGROUP_SUBTREE,
    LAB_GATEWAY_IP,
    LAB_POD_CIDR,
    NODE_NETNS,
    POD_NETNS_PREFIX,
)
from steer.lab.spec import NETNS_NAME_MAX, LabError, LabPodSpec, LabState, default_lab_specs
from steer.lab.updown import lab_down, lab_status, lab_up
from steer.node.cgroups import cgroup2_root
from steer.node.netns import NETNS_RUN_DIR, netns_exec_argv, run_in_netns

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces and cgroups"),
]


def steer_netns() -> set[str]:
    if not NETNS_RUN_DIR.is_dir():
        return set()
    return {
        p.name
        for p in NETNS_RUN_DIR.iterdir()
        if p.name == NODE_NETNS or p.name.startswith(POD_NETNS_PREFIX)
    }


def cgroup_base() -> Path:
    return cgroup2_root() / CGROUP_SUBTREE


def ip(*args: str) -> str:
    return subprocess.run(["ip", "-o", *args], check=True, capture_output=True, text=True).stdout


def root_netns_snapshot() -> dict[str, str]:
    return {
        "link": ip("link"),
        "addr": ip("addr"),
        "route": ip("route", "show", "table", "all"),
        "rule": ip("rule"),
        "ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text(),
    }


def node_links() -> str:
    return ip("-n", NODE_NETNS, "link")


def exchange(server_netns: str, server_ip: str, client_netns: str) -> tuple[str, bytes]:
    """Open a listener in one namespace, connect from another, and echo bytes once.

    Returns the source address the server saw and what came back to the client.
    """
    with run_in_netns(server_netns, lambda: socket.create_server((server_ip, 0))) as server:
        server.settimeout(5)
        port = server.getsockname()[1]
        with run_in_netns(
            client_netns, lambda: socket.create_connection((server_ip, port), timeout=5)
        ) as client:
            conn, (peer_ip, _port) = server.accept()
            with conn:
                client.sendall(b"ping")
                conn.sendall(conn.recv(16).upper())
                return peer_ip, client.recv(16)


@pytest.fixture
def state_file(tmp_path: Path) -> Iterator[Path]:
    if existing := steer_netns():
        pytest.fail(f"a steer lab already exists ({sorted(existing)}); run `steer lab down`")
    path = tmp_path / "run" / "lab.json"
    try:
        yield path
    finally:
        lab_down(path)


@pytest.fixture
def lab(state_file: Path) -> LabState:
    return lab_up(default_lab_specs(), state_file)


def test_up_creates_node_and_pods(lab: LabState, state_file: Path) -> None:
    data = json.loads(state_file.read_text())
    assert data["node"]["netns"] == NODE_NETNS
    assert [p["name"] for p in data["pods"]] == ["client", "web", "api"]
    for pod in data["pods"]:
        assert {"name", "netns", "ip", "cgroup", "veth"} <= pod.keys()
        assert pod["netns"] in steer_netns()
        assert Path(pod["cgroup"]).is_dir()
        assert pod["veth"] in node_links()
    assert NODE_NETNS in steer_netns()
    assert Path(lab.node_cgroup).is_dir()
    assert [p.ip for p in lab.pods] == ["10.244.0.2", "10.244.0.3", "10.244.0.4"]
    assert all(ipaddress.ip_address(p.ip) in ipaddress.ip_network(LAB_POD_CIDR) for p in lab.pods)
    assert lab.pod("default", "web").labels == {"app": "web"}
    assert lab_status(state_file) == lab
    assert LabState.from_json(lab.to_json()) == lab


def test_pod_to_pod_tcp(lab: LabState) -> None:
    client, web = lab.pod("default", "client"), lab.pod("default", "web")
    peer, reply = exchange(web.netns, web.ip, client.netns)
    # The source is the client's own address: the node routes, it does not NAT.
    assert (peer, reply) == (client.ip, b"PING")


def test_pod_reaches_gateway(lab: LabState) -> None:
    client = lab.pod("default", "client")
    assert exchange(NODE_NETNS, LAB_GATEWAY_IP, client.netns) == (client.ip, b"PING")


def test_up_is_idempotent(lab: LabState, state_file: Path) -> None:
    links_before = node_links()
    assert lab_up(default_lab_specs(), state_file) == lab
    assert node_links() == links_before
    client, api = lab.pod("default", "client"), lab.pod("default", "api")
    assert exchange(api.netns, api.ip, client.netns) == (client.ip, b"PING")


def test_up_adds_and_removes_pods(lab: LabState, state_file: Path) -> None:
    client, web, api = lab.pods
    specs = [*default_lab_specs()[:2], LabPodSpec(name="db", namespace="data")]
    changed = lab_up(specs, state_file)

    assert [(p.namespace, p.name) for p in changed.pods] == [
        ("default", "client"),
        ("default", "web"),
        ("data", "db"),
    ]
    # Survivors keep their addresses; the newcomer gets the lowest free one.
    assert changed.pods[:2] == (client, web)
    assert changed.pod("data", "db").ip == api.ip
    assert api.netns not in steer_netns()
    assert not Path(api.cgroup).exists()
    assert api.veth not in node_links()
    db = changed.pod("data", "db")
    assert exchange(db.netns, db.ip, client.netns) == (client.ip, b"PING")
    assert lab_status(state_file) == changed


def test_down_removes_everything(lab: LabState, state_file: Path) -> None:
    lab_down(state_file)
    assert steer_netns() == set()
    assert not cgroup_base().exists()
    assert not state_file.exists()
    assert lab_status(state_file) is None
    lab_down(state_file)  # already gone: still no error


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_down_after_crash(lab: LabState, state_file: Path, damage: str) -> None:
    web = lab.pod("default", "web")
    # A process inside a pod, as a workload or a crashed agent would leave behind.
    proc = subprocess.Popen(netns_exec_argv(web.netns, ["sleep", "60"]))
    (Path(web.cgroup) / "cgroup.procs").write_text(str(proc.pid))
    # A name whose mount was lost, as an interrupted create leaves it.
    (NETNS_RUN_DIR / f"{POD_NETNS_PREFIX}ghost").touch()
    if damage == "missing":
        state_file.unlink()
    else:
        state_file.write_text("{not json")
        with pytest.raises(LabError):
            lab_status(state_file)

    lab_down(state_file)

    assert proc.wait(timeout=5) == -9
    assert steer_netns() == set()
    assert not cgroup_base().exists()
    assert not state_file.exists()


def test_up_repairs_after_crash(lab: LabState, state_file: Path) -> None:
    # Lost state and a pod whose wiring was half torn down: up rebuilds from the kernel.
    state_file.unlink()
    web = lab.pod("default", "web")
    ip("-n", NODE_NETNS, "link", "del", web.veth)
    assert lab_up(default_lab_specs(), state_file) == lab
    client = lab.pod("default", "client")
    assert exchange(web.netns, web.ip, client.netns) == (client.ip, b"PING")


def test_up_keeps_a_pods_current_address(lab: LabState, state_file: Path) -> None:
    web = lab.pod("default", "web")
    ip("-n", web.netns, "addr", "flush", "dev", "eth0")
    ip("-n", web.netns, "addr", "add", "10.244.0.50/32", "dev", "eth0")
    assert lab_up(default_lab_specs(), state_file).pod("default", "web").ip == "10.244.0.50"
    # The node's host route follows the address instead of keeping the old one too.
    assert web.ip not in ip("-n", NODE_NETNS, "route")
    client = lab.pod("default", "client")
    assert exchange(web.netns, "10.244.0.50", client.netns) == (client.ip, b"PING")


def test_root_netns_untouched(state_file: Path) -> None:
    before = root_netns_snapshot()
    lab = lab_up(default_lab_specs(), state_file)
    client, web = lab.pod("default", "client"), lab.pod("default", "web")
    exchange(web.netns, web.ip, client.netns)
    assert root_netns_snapshot() == before
    lab_down(state_file)
    assert root_netns_snapshot() == before


def test_duplicate_pods_are_refused(state_file: Path) -> None:
    with pytest.raises(ValueError, match="would share"):
        lab_up([LabPodSpec(name="a"), LabPodSpec(name="a")], state_file)
    with pytest.raises(ValueError, match="not a valid"):
        LabPodSpec(name="../escape")


def test_long_names_are_shortened(state_file: Path) -> None:
    long = LabPodSpec(name="x" * 200, namespace="n" * 63)
    (pod,) = lab_up([long], state_file).pods
    assert len(pod.netns) <= NETNS_NAME_MAX
    assert pod.netns in steer_netns()
    assert Path(pod.cgroup).is_dir()
    assert len({pod, pod}) == 1  # hashable despite its label mappings


def test_run_in_netns_reraises_and_never_creates(lab: LabState) -> None:
    own_netns = Path("/proc/thread-self/ns/net").stat().st_ino

    def boom() -> None:
        raise KeyError("from inside")

    with pytest.raises(KeyError, match="from inside"):
        run_in_netns(NODE_NETNS, boom)
    with pytest.raises(FileNotFoundError):
        run_in_netns(f"{POD_NETNS_PREFIX}does-not-exist", lambda: None)
    assert f"{POD_NETNS_PREFIX}does-not-exist" not in steer_netns()
    # The caller's thread is never moved.
    assert Path("/proc/thread-self/ns/net").stat().st_ino == own_netns


def test_enter_netns_moves_the_process(lab: LabState) -> None:
    code = (
        "import os, sys; from steer.node.netns import enter_netns;"
        f"enter_netns({NODE_NETNS!r}); print(os.stat('/proc/self/ns/net').st_ino)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    ).stdout
    assert int(out) == (NETNS_RUN_DIR / NODE_NETNS).stat().st_ino
