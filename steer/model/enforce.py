"""Policies plus pods resolved into per-pod, per-direction rule lists, and the L4 decision.

This is the single definition of what a flow's verdict is. The iptables renderer encodes
it as chains, the xDS renderer as RBAC, and the agent calls `decide_flow` to find which live
flows a policy change affects. Semantics (docs/policy-reference.md):

* A pod's side (its egress, or its ingress) is unrestricted until a policy with that
  section selects it.
* Within a side: a matching L4 Deny rule denies; else a matching rule with `http` sends the
  flow to Envoy (L7); else a matching L4 Allow rule allows; else the default action, which
  is Deny if any selecting policy says Deny.
* A flow's verdict combines the source's egress and the destination's ingress:
  deny beats L7 beats allow.
"""

from __future__ import annotations

import zlib
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property, lru_cache
from ipaddress import IPv4Address, IPv4Network
from typing import Generic, TypeVar

from steer.constants import MARK_MAX_POLICY_ID, VERDICT_ALLOW, VERDICT_DENY, VERDICT_L7
from steer.model.pod import Pod, PodSteering, steering_of
from steer.model.policy import (
    Action,
    Direction,
    EgressRule,
    HTTPMatch,
    HTTPPolicy,
    IngressRule,
    LabelSelector,
    Mode,
    Peer,
)

AnyPort = tuple[tuple[int, int], ...] | None


@dataclass(frozen=True)
class ResolvedRule:
    policy_key: str
    policy_id: int
    name: str
    action: Action
    # None means any peer / any port; an empty tuple means a selector that matched nothing.
    peers: tuple[IPv4Network, ...] | None
    ports: AnyPort
    http: HTTPMatch | None
    # The rule's position in its policy section: with the policy key, a name for the rule
    # that is unique by construction (rule names are checked for duplicates at load, but a
    # rendered key must never depend on that).
    index: int = 0
    # mode: Audit: enforces nothing. An HTTP rule's flows still reach Envoy, which
    # evaluates it in its shadow rules only; an L4 rule is left out of every datapath.
    audit: bool = False

    @property
    def audits_l4(self) -> bool:
        """An audited rule without an HTTP match: its flows never need Envoy."""
        return self.audit and self.http is None

    def matches(self, peer: IPv4Address, port: int) -> bool:
        if self.peers is not None and not any(peer in net for net in self.peers):
            return False
        return self.ports is None or any(lo <= port <= hi for lo, hi in self.ports)

    @property
    def kind(self) -> int:
        """Which class this rule decides: evaluated deny, then L7, then allow."""
        if self.http is not None:
            return VERDICT_L7
        return VERDICT_DENY if self.action is Action.DENY else VERDICT_ALLOW


