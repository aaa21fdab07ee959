"""The agent's decisions as the exact kernel calls they make, through the recording fake
kernel: a datapath switch, the fallback after a failed BPF load, revocations on both
datapaths, and exclusions. Root-free; regenerate with STEER_REGEN_GOLDEN=1.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import replace
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from steer.constants import (
    ANNOTATION_DATAPLANE,
    ANNOTATION_EXCLUDE_OUTBOUND_PORTS,
    LABEL_ALLOW_EXCLUSIONS,
    VERDICT_ALLOW,
    VERDICT_L7,
)
from steer.model.pod import Pod
from steer.model.policy import HTTPPolicy
from steer.node.bpfmaps import FlowKey, OrigDst, PodVal, ip_be
from steer.node.conntrack import Flow
from steer.node.datapath import NodeDatapath, SyncReport
from steer.node.fakekernel import RecordingKernel
from steer.node.features import Features
from tests.golden.golden import check_golden
from tests.samples import PODS, policy_yaml, sample_policies

CGROUPS = "/sys/fs/cgroup/unified/steer"
ENVOY_CGROUP = f"{CGROUPS}/node"
EBPF = Features(ebpf=True, skmsg=True, ebpf_reason="", skmsg_reason="")


def lab_pods(**dataplanes: str) -> list[Pod]:
    """The sample node's pods with cgroups and netns, as the lab has them."""
    return [
        replace(
            pod,
            cgroup=f"{CGROUPS}/default-{pod.name}",
            netns=f"steer-pod-default-{pod.name}",
            annotations={ANNOTATION_DATAPLANE: dataplanes.get(pod.name, "iptables")},
        )
        for pod in PODS
    ]


def node(kernel: RecordingKernel, tmp_path: Path) -> NodeDatapath:
    return NodeDatapath(kernel=kernel, features=EBPF, bpf_state_file=tmp_path / "bpf.json")


def sync(datapath: NodeDatapath, policies: list[HTTPPolicy], pods: list[Pod]) -> SyncReport:
    report = datapath.sync(policies, pods, ENVOY_CGROUP)
    assert not report.errors, report.errors
    return report


def calls_of(kernel: RecordingKernel) -> str:
    return "\n".join(kernel.calls) + "\n"


def api_on_port(port: int) -> HTTPPolicy:
    """The sample api policy, with its one allowed port moved."""
    from steer.model.load import parse_policies

    spec = (
        "spec:\n  podSelector:\n    matchLabels: {app: api}\n  ingress:\n"
        "    defaultAction: Deny\n    rules:\n      - name: client-tcp\n"
        "        from: [{podSelector: {matchLabels: {app: client}}}]\n"
        f"        ports: [{{port: {port}}}]\n"
    )
    [policy], errors = parse_policies(policy_yaml(spec, name="api"), "api.yaml")
    assert not errors
    return policy


def with_api(port: int) -> list[HTTPPolicy]:
    return [p for p in sample_policies() if p.metadata.name != "api"] + [api_on_port(port)]


def test_switching_a_pod_to_ebpf_loads_once_fills_its_maps_and_attaches(tmp_path: Path) -> None:
    kernel = RecordingKernel()
    datapath = node(kernel, tmp_path)
    sync(datapath, sample_policies(), lab_pods())
    assert not any(call.startswith("bpf") for call in kernel.calls), "no pod wanted eBPF"
    kernel.calls.clear()

    report = sync(datapath, sample_policies(), lab_pods(client="ebpf"))
    assert report.dataplanes["default/client"][0] == "ebpf"
    assert {(f"{CGROUPS}/default-client", "steer_connect4")} <= kernel.attached
    check_golden("kernel_switch_to_ebpf.calls", calls_of(kernel))

    kernel.calls.clear()
    sync(datapath, sample_policies(), lab_pods())
    assert not any(c for c in kernel.attached if c[0].endswith("default-client"))
    check_golden("kernel_switch_back_to_iptables.calls", calls_of(kernel))


