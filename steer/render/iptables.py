"""Enforcement -> iptables rules as plain data, and from them the restore and cleanup texts.

Layout (all in the node's network namespace):

    mangle PREROUTING -p tcp -> STEER-PRE
        verdict already in the connmark?  RETURN   (every packet after the first)
        not a NEW flow?                    RETURN   (replies to Envoy's own upstreams)
        -> STEER-E-<pod>  egress side of the source pod, writes field E (bits 30-31)
        -> STEER-I-<pod>  ingress side of the destination, writes field V (bits 28-29)
           (each one jump into STEER-SE-/STEER-SI-<digest>: the side's rules, in a chain
           shared by every pod whose side has the same rules)
        combine E and V (deny > L7 > allow) into V, save V + policy id into the connmark
    nat PREROUTING -p tcp -> STEER-NAT   L7 flows: REDIRECT to Envoy (minus exclusions)
    filter FORWARD/INPUT -p tcp -> STEER-FWD/STEER-IN   denied flows: TCP reset

So the policy chains see one packet per flow; later packets match one connmark rule.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from ipaddress import IPv4Address, IPv4Network

from steer.constants import (
    CHAIN_PREFIX,
    COMMENT_PREFIX,
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    ENVOY_SERVICE_PORTS,
    MARK_ID_MASK,
    MARK_ID_SHIFT,
    MARK_MASK,
    MARK_VERDICT_MASK,
    MARK_VERDICT_SHIFT,
    NFLOG_CLOSE_GROUP,
    NFLOG_GROUP,
    VERDICT_ALLOW,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import (
    Enforcement,
    ManagedPod,
    ResolvedRule,
    SideRules,
    l7_port_ranges,
)
from steer.model.policy import Action, Direction

TABLES = ("mangle", "nat", "filter")
# Scratch field for the egress side's verdict, in the packet mark only: it is cleared
# before the packet leaves STEER-PRE and never saved to the connmark.
EGRESS_SHIFT = 30
EGRESS_FIELD = 0x3 << EGRESS_SHIFT

CHAIN_PRE = f"{CHAIN_PREFIX}-PRE"
# The verdict of a new flow, shared by STEER-PRE (before any NAT) and STEER-DNAT (after
# kube-proxy's DNAT, in mangle FORWARD).
CHAIN_DECIDE = f"{CHAIN_PREFIX}-DECIDE"
CHAIN_DNAT = f"{CHAIN_PREFIX}-DNAT"
# Steered pods' flows to a Service that may need Envoy at its backend: marked L7 before
# kube-proxy's DNAT, so that STEER-NAT sends them to Envoy.
CHAIN_SERVICE_L7 = f"{CHAIN_PREFIX}-SVC7"
CHAIN_NAT = f"{CHAIN_PREFIX}-NAT"
CHAIN_FORWARD = f"{CHAIN_PREFIX}-FWD"
CHAIN_INPUT = f"{CHAIN_PREFIX}-IN"
CHAIN_ENVOY = f"{CHAIN_PREFIX}-ENVOY"
# ip6tables: steer has no IPv6 policy yet, so steered pods' IPv6 TCP is refused.
CHAIN_V6_FORWARD = f"{CHAIN_PREFIX}6-FWD"
CHAIN_V6_INPUT = f"{CHAIN_PREFIX}6-IN"


@dataclass(frozen=True)
class Rule:
    table: str
    chain: str
    args: tuple[str, ...]
    comment: str

    def spec(self) -> str:
        """The rule as iptables arguments, comment included (no -A/-I and chain).

        The comment goes before the target, where iptables-save prints it, so that a
        rule written here and one read back compare equal as text.
        """
        return self._spec

    @cached_property
    def _spec(self) -> str:
        # Asked for again on every apply and digest; unchanged rules are the same objects.
        cut = self.args.index("-j") if "-j" in self.args else len(self.args)
        comment = ("-m", "comment", "--comment", _comment(self.comment))
        return " ".join((*self.args[:cut], *comment, *self.args[cut:]))


@dataclass(frozen=True)
class Jump:
    """An entry rule from a built-in chain into a steer chain."""

    table: str
    builtin: str
    target: str

    @property
    def args(self) -> tuple[str, ...]:
        return ("-p", "tcp", "-j", self.target)

    def spec(self) -> str:
        return Rule(self.table, self.builtin, self.args, f"enter-{self.target.lower()}").spec()


@dataclass(frozen=True)
class ServiceSteering:
    """The Service frontends (address, port) the rules must know. Flows to them are
    decided after kube-proxy's DNAT, on the backend it chose, except steered pods' flows to
    `via_envoy` frontends, which go to Envoy first (steer.model.servicepolicy)."""

    frontends: tuple[tuple[IPv4Address, int], ...] = ()
    via_envoy: frozenset[tuple[IPv4Address, int]] = frozenset()
    # Where pods' addresses come from (the lab's range; the nodes' podCIDRs in a cluster).
    pod_cidrs: tuple[IPv4Network, ...] = ()
    # The Envoy listener of each frontend's Service port that has one
    # (steer.model.servicepolicy): flows to a via-Envoy frontend are sent there, so that
    # Envoy knows the Service.
    envoy_ports: tuple[tuple[tuple[IPv4Address, int], int], ...] = ()


NO_SERVICES = ServiceSteering()


@dataclass(frozen=True)
class Ruleset:
    chains: Mapping[str, tuple[str, ...]]
    rules: tuple[Rule, ...]
    jumps: tuple[Jump, ...]
    # The rules by (table, chain), as the renderer built them: an unchanged chain is then
    # the very same tuple in two rulesets, and comparing them is one identity check.
    grouped: Mapping[tuple[str, str], tuple[Rule, ...]] | None = field(
        default=None, compare=False, repr=False
    )

    def rules_of(self, table: str, chain: str) -> tuple[Rule, ...]:
        return self._by_chain.get((table, chain), ())

    @cached_property
    def _by_chain(self) -> Mapping[tuple[str, str], tuple[Rule, ...]]:
        if self.grouped is not None:
            return self.grouped
        grouped: dict[tuple[str, str], list[Rule]] = {}
        for rule in self.rules:
            grouped.setdefault((rule.table, rule.chain), []).append(rule)
        return {key: tuple(rules) for key, rules in grouped.items()}

    def digest(self, previous: Ruleset | None = None) -> str:
        """Content hash of every rule. Chains equal to those of `previous` (a ruleset
        digested before) reuse its chain hashes: hashing 200k rules took 60 ms."""
        earlier = previous._chain_digests if previous is not None else {}
        h = hashlib.sha256()
        for key, rules in self._by_chain.items():
            chain_digest = self._chain_digests.get(key)
            if chain_digest is None:
                chain_digest = earlier.get(key)
                if (
                    chain_digest is None
                    or previous is None
                    or not _same(previous.rules_of(*key), rules)
                ):
                    text = "\n".join(r.spec() for r in rules)
                    chain_digest = hashlib.sha256(text.encode()).digest()
                self._chain_digests[key] = chain_digest
            h.update(f"{key[0]} {key[1]} ".encode() + chain_digest)
        return h.hexdigest()[:16]

    @cached_property
    def _chain_digests(self) -> dict[tuple[str, str], bytes]:
        return {}


@dataclass(frozen=True)
class KernelState:
    """What steer already has in the kernel, read back before a change."""

    chains: Mapping[str, frozenset[str]] = field(default_factory=dict)
    jumps: frozenset[Jump] = frozenset()
    # Entry jumps with another tool's rule ahead of them in their built-in chain: a rule
    # there can decide a packet before steer does (kube-proxy's KUBE-FORWARD accepts, its
    # KUBE-SERVICES DNATs before steer's REDIRECT). Moved back to the top on a write.
    misplaced: frozenset[Jump] = frozenset()

    @classmethod
    def left_by(cls, ruleset: Ruleset) -> KernelState:
        """What the kernel holds once `ruleset` is applied (and nobody changed it since)."""
        return cls(
            chains={table: frozenset(chains) for table, chains in ruleset.chains.items()},
            jumps=frozenset(ruleset.jumps),
        )


def comment_token(text: str) -> str:
    """The comment as stored in the kernel, minus the prefix.

    Comments travel unquoted through restore text, so they are kept one shell-safe token.
    """
    return re.sub(r"[^A-Za-z0-9_.:/=\[\]-]", "_", text)[:200]


def _comment(text: str) -> str:
    return COMMENT_PREFIX + comment_token(text)


@lru_cache(maxsize=1024)
def _hex(value: int) -> str:
    return f"0x{value:x}"


def side_chain(side: SideRules) -> str:
    return _chain_name(side.direction, side.pod_key)


@lru_cache(maxsize=1 << 16)
def _chain_name(direction: Direction, pod_key: str) -> str:
    tag = "E" if direction is Direction.EGRESS else "I"
    digest = hashlib.sha1(pod_key.encode()).hexdigest()[:10]
    return f"{CHAIN_PREFIX}-{tag}-{digest}"


def _port_args(ports: tuple[tuple[int, int], ...] | None) -> list[tuple[str, ...]]:
    if ports is None:
        return [()]
    return [("-p", "tcp", "--dport", str(lo) if lo == hi else f"{lo}:{hi}") for lo, hi in ports]


def _peer_args(peers: tuple[IPv4Network, ...] | None, flag: str) -> list[tuple[str, ...]]:
    if peers is None:
        return [()]
    return [(flag, str(net)) for net in peers]


def _jump_to_shared(side: SideRules, shared: str) -> tuple[Rule, ...]:
    return (Rule("mangle", side_chain(side), ("-j", shared), "rules"),)


def _shared_chain(side: SideRules) -> tuple[str, tuple[Rule, ...]]:
    """The side's rules, in a chain named by their content and shared by every pod whose
    side renders the same (the replicas of a workload, under the same policies); each
    pod's own chain is one jump into it (`_jump_to_shared`). At 1k pods, ten per policy,
    sharing made the mangle table 6x smaller, and legacy iptables rewrites a whole table
    on every change. Depends on the side's direction, default and rules only."""
    shift, field_mask = (
        (EGRESS_SHIFT, EGRESS_FIELD)
        if side.direction is Direction.EGRESS
        else (MARK_VERDICT_SHIFT, MARK_VERDICT_MASK)
    )
    peer_flag = "-d" if side.direction is Direction.EGRESS else "-s"

    def set_verdict(verdict: int, policy_id: int) -> tuple[str, ...]:
        value = (verdict << shift) | (policy_id << MARK_ID_SHIFT)
        return ("-j", "MARK", "--set-xmark", f"{_hex(value)}/{_hex(field_mask | MARK_ID_MASK)}")

    body: list[tuple[tuple[str, ...], str]] = []
    for kind, label in ((VERDICT_DENY, "deny"), (VERDICT_L7, "l7"), (VERDICT_ALLOW, "allow")):
        rules: tuple[ResolvedRule, ...] = side.by_kind(kind)
        emitted = [
            ((*peer, *port, *set_verdict(kind, rule.policy_id)), f"{rule.policy_key}/{rule.name}")
            for rule in rules
            for peer in _peer_args(rule.peers, peer_flag)
            for port in _port_args(rule.ports)
        ]
        if emitted:
            body += emitted
            decided = ("-m", "mark", "--mark", f"{_hex(kind << shift)}/{_hex(field_mask)}")
            body.append(((*decided, "-j", "RETURN"), f"{label}-decided"))
    default = VERDICT_ALLOW if side.default_action is Action.ALLOW else VERDICT_DENY
    body.append(
        (
            set_verdict(default, side.default_policy_id),
            f"default-{side.default_action.value.lower()}",
        )
    )
    content = "\n".join(f"{' '.join(args)} {comment}" for args, comment in body)
    tag = "SE" if side.direction is Direction.EGRESS else "SI"
    shared = f"{CHAIN_PREFIX}-{tag}-{hashlib.sha1(content.encode()).hexdigest()[:10]}"
    return shared, tuple(Rule("mangle", shared, args, comment) for args, comment in body)