@dataclass(frozen=True)
class SideRules:
    """All rules of one pod in one direction, in evaluation order."""

    pod_key: str
    pod_ip: IPv4Address
    direction: Direction
    default_action: Action
    default_policy_id: int
    rules: tuple[ResolvedRule, ...]
    # Rules of mode Audit no datapath sees (they enforce nothing): L4 ones, and HTTP ones
    # under a default Deny. Envoy's shadow rules hold the HTTP ones; `steer observe`
    # records what the as-if verdicts (Enforcement.as_if) would deny.
    audited: tuple[ResolvedRule, ...] = ()
    # A policy of mode Audit whose default Deny would restrict this side, where no enforced
    # policy does: its id (0: none). Envoy evaluates the side's allows as if it did.
    audit_default_policy_id: int = 0

    @cached_property
    def audits_allows(self) -> bool:
        """Whether enforcing the Audit parts would change what this side's allows let by.
        Asked for each side on every destination the xDS render builds routes for."""
        return self.audit_default_policy_id != 0 or any(
            r.audit and r.action is Action.ALLOW for r in (*self.rules, *self.audited)
        )

    def by_kind(self, kind: int) -> tuple[ResolvedRule, ...]:
        return self._kinds.get(kind, ())

    @cached_property
    def _kinds(self) -> dict[int, tuple[ResolvedRule, ...]]:
        # Asked for on every verdict; the eBPF map render asks thousands of times per pod.
        grouped: dict[int, list[ResolvedRule]] = {}
        for rule in self.rules:
            grouped.setdefault(rule.kind, []).append(rule)
        return {kind: tuple(rules) for kind, rules in grouped.items()}

    def narrowed(self, peer: IPv4Address) -> SideRules:
        """This side with only the rules whose peers include `peer`: for that peer, its
        verdict at every port is this side's. The eBPF map render asks one address about
        a hundred ports; narrowing first saves re-matching every rule's peers each time."""
        rules = tuple(
            r for r in self.rules if r.peers is None or any(peer in net for net in r.peers)
        )
        return replace(self, rules=rules)

    def verdict(self, peer: IPv4Address, port: int) -> tuple[int, int]:
        kind, rule = self.deciding(peer, port)
        return kind, rule.policy_id if rule is not None else self.default_policy_id

    def deciding(self, peer: IPv4Address, port: int) -> tuple[int, ResolvedRule | None]:
        """This side's verdict for a flow with `peer` at `port`, and the rule that decides
        it (None: the default action)."""
        for kind in (VERDICT_DENY, VERDICT_L7, VERDICT_ALLOW):
            for rule in self.by_kind(kind):
                if rule.matches(peer, port):
                    return kind, rule
        return (VERDICT_ALLOW if self.default_action is Action.ALLOW else VERDICT_DENY), None


@lru_cache(maxsize=16384)
def _address(ip: str) -> IPv4Address:
    """One object per pod address: the caches keyed by address keep the first key object
    they saw, so a new one per pod change stayed alive beside it."""
    return IPv4Address(ip)


@dataclass(frozen=True)
class ManagedPod:
    pod: Pod
    ip: IPv4Address
    steering: PodSteering


@dataclass(frozen=True)
class FlowVerdict:
    verdict: int
    policy_id: int


@dataclass(frozen=True)
class Enforcement:
    pods: tuple[ManagedPod, ...]
    egress: Mapping[IPv4Address, SideRules]
    ingress: Mapping[IPv4Address, SideRules]
    policy_ids: Mapping[str, int]
    warnings: tuple[str, ...]
    # Where a policy or rule is of mode Audit: the verdicts if every one were enforced.
    # `steer observe` records as `audit` what this would deny and the enforcement lets by.
    as_if: Enforcement | None = field(default=None, compare=False)

    def pod_by_ip(self, ip: IPv4Address) -> ManagedPod | None:
        return self._by_ip.get(ip)

    @cached_property
    def _by_ip(self) -> dict[IPv4Address, ManagedPod]:
        return {p.ip: p for p in self.pods}

    def policy_key(self, policy_id: int) -> str | None:
        """The namespace/name of the policy with this id (None: not one of these)."""
        return self._keys_by_id.get(policy_id)

    @cached_property
    def _keys_by_id(self) -> dict[int, str]:
        return {pid: key for key, pid in self.policy_ids.items()}


def policy_id(key: str) -> int:
    """A policy's id in the conntrack mark: 1..4095, derived from its name alone.

    Derived rather than allocated so that adding or removing one policy never renumbers
    the others (which would rewrite every chain and disturb every flow's mark). Two
    policies may share an id; the id narrows a search for a policy's flows, and the
    agent always confirms a flow's verdict by recomputing it.
    """
    return zlib.crc32(key.encode()) % MARK_MAX_POLICY_ID + 1


def policy_ids(policies: Iterable[HTTPPolicy]) -> dict[str, int]:
    return {p.key: policy_id(p.key) for p in policies}


@lru_cache(maxsize=65536)
def _network(cidr: str) -> IPv4Network:
    # The same CIDRs come back on every re-resolve; parsing them dominated at 10k rules.
    return IPv4Network(cidr)


P = TypeVar("P")


