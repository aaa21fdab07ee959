"""Live TCP flows in conntrack (listed by conntrack-tools), and deleting their entries
(through pyroute2).

The thin adapter behind `NodeKernel`'s conntrack calls: which flows a change revokes is
decided in `steer.node.datapath`. Acts on the calling thread's network namespace (the
`conntrack` child inherits it).

Why the `conntrack` program and not netlink from Python (pyroute2): measured on the
benchmark machine, pyroute2 decoded a dump at ~740 us per entry (1.5 s for 2,000 flows),
where `conntrack -L` lists and prints the same 2,000 in ~30 ms, spawn included. Every
dump walks the kernel's whole conntrack hash (262,144 buckets here, ~7 ms, shared by all
namespaces) however narrow its filter, so one listing per revocation pass, filtered here,
beats a filtered dump per touched address.
"""

from __future__ import annotations

import logging
import re
import socket
import subprocess
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import Conntrack
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

from steer.constants import MARK_ID_MASK, MARK_ID_SHIFT, MARK_VERDICT_MASK, MARK_VERDICT_SHIFT

log = logging.getLogger("steer.conntrack")
CONNTRACK = "conntrack"
TIMEOUT_S = 10.0
# Conntrack TCP states of connections that are over: nothing left to revoke.
_FINISHED_TCP_STATES = frozenset({"TIME_WAIT", "CLOSE"})
# One entry of `conntrack -L -p tcp` (default format): the original tuple comes first; the
# reply tuple, flags and the mark follow.
_ENTRY = re.compile(
    r"^tcp\s+6\s+\d+\s+(?P<state>[A-Z_]+)\s+"
    r"src=(?P<src>[\d.]+) dst=(?P<dst>[\d.]+) sport=(?P<sport>\d+) dport=(?P<dport>\d+)"
    # Counters appear here when nf_conntrack_acct is on.
    r"(?:\s+(?:packets|bytes)=\d+)*\s+(?:\[UNREPLIED\]\s+)?"
    r"src=(?P<rsrc>[\d.]+) dst=[\d.]+ sport=(?P<rsport>\d+)"
    r".*?\bmark=(?P<mark>\d+)",
    re.MULTILINE,
)


class ConntrackError(OSError):
    pass


def mark_decision(mark: int) -> tuple[int, int]:
    """The verdict (VERDICT_*, 0 for none) and the deciding policy's id that steer's rules
    saved in a conntrack mark (steer.render.iptables)."""
    return (mark & MARK_VERDICT_MASK) >> MARK_VERDICT_SHIFT, (mark & MARK_ID_MASK) >> MARK_ID_SHIFT


@dataclass(frozen=True)
class Flow:
    src: IPv4Address
    dst: IPv4Address
    sport: int
    dport: int
    verdict: int
    policy_id: int
    # Where the flow really goes, when conntrack translated it: the backend kube-proxy's
    # DNAT chose, or Envoy after a REDIRECT. None when untranslated.
    reached: tuple[IPv4Address, int] | None = None


def _conntrack(*args: str, stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(
            [CONNTRACK, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConntrackError(f"{CONNTRACK} {args[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise ConntrackError(f"{CONNTRACK} {args[0]} failed: {proc.stderr.strip()}")
    return proc.stdout


def parse(
    listing: str,
    *,
    marked: bool | None = None,
    sources: Collection[IPv4Address] | None = None,
    destinations: Collection[IPv4Address] | None = None,
) -> list[Flow]:
    """The live (not finished) TCP flows of a `conntrack -L -p tcp` listing: with `marked`,
    only those with (or without) a verdict mark; with `sources`/`destinations`, only those
    from or to these addresses. Filtered on the text first: a busy node lists thousands
    of flows, and a change is about a few."""
    by_address = sources is not None or destinations is not None
    src = {str(ip) for ip in sources or ()}
    dst = {str(ip) for ip in destinations or ()}
    found = []
    for m in _ENTRY.finditer(listing):
        mark = int(m["mark"])
        if (
            m["state"] in _FINISHED_TCP_STATES
            or (marked is not None and bool(mark & MARK_VERDICT_MASK) != marked)
            or (by_address and m["src"] not in src and m["dst"] not in dst and m["rsrc"] not in dst)
        ):
            continue
        translated = (m["rsrc"], m["rsport"]) != (m["dst"], m["dport"])
        found.append(
            Flow(
                IPv4Address(m["src"]),
                IPv4Address(m["dst"]),
                int(m["sport"]),
                int(m["dport"]),
                *mark_decision(mark),
                (IPv4Address(m["rsrc"]), int(m["rsport"])) if translated else None,
            )
        )
    return found


def flows(
    *,
    marked: bool = True,
    sources: Collection[IPv4Address] | None = None,
    destinations: Collection[IPv4Address] | None = None,
) -> list[Flow]:
    """Live TCP flows with a steer verdict mark (`marked`) or without one. Given `sources`
    and/or `destinations`, only flows from or to those addresses."""
    return parse(listing(), marked=marked, sources=sources, destinations=destinations)


def listing() -> str:
    """The conntrack table's TCP entries, as `conntrack -L -p tcp` prints them."""
    return _conntrack("-L", "-p", "tcp")


def delete(flows: Sequence[Flow]) -> list[Flow]:
    """Delete these flows' entries, each by its exact tuple (no table walk): each flow's
    next packet is then new and walks the rules again. Returns the flows deleted (a flow
    that ended meanwhile is not). (`conntrack -D` would walk the whole table per flow.)"""
    deleted: list[Flow] = []
    if not flows:
        return deleted
    with Conntrack() as ct:
        for flow in flows:
            match = NFCTAttrTuple(
                saddr=str(flow.src),
                daddr=str(flow.dst),
                sport=flow.sport,
                dport=flow.dport,
                proto=socket.IPPROTO_TCP,
            )
            try:
                ct.entry("del", tuple_orig=match)
            except (OSError, NetlinkError) as exc:  # raced with the flow's own end
                log.debug("conntrack delete %s: %s", flow, exc)
                continue
            deleted.append(flow)
    return deleted
