"""kube-proxy's part on the lab node: the iptables rules kube-proxy v1.20 (iptables mode)
installs for a node's Services, rendered from steer's own Service model. Lab only.

Why it exists: the lab node has no Kubernetes, so no kube-proxy, and without one a
connect to a ClusterIP or NodePort that steer's datapath leaves alone (the iptables
datapath, a Service the eBPF map could not hold, a non-steered pod) would go nowhere.
A real node (tests/cluster, scripts/kube-node.sh) runs the real kube-proxy v1.20.2; here
its rules are played the way the lab's veths play the CNI, so that steer meets the same
chains, rules, marks and entry-jump order on the lab as on a node. Nothing in model/,
render/, node/ or control/ may import this module.

What is reproduced (kube-proxy v1.20 pkg/proxy/iptables/proxier.go, as iptables-save
prints it back, so the lab's `iptables-save` compares line by line with a node's):
- chain names byte for byte: KUBE-SVC-/KUBE-SEP- + base32(sha256(servicePortName +
  "tcp" [+ "ip:port"]))[:16];
- nat KUBE-SERVICES, jumped from PREROUTING and OUTPUT: per ClusterIP with endpoints a
  masquerade rule for clients outside the cluster CIDR (the node sets clusterCIDR) and
  the jump to KUBE-SVC-; last, the jump to KUBE-NODEPORTS for local destinations;
- KUBE-SVC-: one rule per endpoint, `-m statistic --mode random` with probability
  1/(n-i) except the last. kube-proxy writes it as "%0.10f" (0.3333333333); the kernel
  keeps a 31-bit fraction (lround(p * 2^31)) that iptables-save prints as "%.11f"
  (0.33333333349). The text carries the printed form of kube-proxy's own string: the
  kernel holds the very value kube-proxy would have given it;
- KUBE-SEP-: hairpin masquerade (`-s endpoint/32 -j KUBE-MARK-MASQ`), then DNAT;
  endpoints in kube-proxy's order (sorted as "ip:port" strings);
- KUBE-NODEPORTS: masquerade, then the Service's KUBE-SVC-, per node port;
- no endpoints: no nat rules; filter KUBE-SERVICES (jumped from FORWARD and OUTPUT for
  NEW connections) REJECTs the ClusterIP, filter KUBE-EXTERNAL-SERVICES (from INPUT and
  FORWARD) REJECTs the node port on local addresses;
- KUBE-MARK-MASQ (or-mark 0x4000), KUBE-POSTROUTING (return unless marked, clear the
  mark, MASQUERADE --random-fully), filter KUBE-FORWARD (drop INVALID, accept marked
  and RELATED/ESTABLISHED), and the empty KUBE-PROXY-CANARY chains of its monitor;
- SVC and SEP rules lose their comments above 1000 endpoints, as kube-proxy's do;
- entry jumps inserted at the top in kube-proxy's order (it prepends each), so the
  built-in chains end up as on a node where kube-proxy started first: apply this
  before steer's agent runs.

Not reproduced: what the model does not carry (externalIPs, LoadBalancer ingress,
externalTrafficPolicy: Local, session affinity, UDP/SCTP), the node-port sockets
kube-proxy holds open, conntrack flushing, and kubelet's own chains (KUBE-MARK-DROP,
KUBE-FIREWALL).

Pure: text for `iptables-legacy-restore --noflush`; the caller applies it.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from steer.constants import LAB_POD_CIDR
from steer.model.service import Backend, Frontend

KUBE_PROXY_VERSION = "v1.20"
TABLES = ("mangle", "filter", "nat")

SERVICES = "KUBE-SERVICES"
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
NODEPORTS = "KUBE-NODEPORTS"
POSTROUTING = "KUBE-POSTROUTING"
MARK_MASQ = "KUBE-MARK-MASQ"
FORWARD = "KUBE-FORWARD"
CANARY = "KUBE-PROXY-CANARY"
SVC_PREFIX = "KUBE-SVC-"
SEP_PREFIX = "KUBE-SEP-"

# kube-proxy's own chains per table, in the order it declares them.
FIXED_CHAINS: Mapping[str, tuple[str, ...]] = {
    "mangle": (CANARY,),
    "filter": (SERVICES, EXTERNAL_SERVICES, FORWARD, CANARY),
    "nat": (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, CANARY),
}

# The lab's pod CIDR, given to kube-proxy as clusterCIDR as the cluster node gives its own.
LAB_CLUSTER_CIDR = IPv4Network(LAB_POD_CIDR)
# --masquerade-bit 14, the default.
MASQUERADE_MARK = 0x4000
# Above this many endpoint chains, kube-proxy drops the comments of SVC and SEP rules.
ENDPOINT_CHAINS_COMMENT_THRESHOLD = 1000
_PROTOCOL = "tcp"
_NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"
_REJECT = ("-j", "REJECT", "--reject-with", "icmp-port-unreachable")
# Names end up inside a quoted comment of the restore text.
_UNSAFE = re.compile(r'["\\\s]')


@dataclass(frozen=True)
class Jump:
    """An entry rule from a built-in chain into one of kube-proxy's."""

    table: str
    builtin: str
    target: str
    comment: str
    new_only: bool = False

    def spec(self) -> str:
        state = "-m conntrack --ctstate NEW " if self.new_only else ""
        return f'{state}-m comment --comment "{self.comment}" -j {self.target}'