class _LabelIndex(Generic[P]):
    """Items by namespace and by each label pair, so a selector with matchLabels looks
    at the pods carrying its rarest pair instead of at every pod: resolving 10k rules over
    1k pods was quadratic without it. Every list is in pod key order, as a fresh build
    over pods sorted by key would have it, and a pod change updates only that pod's
    entries (rebuilding the index took ~15 ms of every pod change at 1k pods)."""

    def __init__(self, items: Iterable[P], key: Callable[[P], Pod]) -> None:
        self._key = key
        self.by_namespace: dict[str, list[tuple[str, P, Mapping[str, str]]]] = {}
        self.by_label: dict[tuple[str, str, str], list[tuple[str, P, Mapping[str, str]]]] = {}
        for item in items:
            self.add(item)

    def _lists(self, pod: Pod) -> Iterator[list[tuple[str, P, Mapping[str, str]]]]:
        yield self.by_namespace.setdefault(pod.namespace, [])
        for label, value in pod.labels.items():
            yield self.by_label.setdefault((pod.namespace, label, value), [])

    def add(self, item: P) -> None:
        pod = self._key(item)
        entry = (pod.key, item, pod.labels)
        for entries in self._lists(pod):
            if entries and entries[-1][0] < pod.key:
                entries.append(entry)  # items given in key order: the common case
            else:
                entries.insert(bisect_left(entries, pod.key, key=_entry_key), entry)

    def remove(self, item: P) -> None:
        pod = self._key(item)
        for entries in self._lists(pod):
            at = bisect_left(entries, pod.key, key=_entry_key)
            # By key: the entry may hold an equal, older object for this pod.
            if at < len(entries) and entries[at][0] == pod.key:
                del entries[at]
        # Drop emptied lists, so that label churn does not grow the index.
        if not self.by_namespace.get(pod.namespace, True):
            del self.by_namespace[pod.namespace]
        for label, value in pod.labels.items():
            if not self.by_label.get((pod.namespace, label, value), True):
                del self.by_label[(pod.namespace, label, value)]

    def select(self, selector: LabelSelector, namespace: str) -> list[P]:
        candidates = self.by_namespace.get(namespace, [])
        for label, value in selector.match_labels.items():
            narrower = self.by_label.get((namespace, label, value), [])
            if len(narrower) < len(candidates):
                candidates = narrower
        return [item for _, item, labels in candidates if selector.matches(labels)]


def _entry_key(entry: tuple[str, object, object]) -> str:
    return entry[0]


def _resolve_peers(
    peers: Sequence[Peer] | None, namespace: str, pods: _LabelIndex[Pod]
) -> tuple[IPv4Network, ...] | None:
    """Peers as address ranges. Pod selectors match every pod, steered or not: a pod
    must not escape a Deny rule (or lose an Allow) by opting out of steering."""
    if peers is None:
        return None
    nets: list[IPv4Network] = []
    for peer in peers:
        if peer.cidr is not None:
            nets.append(_network(peer.cidr))
        elif peer.pod_selector is not None:
            nets.extend(_network(f"{p.ip}/32") for p in pods.select(peer.pod_selector, namespace))
    return tuple(dict.fromkeys(nets))


def resolve(
    policies: Sequence[HTTPPolicy],
    pods: Sequence[Pod],
    local: Callable[[Pod], bool] | None = None,
) -> Enforcement:
    """`local`: the pods this node steers (default: all). Peers are resolved over every pod
    given, so a selector matches pods on other nodes too."""
    return Resolver(local).resolve(policies, pods)


@dataclass(eq=False)
class _ResolvedPolicy:
    """One policy resolved against one set of pods. Compared by identity: a side whose
    policies are the same objects as last time is the same side."""

    policy: HTTPPolicy
    targets: tuple[IPv4Address, ...]
    sections: tuple[tuple[Direction, tuple[ResolvedRule, ...]], ...]
    # Every selector whose matches the result depends on, with its namespace: a pod change
    # that none of them matches (before or after) leaves this result valid.
    selectors: tuple[LabelSelector, ...]

    def depends_on(self, pod: Pod) -> bool:
        return pod.namespace == self.policy.metadata.namespace and any(
            s.matches(pod.labels) for s in self.selectors
        )


