"""Events of flows into the node's pods from elsewhere (steer.node.observe), made from
what netfilter hands the agent (steer.node.nfnetlink): the parsers, fuzzed with
arbitrary bytes and round-tripped on well-formed messages, and the events, named by the
decision code under the view whose verdict matches the kernel's."""

from __future__ import annotations

import socket
import struct
from dataclasses import replace
from ipaddress import IPv4Address

from hypothesis import given
from hypothesis import strategies as st

from steer.constants import (
    ENVOY_INBOUND_PORT,
    LAB_GATEWAY_IP,
    MARK_VERDICT_SHIFT,
    VERDICT_ALLOW,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import resolve
from steer.node import nfnetlink
from steer.node.nfnetlink import (
    TCP_CLOSE,
    TCP_TIME_WAIT,
    ConntrackFlow,
    LoggedPacket,
    attributes,
    logged_packet,
    messages,
    parse_conntrack,
)
from steer.node.observe import NodeView, Revoked, inbound_flow_event, one_line, refused_event
from tests.samples import CLIENT, PODS, WEB, sample_enforcement
from tests.unit.test_fuzz_inputs import FUZZ

OFF_NODE = "10.99.0.2"
VIEW = NodeView({p.ip: (p, "iptables") for p in PODS}, sample_enforcement())
NO_POLICIES = NodeView({p.ip: (p, "iptables") for p in PODS}, resolve([], PODS))


def mark(verdict: int) -> int:
    return verdict << MARK_VERDICT_SHIFT


def packet(dst: str, port: int, src: str = OFF_NODE) -> LoggedPacket:
    return LoggedPacket(src, 40000, dst, port, mark(VERDICT_DENY))


def test_a_refused_packet_from_off_the_node_names_the_server_pod_and_its_rule() -> None:
    event = refused_event([VIEW], packet(WEB.ip, 9090), 1.0)
    assert event is not None
    assert (event["pod"], event["direction"], event["dataplane"]) == ("web", "ingress", "iptables")
    assert (event["verdict"], event["end"], event["pid"]) == ("denied", "refused", None)
    assert (event["policy"], event["rule"]) == ("default/web", "no-debug-port")
    assert event["src"] == f"{OFF_NODE}:40000"


def test_a_refusal_read_after_the_policy_went_is_named_by_the_view_that_refused_it() -> None:
    # Newest first: the policies are gone by the time the copy is read.
    event = refused_event([NO_POLICIES, VIEW], packet(WEB.ip, 8080), 1.0)
    assert event is not None
    assert (event["policy"], event["rule"]) == ("default/web", "default-deny")


def test_a_verdict_no_view_explains_names_the_marks_policy_and_no_rule() -> None:
    """The kernel refused what every view sends to Envoy (an L7 flow after a NodePort's
    translation fails closed): the policy whose id the mark carries, and no rule rather
    than the allowing one."""
    web_id = VIEW.enforcement.policy_ids["default/web"] if VIEW.enforcement else 0
    refused = LoggedPacket(CLIENT.ip, 40000, WEB.ip, 8080, mark(VERDICT_DENY) | web_id << 16)
    event = refused_event([NO_POLICIES, VIEW], refused, 1.0)
    assert event is not None and (event["policy"], event["rule"]) == ("default/web", None)
    unknown = refused_event([NO_POLICIES], refused, 1.0)
    assert unknown is not None and (unknown["policy"], unknown["rule"]) == (None, None)


def test_refusals_and_flows_that_reach_no_pod_of_the_node_are_not_events() -> None:
    assert refused_event([VIEW], packet(LAB_GATEWAY_IP, 22), 1.0) is None
    to_node = ConntrackFlow(1, OFF_NODE, 40000, LAB_GATEWAY_IP, 22, LAB_GATEWAY_IP, 22,
                            mark(VERDICT_ALLOW), TCP_TIME_WAIT)  # fmt: skip
    assert inbound_flow_event([VIEW], to_node, 0, Revoked()) is None


def test_a_direct_flow_let_in_carries_conntrack_counts_duration_and_end() -> None:
    flow = ConntrackFlow(7, OFF_NODE, 40000, CLIENT.ip, 7070, CLIENT.ip, 7070,
                         mark(VERDICT_ALLOW), TCP_TIME_WAIT, 300, 200, 1_000_000_000)  # fmt: skip
    event = inbound_flow_event([VIEW], flow, 1_250_000_000, Revoked())
    assert event is not None
    assert (event["pod"], event["direction"], event["verdict"]) == ("client", "ingress", "allowed")
    assert (event["via_envoy"], event["backend"], event["end"]) == (
        False,
        f"{CLIENT.ip}:7070",
        "fin",
    )
    assert (event["bytes_sent"], event["bytes_received"]) == (300, 200)
    assert (event["time"], event["duration_ms"]) == (1.0, 250.0)
    reset = inbound_flow_event([VIEW], replace(flow, state=TCP_CLOSE), 0, Revoked())
    assert reset is not None and reset["end"] == "reset"


def test_a_flow_whose_entry_went_while_live_ended_revoked_or_expired() -> None:
    established = 3
    live = ConntrackFlow(9, OFF_NODE, 40001, CLIENT.ip, 7070, CLIENT.ip, 7070, mark(VERDICT_ALLOW),
                         established, 300, 200, 1_000_000_000, 3_000_000_000)  # fmt: skip
    revoked = Revoked()
    expired = inbound_flow_event([VIEW], live, 9_000_000_000, revoked)
    assert expired is not None and (expired["end"], expired["duration_ms"]) == ("expired", 2000.0)
    revoked.remember(f"{OFF_NODE}:40001", 1.0)
    cut = inbound_flow_event([VIEW], live, 9_000_000_000, revoked)
    assert cut is not None and (cut["end"], cut["verdict"]) == ("revoked", "allowed")


def test_pods_steer_does_not_steer_are_no_events_subject() -> None:
    unsteered = NodeView({**VIEW.pods, CLIENT.ip: (CLIENT, None)}, VIEW.enforcement)
    into_unsteered = ConntrackFlow(10, OFF_NODE, 40002, CLIENT.ip, 7070, CLIENT.ip, 7070,
                                   mark(VERDICT_ALLOW), TCP_TIME_WAIT)  # fmt: skip
    assert inbound_flow_event([unsteered], into_unsteered, 0, Revoked()) is None
    from_unsteered = ConntrackFlow(11, CLIENT.ip, 40003, WEB.ip, 8080, WEB.ip, 8080,
                                   mark(VERDICT_ALLOW), TCP_TIME_WAIT)  # fmt: skip
    event = inbound_flow_event([unsteered], from_unsteered, 0, Revoked())
    assert event is not None and (event["pod"], event["direction"]) == ("web", "ingress")


def test_a_flow_redirected_to_envoy_names_the_pod_dialled() -> None:
    """Conntrack's reply tuple names Envoy's inbound port after a REDIRECT. A client pod
    of the node (one no hook records, on a node without BPF) is the event's subject."""
    flow = ConntrackFlow(8, CLIENT.ip, 40000, WEB.ip, 8080, LAB_GATEWAY_IP, ENVOY_INBOUND_PORT,
                         mark(VERDICT_L7), TCP_TIME_WAIT)  # fmt: skip
    event = inbound_flow_event([VIEW], flow, 0, Revoked())
    assert event is not None
    assert (event["pod"], event["direction"], event["via_envoy"]) == ("client", "egress", True)
    assert event["backend"] == f"{WEB.ip}:8080"
    # As its egress event would name it: the client's egress rule with HTTP matches.
    assert (event["policy"], event["rule"]) == ("default/client-egress", "no-internal-header")
    # No counters or start: a flow conntrack forgot before its lookup.
    assert event["bytes_sent"] is None and event["duration_ms"] is None


# --- parsing --------------------------------------------------------------------------------


def conntrack_message(flow: ConntrackFlow) -> bytes:
    """A conntrack update event as the kernel lays it out (checked against the kernel in
    tests/privileged/test_nfnetlink.py)."""

    def tuple_of(src: str, sport: int, dst: str, dport: int) -> bytes:
        return nfnetlink._nest(
            nfnetlink._TUPLE_IP,
            nfnetlink._attr(nfnetlink._IP_V4_SRC, IPv4Address(src).packed),
            nfnetlink._attr(nfnetlink._IP_V4_DST, IPv4Address(dst).packed),
        ) + nfnetlink._nest(
            nfnetlink._TUPLE_PROTO,
            nfnetlink._attr(nfnetlink._PROTO_NUM, bytes([socket.IPPROTO_TCP])),
            nfnetlink._attr(nfnetlink._PROTO_SRC_PORT, struct.pack("!H", sport)),
            nfnetlink._attr(nfnetlink._PROTO_DST_PORT, struct.pack("!H", dport)),
        )

    body = (
        nfnetlink._nest(
            nfnetlink.CTA_TUPLE_ORIG, tuple_of(flow.src, flow.sport, flow.dst, flow.dport)
        )
        + nfnetlink._nest(
            nfnetlink.CTA_TUPLE_REPLY,
            tuple_of(flow.reply_src, flow.reply_sport, flow.src, flow.sport),
        )
        + nfnetlink._attr(nfnetlink.CTA_ID, struct.pack("!I", flow.id))
        + nfnetlink._nest(
            nfnetlink.CTA_PROTOINFO,
            nfnetlink._nest(
                nfnetlink._PROTOINFO_TCP,
                nfnetlink._attr(nfnetlink._PROTOINFO_TCP_STATE, bytes([flow.state or 0])),
            ),
        )
        + nfnetlink._attr(nfnetlink.CTA_MARK, struct.pack("!I", flow.mark))
    )
    return nfnetlink._message(0x100, 0, 0, socket.AF_INET, body)


addresses = st.integers(0, 2**32 - 1).map(lambda n: str(IPv4Address(n)))
ports = st.integers(0, 65535)


@FUZZ
@given(
    st.builds(
        ConntrackFlow,
        id=st.integers(0, 2**32 - 1),
        src=addresses,
        sport=ports,
        dst=addresses,
        dport=ports,
        reply_src=addresses,
        reply_sport=ports,
        mark=st.integers(0, 2**32 - 1),
        state=st.integers(0, 255),
    )
)
def test_a_conntrack_event_reads_back_whole(flow: ConntrackFlow) -> None:
    data = conntrack_message(flow)
    ((kind, start, end),) = messages(data)
    assert kind == 0x100
    assert parse_conntrack(data, start, end) == flow
    # The socket filter's fixed offsets: the original source and the protocol.
    assert data[nfnetlink.EVENT_SRC_AT : nfnetlink.EVENT_SRC_AT + 4] == IPv4Address(flow.src).packed
    assert data[nfnetlink.EVENT_DST_AT : nfnetlink.EVENT_DST_AT + 4] == IPv4Address(flow.dst).packed
    reply_src = data[nfnetlink.EVENT_REPLY_SRC_AT : nfnetlink.EVENT_REPLY_SRC_AT + 4]
    assert reply_src == IPv4Address(flow.reply_src).packed
    assert data[nfnetlink.EVENT_PROTO_AT] == socket.IPPROTO_TCP


@FUZZ
@given(st.binary(max_size=512), st.integers(0, 600), st.integers(0, 600))
def test_the_parsers_never_raise_on_arbitrary_bytes(data: bytes, start: int, end: int) -> None:
    for _kind, begin, stop in messages(data):
        parse_conntrack(data, begin, stop)
        logged_packet(data, begin, stop)
    attributes(data, start, end)
    parse_conntrack(data, start, end)
    logged_packet(data, start, end)


# --- the socket filter, run by the kernel --------------------------------------------------


class FilteredSocket:
    """A NETLINK_USERSOCK socket with `program` attached, fed messages from another: the
    kernel runs the filter on each as it would on conntrack's events."""

    def __init__(self, program: list[nfnetlink.Instruction]) -> None:
        self.receiver = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
        self.sender = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_USERSOCK)
        self.receiver.bind((0, 0))
        self.sender.bind((0, 0))
        nfnetlink.attach_filter(self.receiver, program)
        self.receiver.setblocking(False)

    def takes(self, message: bytes) -> bool:
        self.sender.sendto(message, (self.receiver.getsockname()[0], 0))
        try:
            return self.receiver.recv(65536) == message
        except BlockingIOError:
            return False

    def close(self) -> None:
        self.receiver.close()
        self.sender.close()