def _mark_is(value: int, mask: int) -> tuple[str, ...]:
    return ("-m", "mark", "--mark", f"{_hex(value)}/{_hex(mask)}")


def _set_v(verdict: int) -> tuple[str, ...]:
    value = verdict << MARK_VERDICT_SHIFT
    return ("-j", "MARK", "--set-xmark", f"{_hex(value)}/{_hex(MARK_VERDICT_MASK)}")


_SAVE_VERDICT = (
    "-j",
    "CONNMARK",
    "--save-mark",
    "--nfmask",
    _hex(MARK_MASK),
    "--ctmask",
    _hex(MARK_MASK),
)
_VERDICT_DECIDED = ("-m", "connmark", "!", "--mark", f"0x0/{_hex(MARK_VERDICT_MASK)}")
_VERDICT_CACHED = (*_VERDICT_DECIDED, "-j", "RETURN")
_NOT_NEW = ("-m", "conntrack", "!", "--ctstate", "NEW", "-j", "RETURN")
# A copy of the client's FIN or RST of a flow steer let through, for `steer observe`: the
# agent tells of the flow at its close (steer.node.nfnetlink), where conntrack's destroy
# event comes two minutes after a FIN. Every packet of the node meets this one rule; the
# flags test fails first for all but a flow's last few. Denied flows never get here (no
# packet follows a refused SYN); the eBPF datapath's flows carry no verdict mark (their
# hooks record them). Headers only; with no reader on the group the kernel drops it.
LOG_CLOSE = (
    *("-p", "tcp", "-m", "tcp", "!", "--tcp-flags", "FIN,RST", "NONE"),
    *("-m", "conntrack", "--ctdir", "ORIGINAL"),
    *_VERDICT_DECIDED,
    *("-j", "NFLOG", "--nflog-group", str(NFLOG_CLOSE_GROUP), "--nflog-size", "64"),
)


