"""Enforcement -> the contents of the eBPF datapath's policy map, per source pod.

connect4 looks up (source pod, destination address) in an LPM trie and reads the verdict
for the destination port from a short list of port segments. This module computes those
entries from `decide_flow`, the same definition the iptables renderer encodes, so the two
datapaths cannot disagree:

* the trie holds, for each source pod, every destination prefix that any relevant rule
  names (its egress peers, each local pod with an ingress policy, its excluded CIDRs)
  plus 0.0.0.0/0; the longest match gives an address's prefix;
* for each prefix, the verdict is computed at one address that lies in the prefix but in
  none of the more specific ones (all such addresses share a verdict), at one port per
  segment between the port boundaries that any relevant rule names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from steer.constants import VERDICT_ALLOW, VERDICT_L7
from steer.model.enforce import Enforcement, ManagedPod, ResolvedRule, decide_flow

ANY = IPv4Network("0.0.0.0/0")
MAX_PORT = 65535


@dataclass(frozen=True)
class Segment:
    lo: int
    hi: int
    verdict: int


@dataclass(frozen=True)
class PrefixPolicy:
    prefix: IPv4Network
    default: int
    segments: tuple[Segment, ...]


@dataclass(frozen=True)
class PodPolicy:
    pod_key: str
    ip: IPv4Address
    prefixes: tuple[PrefixPolicy, ...]


class TooComplexForBpf(ValueError):
    """The pod's policy needs more port segments than one map entry holds."""


def _uncovered_address(prefix: IPv4Network, more_specific: list[IPv4Network]) -> IPv4Address | None:
    """An address in `prefix` outside every network in `more_specific`, if any."""
    inside = [n for n in more_specific if n.overlaps(prefix)]
    if not inside:
        return prefix.network_address
    if any(prefix.subnet_of(n) for n in inside):
        return None
    for half in prefix.subnets(prefixlen_diff=1):
        found = _uncovered_address(half, inside)
        if found is not None:
            return found
    return None


def _rules_for(enforcement: Enforcement, src: ManagedPod, dst: IPv4Address) -> list[ResolvedRule]:
    rules: list[ResolvedRule] = []
    if (egress := enforcement.egress.get(src.ip)) is not None:
        rules += egress.rules
    if (ingress := enforcement.ingress.get(dst)) is not None:
        rules += ingress.rules
    return rules


def _port_boundaries(rules: Iterable[ResolvedRule], excluded: Iterable[int]) -> list[int]:
    """Start ports of the segments over which the verdict is constant."""
    starts = {1}
    for rule in rules:
        for lo, hi in rule.ports or ():
            starts.update((lo, hi + 1))
    for port in excluded:
        starts.update((port, port + 1))
    return sorted(p for p in starts if 1 <= p <= MAX_PORT)


def flow_verdict(enforcement: Enforcement, src: ManagedPod, dst: IPv4Address, port: int) -> int:
    """The verdict connect4 reaches for src -> dst:port: `decide_flow`, with exclusions."""
    if dst == src.ip:
        return VERDICT_ALLOW  # a pod talking to itself never leaves its namespace
    dst_pod = enforcement.pod_by_ip(dst)
    verdict = decide_flow(enforcement, src.ip, dst, port).verdict
    # Excluded traffic skips Envoy, exactly as the iptables datapath's nat exclusions do:
    # an L7 verdict becomes a direct allow; denials stand.
    steering = src.steering
    excluded = (
        port in steering.exclude_outbound_ports
        or any(dst in IPv4Network(c) for c in steering.exclude_outbound_cidrs)
        or (dst_pod is not None and port in dst_pod.steering.exclude_inbound_ports)
    )
    return VERDICT_ALLOW if verdict == VERDICT_L7 and excluded else verdict


def _prefix_policy(
    enforcement: Enforcement,
    src: ManagedPod,
    prefix: IPv4Network,
    at: IPv4Address,
    max_segments: int,
) -> PrefixPolicy:
    dst_pod = enforcement.pod_by_ip(at)
    excluded = set(src.steering.exclude_outbound_ports)
    if dst_pod is not None:
        excluded |= dst_pod.steering.exclude_inbound_ports
    starts = _port_boundaries(_rules_for(enforcement, src, at), excluded)
    ends = [*(s - 1 for s in starts[1:]), MAX_PORT]
    spans = [
        Segment(lo, hi, flow_verdict(enforcement, src, at, lo))
        for lo, hi in zip(starts, ends, strict=True)
    ]
    merged: list[Segment] = []
    for span in spans:
        if merged and merged[-1].verdict == span.verdict and merged[-1].hi + 1 == span.lo:
            merged[-1] = Segment(merged[-1].lo, span.hi, span.verdict)
        else:
            merged.append(span)
    width: Counter[int] = Counter()
    for span in merged:
        width[span.verdict] += span.hi - span.lo + 1
    default = width.most_common(1)[0][0]
    segments = tuple(s for s in merged if s.verdict != default)
    if len(segments) > max_segments:
        raise TooComplexForBpf(
            f"destination {prefix} needs {len(segments)} port segments, the eBPF map holds "
            f"{max_segments}"
        )
    return PrefixPolicy(prefix, default, segments)


def _relevant_prefixes(enforcement: Enforcement, src: ManagedPod) -> set[IPv4Network]:
    prefixes = {ANY}
    if (egress := enforcement.egress.get(src.ip)) is not None:
        for rule in egress.rules:
            prefixes.update(rule.peers or ())
    prefixes.update(IPv4Network(f"{ip}/32") for ip in enforcement.ingress)
    prefixes.update(IPv4Network(c) for c in src.steering.exclude_outbound_cidrs)
    # Destination pods' inbound exclusions depend on the pod, so each gets its own entry.
    prefixes.update(
        IPv4Network(f"{p.ip}/32") for p in enforcement.pods if p.steering.exclude_inbound_ports
    )
    return prefixes


def render_pod_policy(
    enforcement: Enforcement, src: ManagedPod, max_segments: int = 16
) -> PodPolicy:
    """Raises TooComplexForBpf if the pod must stay on the iptables datapath."""
    prefixes = sorted(_relevant_prefixes(enforcement, src), key=lambda n: (n.prefixlen, n))
    entries = []
    for prefix in prefixes:
        more_specific = [p for p in prefixes if p.prefixlen > prefix.prefixlen]
        at = _uncovered_address(prefix, more_specific)
        if at is not None:
            entries.append(_prefix_policy(enforcement, src, prefix, at, max_segments))
    return PodPolicy(src.pod.key, src.ip, tuple(entries))