NETLINK_USERSOCK = 2
STEERED, RECORDED, STRANGER = "10.244.0.3", "10.244.0.2", "10.99.0.2"


def closing(src: str, dst: str, reply_src: str, **changes: object) -> bytes:
    flow = ConntrackFlow(
        1, src, 40000, dst, 8080, reply_src, 8080, mark(VERDICT_ALLOW), TCP_TIME_WAIT
    )
    return conntrack_message(ConntrackFlow(**{**flow.__dict__, **changes}))


def test_the_filter_takes_ends_of_decided_flows_touching_a_steered_pod_not_recorded() -> None:
    program = nfnetlink.closes_filter(
        0x30000000, [IPv4Address(RECORDED)], [IPv4Address(STEERED), IPv4Address(RECORDED)]
    )
    assert nfnetlink.filter_fits(program)
    kernel = FilteredSocket(program)
    try:
        assert kernel.takes(closing(STRANGER, STEERED, STEERED))
        assert kernel.takes(closing(STRANGER, STEERED, STEERED, state=TCP_CLOSE))
        # A NodePort: dialled to the node, the reply from the backend.
        assert kernel.takes(closing(STRANGER, "10.87.0.2", STEERED))
        # Sent to Envoy: the reply from the node's inbound port.
        assert kernel.takes(closing(STRANGER, STEERED, LAB_GATEWAY_IP, mark=mark(VERDICT_L7)))
        assert not kernel.takes(closing(STRANGER, STEERED, STEERED, mark=0x4000))  # no verdict
        assert not kernel.takes(closing(RECORDED, STEERED, STEERED))
        assert not kernel.takes(closing(STRANGER, "10.244.0.9", "10.244.0.9"))  # unsteered
    finally:
        kernel.close()


