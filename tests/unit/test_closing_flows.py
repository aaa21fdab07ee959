"""The bookkeeping between a copy of a client's FIN or RST and its flow's event
(steer.node.observe.ClosingFlows): when the entry is read, what a read says, and which
destroy events tell of flows already told; and between conntrack's event of a new flow
and its event while open (LongFlows). The kernel's side (the copies, the lookups by
tuple, the ids) is checked in tests/privileged/test_nfnetlink.py and
tests/e2e/test_inbound.py."""

from __future__ import annotations

from dataclasses import replace

from steer.constants import MARK_VERDICT_MASK, MARK_VERDICT_SHIFT, VERDICT_ALLOW
from steer.node.nfnetlink import TCP_CLOSE, TCP_ESTABLISHED, TCP_TIME_WAIT, ConntrackFlow
from steer.node.observe import (
    CLOSE_READS_S,
    TOLD_SLACK_BYTES,
    ClosingFlows,
    LongFlows,
    NodeView,
    Revoked,
    inbound_flow_event,
    one_line,
)
from tests.samples import PODS, WEB, sample_enforcement

TCP_FIN_WAIT = 4
KEY = ("10.99.0.2", 40000, "10.244.0.3", 8080)
CLOSED_NS = 1_700_000_000_000_000_000
ALLOWED = VERDICT_ALLOW << MARK_VERDICT_SHIFT


def entry(
    state: int, *, id: int = 77, sent: int | None = 500, received: int | None = 900
) -> ConntrackFlow:
    return ConntrackFlow(
        id, *KEY[:2], *KEY[2:], "10.244.0.3", 8080, ALLOWED, state,
        bytes_orig=sent, bytes_reply=received, start_ns=CLOSED_NS - 10**9,
    )  # fmt: skip


def closing(told_max: int = 1 << 10) -> ClosingFlows:
    flows = ClosingFlows(MARK_VERDICT_MASK, keep_s=150.0, told_max=told_max)
    flows.copied(KEY, 0.0, CLOSED_NS)
    return flows


def test_a_closed_flow_is_told_after_the_first_delay_stopped_at_the_clients_close() -> None:
    flows = closing()
    assert flows.due(CLOSE_READS_S[0] - 0.01) == []
    assert flows.due(CLOSE_READS_S[0]) == [KEY]
    told = flows.read(KEY, entry(TCP_TIME_WAIT), CLOSE_READS_S[0])
    assert told == replace(entry(TCP_TIME_WAIT), stop_ns=CLOSED_NS)
    assert flows.waiting() == 0
    # Its destroy event, with the last ACK counted since: not told again, once.
    later = replace(entry(TCP_TIME_WAIT), bytes_orig=552, stop_ns=CLOSED_NS + 120 * 10**9)
    assert flows.told(later)
    assert not flows.told(later)


def test_a_flow_reset_is_told_too() -> None:
    flows = closing()
    flows.due(1.0)
    told = flows.read(KEY, entry(TCP_CLOSE), 1.0)
    assert told is not None and told.state == TCP_CLOSE


def test_a_half_closed_flow_is_read_again_later_then_left_to_its_destroy_event() -> None:
    flows = closing()
    now = CLOSE_READS_S[0]
    assert flows.due(now) == [KEY]
    for delay in CLOSE_READS_S[1:]:
        assert flows.read(KEY, entry(TCP_FIN_WAIT), now) is None
        assert flows.due(now + delay - 0.01) == []
        now += delay
        assert flows.due(now) == [KEY]
    assert flows.read(KEY, entry(TCP_FIN_WAIT), now) is None
    assert flows.due(now + 3600) == [] and flows.waiting() == 0
    assert not flows.told(entry(TCP_TIME_WAIT))


def test_a_half_closed_flow_closed_by_the_second_read_is_told() -> None:
    flows = closing()
    flows.due(0.5)
    assert flows.read(KEY, entry(TCP_FIN_WAIT), 0.5) is None
    assert flows.due(2.5) == [KEY]
    assert flows.read(KEY, entry(TCP_TIME_WAIT), 2.5) is not None


def test_a_fin_sent_again_moves_the_close_not_the_read() -> None:
    flows = closing()
    flows.copied(KEY, 0.4, CLOSED_NS + 400_000_000)
    assert flows.due(CLOSE_READS_S[0]) == [KEY]
    told = flows.read(KEY, entry(TCP_TIME_WAIT), CLOSE_READS_S[0])
    assert told is not None and told.stop_ns == CLOSED_NS + 400_000_000