def _pre_rules(
    enforcement: Enforcement, ebpf_pods: list[ManagedPod], services: ServiceSteering
) -> list[Rule]:
    rules = [
        Rule("mangle", CHAIN_PRE, LOG_CLOSE, "log-close"),
        Rule("mangle", CHAIN_PRE, _VERDICT_CACHED, "verdict-cached"),
        Rule("mangle", CHAIN_PRE, _NOT_NEW, "not-new"),
        *(
            Rule("mangle", CHAIN_PRE, (*_from_pod(pod), "-j", "RETURN"), f"ebpf:{pod.pod.key}")
            for pod in ebpf_pods
        ),
    ]
    for ip, port in services.frontends:
        to_frontend = ("-d", _host_cidr(ip), "-p", "tcp", "--dport", str(port))
        if (ip, port) in services.via_envoy:
            rules.append(
                Rule(
                    "mangle",
                    CHAIN_PRE,
                    (*to_frontend, "-j", CHAIN_SERVICE_L7),
                    f"service-via-envoy:{ip}:{port}",
                )
            )
        # Its backend is not known before kube-proxy's DNAT: STEER-DNAT decides it.
        rules.append(
            Rule("mangle", CHAIN_PRE, (*to_frontend, "-j", "RETURN"), f"service:{ip}:{port}")
        )
    rules.append(Rule("mangle", CHAIN_PRE, ("-j", CHAIN_DECIDE), "decide"))
    return rules