def nflog_copy(src: str, *, payload: bool = True) -> bytes:
    """An NFLOG copy as the kernel lays it out: the packet header, the mark, then the
    packet (checked against the kernel in tests/privileged/test_nfnetlink.py)."""
    ip_header = bytes([0x45]) + bytes(8) + bytes([socket.IPPROTO_TCP]) + bytes(2)
    ip_header += IPv4Address(src).packed + IPv4Address(STEERED).packed
    body = nfnetlink._attr(1, b"\x08\x00\x03\x00") + nfnetlink._attr(
        nfnetlink._NFULA_MARK, struct.pack("!I", mark(VERDICT_ALLOW))
    )
    if payload:
        body += nfnetlink._attr(nfnetlink._NFULA_PAYLOAD, ip_header + struct.pack("!HH", 1, 2))
    return nfnetlink._message(0x400, 0, 0, socket.AF_INET, body)


def test_the_closing_filter_drops_copies_of_recorded_pods_packets() -> None:
    kernel = FilteredSocket(nfnetlink.closing_filter([IPv4Address(RECORDED)]))
    try:
        assert kernel.takes(nflog_copy(STRANGER))
        assert kernel.takes(nflog_copy(STEERED))
        assert not kernel.takes(nflog_copy(RECORDED))
        assert not kernel.takes(nflog_copy(STRANGER, payload=False))
    finally:
        kernel.close()
    nothing_recorded = FilteredSocket(nfnetlink.closing_filter([]))
    try:
        assert nothing_recorded.takes(nflog_copy(RECORDED))
    finally:
        nothing_recorded.close()


def test_a_filter_too_long_for_the_kernel_is_not_attempted() -> None:
    many = [IPv4Address(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}") for n in range(1000)]
    assert not nfnetlink.filter_fits(nfnetlink.closes_filter(0x30000000, many, many))
    assert nfnetlink.filter_fits(nfnetlink.closes_filter(0x30000000, many[:100], many[:100]))


def test_the_readable_line_of_a_flow_from_elsewhere_shows_who_connected_to_which_pod() -> None:
    event = refused_event([VIEW], packet(WEB.ip, 9090), 1.0)
    assert event is not None
    line = one_line({**event, "time": "2026-12-04T10:51:12.480+00:00"})
    assert line == (
        f"10:51:12.480 DENIED  l4 {OFF_NODE}:40000 -> default/web {WEB.ip}:9090 refused "
        "[iptables] default/web/no-debug-port"
    )