def test_a_flow_told_is_not_told_again_by_a_later_fin() -> None:
    """A retransmitted FIN, or a client sending FINs on purpose to flood the ring."""
    flows = closing()
    flows.due(1.0)
    assert flows.read(KEY, entry(TCP_TIME_WAIT), 1.0) is not None
    for second in range(2, 10):
        flows.copied(KEY, float(second), CLOSED_NS)
        assert flows.due(second + 1.0) == [KEY]
        assert flows.read(KEY, entry(TCP_TIME_WAIT), second + 1.0) is None


def test_a_flow_that_went_on_after_it_was_told_is_told_again_at_its_destroy() -> None:
    """A client whose in-window RST conntrack took (CLOSE) and the pod ignored, and which
    then carried on: its bytes since are not hidden."""
    flows = closing()
    flows.due(1.0)
    told = flows.read(KEY, entry(TCP_CLOSE), 1.0)
    assert told is not None and told.bytes_orig is not None
    went_on = replace(entry(TCP_CLOSE), bytes_orig=told.bytes_orig + TOLD_SLACK_BYTES + 1)
    assert not flows.told(went_on)


def test_what_is_not_read_as_a_closed_flow_of_steers() -> None:
    for found in (
        None,  # gone: its destroy event tells of it
        replace(entry(TCP_TIME_WAIT), mark=0),  # no verdict of steer's
        entry(TCP_TIME_WAIT, sent=None),  # no counters to compare its destroy event with
        entry(TCP_TIME_WAIT, received=None),
    ):
        flows = closing()
        flows.due(1.0)
        assert flows.read(KEY, found, 1.0) is None
        assert flows.waiting() == 0


def test_a_new_flow_on_the_same_tuple_is_not_told_as_the_old_one() -> None:
    flows = closing()
    flows.due(0.5)
    assert flows.read(KEY, entry(TCP_FIN_WAIT, id=1), 0.5) is None
    flows.due(2.5)
    assert flows.read(KEY, entry(TCP_TIME_WAIT, id=2), 2.5) is None


def test_past_the_cap_the_oldest_flows_told_are_let_go_and_told_again() -> None:
    flows = ClosingFlows(MARK_VERDICT_MASK, keep_s=150.0, told_max=2)
    for sport in (1, 2, 3):
        key = (KEY[0], sport, *KEY[2:])
        flows.copied(key, 0.0, CLOSED_NS)
        flows.due(1.0)
        assert flows.read(key, replace(entry(TCP_TIME_WAIT), sport=sport), 1.0) is not None
    assert [flows.told(replace(entry(TCP_TIME_WAIT), sport=s)) for s in (1, 2, 3)] == [
        False,
        True,
        True,
    ]


def test_flows_told_are_let_go_once_their_destroy_events_are_overdue() -> None:
    flows = closing()
    flows.due(1.0)
    assert flows.read(KEY, entry(TCP_TIME_WAIT), 1.0) is not None
    flows.forget(1.0 + 150.0)
    assert not flows.told(entry(TCP_TIME_WAIT))


def test_told_flows_are_keyed_by_id_and_source_port() -> None:
    flows = closing()
    flows.due(1.0)
    assert flows.read(KEY, entry(TCP_TIME_WAIT), 1.0) is not None
    assert not flows.told(replace(entry(TCP_TIME_WAIT), sport=40001))
    assert not flows.told(replace(entry(TCP_TIME_WAIT), id=78))
    assert flows.told(entry(TCP_TIME_WAIT))


# --- flows that live long ------------------------------------------------------------------


def test_a_flow_open_long_is_looked_at_once_after_the_delay() -> None:
    flows = LongFlows(live_after_s=5.0)
    flows.opened(KEY, 77, 0.0)
    flows.opened(KEY, 77, 1.0)  # an event seen twice is one flow
    assert flows.due(4.99) == []
    assert flows.due(5.0) == [(KEY, 77)]
    assert flows.due(60.0) == []


def test_a_flow_found_already_old_comes_due_before_flows_seen_earlier() -> None:
    """At start-up the reader finds flows opened before it, some long ago: each is due
    when it has lived the delay, not after the flows whose events came first."""
    flows = LongFlows(live_after_s=5.0)
    seen = (KEY[0], 1, *KEY[2:])
    flows.opened(seen, 78, 10.0)  # a new flow's event: due at 15
    flows.opened(KEY, 77, 10.0 - 5.0)  # found open, 5 s old or more: due now
    flows.opened((KEY[0], 2, *KEY[2:]), 79, 10.0 - 2.0)  # found open, 2 s old: due at 13
    assert flows.due(10.0) == [(KEY, 77)]
    assert flows.due(13.0) == [((KEY[0], 2, *KEY[2:]), 79)]
    assert flows.due(15.0) == [(seen, 78)]


