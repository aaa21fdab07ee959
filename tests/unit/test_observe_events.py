"""Access log entries as `steer observe` events, the ring, and the filters (pure parts of
steer.node.observe; the real stream from Envoy is tested in tests/e2e/test_observe.py)."""

from __future__ import annotations

import socket
from dataclasses import replace
from typing import Any

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2
from google.protobuf import wrappers_pb2

from steer.constants import VERDICT_ALLOW, VERDICT_DENY, VERDICT_L7
from steer.metrics import AgentMetrics
from steer.node.bpfmaps import (
    FLOW_CLOSED,
    FLOW_REFUSED,
    VERDICT_IPTABLES,
    FlowEvent,
    ip_be,
    live_record,
)
from steer.node.observe import (
    EventRing,
    NodeView,
    Observability,
    Openers,
    Revoked,
    _AccessLogs,
    http_event,
    join_late,
    known_shape,
    matches,
    materialized,
    one_line,
)
from tests.samples import CLIENT, WEB, sample_enforcement

VIEW = NodeView({CLIENT.ip: (CLIENT, "ebpf"), WEB.ip: (WEB, "iptables")}, sample_enforcement())


def entry(
    path: str, status: int, details: str, *, service: str | None = None
) -> accesslog_pb2.HTTPAccessLogEntry:
    message = accesslog_pb2.HTTPAccessLogEntry()
    common = message.common_properties
    common.downstream_remote_address.CopyFrom(
        address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=CLIENT.ip, port_value=40000)
        )
    )
    common.downstream_local_address.CopyFrom(
        address_pb2.Address(
            socket_address=address_pb2.SocketAddress(address=WEB.ip, port_value=8080)
        )
    )
    if service is not None:
        common.metadata.filter_metadata["steer"].update({"service": service})
    message.request.request_method = base_pb2.RequestMethod.GET
    message.request.path = path
    message.response.response_code.CopyFrom(wrappers_pb2.UInt32Value(value=status))
    message.response.response_code_details = details
    return message


def test_a_denial_is_named_by_envoys_rbac_verdict() -> None:
    details = "rbac_access_denied_matched_policy[default/web:default/web/1/no-debug-port]"
    event = http_event(entry("/x", 403, details), VIEW)
    assert {k: event[k] for k in ("verdict", "policy", "rule", "status", "layer")} == {
        "verdict": "denied",
        "policy": "default/web",
        "rule": "no-debug-port",
        "status": 403,
        "layer": "http",
    }
    assert (event["pod"], event["namespace"], event["dataplane"]) == ("client", "default", "ebpf")
    assert (event["src"], event["dst"], event["dst_pod"]) == (
        f"{CLIENT.ip}:40000",
        f"{WEB.ip}:8080",
        "default/web",
    )
    assert (event["pid"], event["comm"]) == (None, None)


def test_a_default_deny_and_an_allow_are_named_by_the_decision_code() -> None:
    denied = http_event(entry("/admin", 403, "rbac_access_denied_matched_policy[none]"), VIEW)
    assert (denied["policy"], denied["rule"]) == ("default/web", "default-deny")
    allowed = http_event(entry("/public/a", 200, "via_upstream"), VIEW)
    assert (allowed["verdict"], allowed["policy"], allowed["rule"]) == (
        "allowed",
        "default/web",
        "public-read",
    )


def test_a_refusal_before_any_rule_names_envoys_reason() -> None:
    event = http_event(entry("/a%2Fb", 400, "path_normalization_failed"), VIEW)
    assert (event["verdict"], event["policy"], event["rule"]) == (
        "denied",
        None,
        "path_normalization_failed",
    )


def test_the_service_tag_and_unknown_addresses() -> None:
    event = http_event(entry("/public/a", 200, "via_upstream", service="default/web"), VIEW)
    assert event["service"] == "default/web"
    stranger = http_event(entry("/", 200, "via_upstream"), NodeView())
    assert (stranger["pod"], stranger["dataplane"], stranger["policy"]) == (None, None, None)