def test_a_failed_bpf_load_keeps_every_pod_on_iptables_with_the_reason(tmp_path: Path) -> None:
    kernel = RecordingKernel(fail_build="the verifier rejected steer_connect4: Permission denied")
    datapath = node(kernel, tmp_path)
    report = sync(datapath, sample_policies(), lab_pods(client="ebpf"))
    dataplane, why = report.dataplanes["default/client"]
    assert dataplane == "iptables"
    assert "steer_connect4" in why
    assert not kernel.attached
    assert not datapath.features.ebpf
    check_golden("kernel_bpf_load_fails.calls", calls_of(kernel))

    kernel.calls.clear()
    sync(datapath, sample_policies(), lab_pods(client="ebpf"))
    assert not any(c.startswith("bpf build") for c in kernel.calls), "no retry on every sync"


def test_a_policy_change_revokes_exactly_the_iptables_flows_it_affects(tmp_path: Path) -> None:
    kernel = RecordingKernel()
    datapath = node(kernel, tmp_path)
    client, web, api = (IPv4Address(p.ip) for p in PODS)
    sync(datapath, sample_policies(), lab_pods())
    to_api = Flow(client, api, 40000, 7000, VERDICT_ALLOW, 0)
    to_web = Flow(client, web, 40001, 8080, VERDICT_L7, 0)
    kernel.flows = [to_api, to_web]
    kernel.calls.clear()

    report = sync(datapath, with_api(7001), lab_pods())
    assert report.revoked == 1
    assert kernel.flows == [to_web]
    check_golden("kernel_revoke_iptables.calls", calls_of(kernel))


def test_a_policy_change_destroys_exactly_the_ebpf_sockets_it_affects(tmp_path: Path) -> None:
    kernel = RecordingKernel()
    datapath = node(kernel, tmp_path)
    client, web, api = (p.ip for p in PODS)
    sync(datapath, sample_policies(), lab_pods(client="ebpf"))
    # A steered L7 connection (its original destination as connect4 stored it) and a
    # direct one that connect4 allowed, which iptables let through unmarked.
    steered = FlowKey(kernel.cookie, ip_be(client), ip_be("10.244.0.1"), 41000, 15001)
    kernel.maps["steer_origdst"] = {
        bytes(steered): bytes(
            OrigDst(ip_be(web), int.from_bytes((8080).to_bytes(2, "big"), "little"), 1)
        )
    }
    kernel.unmarked = [Flow(IPv4Address(client), IPv4Address(api), 41001, 7000, 0, 0)]
    kernel.calls.clear()

    report = sync(datapath, with_api(7001), lab_pods(client="ebpf"))
    assert report.revoked == 1
    assert [c for c in kernel.calls if c.startswith("ss -K")] == [
        f"ss -K in steer-pod-default-client: {client}:41001 -> {api}:7000"
    ]
    check_golden("kernel_revoke_ebpf.calls", calls_of(kernel))


@pytest.mark.parametrize("dataplane", ["iptables", "ebpf"])
def test_exclusions_count_only_where_the_namespace_allows_them(
    tmp_path: Path, dataplane: str
) -> None:
    def excluding(allowed: bool) -> list[Pod]:
        pods = lab_pods(client=dataplane)
        pods[0] = replace(
            pods[0],
            annotations={**pods[0].annotations, ANNOTATION_EXCLUDE_OUTBOUND_PORTS: "8080"},
            namespace_labels={LABEL_ALLOW_EXCLUSIONS: "true"} if allowed else {},
        )
        return pods

    denied, allowed = RecordingKernel(), RecordingKernel()
    sync(node(denied, tmp_path / "a"), sample_policies(), excluding(allowed=False))
    sync(node(allowed, tmp_path / "b"), sample_policies(), excluding(allowed=True))
    plain = RecordingKernel()
    sync(node(plain, tmp_path / "c"), sample_policies(), lab_pods(client=dataplane))
    assert denied.calls == plain.calls, "an exclusion without permission changes nothing"
    assert allowed.calls != plain.calls
    check_golden(f"kernel_exclusion_{dataplane}.calls", calls_of(allowed))


def test_dry_run_kernel_describes_map_values_readably() -> None:
    kernel = RecordingKernel()
    kernel.bpf_update("steer_podips", ct.c_uint32(ip_be("10.244.0.2")), ct.c_uint32(1))
    kernel.bpf_update("steer_pods", ct.c_uint64(7), PodVal(1, ip_be("10.244.0.2")))
    assert kernel.calls == [
        "bpf update steer_podips 10.244.0.2 = 1",
        "bpf update steer_pods 7 = {slot=1 ip=10.244.0.2}",
    ]
