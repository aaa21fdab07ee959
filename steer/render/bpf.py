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

from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from ipaddress import IPv4Address, IPv4Network

from steer.constants import BPF_MAX_SEGMENTS, VERDICT_ALLOW, VERDICT_L7
from steer.model.enforce import (
    Enforcement,
    ManagedPod,
    ResolvedRule,
    SideRules,
    decide_flow,
    decide_sides,
    exclusion_skips_envoy,
)

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


def _uncovered_addresses(prefixes: Sequence[IPv4Network]) -> dict[IPv4Network, IPv4Address | None]:
    """For each prefix, its lowest address outside every longer prefix of the set (None if
    they cover it all): where its verdict is its own.

    Two CIDR prefixes are nested or disjoint, so the longer prefixes that matter are the
    ones that start inside it: one sorted pass over their spans, in integers. (A search
    that split prefixes in halves and tested every pair cost ~100 ms per eBPF pod per
    change at 1k pods.)"""
    spans = sorted(
        (int(p.network_address), int(p.broadcast_address), p.prefixlen) for p in prefixes
    )
    starts = [start for start, _, _ in spans]
    found: dict[IPv4Network, IPv4Address | None] = {}
    for prefix in prefixes:
        if prefix.prefixlen == 32:
            found[prefix] = prefix.network_address
            continue
        lo, hi = int(prefix.network_address), int(prefix.broadcast_address)
        cursor = lo
        for start, end, length in spans[bisect_left(starts, lo) :]:
            if start > hi or start > cursor:
                break
            if length > prefix.prefixlen:
                cursor = max(cursor, end + 1)
        found[prefix] = IPv4Address(cursor) if cursor <= hi else None
    return found


def _port_boundaries(rules: Iterable[ResolvedRule], excluded: Iterable[int]) -> list[int]:
    """Start ports of the segments over which the verdict is constant."""
    starts = {1}
    for rule in rules:
        for lo, hi in rule.ports or ():
            starts.update((lo, hi + 1))
    for port in excluded:
        starts.update((port, port + 1))
    return sorted(p for p in starts if 1 <= p <= MAX_PORT)


def _with_exclusions(
    verdict: int,
    src: ManagedPod,
    dst: IPv4Address,
    port: int,
    *,
    dst_pod: ManagedPod | None,
    egress: SideRules | None,
    ingress: SideRules | None,
) -> int:
    # Excluded traffic skips Envoy, exactly as the iptables datapath's nat exclusions do:
    # an L7 verdict becomes a direct allow; denials stand.
    if verdict == VERDICT_L7 and exclusion_skips_envoy(
        src, dst, port, dst_pod=dst_pod, egress=egress, ingress=ingress
    ):
        return VERDICT_ALLOW
    return verdict


def flow_verdict(enforcement: Enforcement, src: ManagedPod, dst: IPv4Address, port: int) -> int:
    """The verdict connect4 reaches for src -> dst:port: `decide_flow`, with exclusions."""
    if dst == src.ip:
        return VERDICT_ALLOW  # a pod talking to itself never leaves its namespace
    verdict = decide_flow(enforcement, src.ip, dst, port).verdict
    egress, ingress = enforcement.egress.get(src.ip), enforcement.ingress.get(dst)
    return _with_exclusions(
        verdict, src, dst, port, dst_pod=enforcement.pod_by_ip(dst), egress=egress, ingress=ingress
    )


@dataclass(frozen=True, eq=False)
class _Prefix:
    """What one prefix's entry is computed from: the verdicts from `src` to `at`, an
    address in `prefix` that no more specific prefix covers."""

    egress: SideRules | None
    ingress: SideRules | None
    src: ManagedPod
    dst_pod: ManagedPod | None
    prefix: IPv4Network
    at: IPv4Address

    def key(self) -> tuple[object, ...]:
        ids = (id(self.egress), id(self.ingress), id(self.src), id(self.dst_pod))
        return (*ids, self.prefix, self.at)


