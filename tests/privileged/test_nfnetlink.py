"""The agent's netfilter readers against the real kernel, in a namespace of the test's own:
conntrack's destroy events, with counters and times, taken by the socket filter only for
flows with a verdict in their mark, a steered end and a source no pod hook records, and
brought on by a sweep once the flow's TIME_WAIT is over; NFLOG copies of refused
packets, with every lost copy counted; and copies of the client's FIN of a flow steer let
through, by steer's own rule, with the flow's entry read by its tuple at once; and the
flows open now, listed by the verdict in their mark."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from ipaddress import IPv4Address

import pytest

from steer.bench.render import scratch_netns
from steer.constants import (
    MARK_VERDICT_MASK,
    NFLOG_CLOSE_GROUP,
    NFLOG_GROUP,
    VERDICT_ALLOW,
    VERDICT_L7,
)
from steer.node.netns import run_in_netns
from steer.node.nfnetlink import (
    CONNTRACK_NEW_GROUP,
    TCP_ESTABLISHED,
    TCP_TIME_WAIT,
    ConntrackEvents,
    ConntrackFlow,
    NflogGroup,
)
from steer.render.iptables import LOG_CLOSE

pytestmark = pytest.mark.privileged

MARKED, UNMARKED, REFUSED = 9999, 9997, 9998
ALLOW_MARK = 0x10000000
PAYLOAD = b"x" * 100


@pytest.fixture
def netns() -> Iterator[str]:
    with scratch_netns() as name:
        run(name, "ip", "link", "set", "lo", "up")
        run(name, "ip", "addr", "add", "127.0.0.2/8", "dev", "lo")
        run(name, "sysctl", "-qw", "net.netfilter.nf_conntrack_acct=1")
        run(name, "sysctl", "-qw", "net.netfilter.nf_conntrack_timestamp=1")
        # Conntrack forgets a closed flow after a second, not two minutes.
        run(name, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=1")
        yield name


def run(netns: str, *argv: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *argv], check=True, capture_output=True)


def exchange(netns: str, port: int, source: str = "127.0.0.1") -> int:
    """One short flow over loopback, closed by both sides with FINs; its source port."""

    def flow() -> int:
        with socket.socket() as server:
            server.bind(("127.0.0.1", port))
            server.listen()
            with socket.socket() as client:
                client.bind((source, 0))
                client.connect(("127.0.0.1", port))
                accepted, _ = server.accept()
                with accepted:
                    client.sendall(PAYLOAD)
                    assert accepted.recv(len(PAYLOAD), socket.MSG_WAITALL) == PAYLOAD
                    accepted.sendall(PAYLOAD[:50])
                    assert client.recv(50, socket.MSG_WAITALL) == PAYLOAD[:50]
                    sport: int = client.getsockname()[1]
                    client.shutdown(socket.SHUT_WR)
                    accepted.recv(1)
            return sport

    return run_in_netns(netns, flow)


def refused_connects(netns: str, count: int) -> None:
    def connect() -> None:
        for _ in range(count):
            with (
                socket.socket() as client,
                pytest.raises(ConnectionRefusedError),
            ):
                client.connect(("127.0.0.1", REFUSED))

    run_in_netns(netns, connect)


def bound_socket() -> socket.socket:
    client = socket.socket()
    client.bind(("127.0.0.1", 0))
    return client


def final_connect(netns: str, client: socket.socket) -> None:
    """A refused connect from a socket bound beforehand (its port known); once only."""
    if client.fileno() == -1:
        return
    with client, pytest.raises(ConnectionRefusedError):
        client.connect(("127.0.0.1", REFUSED))


def read_all(closes: ConntrackEvents, timeout: float) -> list[ConntrackFlow]:
    """What the events say once the flows' TIME_WAIT is over and a sweep reaped them."""
    time.sleep(1.2)
    closes.sweep()
    closes.events.settimeout(timeout)
    flows: list[ConntrackFlow] = []
    while True:
        try:
            found, overran = closes.read()
        except TimeoutError:
            return flows
        assert not overran
        flows += found


