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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address

from steer.constants import ENVOY_INBOUND_PORT, ENVOY_OUTBOUND_PORT, VERDICT_DENY, VERDICT_L7
from steer.model.enforce import Enforcement, ResolvedRule, decide_flow
from steer.model.service import Frontend

FrontendKey = tuple[IPv4Address, int]
ENVOY_PORTS = (ENVOY_OUTBOUND_PORT, ENVOY_INBOUND_PORT)


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
    redirected = reached[1] in ENVOY_PORTS and not (
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