def _decide_rules(enforcement: Enforcement) -> list[Rule]:
    vmask = _hex(MARK_VERDICT_MASK)
    deny_v = VERDICT_DENY << MARK_VERDICT_SHIFT
    pods = {p.ip: p for p in enforcement.pods}
    rules = [
        Rule(
            "mangle",
            CHAIN_DECIDE,
            ("-j", "MARK", "--set-xmark", f"0x0/{_hex(EGRESS_FIELD | MARK_MASK)}"),
            "policy-entry",
        ),
    ]
    # Sorted by the addresses' integers: comparing IPv4Address objects is ten times slower.
    for ip, side in sorted(enforcement.egress.items(), key=_by_address):
        pod = pods[ip]
        rules.append(
            Rule(
                "mangle",
                CHAIN_DECIDE,
                (*_from_pod(pod), "-j", side_chain(side)),
                f"egress:{side.pod_key}",
            )
        )
    for ip, side in sorted(enforcement.ingress.items(), key=_by_address):
        rules.append(
            Rule(
                "mangle",
                CHAIN_DECIDE,
                (
                    "-d",
                    _host_cidr(ip),
                    "-m",
                    "mark",
                    "!",
                    "--mark",
                    f"{_hex(VERDICT_DENY << EGRESS_SHIFT)}/{_hex(EGRESS_FIELD)}",
                    "-j",
                    side_chain(side),
                ),
                f"ingress:{side.pod_key}",
            )
        )
    rules += [
        Rule(
            "mangle",
            CHAIN_DECIDE,
            (*_mark_is(VERDICT_DENY << EGRESS_SHIFT, EGRESS_FIELD), *_set_v(VERDICT_DENY)),
            "combine-egress-deny",
        ),
        Rule(
            "mangle",
            CHAIN_DECIDE,
            (
                *_mark_is(VERDICT_L7 << EGRESS_SHIFT, EGRESS_FIELD),
                "-m",
                "mark",
                "!",
                "--mark",
                f"{_hex(deny_v)}/{vmask}",
                *_set_v(VERDICT_L7),
            ),
            "combine-egress-l7",
        ),
        Rule(
            "mangle",
            CHAIN_DECIDE,
            (*_mark_is(0, MARK_VERDICT_MASK), *_set_v(VERDICT_ALLOW)),
            "combine-allow",
        ),
        Rule("mangle", CHAIN_DECIDE, _SAVE_VERDICT, "save-verdict"),
        Rule(
            "mangle",
            CHAIN_DECIDE,
            ("-j", "MARK", "--set-xmark", f"0x0/{_hex(EGRESS_FIELD)}"),
            "clear-scratch",
        ),
    ]
    return rules


def _dnat_rules() -> list[Rule]:
    """mangle FORWARD and INPUT: a new flow kube-proxy translated (to a Service's backend,
    on a pod or on the node itself) is decided here, on the backend, with the same chains
    as any other. An L7 verdict found this late cannot reach Envoy any more (REDIRECT acts
    only before the DNAT): refused."""
    l7 = VERDICT_L7 << MARK_VERDICT_SHIFT
    deny = f"{_hex(VERDICT_DENY << MARK_VERDICT_SHIFT)}/{_hex(MARK_VERDICT_MASK)}"
    return [
        Rule(
            "mangle",
            CHAIN_DNAT,
            ("-m", "conntrack", "!", "--ctstate", "DNAT", "-j", "RETURN"),
            "not-translated",
        ),
        Rule("mangle", CHAIN_DNAT, _NOT_NEW, "not-new"),
        # Whatever was decided before the DNAT was decided on the address dialled, not on
        # the backend: a Service steer does not know (yet), an externalIP, a hostPort. Only
        # a deny stands (it is never looser); an L7 mark here means the flow escaped its
        # REDIRECT (an exclusion): it is decided on the backend like the rest.
        Rule(
            "mangle",
            CHAIN_DNAT,
            ("-m", "connmark", "--mark", deny, "-j", "RETURN"),
            "denied-before-translation",
        ),
        # steer's own REDIRECT to Envoy (an L7 flow, to a local address): decided already.
        Rule(
            "mangle",
            CHAIN_DNAT,
            (
                *("-m", "connmark", "--mark", f"{_hex(l7)}/{_hex(MARK_VERDICT_MASK)}"),
                *("-m", "addrtype", "--dst-type", "LOCAL", "-j", "RETURN"),
            ),
            "redirected-to-envoy",
        ),
        Rule("mangle", CHAIN_DNAT, ("-j", CHAIN_DECIDE), "decide-on-backend"),
        Rule(
            "mangle",
            CHAIN_DNAT,
            (*_mark_is(l7, MARK_VERDICT_MASK), *_set_v(VERDICT_DENY)),
            "l7-after-dnat-fails-closed",
        ),
        Rule(
            "mangle",
            CHAIN_DNAT,
            (*_mark_is(VERDICT_DENY << MARK_VERDICT_SHIFT, MARK_VERDICT_MASK), *_SAVE_VERDICT),
            "save-fail-closed",
        ),
    ]


def _service_l7_rules(pods: Sequence[ManagedPod]) -> list[Rule]:
    """Steered pods' flows to a Service that may need Envoy: L7, before kube-proxy acts."""
    value = f"{_hex(VERDICT_L7 << MARK_VERDICT_SHIFT)}/{_hex(EGRESS_FIELD | MARK_MASK)}"
    rules = [
        Rule(
            "mangle",
            CHAIN_SERVICE_L7,
            (*_from_pod(pod), "-j", "MARK", "--set-xmark", value),
            f"service-via-envoy:{pod.pod.key}",
        )
        for pod in sorted(pods, key=lambda p: int(p.ip))
    ]
    rules.append(
        Rule(
            "mangle",
            CHAIN_SERVICE_L7,
            (*_mark_is(VERDICT_L7 << MARK_VERDICT_SHIFT, MARK_VERDICT_MASK), *_SAVE_VERDICT),
            "save-verdict",
        )
    )
    return rules


def _by_address(item: tuple[IPv4Address, object]) -> int:
    return int(item[0])


