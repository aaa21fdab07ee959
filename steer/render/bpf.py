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
    touched,
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

    def shape(self, max_segments: int) -> tuple[object, ...] | None:
        """What the entry's verdicts depend on, when that is not the address: for a source
        without egress rules or excluded CIDRs, only the destination's ingress rules (as
        the Resolver shares them between replicas), its inbound exclusions and namespace,
        and whether it is the source itself. Replicas of a workload then share one
        computation. None when the address matters."""
        src, ingress, dst = self.src, self.ingress, self.dst_pod
        if self.egress is not None or src.steering.exclude_outbound_cidrs:
            return None
        rules = (
            None
            if ingress is None
            else (ingress.default_action, ingress.default_policy_id, id(ingress.rules))
        )
        destination = (
            None if dst is None else (dst.pod.namespace, dst.steering.exclude_inbound_ports)
        )
        return (id(src), max_segments, rules, destination, self.at == src.ip)


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


def _own_prefixes(enforcement: Enforcement, src: ManagedPod) -> frozenset[IPv4Network]:
    """The prefixes that the source pod itself brings: its egress peers and excluded
    CIDRs, its own address, and 0.0.0.0/0."""
    prefixes = {ANY, _host(src.ip)}
    if (egress := enforcement.egress.get(src.ip)) is not None:
        for rule in egress.rules:
            prefixes.update(rule.peers or ())
    prefixes.update(IPv4Network(c) for c in src.steering.exclude_outbound_cidrs)
    return frozenset(prefixes)


def _relevant_prefixes(enforcement: Enforcement, own: frozenset[IPv4Network]) -> set[IPv4Network]:
    prefixes = set(own)
    prefixes.update(_host(ip) for ip in enforcement.ingress)
    # Destination pods' inbound exclusions depend on the pod, so each gets its own entry.
    prefixes.update(_host(p.ip) for p in enforcement.pods if p.steering.exclude_inbound_ports)
    return prefixes


def _destination_needs_host_entry(enforcement: Enforcement, ip: IPv4Address) -> bool:
    """Whether `_relevant_prefixes` holds ip/32 for the destination's sake."""
    if ip in enforcement.ingress:
        return True
    pod = enforcement.pod_by_ip(ip)
    return pod is not None and bool(pod.steering.exclude_inbound_ports)


@lru_cache(maxsize=1 << 16)
def _host(ip: IPv4Address) -> IPv4Network:
    return IPv4Network(f"{ip}/32")


@dataclass
class _PodRender:
    """One source pod's last render, and what it was computed from."""

    enforcement: Enforcement
    src: ManagedPod
    egress: SideRules | None
    max_segments: int
    policy: PodPolicy
    own: frozenset[IPv4Network]
    # Every relevant prefix -> its uncovered address (None: longer prefixes cover it all).
    uncovered: dict[IPv4Network, IPv4Address | None]
    entries: dict[IPv4Network, PrefixPolicy]

    def reusable_for(self, enforcement: Enforcement, src: ManagedPod, max_segments: int) -> bool:
        return (
            self.src is src
            and self.egress is enforcement.egress.get(src.ip)
            and self.max_segments == max_segments
        )