_SideKey = tuple[Direction, IPv4Address]


class Resolver:
    """`resolve`, remembering its last answer so the next one costs what changed.

    A control plane or agent re-resolves on every change; at 1k pods and 10k rules a full
    resolve takes ~400 ms, most of it re-deriving rules that did not change. The resolver
    keeps each policy's resolved rules while the policy is the same and no changed pod
    matches one of its selectors, and each side while the policies on it are the same
    objects. Its result always equals `resolve(policies, pods, local)` on the same input,
    and unchanged sides are the very same objects, so renderers can cache by identity.
    """

    def __init__(self, local: Callable[[Pod], bool] | None = None) -> None:
        self._local = local
        self._pods: dict[str, Pod] = {}
        self._managed: dict[str, tuple[ManagedPod | None, tuple[str, ...]]] = {}
        self._all_pods: _LabelIndex[Pod] = _LabelIndex((), lambda p: p)
        self._steered: _LabelIndex[ManagedPod] = _LabelIndex((), lambda m: m.pod)
        self._policies: dict[str, _ResolvedPolicy] = {}
        self._sides: dict[_SideKey, tuple[tuple[_ResolvedPolicy, ...], SideRules]] = {}
        # (direction, the policies on a side) -> a side with them, from the last resolve.
        self._shapes: dict[tuple[Direction, tuple[_ResolvedPolicy, ...]], SideRules] = {}
        self._pods_given: tuple[Pod, ...] = ()
        self._steered_pods: tuple[ManagedPod, ...] = ()
        # What the policies of mode Audit would do: resolved beside, only while there are
        # any, with each such policy's enforced copy kept while the policy is the same.
        self._as_if: Resolver | None = None
        self._enforced_copies: dict[str, tuple[HTTPPolicy, HTTPPolicy]] = {}

    def resolve(self, policies: Sequence[HTTPPolicy], pods: Sequence[Pod]) -> Enforcement:
        self._update_pods(pods)
        warnings = [w for _, errors in self._managed.values() for w in errors]
        ids = policy_ids(policies)
        resolved: dict[str, _ResolvedPolicy] = {}
        for policy in sorted(policies, key=lambda p: p.key):
            entry = self._policies.get(policy.key)
            if entry is None or (entry.policy is not policy and entry.policy != policy):
                entry = self._resolve_policy(policy, ids[policy.key])
            resolved[policy.key] = entry
            if not entry.targets:
                warnings.append(f"policy {policy.key}: podSelector matches no steered pod")
        self._policies = resolved

        members: dict[_SideKey, list[_ResolvedPolicy]] = {}
        for entry in resolved.values():
            for direction, _ in entry.sections:
                for ip in entry.targets:
                    members.setdefault((direction, ip), []).append(entry)
        managed = self._steered_pods
        pod_keys = {m.ip: m.pod.key for m in managed}
        sides: dict[_SideKey, tuple[tuple[_ResolvedPolicy, ...], SideRules]] = {}
        shapes: dict[tuple[Direction, tuple[_ResolvedPolicy, ...]], SideRules] = {}
        for key, entries in members.items():
            on_side = tuple(entries)
            cached = self._sides.get(key)
            if cached is not None and cached[0] == on_side:
                sides[key] = cached
            else:
                # Pods under the same policies (a workload's replicas) get sides that
                # differ only in the pod, sharing one rules tuple: the renderers key their
                # caches on it and render the rules once, not once per replica.
                like = shapes.get((key[0], on_side)) or self._shapes.get((key[0], on_side))
                side = _side(key, on_side, pod_keys, ids)
                if like is not None and like.rules == side.rules:
                    side = replace(side, rules=like.rules)
                sides[key] = (on_side, side)
            shapes.setdefault((key[0], on_side), sides[key][1])
        self._sides, self._shapes = sides, shapes
        return Enforcement(
            pods=managed,
            egress={ip: s for (d, ip), (_, s) in sides.items() if d is Direction.EGRESS},
            ingress={ip: s for (d, ip), (_, s) in sides.items() if d is Direction.INGRESS},
            policy_ids=ids,
            warnings=tuple(warnings),
            as_if=self._resolve_as_if(policies, pods),
        )

    def _resolve_as_if(
        self, policies: Sequence[HTTPPolicy], pods: Sequence[Pod]
    ) -> Enforcement | None:
        auditing = [p for p in policies if p.audits]
        if not auditing:
            self._as_if, self._enforced_copies = None, {}
            return None
        copies = {}
        for policy in auditing:
            kept = self._enforced_copies.get(policy.key)
            copies[policy.key] = (
                kept if kept is not None and kept[0] is policy else (policy, policy.enforced())
            )
        self._enforced_copies = copies
        if self._as_if is None:
            self._as_if = Resolver(self._local)
        return self._as_if.resolve(
            [copies[p.key][1] if p.key in copies else p for p in policies], pods
        )

    def _update_pods(self, pods: Sequence[Pod]) -> None:
        given = tuple(pods)
        # Compares by identity first: a caller that passes the same Pod objects again (a
        # policy-only change) costs a thousand pointer comparisons, not a re-index.
        if given == self._pods_given:
            return
        self._pods_given = given
        by_key = {p.key: p for p in sorted(pods, key=lambda p: p.key)}
        changed = [
            version
            for key in by_key.keys() | self._pods.keys()
            if self._pods.get(key) != by_key.get(key)
            for version in (self._pods.get(key), by_key.get(key))
            if version is not None
        ]
        if not changed:
            return
        managed = {
            key: self._managed[key] if self._pods.get(key) == pod else self._manage(pod)
            for key, pod in by_key.items()
        }
        for key in {p.key for p in changed}:
            old, new = self._pods.get(key), by_key.get(key)
            if old is not None:
                self._all_pods.remove(old)
            if new is not None:
                self._all_pods.add(new)
            old_managed = self._managed.get(key, (None, ()))[0]
            new_managed = managed.get(key, (None, ()))[0]
            if old_managed is not new_managed:
                if old_managed is not None:
                    self._steered.remove(old_managed)
                if new_managed is not None:
                    self._steered.add(new_managed)
        self._managed = managed
        self._pods = by_key
        self._steered_pods = tuple(m for m, _ in self._managed.values() if m is not None)
        self._policies = {
            key: entry
            for key, entry in self._policies.items()
            if not any(entry.depends_on(pod) for pod in changed)
        }

    def _manage(self, pod: Pod) -> tuple[ManagedPod | None, tuple[str, ...]]:
        if self._local is not None and not self._local(pod):
            return None, ()
        # Host network included: such a pod has the node's address, never a boundary of its own.
        steering, errors = steering_of(pod)
        managed = ManagedPod(pod, _address(pod.ip), steering) if steering.inject else None
        return managed, tuple(f"pod {pod.key}: {e}" for e in errors)

    def _resolve_policy(self, policy: HTTPPolicy, policy_id: int) -> _ResolvedPolicy:
        ns = policy.metadata.namespace
        selectors = [policy.spec.pod_selector]
        sections: list[tuple[Direction, tuple[ResolvedRule, ...]]] = []
        for direction, section in (
            (Direction.INGRESS, policy.spec.ingress),
            (Direction.EGRESS, policy.spec.egress),
        ):
            if section is None:
                continue
            section_rules: Sequence[IngressRule | EgressRule] = section.rules
            for rule in section_rules:
                selectors += [p.pod_selector for p in rule.peers or () if p.pod_selector]
            rules = tuple(
                ResolvedRule(
                    policy.key,
                    policy_id,
                    rule.name or f"{direction.value}[{index}]",
                    rule.action,
                    _resolve_peers(rule.peers, ns, self._all_pods),
                    None if rule.ports is None else tuple(p.range for p in rule.ports),
                    rule.http,
                    index,
                    rule.mode is Mode.AUDIT or policy.spec.mode is Mode.AUDIT,
                )
                for index, rule in enumerate(section_rules)
            )
            sections.append((direction, rules))
        targets = tuple(m.ip for m in self._steered.select(policy.spec.pod_selector, ns))
        return _ResolvedPolicy(policy, targets, tuple(sections), tuple(selectors))