def _from_pod(pod: ManagedPod) -> tuple[str, ...]:
    return _source_args(pod.pod.interface, pod.ip)


@lru_cache(maxsize=1 << 16)
def _source_args(interface: str, ip: IPv4Address) -> tuple[str, ...]:
    # The interface match stops a pod from spoofing another pod's source address.
    # Cached: formatting an address costs more than hashing it, and the node-wide
    # chains name every pod again after each pod change.
    iface = ("-i", interface) if interface else ()
    return (*iface, "-s", _host_cidr(ip))


@lru_cache(maxsize=1 << 16)
def _host_cidr(ip: IPv4Address) -> str:
    return f"{ip}/32"


def _multiport(ports: Iterable[int]) -> tuple[str, ...]:
    return ("-p", "tcp", "-m", "multiport", "--dports", ",".join(str(p) for p in sorted(ports)))


# Every port of Envoy's a pod must not dial: the shared listeners and the Service ones.
_ENVOY_PORTS = (
    f"{ENVOY_OUTBOUND_PORT},{ENVOY_INBOUND_PORT},"
    f"{ENVOY_SERVICE_PORTS.start}:{ENVOY_SERVICE_PORTS.stop - 1}"
)


def _redirect(port: int) -> tuple[str, ...]:
    return ("-p", "tcp", "-j", "REDIRECT", "--to-ports", str(port))


def _nat_rules(
    enforcement: Enforcement, ebpf: frozenset[str], services: ServiceSteering
) -> list[Rule]:
    l7 = f"{_hex(VERDICT_L7 << MARK_VERDICT_SHIFT)}/{_hex(MARK_VERDICT_MASK)}"
    rules = [
        # To a pod's own address, a flow that is not steer's to redirect needs no NAT from
        # anyone (a Service's address is never in the pod range; the node's own addresses
        # in it, a bridge's gateway, may carry NodePorts and hostPorts): it skips kube-proxy's
        # KUBE-SERVICES, one rule per Service port walked by every new flow. That is every
        # flow connect4 balanced to a backend.
        *(
            Rule(
                "nat",
                CHAIN_NAT,
                (
                    *("-d", str(cidr), "-m", "addrtype", "!", "--dst-type", "LOCAL"),
                    *("-m", "connmark", "!", "--mark", l7, "-j", "ACCEPT"),
                ),
                "to-a-pod-address",
            )
            for cidr in services.pod_cidrs
        ),
        Rule("nat", CHAIN_NAT, ("-m", "connmark", "!", "--mark", l7, "-j", "RETURN"), "not-l7"),
        *_exclusion_limits(enforcement, ebpf),
    ]
    for pod in enforcement.pods:
        steering = pod.steering
        if steering.exclude_outbound_ports:
            rules.append(
                Rule(
                    "nat",
                    CHAIN_NAT,
                    (*_from_pod(pod), *_multiport(steering.exclude_outbound_ports), "-j", "RETURN"),
                    f"exclude-outbound-ports:{pod.pod.key}",
                )
            )
        rules.extend(
            Rule(
                "nat",
                CHAIN_NAT,
                (*_from_pod(pod), "-d", cidr, "-j", "RETURN"),
                f"exclude-outbound-cidr:{pod.pod.key}",
            )
            for cidr in steering.exclude_outbound_cidrs
        )
        if steering.exclude_inbound_ports:
            rules.append(
                Rule(
                    "nat",
                    CHAIN_NAT,
                    (
                        "-d",
                        _host_cidr(pod.ip),
                        *_multiport(steering.exclude_inbound_ports),
                        "-j",
                        "RETURN",
                    ),
                    f"exclude-inbound-ports:{pod.pod.key}",
                )
            )
    # Only a steered pod's flow to a via-Envoy frontend gets here (STEER-SVC7 marked it).
    rules.extend(
        Rule(
            "nat",
            CHAIN_NAT,
            (
                *("-d", _host_cidr(ip), "-p", "tcp", "--dport", str(port)),
                *("-j", "REDIRECT", "--to-ports", str(envoy_port)),
            ),
            f"redirect-service:{ip}:{port}",
        )
        for (ip, port), envoy_port in services.envoy_ports
        if (ip, port) in services.via_envoy
    )
    rules.extend(
        Rule(
            "nat",
            CHAIN_NAT,
            (*_from_pod(pod), *_redirect(ENVOY_OUTBOUND_PORT)),
            f"redirect-outbound:{pod.pod.key}",
        )
        for pod in enforcement.pods
        if pod.pod.key not in ebpf
    )
    rules.append(
        Rule(
            "nat",
            CHAIN_NAT,
            _redirect(ENVOY_INBOUND_PORT),
            "redirect-inbound",
        )
    )
    return rules