def test_flows_found_old_are_told_as_found_a_batch_at_a_time_unless_closed_first() -> None:
    flows = LongFlows(live_after_s=5.0)
    found = [replace(entry(TCP_ESTABLISHED, id=100 + port), sport=port) for port in range(5)]
    for flow in found:
        assert flows.found((flow.src, flow.sport, flow.dst, flow.dport), flow)
    closed = found[1]
    flows.closed((closed.src, closed.sport, closed.dst, closed.dport))
    other = found[2]  # a destroy event of an earlier flow on the same tuple: not this one
    flows.closed((other.src, other.sport, other.dst, other.dport), conntrack_id=1)
    assert flows.found_due(2) == [found[0], found[2]]
    assert flows.found_due(2) == found[3:]
    assert flows.found_due(2) == []
    assert flows.due(60.0) == []  # never also looked at as a flow watched


def test_past_the_cap_flows_found_are_refused_and_say_so() -> None:
    flows = LongFlows(live_after_s=5.0, watched_max=2)
    assert flows.opened(KEY, 77, 0.0)
    assert flows.found((KEY[0], 1, *KEY[2:]), entry(TCP_ESTABLISHED, id=78))
    assert not flows.found((KEY[0], 2, *KEY[2:]), entry(TCP_ESTABLISHED, id=79))
    assert not flows.opened((KEY[0], 3, *KEY[2:]), 80, 0.0)
    assert flows.opened(KEY, 81, 1.0)  # a new flow on a watched tuple takes its place


def test_a_flow_closed_before_the_delay_is_not_looked_at() -> None:
    flows = LongFlows(live_after_s=5.0)
    flows.opened(KEY, 77, 0.0)
    flows.closed(KEY)
    assert flows.due(5.0) == []


def test_only_the_same_flow_still_established_is_told_open() -> None:
    flows = LongFlows()
    assert flows.still_open(77, entry(TCP_ESTABLISHED))
    assert not flows.still_open(77, entry(TCP_FIN_WAIT))  # closing: its close tells of it
    assert not flows.still_open(77, entry(TCP_ESTABLISHED, id=78))  # a new flow, same tuple
    assert not flows.still_open(77, None)


def test_past_the_cap_new_flows_are_not_watched() -> None:
    flows = LongFlows(live_after_s=5.0, watched_max=1)
    flows.opened(KEY, 77, 0.0)
    flows.opened((KEY[0], 1, *KEY[2:]), 78, 0.0)
    assert flows.due(5.0) == [(KEY, 77)]


def test_an_open_flow_from_elsewhere_has_no_end_and_no_bytes_yet() -> None:
    view = NodeView({p.ip: (p, "iptables") for p in PODS}, sample_enforcement())
    flow = replace(entry(TCP_ESTABLISHED), dst=WEB.ip, reply_src=WEB.ip)
    event = inbound_flow_event([view], flow, CLOSED_NS + 6 * 10**9, Revoked(), live=True)
    assert event is not None
    assert (event["end"], event["bytes_sent"], event["bytes_received"]) == (None, None, None)
    assert event["duration_ms"] == 7000.0
    assert (event["pod"], event["direction"]) == ("web", "ingress")
    assert " open 7000.0ms " in one_line({**event, "time": "2026-12-05T10:00:00+00:00"})


def test_a_new_flow_on_a_watched_tuple_is_looked_at_on_its_own_time() -> None:
    """Ports reused within five seconds: the old flow's time does not apply to the new."""
    flows = LongFlows(live_after_s=5.0)
    flows.opened(KEY, 77, 0.0)
    flows.opened(KEY, 78, 3.0)
    assert flows.due(5.0) == []
    assert flows.due(8.0) == [(KEY, 78)]


def test_the_old_flows_end_read_late_does_not_stop_watching_the_new_one() -> None:
    flows = LongFlows(live_after_s=5.0)
    flows.opened(KEY, 78, 0.0)
    flows.closed(KEY, 77)  # the destroy event of the tuple's earlier flow
    assert flows.due(5.0) == [(KEY, 78)]
    flows.opened(KEY, 79, 6.0)
    flows.closed(KEY)  # a FIN copy: the flow on the tuple now
    assert flows.due(11.0) == []
