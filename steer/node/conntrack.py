"""Live TCP flows in conntrack, and deleting their entries, through pyroute2.

The thin adapter behind `NodeKernel`'s conntrack calls: which flows a change revokes is
decided in `steer.node.datapath`. Acts on the calling thread's network namespace.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

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


def _flow(entry: Any) -> Flow:
    orig = entry.tuple_orig
    mark = int(entry.mark or 0)
    return Flow(
        IPv4Address(orig.saddr),
        IPv4Address(orig.daddr),
        int(orig.sport),
        int(orig.dport),
        (mark & MARK_VERDICT_MASK) >> MARK_VERDICT_SHIFT,
        (mark & MARK_ID_MASK) >> MARK_ID_SHIFT,
        entry,
    )


def _live_tcp(entries: Iterable[Any], marked: bool) -> Iterator[Flow]:
    for entry in entries:
        if entry.tuple_orig.proto != socket.IPPROTO_TCP or _finished(entry):
            continue
        if bool(int(entry.mark or 0) & MARK_VERDICT_MASK) == marked:
            yield _flow(entry)


# Past this many addresses one full dump is cheaper than a filtered dump per address (each
# filtered dump still walks the whole table, in the kernel).
FILTERED_DUMPS_MAX = 64


def flows(
    *,
    marked: bool = True,
    sources: Collection[IPv4Address] | None = None,
    destinations: Collection[IPv4Address] | None = None,
) -> list[Flow]:
    """Live TCP flows with a steer verdict mark (`marked`) or without one. Given `sources`
    and/or `destinations`, only flows from or to those addresses, filtered in the kernel
    (CTA_FILTER on the original tuple): after a policy change the agent reads the flows
    of the pods the change touched, not the whole table."""
    with Conntrack() as ct:
        if sources is None and destinations is None:
            if marked:
                # One kernel-filtered dump per verdict: mark=0 means "no filter" to pyroute2.
                dumps: Iterable[Any] = (
                    entry
                    for verdict in (VERDICT_ALLOW, VERDICT_DENY, VERDICT_L7)
                    for entry in ct.dump_entries(
                        mark=verdict << MARK_VERDICT_SHIFT, mark_mask=MARK_VERDICT_MASK
                    )
                )
                return list(_live_tcp(dumps, marked=True))
            return list(_live_tcp(ct.dump_entries(), marked=False))
        wanted = [("saddr", ip) for ip in sources or ()]
        wanted += [("daddr", ip) for ip in destinations or ()]
        if len(wanted) > FILTERED_DUMPS_MAX:
            src, dst = set(sources or ()), set(destinations or ())
            return [
                f
                for f in _live_tcp(ct.dump_entries(), marked=marked)
                if f.src in src or f.dst in dst
            ]
        found: dict[tuple[IPv4Address, int, IPv4Address, int], Flow] = {}
        for field_name, ip in wanted:
            match = NFCTAttrTuple(proto=socket.IPPROTO_TCP, **{field_name: str(ip)})
            for flow in _live_tcp(ct.dump_entries(tuple_orig=match), marked=marked):
                found[(flow.src, flow.sport, flow.dst, flow.dport)] = flow
        return list(found.values())


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