def _side(
    key: _SideKey,
    entries: Sequence[_ResolvedPolicy],
    pod_keys: Mapping[IPv4Address, str],
    ids: Mapping[str, int],
) -> SideRules:
    direction, ip = key

    def default_of(policy: HTTPPolicy) -> Action:
        section = policy.spec.ingress if direction is Direction.INGRESS else policy.spec.egress
        return section.default_action if section is not None else Action.ALLOW

    policies = [e.policy for e in entries]
    # A policy of mode Audit restricts nothing: its default counts for nobody.
    enforced = [p for p in policies if p.spec.mode is not Mode.AUDIT]
    denying = [p for p in enforced if default_of(p) is Action.DENY]
    audit_denying = [p for p in policies if p not in enforced and default_of(p) is Action.DENY]
    in_order = [
        rule for e in entries for d, rules in e.sections if d is direction for rule in rules
    ]

    def steers(rule: ResolvedRule) -> bool:
        """Whether the rule takes part in the datapath's verdict. An audited HTTP rule
        does only to send its flows through Envoy, for Envoy to see their requests, and
        only where the side allows by default: the deny rules come first and the L7 class
        before the allows, so it turns an allowed flow into an L7 one and nothing else.
        Under a default Deny it would turn the denied flows it matches into L7 ones."""
        return not rule.audit or (rule.http is not None and not denying)

    return SideRules(
        pod_key=pod_keys[ip],
        pod_ip=ip,
        direction=direction,
        default_action=Action.DENY if denying else Action.ALLOW,
        # No enforced policy on the side: none decides its flows (0 names no policy).
        default_policy_id=ids[(denying or enforced)[0].key] if enforced else 0,
        rules=tuple(rule for rule in in_order if steers(rule)),
        audited=tuple(rule for rule in in_order if not steers(rule)),
        audit_default_policy_id=ids[audit_denying[0].key] if audit_denying and not denying else 0,
    )