def test_the_ring_keeps_the_newest_and_counts_what_it_drops() -> None:
    ring = EventRing(size=3)
    for number in range(5):
        ring.add({"n": number})
    events, seq = ring.last(10)
    assert ([e["n"] for e in events], seq, ring.evicted) == ([2, 3, 4], 5, 2)
    ring.add({"n": 5})
    assert ring.after(seq, timeout=0.1) == ([{"n": 5}], 6)
    assert ring.after(6, timeout=0.01) == ([], 6)
    # A batch longer than the ring keeps its newest and counts the rest.
    ring.extend([{"n": n} for n in range(6, 11)])
    assert ([e["n"] for e in ring.last(10)[0]], ring.evicted) == ([8, 9, 10], 8)


def test_filters() -> None:
    event: dict[str, Any] = {
        "pod": "client",
        "namespace": "default",
        "dst": "10.244.0.3:8080",
        "status": 403,
        "verdict": "denied",
    }
    assert matches(event, {"pod": "client", "port": 8080, "status": 403, "verdict": None})
    assert matches(event, {"pod": "default/client"})
    assert not matches(event, {"pod": "other/client"})
    assert not matches(event, {"port": 80})
    assert not matches(event, {"verdict": "allowed"})


def record(
    verdict: int,
    kind: int,
    end_state: int = 0,
    src: str = CLIENT.ip,
    *,
    slot: int = 1,
    dialled: tuple[str, int] = ("10.96.0.10", 80),
) -> bytes:
    """A record as the kernel writes it, through the C layout's ctypes mirror: the agent
    reads it with FlowRecord, and the two layouts must agree field by field."""
    raw = FlowEvent()
    raw.flow.start_ns = 1_000_000_000
    raw.flow.tgid = 4242
    raw.flow.slot = slot
    raw.flow.dialled_ip = ip_be(dialled[0])
    raw.flow.dialled_port_be = socket.htons(dialled[1])
    raw.flow.dst_ip = ip_be(WEB.ip)
    raw.flow.dst_port_be = socket.htons(9090)
    raw.flow.verdict = verdict
    raw.flow.comm = b"curl"
    raw.end.kind = kind
    raw.end.end_state = end_state
    raw.end.at_ns = 1_250_000_000
    raw.end.src_ip = ip_be(src)
    raw.end.src_port = 40000
    raw.end.bytes_sent, raw.end.bytes_received = 120, 4096
    return bytes(raw)


# Its own caches: replace() would share VIEW's, and a shape worked out there has no slot.
SLOTTED = replace(VIEW, slots={1: CLIENT}, flow_shapes={}, shapes={}, explained={})


def event_of(data: bytes, view: NodeView) -> dict[str, Any]:
    """The event the agent makes of a record: its shape when read, the rest when `steer
    observe` first reads it."""
    return materialized((known_shape(view, data), data, 0.0))


def test_a_refused_connect_is_an_l4_denial_with_its_process_and_rule() -> None:
    event = event_of(record(VERDICT_DENY, FLOW_REFUSED), SLOTTED)
    assert {k: event[k] for k in ("layer", "verdict", "pod", "pid", "comm", "end")} == {
        "layer": "l4",
        "verdict": "denied",
        "pod": "client",
        "pid": 4242,
        "comm": "curl",
        "end": "refused",
    }
    assert (event["dst"], event["backend"], event["src"]) == (
        "10.96.0.10:80",
        f"{WEB.ip}:9090",
        CLIENT.ip,
    )
    assert (event["policy"], event["rule"]) == ("default/web", "no-debug-port")
    assert event["time"] == 1.0


def test_a_closed_flow_carries_its_bytes_duration_and_ending() -> None:
    event = event_of(record(VERDICT_ALLOW, FLOW_CLOSED, end_state=9), SLOTTED)
    assert (event["verdict"], event["end"], event["src"]) == (
        "allowed",
        "fin",
        f"{CLIENT.ip}:40000",
    )
    assert (event["bytes_sent"], event["bytes_received"], event["duration_ms"]) == (
        120,
        4096,
        250.0,
    )
    reset = event_of(record(VERDICT_L7, FLOW_CLOSED, end_state=1), SLOTTED)
    assert (reset["end"], reset["via_envoy"]) == ("reset", True)