_EXTERNAL_PORTALS = "kubernetes externally-visible service portals"
_PORTALS = "kubernetes service portals"
# iptablesJumpChains of v1.20, in its order: kube-proxy prepends each one in turn, so in
# FORWARD the last listed ends up first.
JUMPS: tuple[Jump, ...] = (
    Jump("filter", "INPUT", EXTERNAL_SERVICES, _EXTERNAL_PORTALS, new_only=True),
    Jump("filter", "FORWARD", EXTERNAL_SERVICES, _EXTERNAL_PORTALS, new_only=True),
    Jump("filter", "FORWARD", SERVICES, _PORTALS, new_only=True),
    Jump("filter", "OUTPUT", SERVICES, _PORTALS, new_only=True),
    Jump("filter", "FORWARD", FORWARD, "kubernetes forwarding rules"),
    Jump("nat", "OUTPUT", SERVICES, _PORTALS),
    Jump("nat", "PREROUTING", SERVICES, _PORTALS),
    Jump("nat", "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
)


@dataclass(frozen=True)
class _ServicePort:
    """One Service port as kube-proxy's serviceMap holds it: its ClusterIP and node port
    frontends share the KUBE-SVC- chain and the endpoints."""

    name: str  # servicePortName: "namespace/name" or "namespace/name:port"
    cluster_ips: tuple[tuple[IPv4Address, int], ...]
    node_ports: tuple[int, ...]
    backends: tuple[Backend, ...]

    @property
    def svc_chain(self) -> str:
        return SVC_PREFIX + _hash(self.name + _PROTOCOL)

    def sep_chain(self, backend: Backend) -> str:
        return SEP_PREFIX + _hash(self.name + _PROTOCOL + _endpoint(backend))


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest).decode()[:16]


def _endpoint(backend: Backend) -> str:
    return f"{backend.ip}:{backend.port}"


def _comment(text: str) -> tuple[str, ...]:
    return ("-m", "comment", "--comment", f'"{text}"')


def _hex(value: int) -> str:
    return f"0x{value:x}"


def probability(n: int) -> str:
    """`--probability` of the first of `n` remaining endpoints, as iptables-save prints it
    on a node: kube-proxy's "%0.10f" of 1/n, stored by the kernel as lround(p * 2^31)."""
    if n < 2:
        raise ValueError(f"a probability is only written for 2 or more endpoints, not {n}")
    written = float(f"{1.0 / n:.10f}")
    fixed = int(written * 0x80000000 + 0.5)
    return f"{fixed / 0x80000000:.11f}"


def _service_ports(frontends: Iterable[Frontend]) -> list[_ServicePort]:
    grouped: dict[tuple[str, str], list[Frontend]] = {}
    for frontend in frontends:
        for text in (frontend.service, frontend.port_name):
            if _UNSAFE.search(text):
                raise ValueError(f"{text!r}: not a Kubernetes name (quotes, backslashes, spaces)")
        grouped.setdefault((frontend.service, frontend.port_name), []).append(frontend)
    ports = []
    for (service, port_name), members in sorted(grouped.items()):
        backends = {(b.ip, b.port): b for f in members for b in f.backends}
        ports.append(
            _ServicePort(
                name=f"{service}:{port_name}" if port_name else service,
                cluster_ips=tuple(sorted({(f.ip, f.port) for f in members if not f.node_port})),
                node_ports=tuple(sorted({f.port for f in members if f.node_port})),
                # kube-proxy's endpoints cache sorts them by their "ip:port" string.
                backends=tuple(sorted(backends.values(), key=_endpoint)),
            )
        )
    return ports


def kube_proxy_chains(frontends: Iterable[Frontend] = ()) -> dict[str, frozenset[str]]:
    """Every chain `render_kube_proxy(frontends)` owns, by table: kube-proxy's own, and a
    KUBE-SVC- plus one KUBE-SEP- per endpoint for each Service port with endpoints."""
    chains = {table: set(fixed) for table, fixed in FIXED_CHAINS.items()}
    for port in _service_ports(frontends):
        if port.backends:
            chains["nat"].add(port.svc_chain)
            chains["nat"].update(port.sep_chain(b) for b in port.backends)
    return {table: frozenset(names) for table, names in chains.items()}