def decide_flow(
    enforcement: Enforcement, src: IPv4Address, dst: IPv4Address, port: int
) -> FlowVerdict:
    """The verdict the datapath must reach for a new TCP flow src -> dst:port."""
    return decide_sides(enforcement.egress.get(src), enforcement.ingress.get(dst), src, dst, port)


def decide_sides(
    egress: SideRules | None,
    ingress: SideRules | None,
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
) -> FlowVerdict:
    """`decide_flow` given the source's egress side and the destination's ingress side."""
    kind, side, rule = deciding_sides(egress, ingress, src, dst, port)
    if rule is not None:
        return FlowVerdict(kind, rule.policy_id)
    return FlowVerdict(kind, side.default_policy_id if side is not None else 0)


def deciding_sides(
    egress: SideRules | None,
    ingress: SideRules | None,
    src: IPv4Address,
    dst: IPv4Address,
    port: int,
) -> tuple[int, SideRules | None, ResolvedRule | None]:
    """The verdict for a new TCP flow src -> dst:port, the side that decides it and its
    deciding rule (None: that side's default action; no side: no policy applies). A deny
    on either side wins, then an L7 verdict, then the allow of the ingress side."""
    sides: list[tuple[SideRules, int, ResolvedRule | None]] = []
    if egress is not None:
        sides.append((egress, *egress.deciding(dst, port)))
    if ingress is not None:
        sides.append((ingress, *ingress.deciding(src, port)))
    for kind in (VERDICT_DENY, VERDICT_L7):
        for side, verdict, rule in sides:
            if verdict == kind:
                return kind, side, rule
    if not sides:
        return VERDICT_ALLOW, None, None
    side, _, rule = sides[-1]
    return VERDICT_ALLOW, side, rule


