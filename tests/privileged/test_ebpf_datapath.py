"""The eBPF datapath on the real kernel: connect4 verdicts, SO_ORIGINAL_DST through the
getsockopt hook, adoption of pinned objects, fallback and a clean unload.

Workloads run as processes inside the pods' cgroups (cgroup hooks act on the cgroup of
the process that makes the socket); a stand-in for Envoy runs in the node's cgroup.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from steer.constants import (
    BPF_PIN_DIR,
    ENVOY_OUTBOUND_PORT,
    ENVOY_SERVICE_PORTS,
    LAB_GATEWAY_IP,
    NODE_NETNS,
)
from steer.lab.podproc import PodProcess
from steer.lab.spec import LabPod, LabState
from steer.model.pod import Pod
from steer.node import bpfbuild, bpfmaps
from steer.node.bpfbuild import BpfError
from steer.node.bpfobjects import BpfObjects
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.features import FORCE_ENV
from steer.node.kernel import HostKernel
from steer.node.netns import run_in_netns
from tests.privileged.conftest import lab_pods, unload_everything
from tests.samples import sample_policies, tenant_client_policies

pytestmark = pytest.mark.privileged


def pods_of(lab: LabState) -> list[Pod]:
    return lab_pods(lab, {"client": {"steer.dev/dataplane": "ebpf"}})


def sync(datapath: NodeDatapath, lab: LabState) -> SyncReport:
    report = run_in_netns(
        NODE_NETNS, lambda: datapath.sync(sample_policies(), pods_of(lab), lab.node_cgroup)
    )
    assert report.errors == []
    return report


def pod(lab: LabState, name: str) -> LabPod:
    return lab.pod("default", name)


def counters(name: str) -> dict[str, int]:
    """A pod's eBPF counters, by name in the default namespace or by namespace/name."""
    bpf = BpfObjects.load(HostKernel())
    try:
        return bpf.counters(bpf.slots[name if "/" in name else f"default/{name}"])
    finally:
        bpf.close()


def test_client_pod_gets_ebpf_with_a_reason(node: NodeDatapath, lab: LabState) -> None:
    report = sync(node, lab)
    dataplane, why = report.dataplanes["default/client"]
    assert dataplane == "ebpf"
    assert "annotation asks for ebpf" in why
    assert report.dataplanes["default/web"][0] == "ebpf"  # auto, on a capable kernel