def is_kube_proxy_chain(table: str, chain: str) -> bool:
    """Whether kube-proxy (and so this module) owns `chain` in `table`."""
    if chain in FIXED_CHAINS.get(table, ()):
        return True
    return table == "nat" and chain.startswith((SVC_PREFIX, SEP_PREFIX))


def _installed(installed: Mapping[str, Iterable[str]] | None) -> dict[str, frozenset[str]]:
    found = {table: frozenset(chains) for table, chains in (installed or {}).items()}
    for table, chains in found.items():
        foreign = sorted(c for c in chains if not is_kube_proxy_chain(table, c))
        if foreign:
            raise ValueError(f"not kube-proxy's chains in {table}: {', '.join(foreign)}")
    return found


def _nat_rules(
    ports: Sequence[_ServicePort],
    node_ips: Sequence[IPv4Address],
    cluster_cidr: IPv4Network | None,
) -> list[tuple[str, tuple[str, ...]]]:
    mark = f"{_hex(MASQUERADE_MARK)}/{_hex(MASQUERADE_MARK)}"
    rules: list[tuple[str, tuple[str, ...]]] = [
        (POSTROUTING, ("-m", "mark", "!", "--mark", mark, "-j", "RETURN")),
        # Clear the mark, so a packet that goes through the stack again is not
        # masqueraded twice (--xor-mark 0x004000, printed as set-xmark).
        (POSTROUTING, ("-j", "MARK", "--set-xmark", f"{_hex(MASQUERADE_MARK)}/0x0")),
        (
            POSTROUTING,
            (
                *_comment("kubernetes service traffic requiring SNAT"),
                *("-j", "MASQUERADE", "--random-fully"),
            ),
        ),
        (MARK_MASQ, ("-j", "MARK", "--set-xmark", mark)),
    ]
    endpoint_chains = sum(len(p.backends) for p in ports)
    commented = endpoint_chains <= ENDPOINT_CHAINS_COMMENT_THRESHOLD
    for port in ports:
        if not port.backends:
            continue
        svc = port.svc_chain
        service_comment = _comment(port.name) if commented else ()
        for ip, number in port.cluster_ips:
            match = (
                *("-d", f"{ip}/32", "-p", _PROTOCOL),
                *_comment(f"{port.name} cluster IP"),
                *("-m", _PROTOCOL, "--dport", str(number)),
            )
            if cluster_cidr is not None:
                # Off-cluster clients of a VIP are masqueraded, as replies may leave
                # through another node.
                rules.append((SERVICES, ("!", "-s", str(cluster_cidr), *match, "-j", MARK_MASQ)))
            rules.append((SERVICES, (*match, "-j", svc)))
        for number in port.node_ports:
            match = (
                *("-p", _PROTOCOL),
                *_comment(port.name),
                *("-m", _PROTOCOL, "--dport", str(number)),
            )
            rules += [(NODEPORTS, (*match, "-j", MARK_MASQ)), (NODEPORTS, (*match, "-j", svc))]
        n = len(port.backends)
        for i, backend in enumerate(port.backends):
            chance = (
                ("-m", "statistic", "--mode", "random", "--probability", probability(n - i))
                if i < n - 1
                else ()
            )
            rules.append((svc, (*service_comment, *chance, "-j", port.sep_chain(backend))))
        for backend in port.backends:
            sep = port.sep_chain(backend)
            rules += [
                # Hairpin: an endpoint dialling its own Service comes back to itself.
                (sep, ("-s", f"{backend.ip}/32", *service_comment, "-j", MARK_MASQ)),
                (
                    sep,
                    (
                        *("-p", _PROTOCOL, *service_comment, "-m", _PROTOCOL),
                        *("-j", "DNAT", "--to-destination", _endpoint(backend)),
                    ),
                ),
            ]
    # Last in KUBE-SERVICES: node ports, on every local address unless kube-proxy was
    # given --nodeport-addresses (the cluster node sets none).
    tail = _comment(_NODEPORTS_COMMENT)
    if node_ips:
        rules += [
            (SERVICES, ("-d", f"{ip}/32", *tail, "-j", NODEPORTS))
            for ip in sorted(set(node_ips), key=int)
        ]
    else:
        rules.append((SERVICES, (*tail, "-m", "addrtype", "--dst-type", "LOCAL", "-j", NODEPORTS)))
    return rules