def test_a_flow_still_open_is_an_event_without_an_end_or_bytes_yet() -> None:
    """What the agent makes of a flow still in steer_flows: the same pod, process, verdict
    and source as its close record will carry, how long it has been open, no end."""
    closed = FlowEvent.from_buffer_copy(record(VERDICT_ALLOW, FLOW_CLOSED, end_state=9))
    flow = bytes(closed.flow)
    # Before connect() chose the socket's address there is nothing to name it by.
    assert live_record(b"\x01" * 8, flow, 5_000_000_000) is None
    closed.flow.local_ip, closed.flow.local_port = ip_be(CLIENT.ip), 40000
    flow = bytes(closed.flow)
    data = live_record(b"\x01" * 8, flow, 6_000_000_000)
    assert data is not None
    live = event_of(data, SLOTTED)
    done = event_of(bytes(closed), SLOTTED)
    same = ("layer", "verdict", "pod", "pid", "comm", "src", "dst", "policy", "rule")
    assert {k: live[k] for k in same} == {k: done[k] for k in same}
    assert live["src"] == f"{CLIENT.ip}:40000"
    assert (live["end"], live["bytes_sent"], live["bytes_received"], live["duration_ms"]) == (
        None,
        None,
        None,
        5000.0,
    )
    assert " open 5000.0ms " in one_line({**live, "time": "2026-12-05T10:00:00+00:00"})
    # Revoked later, the flow was still open when this event was made: its close says so.
    revoked = Revoked()
    revoked.remember(live["src"], 1.0)
    join_late(live, Openers(), revoked)
    assert live["end"] is None


def test_an_http_event_names_the_process_that_opened_its_connection() -> None:
    openers = Openers(size=2)
    openers.remember(f"{CLIENT.ip}:40000", (4242, "curl"))
    event = http_event(entry("/public/a", 200, "via_upstream"), VIEW, openers)
    assert (event["pid"], event["comm"]) == (4242, "curl")
    # The table keeps the last connections only.
    openers.remember("10.244.0.9:1", (1, "a"))
    openers.remember("10.244.0.9:2", (2, "b"))
    assert openers.get(f"{CLIENT.ip}:40000") is None


def test_an_open_record_read_after_the_access_log_entry_still_names_the_process() -> None:
    # Envoy's access log and the kernel's ring buffer are read by different threads.
    openers = Openers()
    event = http_event(entry("/public/a", 200, "via_upstream"), VIEW, openers)
    assert event["pid"] is None
    openers.remember(event["src"], (4242, "curl"))
    join_late(event, openers, Revoked())
    assert (event["pid"], event["comm"]) == (4242, "curl")


def test_a_flow_a_policy_change_revoked_ends_revoked() -> None:
    revoked = Revoked()
    event = event_of(record(VERDICT_ALLOW, FLOW_CLOSED, end_state=1), SLOTTED)
    join_late(event, Openers(), revoked)
    assert event["end"] == "reset"
    revoked.remember(event["src"], 1.0)
    join_late(event, Openers(), revoked)
    assert event["end"] == "revoked"
    # A refused connect was never a flow to revoke.
    refused = event_of(record(VERDICT_DENY, FLOW_REFUSED), SLOTTED)
    revoked.remember(refused["src"], 1.0)
    join_late(refused, Openers(), revoked)
    assert refused["end"] == "refused"


def test_a_flow_of_a_pod_on_iptables_gets_its_verdict_from_the_rules_decision() -> None:
    # The observe program knows the opener, not the verdict: the pod is found by its
    # address, the verdict by the decision code the iptables rules were rendered from.
    data = record(  # reset in SYN_SENT
        VERDICT_IPTABLES, FLOW_CLOSED, end_state=2, slot=0, dialled=(WEB.ip, 9090)
    )
    event = event_of(data, VIEW)
    assert {k: event[k] for k in ("verdict", "pod", "pid", "comm", "end", "dataplane")} == {
        "verdict": "denied",
        "pod": "client",
        "pid": 4242,
        "comm": "curl",
        "end": "refused",
        "dataplane": "iptables",
    }
    assert (event["policy"], event["rule"], event["dst"]) == (
        "default/web",
        "no-debug-port",
        f"{WEB.ip}:9090",
    )