def test_l7_connect_reaches_envoy_with_its_original_destination(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    with PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy:
        listener = envoy.listen("0.0.0.0", ENVOY_OUTBOUND_PORT)
        seen: list[tuple[str, int]] = []
        accept = threading.Thread(target=lambda: seen.append(envoy.accept_original_dst(listener)))
        accept.start()
        conn = client.open_tcp(pod(lab, "web").ip, 8080)
        accept.join(timeout=5)
        client.tcp_close(conn)
    assert seen == [(pod(lab, "web").ip, 8080)]
    count = counters("client")
    assert count["redirects"] == 1
    assert count["sockopt_hits"] == 1


def test_connect_time_deny_is_refused_at_once(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    outcome, seconds = client.connect_outcome(pod(lab, "web").ip, 9090)
    assert (outcome, seconds < 0.1) == ("refused", True)
    # Dialling Envoy's own listener is refused too, rather than looping through Envoy, and
    # so is a Service port's listener, which would take the pod for that Service's client.
    assert client.connect_outcome(LAB_GATEWAY_IP, ENVOY_OUTBOUND_PORT)[0] == "refused"
    assert client.connect_outcome(LAB_GATEWAY_IP, ENVOY_SERVICE_PORTS[-1])[0] == "refused"
    assert counters("client")["denied"] == 3


@pytest.fixture
def nested_cgroup(lab: LabState) -> Iterator[str]:
    """A cgroup below the client pod's, as a container's is below its pod's on a real node
    (and as a pod process that can write its cgroupfs could make, hoping to slip out)."""
    child = Path(pod(lab, "client").cgroup) / "nested"
    child.mkdir()
    try:
        yield str(child)
    finally:
        child.rmdir()


def test_a_process_in_a_cgroup_below_the_pods_gets_the_pods_verdicts(
    node: NodeDatapath, lab: LabState, nested_cgroup: str
) -> None:
    """connect4 matched the caller's own cgroup only: every process of a real pod (in its
    container's cgroup, one level below) went out unsteered, and so could any process that
    moved itself into a child cgroup."""
    sync(node, lab)
    with PodProcess.start(pod(lab, "client").netns, nested_cgroup) as nested:
        assert nested.connect_outcome(pod(lab, "web").ip, 9090)[0] == "refused"
        assert counters("client")["denied"] == 1, "refused by connect4, not by a closed port"
        with PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy:
            listener = envoy.listen("0.0.0.0", ENVOY_OUTBOUND_PORT)
            seen: list[tuple[str, int]] = []
            accept = threading.Thread(
                target=lambda: seen.append(envoy.accept_original_dst(listener))
            )
            accept.start()
            conn = nested.open_tcp(pod(lab, "web").ip, 8080)
            accept.join(timeout=5)
            nested.tcp_close(conn)
    assert seen == [(pod(lab, "web").ip, 8080)]


def test_v4_mapped_addresses_get_the_ipv4_verdicts(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    """The attack: an AF_INET6 socket dialling ::ffff:<pod ip> skipped connect4, and with
    it every rule. connect6 gives it the IPv4 flow's verdict."""
    sync(node, lab)
    web = pod(lab, "web")
    with (
        PodProcess.start(web.netns, web.cgroup) as server,
        PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy,
    ):
        # A server on the denied port: without the hook the connect would succeed.
        server.serve_echo(web.ip, 9090)
        assert client.connect_outcome(f"::ffff:{web.ip}", 9090)[0] == "refused"
        # Envoy's own listeners, dialled directly through a mapped address.
        assert client.connect_outcome(f"::ffff:{LAB_GATEWAY_IP}", 15006)[0] == "refused"
        listener = envoy.listen("0.0.0.0", ENVOY_OUTBOUND_PORT)
        seen: list[tuple[str, int]] = []
        accept = threading.Thread(target=lambda: seen.append(envoy.accept_original_dst(listener)))
        accept.start()
        conn = client.open_tcp(f"::ffff:{web.ip}", 8080)
        accept.join(timeout=5)
        client.tcp_close(conn)
    assert seen == [(web.ip, 8080)]
    count = counters("client")
    assert (count["denied"], count["redirects"], count["sockopt_hits"]) == (2, 1, 1)


@pytest.mark.parametrize("address", ["2001:db8::1", "fe80::1%eth0", "64:ff9b::a00:1"])
def test_native_ipv6_tcp_is_refused_until_there_is_ipv6_policy(
    node: NodeDatapath, lab: LabState, client: PodProcess, address: str
) -> None:
    sync(node, lab)
    outcome, seconds = client.connect_outcome(address, 8080)
    assert (outcome, seconds < 0.1) == ("refused", True)
    assert counters("client")["denied"] == 1


def _excluding_web(node: NodeDatapath, lab: LabState, client_namespace: str) -> None:
    pods = [
        replace(p, namespace=client_namespace) if p.name == "client" else p
        for p in lab_pods(
            lab,
            {
                "client": {"steer.dev/dataplane": "ebpf"},
                "web": {"steer.dev/exclude-inbound-ports": "8080"},
            },
            {"steer.dev/allow-exclusions": "true"},
        )
    ]
    policies = tenant_client_policies(pod(lab, "web").ip)
    report = run_in_netns(NODE_NETNS, lambda: node.sync(policies, pods, lab.node_cgroup))
    assert report.errors == []


def test_an_inbound_exclusion_skips_envoy_for_its_own_namespace(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    _excluding_web(node, lab, "default")
    web = pod(lab, "web")
    with PodProcess.start(web.netns, web.cgroup) as server:
        server.serve_echo(web.ip, 8080)
        conn = client.open_tcp(web.ip, 8080)
        assert client.tcp_echo(conn, b"direct") == b"direct"
        client.tcp_close(conn)
    assert counters("client")["direct"] == 1


def test_an_inbound_exclusion_does_not_skip_another_namespaces_http_rules(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    """web excludes 8080 from Envoy; connect4 still sends a client of another namespace,
    whose egress policy has HTTP rules for web:8080, to Envoy."""
    _excluding_web(node, lab, "tenant")
    web = pod(lab, "web")
    with PodProcess.start(NODE_NETNS, lab.node_cgroup) as envoy:
        listener = envoy.listen("0.0.0.0", ENVOY_OUTBOUND_PORT)
        seen: list[tuple[str, int]] = []
        accept = threading.Thread(target=lambda: seen.append(envoy.accept_original_dst(listener)))
        accept.start()
        conn = client.open_tcp(web.ip, 8080)
        accept.join(timeout=5)
        client.tcp_close(conn)
    assert seen == [(web.ip, 8080)]
    assert counters("tenant/client")["redirects"] == 1


def test_l4_only_destination_is_reached_directly(
    node: NodeDatapath, lab: LabState, client: PodProcess
) -> None:
    sync(node, lab)
    api = pod(lab, "api")
    with PodProcess.start(api.netns, api.cgroup) as server:
        server.serve_http(api.ip, 7000, "api")
        reply = client.request(api.ip, 7000, "GET", "/anything")
    assert reply.status == 200
    assert b'"peer": "%s"' % pod(lab, "client").ip.encode() in reply.body
    assert "server" not in reply.headers or reply.headers["server"] != "envoy"
    assert counters("client")["direct"] == 1


def test_restart_adopts_the_pins_without_recompiling(
    node: NodeDatapath, lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    sync(node, lab)
    first = BpfObjects.load(HostKernel())
    slots, attachments = dict(first.slots), list(first.attachments)
    first.close()

    def no_compile(self: HostKernel, pin_dir: Path) -> None:
        raise AssertionError("a restart must adopt the pinned objects, not recompile")

    monkeypatch.setattr(HostKernel, "bpf_build", no_compile)
    again = BpfObjects.load(HostKernel())
    try:
        assert again.adopted
        assert (again.slots, again.attachments) == (slots, attachments)
    finally:
        again.close()


def _node_rules() -> list[str]:
    saved = subprocess.run(
        ["ip", "netns", "exec", NODE_NETNS, "iptables-legacy-save"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line for line in saved.splitlines() if not line.startswith("#")]


def _bpftool(*args: str) -> str:
    return subprocess.run(["bpftool", *args], capture_output=True, text=True, check=True).stdout


def _steer_ids(kind: str) -> set[int]:
    """Ids of the loaded BPF programs or maps named steer_*."""
    return {
        int(line.split(":", 1)[0])
        for line in _bpftool(kind, "show").splitlines()
        if line[:1].isdigit() and " steer_" in line
    }


def test_unload_removes_every_bpf_object_and_no_iptables_rule(
    node: NodeDatapath, lab: LabState
) -> None:
    # Objects of earlier tests can linger a while: programs attached to a cgroup the kernel
    # still releases (sockets of its killed processes in TIME_WAIT hold it) stay loaded.
    earlier = _steer_ids("prog"), _steer_ids("map")
    sync(node, lab)
    assert "steer_connect4" in _bpftool("prog", "show")
    rules_before = _node_rules()
    node.close()  # as an agent that has stopped: unload frees what nobody holds
    subprocess.run(
        [".venv/bin/steer", "dataplane", "unload"], check=True, cwd=Path(__file__).parents[2]
    )
    assert _steer_ids("prog") <= earlier[0]
    assert _steer_ids("map") <= earlier[1]
    assert "steer_" not in _bpftool("cgroup", "tree", str(Path(lab.node_cgroup).parent))
    assert not BPF_PIN_DIR.exists()
    assert _node_rules() == rules_before


def test_forced_probe_result_falls_back_to_iptables(
    lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    unload_everything()
    monkeypatch.setenv(FORCE_ENV, '{"ebpf": false}')
    datapath = NodeDatapath()
    try:
        report = sync(datapath, lab)
        dataplane, why = report.dataplanes["default/client"]
        assert dataplane == "iptables"
        assert FORCE_ENV in why
        assert not BPF_PIN_DIR.exists()
    finally:
        datapath.close()
        unload_everything()


def test_a_program_the_verifier_rejects_falls_back_with_its_name_and_log(
    lab: LabState, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connect4 that reads past its map value: the verifier must refuse it, the error
    must name the program and carry the verifier log, and the node must stay up."""
    broken = tmp_path / "bpf"
    shutil.copytree(bpfbuild.BPF_SOURCE_DIR, broken)
    connect4 = broken / "connect4.c"
    connect4.write_text(
        connect4.read_text().replace("i < STEER_MAX_SEGMENTS; i++", "i <= STEER_MAX_SEGMENTS; i++")
    )
    monkeypatch.setattr(bpfbuild, "BPF_SOURCE_DIR", broken)
    unload_everything()
    with pytest.raises(BpfError) as info:
        BpfObjects.load(HostKernel(), tmp_path / "pins", tmp_path / "state.json")
    assert "steer_connect4" in str(info.value)
    assert "verifier log" in str(info.value)
    assert "invalid access to map value" in str(info.value)

    datapath = NodeDatapath()
    try:
        report = sync(datapath, lab)
        dataplane, why = report.dataplanes["default/client"]
        assert dataplane == "iptables"
        assert "steer_connect4" in why
    finally:
        datapath.close()
        unload_everything()
        BpfObjects.unload_all(HostKernel(), tmp_path / "pins", tmp_path / "state.json")


def test_pinned_maps_that_differ_from_the_layout_table_are_refused(
    node: NodeDatapath, lab: LabState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent checks every pinned map against steer/node/bpfmaps.py when it opens the
    pins, so C and Python cannot disagree on a size unnoticed."""
    sync(node, lab)
    cfg = bpfmaps.MAPS["steer_cfg"]
    monkeypatch.setitem(bpfmaps.MAPS, "steer_cfg", replace(cfg, max_entries=2))
    kernel = HostKernel()
    with pytest.raises(BpfError, match=r"steer_cfg: max_entries 1, expected 2"):
        kernel.bpf_open_pins(BPF_PIN_DIR)
    assert not kernel.map_fds and not kernel.prog_fds