def test_a_flow_is_read_once_when_conntrack_lets_go_with_bytes_and_times(netns: str) -> None:
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport",
        str(MARKED), "-j", "CONNMARK", "--set-mark", hex(ALLOW_MARK))  # fmt: skip
    closes = run_in_netns(netns, lambda: ConntrackEvents(MARK_VERDICT_MASK))
    try:
        # Until it is told which pods are steered, it takes nothing.
        exchange(netns, MARKED)
        assert read_all(closes, 0.5) == []
        assert closes.filter_addresses([], [IPv4Address("127.0.0.1")])
        sport = exchange(netns, MARKED)
        (flow,) = read_all(closes, 1.0)
        assert (flow.src, flow.sport, flow.dst, flow.dport) == ("127.0.0.1", sport, "127.0.0.1",
                                                                 MARKED)  # fmt: skip
        assert (flow.reply_src, flow.reply_sport, flow.mark) == ("127.0.0.1", MARKED, ALLOW_MARK)
        assert flow.state == TCP_TIME_WAIT
        # IP packets: the payload, plus 40 bytes or more of headers a packet.
        assert flow.bytes_orig is not None and flow.bytes_orig > len(PAYLOAD) + 3 * 40
        assert flow.bytes_reply is not None and flow.bytes_reply > 50 + 3 * 40
        # Stopped when TIME_WAIT ran out (about a second after the close), not when reaped.
        assert flow.start_ns is not None and flow.stop_ns is not None
        assert 0.5e9 < flow.stop_ns - flow.start_ns < 5e9
    finally:
        closes.close()


def test_the_kernel_drops_flows_without_a_verdict_recorded_or_between_unsteered_ends(
    netns: str,
) -> None:
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport",
        str(MARKED), "-j", "CONNMARK", "--set-mark", hex(ALLOW_MARK))  # fmt: skip
    closes = run_in_netns(netns, lambda: ConntrackEvents(MARK_VERDICT_MASK))
    try:
        # 127.0.0.1 plays the steered pod (the server), 127.0.0.2 a recorded one.
        local, recorded = IPv4Address("127.0.0.1"), IPv4Address("127.0.0.2")
        assert closes.filter_addresses([recorded], [local, recorded])
        exchange(netns, UNMARKED)
        exchange(netns, MARKED, source="127.0.0.2")
        kept = exchange(netns, MARKED)
        assert [f.sport for f in read_all(closes, 1.0)] == [kept]
        # Nothing recorded: the same flow is taken.
        assert closes.filter_addresses([], [local])
        again = exchange(netns, MARKED, source="127.0.0.2")
        assert [(f.src, f.sport) for f in read_all(closes, 1.0)] == [("127.0.0.2", again)]
        # No end steered: none of steer's.
        assert closes.filter_addresses([], [IPv4Address("10.1.1.1")])
        exchange(netns, MARKED)
        assert read_all(closes, 1.0) == []
    finally:
        closes.close()


def test_refused_packets_are_copied_and_every_lost_copy_is_counted(netns: str) -> None:
    run(netns, "iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--dport", str(REFUSED),
        "-j", "NFLOG", "--nflog-group", str(NFLOG_GROUP))  # fmt: skip
    run(netns, "iptables-legacy", "-A", "OUTPUT", "-p", "tcp", "--dport", str(REFUSED),
        "-j", "REJECT", "--reject-with", "tcp-reset")  # fmt: skip
    # A receive buffer of a few kilobytes: most batches of copies find it full.
    group = run_in_netns(netns, lambda: NflogGroup(NFLOG_GROUP, buffer_bytes=4096))
    try:
        group.sock.settimeout(1.0)
        refused_connects(netns, 1)
        (first,) = group.read()
        assert (first.src, first.dst, first.dport) == ("127.0.0.1", "127.0.0.1", REFUSED)
        refused_connects(netns, 600)
        # One more once the socket has room again (nothing is read meanwhile): its number
        # shows what went missing. Read until it is in, however late under load.
        final = run_in_netns(netns, bound_socket)
        read, final_port = 0, final.getsockname()[1]
        while True:
            try:
                batch = group.read()
            except TimeoutError:
                final_connect(netns, final)
                continue
            read += len(batch)
            if any(p.sport == final_port for p in batch):
                break
        assert group.lost > 0, "the test meant to overrun the socket and did not"
        assert read + group.lost == 601
    finally:
        group.close()