def test_a_batch_of_events_is_counted_by_layer_and_labels() -> None:
    metrics = AgentMetrics()
    allowed = {"layer": "http", "verdict": "allowed", "dataplane": "ebpf", "direction": "egress"}
    flow = {**allowed, "layer": "l4", "verdict": "audit", "policy": "default/db"}
    metrics.observe_events([allowed, allowed, flow])
    metrics.observe_events([allowed])
    labels = {"dataplane": "ebpf", "direction": "egress"}
    sample = metrics.registry.get_sample_value
    assert (
        sample("steer_http_requests_total", {**labels, "verdict": "allowed", "policy": "none"}) == 3
    )
    assert sample("steer_flows_total", {**labels, "verdict": "audit", "policy": "default/db"}) == 1


def test_a_flow_kept_as_read_becomes_the_same_event_once_and_keeps_what_is_joined_late() -> None:
    ring = EventRing()
    data = record(VERDICT_ALLOW, FLOW_CLOSED, end_state=1)
    ring.extend([(known_shape(SLOTTED, data), data, 0.0)])
    (event,), seq = ring.last(5)
    assert (event, seq) == (event_of(data, replace(SLOTTED, flow_shapes={})), 1)
    revoked = Revoked()
    revoked.remember(event["src"], 1.0)
    join_late(event, Openers(), revoked)
    # Made an event in place: later reads see the same event, revoked.
    assert ring.last(1)[0][0] is event
    assert ring.after(0, timeout=0)[0][0]["end"] == "revoked"


def test_flows_on_iptables_from_different_pods_do_not_share_a_shape() -> None:
    # On iptables the record names no slot: the source address is part of the shape.
    from_client = record(VERDICT_IPTABLES, FLOW_CLOSED)
    from_web = record(VERDICT_IPTABLES, FLOW_CLOSED, src=WEB.ip)
    assert known_shape(VIEW, from_client)["pod"] == "client"
    assert known_shape(VIEW, from_web)["pod"] == "web"


def test_flows_of_one_shape_are_counted_as_often_as_they_came() -> None:
    metrics = AgentMetrics()
    data = record(VERDICT_DENY, FLOW_REFUSED)
    shape = known_shape(SLOTTED, data)
    assert known_shape(SLOTTED, data) is shape
    metrics.observe_events([shape] * 3)
    labels = {"dataplane": "ebpf", "direction": "egress", "verdict": "denied"}
    sample = metrics.registry.get_sample_value
    assert sample("steer_flows_total", {**labels, "policy": "default/web"}) == 3


def test_access_log_entries_are_kept_as_read_counted_and_made_events_when_read() -> None:
    # The agent's path for Envoy's stream: one message, two requests of one shape and a
    # denial; the metrics count them before anything reads them, and the ring makes each
    # the same event `http_event` would.
    observability = Observability(on_events=(metrics := AgentMetrics()).observe_events)
    observability.view = replace(VIEW, shapes={})
    observability.openers.remember(f"{CLIENT.ip}:40000", (4242, "curl"))
    denial = "rbac_access_denied_matched_policy[default/web:default/web/1/no-debug-port]"
    message = als_pb2.StreamAccessLogsMessage()
    entries = [
        entry("/public/a", 200, "via_upstream"),
        entry("/public/a", 200, "via_upstream"),
        entry("/debug", 403, denial),
    ]
    message.http_logs.log_entry.extend(entries)
    servicer = _AccessLogs(observability._add_pending, lambda: observability.view, Openers())
    servicer.StreamAccessLogs(iter([message]), None)
    sample = metrics.registry.get_sample_value
    labels = {"dataplane": "ebpf", "direction": "egress", "policy": "default/web"}
    assert sample("steer_http_requests_total", {**labels, "verdict": "allowed"}) == 2
    assert sample("steer_http_requests_total", {**labels, "verdict": "denied"}) == 1
    events, seq = observability.ring.last(10)
    assert seq == 3
    assert events == [http_event(e, replace(VIEW, shapes={})) for e in entries]
    # The servicer's openers were empty: the process is joined when read, as for any event
    # whose open record came late.
    join_late(events[0], observability.openers, Revoked())
    assert (events[0]["pid"], events[0]["comm"]) == (4242, "curl")
    assert observability.ring.last(3)[0][0] is events[0]
