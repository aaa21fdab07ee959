"""How a flow dialled to a Service is decided: always as the flow to the backend it reaches.

Pure. The eBPF datapath chooses the backend at connect() and decides that flow, nothing
else. The iptables datapath faces kube-proxy, which chooses the backend by DNAT in
`nat PREROUTING`, the same hook where steer must REDIRECT an L7 flow to Envoy; only one
of the two can act on a flow. So (docs/architecture.md, "Services"):

* a flow to a Service port whose backends can need Envoy (`envoy_frontends`) from a pod
  steered by iptables is sent to Envoy before kube-proxy sees it, and Envoy learns the
  backend when it asks for the original destination: the getsockopt hook chooses it
  there, and Envoy then enforces exactly the backend's HTTP rules;
* every other flow to a Service is left to kube-proxy and decided after its DNAT, on the
  backend it chose (an L7 verdict found only then cannot reach Envoy any more and is
  refused: fail closed).

`expected_verdict` is what revocation compares a live flow's verdict mark with.

Envoy learns which Service a flow was dialled to from the port it arrives on: each
Service port in `envoy_frontends` gets a listener of its own (`service_listener_ports`),
which both datapaths send that Service's flows to, and which tags every request on it
with the Service for RBAC and the access log. The agent and the control plane compute
the same ports from the same Services and policies, each on its own.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from steer.constants import (
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    ENVOY_SERVICE_PORTS,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import Enforcement, ResolvedRule, decide_flow
from steer.model.service import Frontend

FrontendKey = tuple[IPv4Address, int]
# A Service port: ("namespace/name", the port's name). Its ClusterIP and NodePort
# frontends share one Envoy listener.
ServicePortKey = tuple[str, str]


def is_envoy_port(port: int) -> bool:
    """A port of Envoy's that steer REDIRECTs to: a flow that reached it went to Envoy."""
    return port in (ENVOY_OUTBOUND_PORT, ENVOY_INBOUND_PORT) or port in ENVOY_SERVICE_PORTS


def _covers(rule: ResolvedRule, peer: IPv4Address | None, port: int) -> bool:
    if rule.ports is not None and not any(lo <= port <= hi for lo, hi in rule.ports):
        return False
    if peer is None or rule.peers is None:
        return True
    return any(peer in net for net in rule.peers)


def envoy_frontends(
    enforcement: Enforcement, frontends: Iterable[Frontend]
) -> frozenset[FrontendKey]:
    """The frontends a flow to which may need Envoy at its backend: some backend's ingress
    has an HTTP rule at its port, or some pod's egress has an HTTP rule that covers a
    backend at its port. Source-independent on purpose (a per-source answer would cost a
    rule per pod and frontend): a source whose flow to the chosen backend would be plain
    L4 gets from Envoy the same answer RBAC renders for it (allowed, or 403 where it is
    denied), so the over-approximation never loosens a verdict."""
    egress_l7 = [rule for side in enforcement.egress.values() for rule in side.by_kind(VERDICT_L7)]
    found = set()
    for frontend in frontends:
        for backend in frontend.backends:
            ingress = enforcement.ingress.get(backend.ip)
            if (
                ingress is not None
                and any(_covers(r, None, backend.port) for r in ingress.by_kind(VERDICT_L7))
            ) or any(_covers(r, backend.ip, backend.port) for r in egress_l7):
                found.add((frontend.ip, frontend.port))
                break
    return frozenset(found)


def expected_verdict(
    enforcement: Enforcement,
    frontends: Mapping[FrontendKey, Frontend],
    via_envoy: frozenset[FrontendKey],
    flow: tuple[IPv4Address, IPv4Address, int],
    *,
    reached: tuple[IPv4Address, int] | None,
) -> int:
    """The verdict a live flow src -> dst:port must carry under `enforcement`; `reached`
    is where conntrack says it went (the backend after kube-proxy's DNAT, Envoy after a
    REDIRECT), None if untranslated. A flow whose mark differs is revoked: its next packet
    is decided afresh. `flow`: (source, destination, destination port) as dialled."""
    src, dst, port = flow
    if reached is None:
        return decide_flow(enforcement, src, dst, port).verdict
    frontend = frontends.get((dst, port))
    redirected = is_envoy_port(reached[1]) and not (
        frontend is not None and _is_backend(frontend, reached)
    )
    if redirected:
        if frontend is None:
            return decide_flow(enforcement, src, dst, port).verdict  # an L7 flow, as ever
        # Sent to Envoy before kube-proxy, which decides each request; once the Service
        # no longer needs Envoy, the flow is revoked and decided after kube-proxy instead.
        return VERDICT_L7 if (dst, port) in via_envoy else 0
    # Translated by someone else's DNAT (kube-proxy's, for a Service steer may not know):
    # decided on the address it reached (a backend that has since left its Service is
    # still the flow's peer, and the policy still applies), as STEER-DNAT decides it.
    verdict = decide_flow(enforcement, src, reached[0], reached[1]).verdict
    return VERDICT_DENY if verdict == VERDICT_L7 else verdict


def _is_backend(frontend: Frontend, reached: tuple[IPv4Address, int]) -> bool:
    return any((b.ip, b.port) == reached for b in frontend.backends)


@dataclass(frozen=True)
class ServiceListener:
    """Envoy's listener for one Service port: the flows dialled to it arrive here."""

    service: str  # namespace/name
    port_name: str
    envoy_port: int
    # Where its flows may go: a restored destination outside them matches no filter chain
    # and is closed, so a flow can never be tagged with a Service it did not reach.
    backends: tuple[IPv4Address, ...]

    @property
    def name(self) -> str:
        return f"steer-svc-{self.envoy_port}"


def service_listener_ports(
    keys: Iterable[ServicePortKey], ports: Sequence[int] = ENVOY_SERVICE_PORTS
) -> dict[ServicePortKey, int]:
    """Envoy's port for each Service port, from the set of keys alone, so that the agent
    and the control plane agree without talking. Each key hashes to its own port, taking
    the next free one on a collision (keys in sorted order), so a Service coming or going
    moves no other Service's port unless it collided with it. Keys beyond the range get no
    port: their flows go to Envoy's shared listener, where no `services` rule matches."""
    taken: dict[int, ServicePortKey] = {}
    for key in sorted(set(keys)):
        if len(taken) == len(ports):
            break
        index = zlib.crc32(f"{key[0]}:{key[1]}".encode()) % len(ports)
        while ports[index] in taken:
            index = (index + 1) % len(ports)
        taken[ports[index]] = key
    return {key: port for port, key in taken.items()}


def service_listeners(
    enforcement: Enforcement, frontends: Sequence[Frontend]
) -> dict[ServicePortKey, ServiceListener]:
    """The Service listeners of a node: one per Service port some frontend of which is in
    `envoy_frontends`."""
    via = envoy_frontends(enforcement, frontends)
    backends: dict[ServicePortKey, set[IPv4Address]] = {}
    for frontend in frontends:
        if (frontend.ip, frontend.port) in via:
            found = backends.setdefault((frontend.service, frontend.port_name), set())
            found.update(b.ip for b in frontend.backends)
    return {
        key: ServiceListener(key[0], key[1], port, tuple(sorted(backends[key])))
        for key, port in service_listener_ports(backends).items()
    }