def _exclusion_limits(enforcement: Enforcement, ebpf: frozenset[str]) -> list[Rule]:
    """A pod's exclusions may only weaken its own namespace's policy
    (`exclusion_skips_envoy`). Ahead of every exclusion, redirect the L7 flows between a
    pod with exclusions and a pod of another namespace at the ports where that other
    pod's HTTP rules apply: they were going to Envoy anyway, unless excluded."""
    pods = [p for p in enforcement.pods if p.pod.key not in ebpf]
    # (source ip, destination ip) -> (source, destination, the other side's L7 ports)
    wanted: dict[
        tuple[IPv4Address, IPv4Address],
        tuple[ManagedPod, ManagedPod, tuple[tuple[int, int], ...] | None],
    ] = {}

    def keep(src: ManagedPod, dst: ManagedPod, side: SideRules | None, peer: IPv4Address) -> None:
        if side is None or src.pod.namespace == dst.pod.namespace:
            return
        ranges = l7_port_ranges(side, peer)
        if ranges != ():
            wanted[(src.ip, dst.ip)] = (src, dst, ranges)

    for src in pods:
        if src.steering.exclude_outbound_ports or src.steering.exclude_outbound_cidrs:
            for dst in enforcement.pods:
                keep(src, dst, enforcement.ingress.get(dst.ip), src.ip)
    for dst in enforcement.pods:
        if dst.steering.exclude_inbound_ports:
            for src in pods:
                keep(src, dst, enforcement.egress.get(src.ip), dst.ip)
    rules = []
    for _, (src, dst, ranges) in sorted(wanted.items()):
        ports = [()] if ranges is None else [("--dport", f"{lo}:{hi}") for lo, hi in ranges]
        rules += [
            Rule(
                "nat",
                CHAIN_NAT,
                (
                    *_from_pod(src),
                    *("-d", f"{dst.ip}/32", "-p", "tcp", *port),
                    *("-j", "REDIRECT", "--to-ports", str(ENVOY_OUTBOUND_PORT)),
                ),
                f"exclusion-limit:{src.pod.key}:{dst.pod.key}",
            )
            for port in ports
        ]
    return rules


def _filter_rules(ebpf_pods: list[ManagedPod]) -> list[Rule]:
    deny = (
        "-m",
        "connmark",
        "--mark",
        f"{_hex(VERDICT_DENY << MARK_VERDICT_SHIFT)}/{_hex(MARK_VERDICT_MASK)}",
    )
    # A TCP reset, like REDIRECT, needs an explicit -p tcp in the same rule.
    reset = ("-j", "REJECT", "--reject-with", "tcp-reset")
    l7_mark = f"{_hex(VERDICT_L7 << MARK_VERDICT_SHIFT)}/{_hex(MARK_VERDICT_MASK)}"
    # A copy of each refused packet for `steer observe`: a refused flow is never confirmed
    # in conntrack, so no conntrack event tells of it (steer.node.nfnetlink). Refusals of
    # flows a pod of the node opened are its socket hooks' to record; the agent skips
    # those. With no reader on the group, the kernel drops the copy.
    log_denied = ("-p", "tcp", *deny, "-j", "NFLOG", "--nflog-group", str(NFLOG_GROUP))
    return [
        Rule("filter", CHAIN_FORWARD, log_denied, "log-denied"),
        Rule("filter", CHAIN_INPUT, log_denied, "log-denied"),
        # A denied flow kube-proxy translated, that came in through a bridge port
        # (br_netfilter): the kernel sends a TCP reset built here straight out of the
        # bridge port, past the NAT that would give it the ClusterIP back, so the client
        # drops it and waits. An ICMP error is translated back like any related packet
        # and makes connect() fail at once, as kube-proxy's own REJECTs do (ICMP errors
        # are rate-limited per peer: net.ipv4.icmp_ratelimit). Routed pods get the reset.
        Rule(
            "filter",
            CHAIN_FORWARD,
            (
                *("-p", "tcp", "--syn", *deny, "-m", "conntrack", "--ctstate", "DNAT"),
                *("-m", "physdev", "--physdev-is-in"),
                *("-j", "REJECT", "--reject-with", "icmp-port-unreachable"),
            ),
            "deny-after-dnat",
        ),
        Rule("filter", CHAIN_FORWARD, ("-p", "tcp", *deny, *reset), "deny"),
        Rule("filter", CHAIN_INPUT, ("-p", "tcp", *deny, *reset), "deny"),
        # A new connection to Envoy's listeners that no REDIRECT produced: a pod dialling
        # Envoy itself (which would make Envoy proxy to itself), unless connect4 of an
        # eBPF-steered pod rewrote it; only first packets walk the exemptions.
        Rule(
            "filter",
            CHAIN_INPUT,
            (
                "!",
                "-i",
                "lo",
                *("-p", "tcp", "-m", "multiport", "--dports", _ENVOY_PORTS),
                *("-m", "conntrack", "--ctstate", "NEW"),
                # Every REDIRECT steer makes is of an L7 flow; a DNAT by anyone else (a
                # Service whose endpoint is Envoy's port) is not an exemption.
                *("-m", "connmark", "!", "--mark", l7_mark),
                "-j",
                CHAIN_ENVOY,
            ),
            "direct-to-envoy",
        ),
        *(
            Rule("filter", CHAIN_ENVOY, (*_from_pod(pod), "-j", "RETURN"), f"ebpf:{pod.pod.key}")
            for pod in ebpf_pods
        ),
        Rule("filter", CHAIN_ENVOY, ("-p", "tcp", *reset), "no-direct-envoy"),
    ]