def _prefix_policy(target: _Prefix, max_segments: int) -> PrefixPolicy:
    """`flow_verdict` at every port of `at`, as segments. The sides are narrowed to the
    rules that can match this pair first: the same verdicts, without matching every
    rule's peers again at each of a hundred ports."""
    egress, ingress, src, dst_pod = target.egress, target.ingress, target.src, target.dst_pod
    prefix, at = target.prefix, target.at
    if at == src.ip:
        # A pod talking to itself never leaves its namespace: allowed at every port.
        return PrefixPolicy(prefix, VERDICT_ALLOW, ())
    narrowed_egress = egress.narrowed(at) if egress is not None else None
    narrowed_ingress = ingress.narrowed(src.ip) if ingress is not None else None
    excluded = set(src.steering.exclude_outbound_ports)
    if dst_pod is not None:
        excluded |= dst_pod.steering.exclude_inbound_ports
    rules = [
        *(narrowed_egress.rules if narrowed_egress else ()),
        *(narrowed_ingress.rules if narrowed_ingress else ()),
    ]
    starts = _port_boundaries(rules, excluded)
    ends = [*(s - 1 for s in starts[1:]), MAX_PORT]

    def verdict(port: int) -> int:
        decided = decide_sides(narrowed_egress, narrowed_ingress, src.ip, at, port).verdict
        return _with_exclusions(
            decided,
            src,
            at,
            port,
            dst_pod=dst_pod,
            egress=narrowed_egress,
            ingress=narrowed_ingress,
        )

    spans = [Segment(lo, hi, verdict(lo)) for lo, hi in zip(starts, ends, strict=True)]
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
    prefixes.update(_host(ip) for ip in enforcement.ingress)
    prefixes.update(IPv4Network(c) for c in src.steering.exclude_outbound_cidrs)
    # Destination pods' inbound exclusions depend on the pod, so each gets its own entry.
    prefixes.update(_host(p.ip) for p in enforcement.pods if p.steering.exclude_inbound_ports)
    return prefixes


@lru_cache(maxsize=1 << 16)
def _host(ip: IPv4Address) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


class BpfPolicyCache:
    """Prefix entries of previous renders, for a caller that renders again and again (the
    agent). An entry depends only on the source's egress side, the destination's ingress
    side, the two pods and the prefix; while those are the same objects (as `Resolver`
    hands back for what did not change) the entry is reused, so a policy change
    re-renders the prefixes it touches, not a thousand per eBPF pod."""

    def __init__(self) -> None:
        # Keyed by the inputs' ids: each value holds its inputs alive, so no other object
        # can have one of those ids while the entry is here.
        self._entries: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}
        self._used: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}

    def entry(self, target: _Prefix, max_segments: int) -> PrefixPolicy:
        key = (*target.key(), max_segments)
        cached = self._used.get(key) or self._entries.get(key)
        if cached is None:
            cached = (target, _prefix_policy(target, max_segments))
        self._used[key] = cached
        return cached[1]

    def forget_unused(self) -> None:
        """Keep only what the renders since the last call used, so the cache follows the
        node instead of growing with churn."""
        self._entries, self._used = self._used, {}


def render_pod_policy(
    enforcement: Enforcement,
    src: ManagedPod,
    max_segments: int = BPF_MAX_SEGMENTS,
    cache: BpfPolicyCache | None = None,
) -> PodPolicy:
    """Raises TooComplexForBpf if the pod must stay on the iptables datapath. Pure in
    effect: with a cache the result equals a render without one."""
    prefixes = sorted(_relevant_prefixes(enforcement, src), key=lambda n: (n.prefixlen, n))
    egress = enforcement.egress.get(src.ip)
    entry = (cache or BpfPolicyCache()).entry
    entries = []
    uncovered = _uncovered_addresses(prefixes)
    for prefix in prefixes:
        if (at := uncovered[prefix]) is not None:
            target = _Prefix(
                egress, enforcement.ingress.get(at), src, enforcement.pod_by_ip(at), prefix, at
            )
            entries.append(entry(target, max_segments))
    return PodPolicy(src.pod.key, src.ip, tuple(entries))
