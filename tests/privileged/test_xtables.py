"""The drift check's fingerprint of the iptables tables, against the real kernel: it must
change with every change the check looks for (a rule put ahead, a jump deleted, a chain
added, removed or renamed) and stay the same while only packet counters move, or the check would
either miss another tool's change or read the whole table every time."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator

import pytest

from steer.bench.render import scratch_netns
from steer.node.netns import run_in_netns
from steer.node.xtables import fingerprint
from steer.render.iptables import TABLES

pytestmark = pytest.mark.privileged


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns() as name:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name


def tables_in(netns: str, *, ipv6: bool = False) -> bytes:
    return run_in_netns(netns, lambda: fingerprint(TABLES if not ipv6 else ("filter",), ipv6=ipv6))


def iptables(netns: str, *args: str, binary: str = "iptables-legacy") -> None:
    subprocess.run(["ip", "netns", "exec", netns, binary, *args], check=True)


def udp_to_loopback(netns: str, count: int) -> None:
    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            for _ in range(count):
                sender.sendto(b"x", ("127.0.0.1", 9))

    run_in_netns(netns, send)


def test_counters_leave_it_and_every_change_the_drift_check_looks_for_changes_it(
    netns: str,
) -> None:
    iptables(netns, "-t", "nat", "-N", "STEER-TEST")
    iptables(netns, "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "STEER-TEST")
    clean = tables_in(netns)
    udp_to_loopback(netns, 50)
    iptables(netns, "-t", "filter", "-A", "OUTPUT", "-p", "udp", "-j", "ACCEPT")
    counted = tables_in(netns)
    udp_to_loopback(netns, 50)
    listing = subprocess.run(
        ["ip", "netns", "exec", netns, "iptables-legacy", "-L", "OUTPUT", "-v", "-x", "-n"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    accept = listing.splitlines()[-1]  # the rule; the header says the policy, ACCEPT too
    assert int(accept.split()[0]) == 50, listing  # the rule's counters did move
    assert tables_in(netns) == counted != clean

    # Another tool's rule ahead of the jump: the same rules, in another order.
    foreign = ["-p", "udp", "--dport", "53", "-j", "RETURN"]
    iptables(netns, "-t", "nat", "-A", "OUTPUT", *foreign)
    behind = tables_in(netns)
    iptables(netns, "-t", "nat", "-D", "OUTPUT", *foreign)
    iptables(netns, "-t", "nat", "-I", "OUTPUT", "1", *foreign)
    ahead = tables_in(netns)
    assert len({behind, ahead, counted}) == 3
    iptables(netns, "-t", "nat", "-D", "OUTPUT", *foreign)
    assert tables_in(netns) == counted

    # A chain renamed in place: the same layout, the same jump (by offset), another name.
    iptables(netns, "-t", "nat", "-E", "STEER-TEST", "STEER-TESU")
    assert tables_in(netns) != counted
    iptables(netns, "-t", "nat", "-E", "STEER-TESU", "STEER-TEST")
    assert tables_in(netns) == counted

    # The jump deleted, then the chain.
    iptables(netns, "-t", "nat", "-D", "OUTPUT", "-p", "udp", "-j", "STEER-TEST")
    unjumped = tables_in(netns)
    iptables(netns, "-t", "nat", "-X", "STEER-TEST")
    assert len({unjumped, tables_in(netns), counted}) == 3


def test_the_ipv6_tables_have_one_too(netns: str) -> None:
    before = tables_in(netns, ipv6=True)
    iptables(netns, "-A", "INPUT", "-p", "tcp", "-j", "REJECT", binary="ip6tables-legacy")
    assert tables_in(netns, ipv6=True) != before