class RulesetCache:
    """What the previous render produced, for a caller that renders again and again (the
    agent). A side that is the same object as last time (as `Resolver` hands back) gets
    the very same chain; the node-wide chains are rebuilt only when the pods, the eBPF
    set or the set of sides changed; and with every input the same, the previous ruleset
    itself comes back, so comparing it with the applied one is one identity check."""

    def __init__(self) -> None:
        # pod chain -> (its side, shared chain, shared rules, pod chain rules)
        self._chains: dict[str, tuple[SideRules, str, tuple[Rule, ...], tuple[Rule, ...]]] = {}
        # (direction, default, default policy id, id of a rules tuple) -> (a side holding
        # that tuple alive, its shared chain, the chain's rules)
        self._shared: dict[tuple[object, ...], tuple[SideRules, str, tuple[Rule, ...]]] = {}
        self._node_key: tuple[object, ...] | None = None
        self._node_rules: NodeRules = {}
        self._inputs: tuple[object, ...] | None = None
        self._ruleset: Ruleset | None = None

    def side_rules(self, sides: Sequence[SideRules]) -> dict[str, tuple[Rule, ...]]:
        """Each pod chain and each shared chain by name, in chain order."""
        chains: dict[str, tuple[SideRules, str, tuple[Rule, ...], tuple[Rule, ...]]] = {}
        by_content: dict[tuple[object, ...], tuple[SideRules, str, tuple[Rule, ...]]] = {}
        for side in sides:
            name = side_chain(side)
            # Replicas' sides share their rules tuple (the Resolver sees to it): their
            # shared chain is rendered once for all of them.
            content = (side.direction, side.default_action, side.default_policy_id, id(side.rules))
            cached = self._chains.get(name)
            if cached is None or cached[0] is not side:
                like = by_content.get(content) or self._shared.get(content)
                if like is None:
                    like = (side, *_shared_chain(side))
                cached = (side, like[1], like[2], _jump_to_shared(side, like[1]))
            by_content.setdefault(content, (side, cached[1], cached[2]))
            chains[name] = cached
        self._chains, self._shared = chains, by_content
        out: dict[str, tuple[Rule, ...]] = {}
        for name, (_, shared, shared_rules, own_rules) in chains.items():
            out[name] = own_rules
            out[shared] = shared_rules
        return {name: out[name] for name in sorted(out)}

    def node_rules(
        self,
        enforcement: Enforcement,
        ebpf: frozenset[str],
        sides: Sequence[SideRules],
        services: ServiceSteering = NO_SERVICES,
    ) -> NodeRules:
        """STEER-PRE, the nat chain and the filter chains: they depend on the pods'
        names, addresses, interfaces and steering, the eBPF set and which pods have which
        sides, not on any side's rules nor on labels (a relabelled pod rebuilt them all)."""
        key = (
            tuple((p.pod.key, p.ip, p.pod.interface, p.steering) for p in enforcement.pods),
            ebpf,
            # A set: the sides' order follows the policies that select each pod.
            frozenset((s.direction, s.pod_ip, s.pod_key) for s in sides),
            # The limits on exclusions read the sides' rules; only then do they count.
            tuple(sides) if any(_has_exclusions(p) for p in enforcement.pods) else (),
            services,
        )
        if key != self._node_key:
            self._node_key, self._node_rules = key, _node_rules(enforcement, ebpf, services)
        return self._node_rules

    def ruleset(
        self,
        enforcement: Enforcement,
        ebpf: frozenset[str],
        sides: tuple[SideRules, ...],
        services: ServiceSteering = NO_SERVICES,
    ) -> Ruleset:
        inputs = (enforcement.pods, ebpf, sides, services)
        if self._ruleset is None or inputs != self._inputs:
            node = self.node_rules(enforcement, ebpf, sides, services)
            self._ruleset = _ruleset(node, self.side_rules(sides))
            self._inputs = inputs
        return self._ruleset


def _has_exclusions(pod: ManagedPod) -> bool:
    steering = pod.steering
    return bool(
        steering.exclude_outbound_ports
        or steering.exclude_outbound_cidrs
        or steering.exclude_inbound_ports
    )


# (table, chain) -> rules, for every chain that is not a policy side's.
NodeRules = dict[tuple[str, str], tuple[Rule, ...]]


def _node_rules(
    enforcement: Enforcement, ebpf: frozenset[str], services: ServiceSteering
) -> NodeRules:
    ebpf_pods = [p for p in enforcement.pods if p.pod.key in ebpf]
    rules: dict[tuple[str, str], list[Rule]] = {}
    steered = [p for p in enforcement.pods if p.pod.key not in ebpf]
    for rule in (
        *_pre_rules(enforcement, ebpf_pods, services),
        *_decide_rules(enforcement),
        *_dnat_rules(),
        *(_service_l7_rules(steered) if services.via_envoy else ()),
        *_nat_rules(enforcement, ebpf, services),
        *_filter_rules(ebpf_pods),
    ):
        rules.setdefault((rule.table, rule.chain), []).append(rule)
    return {key: tuple(chain) for key, chain in rules.items()}


def _ruleset(node: NodeRules, side_rules: Mapping[str, tuple[Rule, ...]]) -> Ruleset:
    node_mangle = tuple(chain for table, chain in node if table == "mangle")
    chains = {
        "mangle": (*node_mangle, *side_rules),
        "nat": (CHAIN_NAT,),
        "filter": (CHAIN_FORWARD, CHAIN_INPUT, CHAIN_ENVOY),
    }
    jumps = (
        Jump("mangle", "PREROUTING", CHAIN_PRE),
        Jump("mangle", "FORWARD", CHAIN_DNAT),
        Jump("mangle", "INPUT", CHAIN_DNAT),
        Jump("nat", "PREROUTING", CHAIN_NAT),
        Jump("filter", "FORWARD", CHAIN_FORWARD),
        Jump("filter", "INPUT", CHAIN_INPUT),
    )
    grouped: dict[tuple[str, str], tuple[Rule, ...]] = {
        key: rules for key, rules in node.items() if key[0] == "mangle"
    }
    grouped.update((("mangle", name), rules) for name, rules in side_rules.items())
    grouped.update((key, rules) for key, rules in node.items() if key[0] != "mangle")
    # Chained in C: at 200k rules a Python-level flatten took 15 ms of every change.
    rules = tuple(itertools.chain.from_iterable(grouped.values()))
    return Ruleset(chains=chains, rules=rules, jumps=jumps, grouped=grouped)


