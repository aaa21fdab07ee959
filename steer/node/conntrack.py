"""Live TCP flows in conntrack, and deleting their entries, through pyroute2.

The thin adapter behind `NodeKernel`'s conntrack calls: which flows a change revokes is
decided in `steer.node.datapath`. Acts on the calling thread's network namespace.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
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
    # The conntrack entry as dumped, to delete it by; not part of the flow's identity.
    entry: object = field(default=None, compare=False, repr=False)


def _finished(entry: Any) -> bool:
    return entry.protoinfo is not None and entry.protoinfo.state_name() in _FINISHED_TCP_STATES


def _steer_entries(ct: Conntrack) -> Iterator[Flow]:
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
                entry,
            )
            yield flow


def flows() -> list[Flow]:
    """Live TCP flows that carry a steer verdict."""
    with Conntrack() as ct:
        return list(_steer_entries(ct))


def delete(flows: Sequence[Flow]) -> list[Flow]:
    """Delete these flows' entries: each flow's next packet is then new and walks the
    rules again. Returns the flows deleted (a flow that ended meanwhile is not)."""
    deleted: list[Flow] = []
    with Conntrack() as ct:
        for flow in flows:
            try:
                ct.delete(flow.entry)
            except (OSError, NetlinkError) as exc:  # raced with the flow's own end
                log.debug("conntrack delete %s: %s", flow, exc)
                continue
            deleted.append(flow)
    return deleted


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