def test_a_clients_fin_is_copied_once_and_its_entry_read_by_tuple_while_in_time_wait(
    netns: str,
) -> None:
    """steer's own rule, in PREROUTING: only the FIN of the client (the flow's original
    direction) of a flow with a verdict, and none from a recorded source once the socket
    filter drops them. The entry read by that tuple is the one whose destroy event comes
    later: the same id, so the agent can drop that event."""
    run(netns, "sysctl", "-qw", "net.netfilter.nf_conntrack_tcp_timeout_time_wait=3")
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport",
        str(MARKED), "-j", "CONNMARK", "--set-mark", hex(ALLOW_MARK))  # fmt: skip
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "PREROUTING", *LOG_CLOSE)
    closes = run_in_netns(netns, lambda: ConntrackEvents(MARK_VERDICT_MASK))
    group = run_in_netns(netns, lambda: NflogGroup(NFLOG_CLOSE_GROUP, batch=1))
    try:
        group.sock.settimeout(1.0)
        assert group.drop_sources([IPv4Address("127.0.0.2")])
        assert closes.filter_addresses([], [IPv4Address("127.0.0.1")])
        unmarked = exchange(netns, UNMARKED)
        exchange(netns, MARKED, source="127.0.0.2")
        sport = exchange(netns, MARKED)
        (copy,) = group.read()
        assert (copy.src, copy.sport, copy.dst, copy.dport) == ("127.0.0.1", sport, "127.0.0.1",
                                                                 MARKED)  # fmt: skip
        with pytest.raises(TimeoutError):
            group.read()
        flow = closes.get(copy.src, copy.sport, copy.dst, copy.dport)
        assert flow is not None and flow.id != 0
        assert (flow.state, flow.mark, flow.reply_sport) == (TCP_TIME_WAIT, ALLOW_MARK, MARKED)
        assert flow.bytes_orig is not None and flow.bytes_orig > len(PAYLOAD) + 3 * 40
        assert flow.start_ns is not None and flow.stop_ns is None
        # Found by its tuple too, but with no verdict in its mark: not steer's to tell.
        other = closes.get("127.0.0.1", unmarked, "127.0.0.1", UNMARKED)
        assert other is not None and (other.mark, other.state) == (0, TCP_TIME_WAIT)
        assert closes.get("127.0.0.1", unmarked, "127.0.0.1", MARKED) is None
        deadline = time.monotonic() + 15
        destroyed: list[ConntrackFlow] = []
        while not any(f.sport == sport for f in destroyed):
            assert time.monotonic() < deadline, "the entry's destroy event never came"
            destroyed += read_all(closes, 0.5)
        assert [f.id for f in destroyed if f.sport == sport] == [flow.id]
        assert closes.get(copy.src, copy.sport, copy.dst, copy.dport) is None
    finally:
        group.close()
        closes.close()


def test_new_flows_are_read_through_the_same_filter_with_their_verdict(netns: str) -> None:
    """Conntrack's event of a new flow comes once the flow's first packet is through, with
    the mark steer's rules set on it; the filter drops the rest as for destroy events."""
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport",
        str(MARKED), "-j", "CONNMARK", "--set-mark", hex(ALLOW_MARK))  # fmt: skip
    opens = run_in_netns(
        netns, lambda: ConntrackEvents(MARK_VERDICT_MASK, group=CONNTRACK_NEW_GROUP)
    )
    try:
        assert opens.filter_addresses([IPv4Address("127.0.0.2")], [IPv4Address("127.0.0.1")])
        exchange(netns, UNMARKED)
        exchange(netns, MARKED, source="127.0.0.2")
        sport = exchange(netns, MARKED)
        opens.events.settimeout(1.0)
        (flow,) = opens.read()[0]
        assert (flow.src, flow.sport, flow.dport, flow.mark) == ("127.0.0.1", sport, MARKED,
                                                                  ALLOW_MARK)  # fmt: skip
        assert flow.id != 0
        with pytest.raises(TimeoutError):
            opens.read()
    finally:
        opens.close()


def test_flows_open_now_are_listed_by_their_verdict(netns: str) -> None:
    """What a restarted agent reads to find the flows let in before it: a dump of the
    table, filtered by the kernel on the verdict in the mark; each entry as it is now."""
    run(netns, "iptables-legacy", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport",
        str(MARKED), "-j", "CONNMARK", "--set-mark", hex(ALLOW_MARK))  # fmt: skip

    def open_flow(port: int) -> tuple[socket.socket, socket.socket, socket.socket]:
        server = socket.create_server(("127.0.0.1", port))
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        client.sendall(PAYLOAD)
        assert accepted.recv(len(PAYLOAD), socket.MSG_WAITALL) == PAYLOAD
        return server, client, accepted

    closes = run_in_netns(netns, lambda: ConntrackEvents(MARK_VERDICT_MASK))
    held = [*run_in_netns(netns, lambda: open_flow(MARKED))]
    held += run_in_netns(netns, lambda: open_flow(UNMARKED))
    try:
        sport = held[1].getsockname()[1]
        (flow,) = closes.marked([VERDICT_ALLOW, VERDICT_L7])
        assert (flow.src, flow.sport, flow.dst, flow.dport) == ("127.0.0.1", sport, "127.0.0.1",
                                                                 MARKED)  # fmt: skip
        assert (flow.state, flow.mark) == (TCP_ESTABLISHED, ALLOW_MARK)
        assert flow.id != 0 and flow.start_ns is not None
        assert flow.bytes_orig is not None and flow.bytes_orig > len(PAYLOAD)
        # Other verdicts find nothing here; the unmarked flow is no verdict's.
        assert list(closes.marked([VERDICT_L7])) == []
        # The same entry as a lookup by its tuple finds.
        same = closes.get(flow.src, flow.sport, flow.dst, flow.dport)
        assert same is not None and same.id == flow.id
    finally:
        for sock in held:
            sock.close()
        closes.close()