def render_ruleset(
    enforcement: Enforcement,
    ebpf: frozenset[str] = frozenset(),
    cache: RulesetCache | None = None,
    services: ServiceSteering = NO_SERVICES,
) -> Ruleset:
    """`ebpf`: keys of the pods the eBPF datapath steers. connect4 decided their flows
    already, so these rules let their new flows through untouched. `services`: the
    Service frontends on the node (see ServiceSteering). Pure in effect: with a cache the
    result equals a render without one."""
    sides = (*enforcement.egress.values(), *enforcement.ingress.values())
    return (cache or RulesetCache()).ruleset(enforcement, ebpf, sides, services)


def render_ipv6_ruleset(enforcement: Enforcement) -> Ruleset:
    """For ip6tables: every steered pod's IPv6 TCP through the node (to other pods, and to
    the node itself) is refused with a reset. No policy covers IPv6 yet, so a pod with an
    IPv6 address must not find in it a way around its IPv4 policy. The eBPF datapath's
    connect6 refuses the same connects before they leave the pod.

    Pods are matched by their node-side interface; a pod whose interface is not known
    (a cluster node) is covered by connect6 on eBPF only (docs/security.md)."""
    reset = ("-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset")
    rules = []
    for pod in sorted(enforcement.pods, key=lambda p: p.pod.key):
        iface = pod.pod.interface
        if not iface:
            continue
        key = pod.pod.key
        rules += [
            Rule("filter", CHAIN_V6_FORWARD, ("-i", iface, *reset), f"no-ipv6-policy-from:{key}"),
            Rule("filter", CHAIN_V6_FORWARD, ("-o", iface, *reset), f"no-ipv6-policy-to:{key}"),
            Rule("filter", CHAIN_V6_INPUT, ("-i", iface, *reset), f"no-ipv6-policy-from:{key}"),
        ]
    return Ruleset(
        chains={"filter": (CHAIN_V6_FORWARD, CHAIN_V6_INPUT)},
        rules=tuple(rules),
        jumps=(
            Jump("filter", "FORWARD", CHAIN_V6_FORWARD),
            Jump("filter", "INPUT", CHAIN_V6_INPUT),
        ),
    )


def _same(a: tuple[Rule, ...], b: tuple[Rule, ...]) -> bool:
    return a is b or a == b


def chains_to_write(
    ruleset: Ruleset, current: KernelState, previous: Ruleset | None = None
) -> dict[str, tuple[str, ...]]:
    """The chains whose content must be (re)written: all of them without a previous
    ruleset, else only those that changed or are missing from the kernel."""
    out: dict[str, tuple[str, ...]] = {}
    for table, wanted in ruleset.chains.items():
        present = current.chains.get(table, frozenset())
        out[table] = tuple(
            chain
            for chain in wanted
            if previous is None
            or chain not in present
            # Rules compare as their text would; unchanged ones are mostly the same objects.
            or not _same(ruleset.rules_of(table, chain), previous.rules_of(table, chain))
        )
    return out


def restore_text(ruleset: Ruleset, current: KernelState, previous: Ruleset | None = None) -> str:
    """Input for `iptables-restore --noflush`: each table commits atomically.

    Declaring a chain flushes it, so a written chain is replaced wholesale; chains steer
    owned before and no longer needs are flushed and deleted in the same commit. Given
    the previously applied ruleset, unchanged chains are left alone, which keeps a small
    policy change cheap at 10k rules and keeps the counters of untouched chains. Built-in
    chains are only ever touched by inserting the missing entry jumps.
    """
    writes = chains_to_write(ruleset, current, previous)
    lines: list[str] = []
    for table in TABLES:
        written = writes.get(table, ())
        stale = sorted(current.chains.get(table, frozenset()) - set(ruleset.chains.get(table, ())))
        jumps = [
            j
            for j in ruleset.jumps
            if j.table == table and (j not in current.jumps or j in current.misplaced)
        ]
        if not (written or stale or jumps):
            continue
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in (*written, *stale)]
        lines += [f"-D {j.builtin} {j.spec()}" for j in jumps if j in current.misplaced]
        lines += [f"-I {jump.builtin} 1 {jump.spec()}" for jump in jumps]
        lines += [
            f"-A {r.chain} {r.spec()}" for chain in written for r in ruleset.rules_of(table, chain)
        ]
        lines += [f"-X {chain}" for chain in stale]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def cleanup_text(current: KernelState) -> str:
    """Remove exactly what steer owns: its entry jumps, then its chains."""
    lines: list[str] = []
    for table in TABLES:
        chains = sorted(current.chains.get(table, frozenset()))
        jumps = [j for j in current.jumps if j.table == table]
        if not chains and not jumps:
            continue
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in chains]
        lines += [
            f"-D {j.builtin} {j.spec()}" for j in sorted(jumps, key=lambda j: (j.target, j.builtin))
        ]
        lines += [f"-X {chain}" for chain in chains]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