def _filter_rules(ports: Sequence[_ServicePort]) -> list[tuple[str, tuple[str, ...]]]:
    rules: list[tuple[str, tuple[str, ...]]] = []
    for port in ports:
        if port.backends:
            continue
        empty = _comment(f"{port.name} has no endpoints")
        rules += [
            (
                SERVICES,
                (
                    *("-d", f"{ip}/32", "-p", _PROTOCOL, *empty),
                    *("-m", _PROTOCOL, "--dport", str(number), *_REJECT),
                ),
            )
            for ip, number in port.cluster_ips
        ]
        rules += [
            (
                EXTERNAL_SERVICES,
                (
                    *("-p", _PROTOCOL, *empty, "-m", "addrtype", "--dst-type", "LOCAL"),
                    *("-m", _PROTOCOL, "--dport", str(number), *_REJECT),
                ),
            )
            for number in port.node_ports
        ]
    mark = f"{_hex(MASQUERADE_MARK)}/{_hex(MASQUERADE_MARK)}"
    established = ("-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT")
    rules += [
        (FORWARD, ("-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP")),
        (
            FORWARD,
            (
                *_comment("kubernetes forwarding rules"),
                "-m",
                "mark",
                "--mark",
                mark,
                "-j",
                "ACCEPT",
            ),
        ),
        (FORWARD, (*_comment("kubernetes forwarding conntrack pod source rule"), *established)),
        (
            FORWARD,
            (*_comment("kubernetes forwarding conntrack pod destination rule"), *established),
        ),
    ]
    return rules


def render_kube_proxy(
    frontends: Sequence[Frontend],
    *,
    node_ips: Sequence[IPv4Address] = (),
    cluster_cidr: IPv4Network | None = LAB_CLUSTER_CIDR,
    installed: Mapping[str, Iterable[str]] | None = None,
) -> str:
    """Text for `iptables-legacy-restore --noflush`: the rules kube-proxy v1.20 would hold
    for `frontends` (model.service.frontends' output; NodePort frontends, one per node
    address, collapse into one rule per node port).

    node_ips: kube-proxy's --nodeport-addresses. Leave it empty to match the cluster node,
    which serves node ports on every local address (`-m addrtype --dst-type LOCAL`).
    cluster_cidr: kube-proxy's clusterCIDR (the lab's pod CIDR, as the node sets one);
    None for a kube-proxy without one, which masquerades no off-cluster client.
    installed: the chains an earlier render put in the kernel (`kube_proxy_chains` of its
    frontends). Each table commits atomically: every chain is declared, so rewritten
    whole, as kube-proxy rewrites its own on each sync; chains of `installed` no longer
    needed are flushed and deleted; an entry jump is inserted only along with the chain
    it targets, so render with `installed` after the first apply, or the jumps double.
    """
    ports = _service_ports(frontends)
    before = _installed(installed)
    wanted = kube_proxy_chains(frontends)
    rules_by_table: dict[str, list[tuple[str, tuple[str, ...]]]] = {
        "mangle": [],
        "filter": _filter_rules(ports),
        "nat": _nat_rules(ports, node_ips, cluster_cidr),
    }
    lines: list[str] = []
    for table in TABLES:
        present = before.get(table, frozenset())
        rules = rules_by_table[table]
        declared = list(FIXED_CHAINS[table])
        for chain, _ in rules:
            if chain not in declared:
                declared.append(chain)
        stale = sorted(present - wanted[table])
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in (*declared, *stale)]
        lines += [
            f"-I {jump.builtin} 1 {jump.spec()}"
            for jump in JUMPS
            if jump.table == table and jump.target not in present
        ]
        lines += [f"-A {chain} {' '.join(args)}" for chain, args in rules]
        lines += [f"-X {chain}" for chain in stale]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def remove_kube_proxy_text(installed: Mapping[str, Iterable[str]]) -> str:
    """Text for `iptables-legacy-restore --noflush` that takes out exactly what
    `render_kube_proxy` installed (`installed`: `kube_proxy_chains` of the frontends last
    rendered): the entry jumps into those chains, then the chains, flushed and deleted.
    No other rule or chain is touched. A jump that is missing fails its table's commit,
    as iptables -D would; nothing of that table is changed then."""
    chains_by_table = _installed(installed)
    lines: list[str] = []
    for table in TABLES:
        chains = chains_by_table.get(table, frozenset())
        if not chains:
            continue
        ordered = [c for c in FIXED_CHAINS[table] if c in chains] + sorted(
            chains - set(FIXED_CHAINS[table])
        )
        lines.append(f"*{table}")
        lines += [f":{chain} - [0:0]" for chain in ordered]
        lines += [
            f"-D {jump.builtin} {jump.spec()}"
            for jump in JUMPS
            if jump.table == table and jump.target in chains
        ]
        lines += [f"-X {chain}" for chain in ordered]
        lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""
