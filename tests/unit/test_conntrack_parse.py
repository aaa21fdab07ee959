"""Reading `conntrack -L -p tcp` listings: what the revocation pass gets to decide on."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from steer.constants import MARK_ID_SHIFT, MARK_VERDICT_SHIFT, VERDICT_DENY, VERDICT_L7
from steer.node import conntrack
from steer.node.conntrack import Flow, parse
from steer.node.kernel import HostKernel

L7_MARK = (VERDICT_L7 << MARK_VERDICT_SHIFT) | (42 << MARK_ID_SHIFT)
DENY_MARK = VERDICT_DENY << MARK_VERDICT_SHIFT
# As conntrack-tools 1.4.7 prints them: an assured flow, an unreplied one (its flags sit
# between the tuples), one that is over, and one whose mark carries no verdict bits.
LISTING = f"""\
tcp      6 431999 ESTABLISHED src=10.244.0.2 dst=10.244.0.3 sport=40000 dport=8080 \
src=10.244.0.3 dst=10.244.0.2 sport=8080 dport=40000 [ASSURED] mark={L7_MARK} use=1
tcp      6 119 SYN_SENT src=10.244.0.2 dst=10.244.0.4 sport=40001 dport=7000 [UNREPLIED] \
src=10.244.0.4 dst=10.244.0.2 sport=7000 dport=40001 mark={DENY_MARK} use=1
tcp      6 97 TIME_WAIT src=10.244.0.2 dst=10.244.0.3 sport=39999 dport=8080 \
src=10.244.0.3 dst=10.244.0.2 sport=8080 dport=39999 [ASSURED] mark={L7_MARK} use=1
tcp      6 431999 ESTABLISHED src=10.244.0.5 dst=10.244.0.3 sport=50000 dport=5432 \
src=10.244.0.3 dst=10.244.0.5 sport=5432 dport=50000 [ASSURED] mark=4095 use=1
"""
A, B, C, D = (IPv4Address(f"10.244.0.{i}") for i in (2, 3, 4, 5))


def test_live_flows_with_their_verdict_and_policy_id() -> None:
    assert parse(LISTING) == [
        Flow(A, B, 40000, 8080, VERDICT_L7, 42),
        Flow(A, C, 40001, 7000, VERDICT_DENY, 0),
        Flow(D, B, 50000, 5432, 0, 0),
    ]


def test_marked_or_unmarked_only() -> None:
    assert [f.sport for f in parse(LISTING, marked=True)] == [40000, 40001]
    assert [f.sport for f in parse(LISTING, marked=False)] == [50000]


def test_only_flows_from_or_to_the_given_addresses() -> None:
    assert [f.sport for f in parse(LISTING, sources=[D])] == [50000]
    assert [f.sport for f in parse(LISTING, destinations=[C])] == [40001]
    assert [f.sport for f in parse(LISTING, sources=[D], destinations=[C])] == [40001, 50000]
    assert parse(LISTING, sources=[], destinations=[]) == []


def test_other_protocols_and_noise_are_ignored() -> None:
    noise = (
        "udp      17 29 src=10.244.0.2 dst=10.96.0.10 sport=5353 dport=53 "
        "src=10.96.0.10 dst=10.244.0.2 sport=53 dport=5353 mark=0 use=1\n"
        "conntrack v1.4.7 (conntrack-tools): 1 flow entries have been shown.\n"
    )
    assert parse(noise) == []


def test_revocation_passes_of_one_change_share_one_listing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each listing walks the kernel's whole conntrack table: one per change, not per pass."""
    listings: list[str] = []

    def listing() -> str:
        listings.append(LISTING)
        return LISTING

    monkeypatch.setattr(conntrack, "listing", listing)
    kernel = HostKernel()
    with kernel.one_conntrack_listing():
        assert len(kernel.conntrack_flows(marked=True)) == 2
        assert len(kernel.conntrack_flows(marked=False, sources=[D])) == 1
    assert len(listings) == 1
    kernel.conntrack_flows()  # outside the block: a fresh listing each time
    kernel.conntrack_flows()
    assert len(listings) == 3
