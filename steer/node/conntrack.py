"""Live flows that carry a steer verdict, and their revocation, through pyroute2.

Acts on the calling thread's network namespace.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError

from steer.constants import (
    MARK_ID_MASK,
    MARK_ID_SHIFT,
    MARK_VERDICT_MASK,
    MARK_VERDICT_SHIFT,
    VERDICT_ALLOW,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import FlowVerdict

log = logging.getLogger("steer.conntrack")
# Conntrack TCP states of connections that are over: nothing left to revoke.
_FINISHED_TCP_STATES = frozenset({"TIME_WAIT", "CLOSE"})


@dataclass(frozen=True)
class Flow:
    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    verdict: int
    policy_id: int


def _finished(entry: Any) -> bool:
    return entry.protoinfo is not None and entry.protoinfo.state_name() in _FINISHED_TCP_STATES


def _steer_entries(ct: Conntrack) -> Iterator[tuple[Flow, object]]:
    """Live TCP flows that carry a steer verdict."""
    # One kernel-filtered dump per verdict: mark=0 would mean "no filter" to pyroute2.
    for verdict in (VERDICT_ALLOW, VERDICT_DENY, VERDICT_L7):
        for entry in ct.dump_entries(
            mark=verdict << MARK_VERDICT_SHIFT, mark_mask=MARK_VERDICT_MASK
        ):
            orig = entry.tuple_orig
            if orig.proto != socket.IPPROTO_TCP:
                continue
            if _finished(entry):
                continue
            mark = int(entry.mark or 0)
            flow = Flow(
                IPv4Address(orig.saddr),
                IPv4Address(orig.daddr),
                int(orig.sport),
                int(orig.dport),
                verdict,
                (mark & MARK_ID_MASK) >> MARK_ID_SHIFT,
            )
            yield flow, entry


def flows() -> list[Flow]:
    with Conntrack() as ct:
        return [flow for flow, _ in _steer_entries(ct)]


def revoke(decide: Callable[[Flow], FlowVerdict]) -> list[Flow]:
    """Delete the entries of every flow whose verdict `decide` now reaches differently.

    The flow's next packet then has no conntrack entry, is picked up as new and walks the
    new policy: a denied flow gets a reset, an allowed one carries on. Flows whose verdict
    stands are left alone, so a policy change disturbs exactly the flows it affects.
    """
    revoked: list[Flow] = []
    with Conntrack() as ct:
        for flow, entry in list(_steer_entries(ct)):
            if decide(flow).verdict == flow.verdict:
                continue
            try:
                ct.delete(entry)
            except (OSError, NetlinkError) as exc:  # raced with the flow's own end
                log.debug("conntrack delete %s: %s", flow, exc)
                continue
            revoked.append(flow)
    return revoked


def unmarked_flows(sources: Iterable[IPv4Address]) -> list[Flow]:
    """Live TCP flows from these addresses without a steer verdict: eBPF pods' direct
    flows, which connect4 decided and iptables let through unmarked."""
    wanted = set(sources)
    found = []
    with Conntrack() as ct:
        # mark=None: pyroute2 reads mark=0 as "no filter" anyway; filter here instead.
        for entry in ct.dump_entries():
            orig = entry.tuple_orig
            if orig.proto != socket.IPPROTO_TCP or int(entry.mark or 0) & MARK_VERDICT_MASK:
                continue
            if IPv4Address(orig.saddr) not in wanted or _finished(entry):
                continue
            found.append(
                Flow(
                    IPv4Address(orig.saddr),
                    IPv4Address(orig.daddr),
                    int(orig.sport),
                    int(orig.dport),
                    0,
                    0,
                )
            )
    return found
