"""The eBPF policy map reaches exactly the verdicts of decide_flow (with exclusions)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

import pytest

from steer.model.enforce import Enforcement, ManagedPod, resolve
from steer.model.load import parse_policies
from steer.model.pod import Pod
from steer.render.bpf import (
    PodPolicy,
    TooComplexForBpf,
    flow_verdict,
    render_pod_policy,
)
from tests.samples import CLIENT, PODS, WEB, policy_yaml, sample_policies

ALLOWED_NS = {"steer.dev/allow-exclusions": "true"}


def lookup(policy: PodPolicy, dst: IPv4Address, port: int) -> int:
    """What connect4 does: its own address passes; else longest prefix, then the first
    matching segment."""
    if dst == policy.ip:
        return 1
    entry = max((e for e in policy.prefixes if dst in e.prefix), key=lambda e: e.prefix.prefixlen)
    return next((s.verdict for s in entry.segments if s.lo <= port <= s.hi), entry.default)


def managed(enforcement: Enforcement, name: str) -> ManagedPod:
    return next(p for p in enforcement.pods if p.pod.name == name)


EXTRA = policy_yaml(
    """spec:
  podSelector: {matchLabels: {app: client}}
  egress:
    defaultAction: Allow
    rules:
      - {action: Deny, to: [{cidr: 10.0.0.0/8}], ports: [{port: 5432}, {port: 6000, endPort: 6010}]}
      - {to: [{cidr: 10.1.0.0/16}], ports: [{port: 80}], http: {paths: [{prefix: /}]}}
      - {action: Deny, to: [{cidr: 10.1.2.0/24}]}
""",
    name="client-extra",
)
ADDRESSES = [
    *(IPv4Address(a) for a in ("10.244.0.2", "10.244.0.3", "10.244.0.4", "169.254.169.254")),
    *(IPv4Address(a) for a in ("10.1.2.3", "10.1.3.3", "10.2.0.1", "8.8.8.8", "192.168.1.1")),
]
PORTS = [1, 79, 80, 81, 5432, 5999, 6000, 6005, 6010, 6011, 7000, 8080, 9090, 65535]


def enforcement_with(*texts: str, pods: tuple[Pod, ...] = PODS) -> Enforcement:
    extra = []
    for text in texts:
        loaded, errors = parse_policies(text, "extra.yaml")
        assert not errors
        extra += loaded
    return resolve(sample_policies() + extra, pods)


@pytest.mark.parametrize("source", ["client", "web", "api"])
def test_map_agrees_with_decide_flow_everywhere(source: str) -> None:
    enforcement = enforcement_with(EXTRA)
    pod = managed(enforcement, source)
    policy = render_pod_policy(enforcement, pod)
    for dst in ADDRESSES:
        for port in PORTS:
            assert lookup(policy, dst, port) == flow_verdict(enforcement, pod, dst, port), (
                dst,
                port,
            )


def test_exclusions_turn_l7_into_direct_but_keep_denials() -> None:
    client = Pod(
        "client",
        "default",
        CLIENT.ip,
        CLIENT.labels,
        {
            "steer.dev/exclude-outbound-ports": "8080",
            "steer.dev/exclude-outbound-cidrs": "10.1.0.0/16",
        },
        namespace_labels=ALLOWED_NS,
    )
    enforcement = enforcement_with(EXTRA, pods=(client, *PODS[1:]))
    policy = render_pod_policy(enforcement, managed(enforcement, "client"))
    assert lookup(policy, IPv4Address(WEB.ip), 8080) == 1  # was L7: web's HTTP rules
    assert lookup(policy, IPv4Address("10.1.3.3"), 80) == 1  # was L7: the egress HTTP rule
    assert lookup(policy, IPv4Address("10.1.2.3"), 80) == 2  # denied stays denied
    assert lookup(policy, IPv4Address(WEB.ip), 9090) == 2


def test_every_pod_has_a_default_route() -> None:
    enforcement = enforcement_with()
    policy = render_pod_policy(enforcement, managed(enforcement, "api"))
    assert IPv4Network("0.0.0.0/0") in {e.prefix for e in policy.prefixes}


def test_too_many_port_segments_is_refused_for_ebpf() -> None:
    many = policy_yaml(
        "spec:\n  podSelector: {matchLabels: {app: client}}\n  egress:\n    rules:\n"
        + "".join(f"      - {{ports: [{{port: {1000 + 2 * i}}}]}}\n" for i in range(20)),
        name="many",
    )
    enforcement = enforcement_with(many)
    with pytest.raises(TooComplexForBpf, match="port segments"):
        render_pod_policy(enforcement, managed(enforcement, "client"))