class BpfPolicyCache:
    """Renders of previous changes, for a caller that renders again and again (the agent).

    Two levels, both keyed by identity (the `Resolver` hands back the very same pod and
    side objects for what did not change):
      - per source pod: when its own pod and egress side are the same objects as at the
        last change, only the entries of the addresses that change touched are computed
        again (and host prefixes added or dropped with them), so a change costs each eBPF
        pod the destinations it touched, not a thousand prefixes;
      - per prefix entry: a full render (a pod's own rules changed) reuses every entry
        whose inputs are the same objects.
    Pure in effect: every render equals one without a cache (tests/unit/
    test_incremental_render.py walks random changes to hold it to that)."""

    def __init__(self) -> None:
        # Keyed by the inputs' ids: each value holds its inputs alive, so no other object
        # can have one of those ids while the entry is here.
        self._entries: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}
        self._used: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}
        self._pods: dict[str, _PodRender] = {}
        self._pods_used: dict[str, _PodRender] = {}
        # `_Prefix.shape` -> an entry computed for it (its target holds the ids alive).
        self._shapes: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}
        self._shapes_used: dict[tuple[object, ...], tuple[_Prefix, PrefixPolicy]] = {}
        self._current: Enforcement | None = None
        self._previous: Enforcement | None = None
        self._touched: frozenset[IPv4Address] | None = None

    def entry(self, target: _Prefix, max_segments: int) -> PrefixPolicy:
        key = (*target.key(), max_segments)
        cached = self._used.get(key) or self._entries.get(key)
        if cached is None:
            shape = target.shape(max_segments)
            like = None
            if shape is not None:
                like = self._shapes_used.get(shape) or self._shapes.get(shape)
            if like is not None:
                policy = PrefixPolicy(target.prefix, like[1].default, like[1].segments)
            else:
                policy = _prefix_policy(target, max_segments)
            cached = (target, policy)
            if shape is not None:
                self._shapes_used[shape] = cached
        self._used[key] = cached
        return cached[1]

    def forget_unused(self) -> None:
        """Keep only what the renders since the last call used, so the cache follows the
        node instead of growing with churn."""
        self._entries, self._used = self._used, {}
        self._pods, self._pods_used = self._pods_used, {}
        self._shapes, self._shapes_used = self._shapes_used, {}

    def pod_policy(self, enforcement: Enforcement, src: ManagedPod, max_segments: int) -> PodPolicy:
        if enforcement is not self._current:
            self._previous, self._current = self._current, enforcement
            scope = touched(self._previous, enforcement)
            self._touched = None if scope is None else scope.destinations
        last = self._pods_used.get(src.pod.key) or self._pods.get(src.pod.key)
        if last is not None and last.reusable_for(enforcement, src, max_segments):
            if last.enforcement is enforcement:
                render = last
            elif last.enforcement is self._previous and self._touched is not None:
                render = self._patched(last, enforcement, self._touched)
            else:
                render = self._full(enforcement, src, max_segments)
        else:
            render = self._full(enforcement, src, max_segments)
        self._pods_used[src.pod.key] = render
        return render.policy

    def _target(
        self, enforcement: Enforcement, render: _PodRender, prefix: IPv4Network, at: IPv4Address
    ) -> PrefixPolicy:
        ingress, dst_pod = enforcement.ingress.get(at), enforcement.pod_by_ip(at)
        target = _Prefix(render.egress, ingress, render.src, dst_pod, prefix, at)
        return self.entry(target, render.max_segments)

    def _full(self, enforcement: Enforcement, src: ManagedPod, max_segments: int) -> _PodRender:
        own = _own_prefixes(enforcement, src)
        prefixes = sorted(_relevant_prefixes(enforcement, own), key=_prefix_order)
        render = _PodRender(
            enforcement,
            src,
            enforcement.egress.get(src.ip),
            max_segments,
            PodPolicy(src.pod.key, src.ip, ()),
            own,
            _uncovered_addresses(prefixes),
            {},
        )
        for prefix in prefixes:
            if (at := render.uncovered[prefix]) is not None:
                render.entries[prefix] = self._target(enforcement, render, prefix, at)
        render.policy = PodPolicy(src.pod.key, src.ip, tuple(render.entries.values()))
        return render

    def _patched(
        self, last: _PodRender, enforcement: Enforcement, addresses: frozenset[IPv4Address]
    ) -> _PodRender:
        """`last`, brought to `enforcement`, which differs from last's only at `addresses`
        (as destinations): their host entries are computed again, added or dropped.

        The other entries stand. Every address that a prefix's longer prefixes leave
        uncovered has the same verdict, so a host prefix coming or going changes the
        enclosing prefix's entry only when it was, or becomes, that prefix's only
        uncovered address."""
        uncovered, entries = dict(last.uncovered), dict(last.entries)
        render = _PodRender(
            enforcement,
            last.src,
            last.egress,
            last.max_segments,
            last.policy,
            last.own,
            uncovered,
            {},
        )
        reordered = False
        for ip in addresses:
            host = _host(ip)
            wanted = host in last.own or _destination_needs_host_entry(enforcement, ip)
            had = host in uncovered
            if wanted != had:
                reordered = True
                if wanted:
                    uncovered[host] = ip
                else:
                    del uncovered[host]
                    entries.pop(host, None)
                self._reshape_enclosing(enforcement, render, entries, ip)
            if wanted:
                entries[host] = self._target(enforcement, render, host, ip)
        if reordered:
            entries = {p: entries[p] for p in sorted(entries, key=_prefix_order)}
        render.entries = entries
        prefixes = tuple(entries.values())
        if prefixes != last.policy.prefixes:
            render.policy = PodPolicy(last.src.pod.key, last.src.ip, prefixes)
        return render

    def _reshape_enclosing(
        self,
        enforcement: Enforcement,
        render: _PodRender,
        entries: dict[IPv4Network, PrefixPolicy],
        ip: IPv4Address,
    ) -> None:
        """ip/32 was just added to or dropped from the set: the longest other prefix that
        holds ip may have gained or lost its last uncovered address."""
        uncovered = render.uncovered
        enclosing = max(
            (p for p in uncovered if p.prefixlen < 32 and ip in p), key=lambda p: p.prefixlen
        )
        was = uncovered[enclosing]
        if _host(ip) in uncovered:  # added: it covers ip now
            if was == ip:
                inside = [p for p in uncovered if p.subnet_of(enclosing)]
                uncovered[enclosing] = _uncovered_addresses(inside)[enclosing]
        elif was is None:  # dropped: ip is the enclosing prefix's only uncovered address
            uncovered[enclosing] = ip
        if uncovered[enclosing] is None:
            entries.pop(enclosing, None)
        elif enclosing not in entries:
            at = uncovered[enclosing]
            assert at is not None
            entries[enclosing] = self._target(enforcement, render, enclosing, at)
        elif was == ip and uncovered[enclosing] != ip:
            # The entry's verdict stands; only where it is computed from moved.
            entries[enclosing] = self._target(
                enforcement,
                render,
                enclosing,
                uncovered[enclosing],  # type: ignore[arg-type]
            )


def _prefix_order(prefix: IPv4Network) -> tuple[int, int]:
    return (prefix.prefixlen, int(prefix.network_address))


def render_pod_policy(
    enforcement: Enforcement,
    src: ManagedPod,
    max_segments: int = BPF_MAX_SEGMENTS,
    cache: BpfPolicyCache | None = None,
) -> PodPolicy:
    """Raises TooComplexForBpf if the pod must stay on the iptables datapath. Pure in
    effect: with a cache the result equals a render without one."""
    return (cache or BpfPolicyCache()).pod_policy(enforcement, src, max_segments)