def l7_port_ranges(side: SideRules, peer: IPv4Address) -> tuple[tuple[int, int], ...] | None:
    """The ports at which `side` sends a flow with `peer` through Envoy (its HTTP rules
    whose peers include `peer`); None for every port. Where a deny rule also matches,
    the flow is denied outright and never reaches Envoy at all."""
    ranges: list[tuple[int, int]] = []
    for rule in side.by_kind(VERDICT_L7):
        if rule.peers is not None and not any(peer in net for net in rule.peers):
            continue
        if rule.ports is None:
            return None
        ranges += rule.ports
    return tuple(sorted(set(ranges)))


def exclusion_skips_envoy(
    src: ManagedPod,
    dst: IPv4Address,
    port: int,
    *,
    dst_pod: ManagedPod | None,
    egress: SideRules | None,
    ingress: SideRules | None,
) -> bool:
    """Whether an exclusion takes the L7 flow src -> dst:port past Envoy.

    A pod's exclusions may only ever weaken its own namespace's policy: a source's
    outbound exclusion never skips the HTTP rules a destination in another namespace
    applies to it, and a destination's inbound exclusion never skips the egress HTTP
    rules of a source in another namespace. (Policies select pods of their own
    namespace, so a side's rules come from its pod's namespace.)
    """
    steering = src.steering
    outbound = port in steering.exclude_outbound_ports or any(
        dst in _network(c) for c in steering.exclude_outbound_cidrs
    )
    if outbound and not (
        dst_pod is not None
        and dst_pod.pod.namespace != src.pod.namespace
        and ingress is not None
        and ingress.verdict(src.ip, port)[0] == VERDICT_L7
    ):
        return True
    inbound = dst_pod is not None and port in dst_pod.steering.exclude_inbound_ports
    return inbound and not (
        dst_pod is not None
        and dst_pod.pod.namespace != src.pod.namespace
        and egress is not None
        and egress.verdict(dst, port)[0] == VERDICT_L7
    )


@dataclass(frozen=True)
class Touched:
    """The addresses a change may have changed verdicts for: as a flow's source (the pod
    or its egress side changed) and as its destination (the pod or its ingress side)."""

    sources: frozenset[IPv4Address]
    destinations: frozenset[IPv4Address]

    def __bool__(self) -> bool:
        return bool(self.sources or self.destinations)


def touched(before: Enforcement | None, after: Enforcement) -> Touched | None:
    """What changed between two resolutions, by identity: the Resolver hands back the very
    same pod and side objects for what did not change. None: everything may have (no
    previous resolution, as after a restart)."""
    if before is None:
        return None
    # The renderers and both revocation passes ask about the same pairs in one sync.
    recent = _recently_touched
    for last in recent:
        if last[0] is before and last[1] is after:
            return last[2]
    scope = _touched(before, after)
    # Changed in place but atomically (under the GIL), and every entry is an immutable
    # tuple: a reader on another thread finds a right answer or none.
    _recently_touched[:] = [(before, after, scope), *recent[:3]]
    return scope


# The last few (before, after, what changed): holding the two keeps their ids unique.
_recently_touched: list[tuple[Enforcement, Enforcement, Touched]] = []


def _touched(before: Enforcement, after: Enforcement) -> Touched:

    def differ(
        old: Mapping[IPv4Address, object], new: Mapping[IPv4Address, object]
    ) -> set[IPv4Address]:
        # By the values' ids, which hash a hundred times faster than addresses do; exact
        # because each value (a pod, a side) holds its own address, so no value moves
        # from one key to another.
        old_ids, new_ids = {id(v) for v in old.values()}, {id(v) for v in new.values()}
        return {ip for ip, v in old.items() if id(v) not in new_ids} | {
            ip for ip, v in new.items() if id(v) not in old_ids
        }

    pods = differ(before._by_ip, after._by_ip)
    return Touched(
        frozenset(pods | differ(before.egress, after.egress)),
        frozenset(pods | differ(before.ingress, after.ingress)),
    )
