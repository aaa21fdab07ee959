"""The agent's events for `steer observe`: every HTTP request Envoy handled, with its
verdict and the rule behind it.

Envoy streams its access log entries to the agent over gRPC ALS
(`envoy.service.accesslog.v3`) on a Unix socket; nothing is written to a file per request.
The agent turns each entry into an event (`http_event`, pure), naming the client pod, its
datapath, and the policy and rule that decided: Envoy's own RBAC verdict names a denying
rule; for an allowed request, and for a section's default, the rule is found with the
decision code `steer explain` uses. Events go to a bounded ring (the oldest are dropped,
and counted); `steer observe` reads it over a second owner-only Unix socket, one JSON
object per line.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import selectors
import socket
import socketserver
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from functools import lru_cache
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from steer.constants import (
    ALS_SOCKET,
    BPF_PIN_DIR,
    HOST_PROC_SYS_NET,
    MARK_VERDICT_MASK,
    NFLOG_CLOSE_GROUP,
    NFLOG_GROUP,
    OBSERVE_RING_SIZE,
    OBSERVE_SOCKET,
    VERDICT_ALLOW,
    VERDICT_DENY,
    VERDICT_L7,
)
from steer.model.enforce import Enforcement
from steer.model.explain import HTTPRequest, audit_default, explain, l4_audit, l4_verdict
from steer.model.pod import Pod
from steer.node import libbpf
from steer.node.bpfmaps import (
    FLOW_KIND_AT,
    FLOW_LIVE,
    FLOW_OPENED,
    FLOW_RECORD_SIZE,
    FLOW_REFUSED,
    FLOW_SHAPE,
    FLOW_SIZE,
    FLOW_SOURCE,
    FLOW_VERDICT_AT,
    VERDICT_IPTABLES,
    VERDICT_NO_BACKEND,
    FlowRecord,
    flow_started_ns,
    ip_from_be,
    live_record,
)
from steer.node.conntrack import mark_decision
from steer.node.netns import run_in_netns
from steer.node.nfnetlink import (
    CONNTRACK_NEW_GROUP,
    TCP_CLOSE,
    TCP_ESTABLISHED,
    TCP_TIME_WAIT,
    ConntrackEvents,
    ConntrackFlow,
    LoggedPacket,
    NflogGroup,
)
from steer.node.ringbuf import RingReader
from steer.render.xds import AUDIT_PREFIXES, EGRESS_ALLOW, INGRESS_ALLOW, RBAC_METADATA

log = logging.getLogger("steer.observe")
Event = dict[str, Any]
V = TypeVar("V")
# An RBAC denial names the matched policy: "<pod>:<policy namespace>/<name>/<index>/<rule>"
# (steer.render.xds.rbac_key), or "none" when an allow filter matched nothing.
_RBAC_DENIED = re.compile(r"rbac_access_denied_matched_policy\[(.*)\]")
_EXPLAINED_MAX = 4096
_MISSING = object()


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """What the agent knew at its last sync: the pods by address, each with its datapath,
    and the resolved policies."""

    pods: Mapping[str, tuple[Pod, str | None]] = field(default_factory=dict)
    enforcement: Enforcement | None = None
    # eBPF pods by their slot in the maps (the flow events name pods by slot).
    slots: Mapping[int, Pod] = field(default_factory=dict)
    # What explain found for a request, by everything it depends on: a node sees the same
    # few requests over and over, and explaining one costs ~80 us. Lives as long as the
    # view, which each sync replaces.
    explained: dict[tuple[object, ...], Any] = field(default_factory=dict, compare=False)
    # What an HTTP event says, by the request's shape (`http_event`).
    shapes: dict[tuple[object, ...], Event] = field(default_factory=dict, compare=False)
    # What a flow event says, by the bytes of its record that it depends on (FLOW_SHAPE).
    flow_shapes: dict[bytes, Event] = field(default_factory=dict, compare=False)

    def l4_verdict_for(
        self, src: str, dst: str, port: int
    ) -> tuple[int | None, str | None, str | None]:
        """(VERDICT_*, policy, rule) of the flow at L4, as `steer explain` finds them."""
        found: tuple[int | None, str | None, str | None] = self._memo(
            ("l4", src, dst, port),
            lambda enforcement: l4_verdict(enforcement, IPv4Address(src), IPv4Address(dst), port),
        )
        return found or (None, None, None)

    def l4_audit_for(self, src: str, dst: str, port: int) -> tuple[str, str] | None:
        """(policy, rule) of mode Audit that would deny the flow."""
        found: tuple[str, str] | None = self._memo(
            ("l4-audit", src, dst, port),
            lambda enforcement: l4_audit(enforcement, IPv4Address(src), IPv4Address(dst), port),
        )
        return found

    def audit_default_for(self, src: str, dst: str, *, egress: bool) -> tuple[str, str] | None:
        """(policy, rule) of the default of a policy of mode Audit that would deny a
        request on this side."""
        found: tuple[str, str] | None = self._memo(
            ("audit-default", src, dst, egress),
            lambda enforcement: audit_default(
                enforcement, IPv4Address(src), IPv4Address(dst), egress=egress
            ),
        )
        return found

    def rule_for(
        self, src: str, dst: str, port: int, request: HTTPRequest
    ) -> tuple[str, str] | None:
        """(policy, rule) that decides `request`, as `steer explain` finds it."""

        def decide(enforcement: Enforcement) -> tuple[str, str] | None:
            decided = explain(enforcement, IPv4Address(src), IPv4Address(dst), port, request)
            return None if decided.policy is None else (decided.policy, decided.rule or "")

        found: tuple[str, str] | None = self._memo((src, dst, port, request), decide)
        return found

    def _memo(self, key: tuple[object, ...], decide: Callable[[Enforcement], Any]) -> Any:
        """`decide` under the view's policies, once per key (None without policies)."""
        # Two threads share the memo (the flow reader's and the access log's): a value is
        # returned as computed, never read back from a dict the other may have cleared.
        found = self.explained.get(key, _MISSING)
        if found is _MISSING:
            if len(self.explained) >= _EXPLAINED_MAX:
                self.explained.clear()
            enforcement = self.enforcement
            found = decide(enforcement) if enforcement is not None else None
            self.explained[key] = found
        return found


@lru_cache(maxsize=4096)
def _rule_of(details: str) -> tuple[str, str] | None:
    """(policy, rule) from an RBAC denial's details, None when no rule is named."""
    found = _RBAC_DENIED.fullmatch(details)
    if found is None or ":" not in found.group(1):
        return None
    namespace, name, _index, rule = found.group(1).split(":", 1)[1].split("/", 3)
    return f"{namespace}/{name}", rule


def _audited(tags: Any) -> tuple[str, str] | str | None:
    """What would have denied the request if every policy and rule of mode Audit were
    enforced, from the RBAC filters' shadow evaluation (steer.render.xds._rbac), which
    Envoy reports as metadata: (policy, rule) of a deny rule, or the side ("egress",
    "ingress") where no allow would have matched, so a policy's default would deny."""
    if RBAC_METADATA not in tags:
        return None
    fields = tags[RBAC_METADATA].fields
    for name, prefix in AUDIT_PREFIXES.items():
        result = f"{prefix}shadow_engine_result"
        if result not in fields or fields[result].string_value != "denied":
            continue
        if name in (EGRESS_ALLOW, INGRESS_ALLOW):
            return "egress" if name == EGRESS_ALLOW else "ingress"
        policy_id = fields[f"{prefix}shadow_effective_policy_id"].string_value
        return _rule_of(f"rbac_access_denied_matched_policy[{policy_id}]")
    return None


_METHODS = {number: name for name, number in base_pb2.RequestMethod.items()}

# An event read and not yet made whole: the agent reads tens of thousands a second and
# `steer observe` reads a few, so only what its shape decides (pods, verdict, policy: all
# the metrics count, shared by every event of that shape) is worked out on arrival, and the
# rest for those read (`materialized`).
# A flow: its shape's event, the ring's record, and the clock offset at reading.
PendingFlow = tuple[Event, bytes, float]
# An access log entry: its shape's event, its time, its client end, and the process behind
# that end if known on arrival.
PendingHttp = tuple[Event, float, str, "tuple[int, str] | None"]
Pending = PendingFlow | PendingHttp


def http_event(
    entry: accesslog_pb2.HTTPAccessLogEntry, view: NodeView, openers: Openers | None = None
) -> Event:
    """One access log entry as a `steer observe` event; `openers` names the process behind
    the client's connection, where a socket hook saw it open."""
    return materialized(pending_http(entry, view, openers))


def pending_http(
    entry: accesslog_pb2.HTTPAccessLogEntry, view: NodeView, openers: Openers | None = None
) -> PendingHttp:
    """An access log entry as it is kept until read (`PendingHttp`). Runs once per request:
    what follows from the request's shape alone is worked out once per shape and view."""
    common, request, response = entry.common_properties, entry.request, entry.response
    remote, local = (
        common.downstream_remote_address.socket_address,
        (common.downstream_local_address.socket_address),
    )
    src_ip, src_port = remote.address, remote.port_value
    tags = common.metadata.filter_metadata
    # A plain tuple (a `_Shape` only when first seen): building a NamedTuple runs Python.
    shape = (
        src_ip,
        local.address,
        local.port_value,
        request.request_method,
        request.original_path or request.path,
        request.authority,
        response.response_code.value,
        response.response_code_details,
        tags["steer"].fields["service"].string_value
        if "steer" in tags and "service" in tags["steer"].fields
        else None,
        _audited(tags),
    )
    known = view.shapes.get(shape)
    if known is None:
        if len(view.shapes) >= _EXPLAINED_MAX:
            view.shapes.clear()
        known = view.shapes[shape] = _http_shape(view, _Shape._make(shape))
    source = f"{src_ip}:{src_port}"
    start = common.start_time
    return (
        known,
        start.seconds + start.nanos / 1e9,
        source,
        openers.get(source) if openers is not None else None,
    )


def _completed_http(
    known: Event, started: float, source: str, opener: tuple[int, str] | None
) -> Event:
    return {
        **known,
        # Seconds since the epoch; an ISO 8601 string once the event is read (`_readable`).
        "time": started,
        # The opener of the client's socket: known to the kernel's socket hooks, not to
        # Envoy's access log.
        "pid": opener[0] if opener else None,
        "comm": opener[1] if opener else None,
        "src": source,
    }


class _Shape(NamedTuple):
    """What an access log entry says about a request, but for its time and client port."""

    src_ip: str
    dst_ip: str
    dst_port: int
    method_number: int
    path: str
    authority: str
    status: int
    details: str
    service: str | None
    audited: tuple[str, str] | str | None


def _http_shape(view: NodeView, shape: _Shape) -> Event:
    """Everything an HTTP event says that follows from the request's shape."""
    src_ip, dst_ip, dst_port, method_number, path, authority, status, details, service, audited = (
        shape
    )
    method = _METHODS.get(method_number, str(method_number))
    client = view.pods.get(src_ip)
    server = view.pods.get(dst_ip)
    subject = client or server
    denied = details.startswith("rbac_access_denied")
    # Refused before any rule (a steer refusal route, or the connection manager's checks).
    refused = status == 400 and details != "via_upstream"
    named = _rule_of(details) if denied else None
    request = HTTPRequest(method, path, authority, service=service)
    if isinstance(audited, str):
        # No allow would have let it through, as if the policies of mode Audit were
        # enforced: the default Deny of one of them on that side.
        audited = view.audit_default_for(src_ip, dst_ip, egress=audited == "egress")
    if not (denied or refused) and audited is not None:
        named = audited
    else:
        audited = None
    if named is None and not refused:
        named = view.rule_for(src_ip, dst_ip, dst_port, request)
    return {
        "layer": "http",
        "verdict": "denied" if denied or refused else "audit" if audited else "allowed",
        "pod": subject[0].name if subject else None,
        "namespace": subject[0].namespace if subject else None,
        "dst_pod": f"{server[0].namespace}/{server[0].name}" if server else None,
        "dst": f"{dst_ip}:{dst_port}",
        "service": service,
        "dataplane": client[1] if client else None,
        # egress: the client is a pod of this node; ingress: only the server is.
        "direction": "egress" if client else "ingress",
        "policy": named[0] if named else None,
        "rule": named[1] if named else (details if refused else None),
        "method": method,
        "host": authority,
        "path": path,
        "status": status,
        "details": details,
    }


_ENDED_BY = {1: "reset", 2: "refused", 3: "reset", 8: "reset"}  # ESTABLISHED, SYN_*, CLOSE_WAIT


def _monotonic_to_epoch() -> float:
    """What to add to a bpf_ktime_get_ns() time (CLOCK_MONOTONIC) for wall-clock time."""
    return time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)


@lru_cache(maxsize=65536)
def _ip(value_be: int) -> str:
    return str(ip_from_be(value_be))


@lru_cache(maxsize=4096)
def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def known_shape(view: NodeView, record: bytes) -> Event:
    """What follows from a flow record's shape alone (pods, addresses, verdict), worked
    out once per shape and view. A flow is one of a pod, as its socket hooks recorded it:
    on eBPF, connect4 (with the verdict it applied) and sockops; on iptables, the observe
    program (the verdict is the rules', found by the same decision code they were rendered
    from)."""
    key = record[FLOW_SHAPE]
    if record[FLOW_VERDICT_AT] == VERDICT_IPTABLES:
        key += record[FLOW_SOURCE]
    known = view.flow_shapes.get(key)
    if known is None:
        if len(view.flow_shapes) >= _EXPLAINED_MAX:
            view.flow_shapes.clear()
        known = view.flow_shapes[key] = _flow_shape(view, FlowRecord.unpack(record))
    return known


def materialized(item: Event | Pending) -> Event:
    if isinstance(item, dict):
        return item
    if len(item) == 4:
        return _completed_http(*item)
    known, record, offset = item
    return _completed(known, FlowRecord.unpack(record), offset)


def _completed(known: Event, raw: FlowRecord, offset: float) -> Event:
    event = known.copy()
    refused, live = raw.kind == FLOW_REFUSED, raw.kind == FLOW_LIVE
    event["time"] = raw.start_ns / 1e9 + offset
    event["pid"] = raw.tgid
    event["comm"] = _comm(raw.comm)
    # A connect refused before it reached the stack has no source port yet.
    event["src"] = _ip(raw.src_ip) if refused else f"{_ip(raw.src_ip)}:{raw.src_port}"
    # The socket's counts are read when it closes: a flow still open has none yet.
    event["bytes_sent"] = None if live else raw.bytes_sent
    event["bytes_received"] = None if live else raw.bytes_received
    # So far, for a flow still open.
    event["duration_ms"] = round((raw.at_ns - raw.start_ns) / 1e6, 3)
    # A refused connect on iptables is the rules' TCP reset: the socket closes from
    # SYN_SENT, like any connect the peer refuses.
    event["end"] = None if live else "refused" if refused else _ENDED_BY.get(raw.end_state, "fin")
    return event


def _flow_shape(view: NodeView, raw: FlowRecord) -> Event:
    on_iptables = raw.verdict == VERDICT_IPTABLES
    known = view.pods.get(_ip(raw.src_ip)) if on_iptables else None
    pod = known[0] if known else view.slots.get(raw.slot)
    dst_ip, dst_port = _ip(raw.dst_ip), socket.ntohs(raw.dst_port_be)
    verdict: int | None = raw.verdict
    policy, rule = (None, None)
    if pod is not None and raw.verdict != VERDICT_NO_BACKEND:
        decided, policy, rule = view.l4_verdict_for(pod.ip, dst_ip, dst_port)
        if on_iptables:
            verdict = decided
    outcome, policy, rule = _l4_outcome(
        view, pod.ip if pod else None, dst_ip, dst_port, verdict=verdict, named=(policy, rule)
    )
    return {
        "time": None,
        "layer": "l4",
        "verdict": outcome,
        "pod": pod.name if pod else None,
        "namespace": pod.namespace if pod else None,
        # The pod's cgroup, which the opener ran in (or in a container's cgroup below it).
        "cgroup": pod.cgroup or None if pod else None,
        "dst": f"{_ip(raw.dialled_ip)}:{socket.ntohs(raw.dialled_port_be)}",
        "backend": f"{dst_ip}:{dst_port}",
        "dataplane": "iptables" if on_iptables else "ebpf",
        # Recorded at the socket of the pod that opened it.
        "direction": "egress",
        "via_envoy": verdict == VERDICT_L7,
        "policy": policy,
        "rule": "no-backend" if raw.verdict == VERDICT_NO_BACKEND else rule,
        "method": None,
        "path": None,
        "status": None,
    }


def _l4_outcome(
    view: NodeView,
    src_ip: str | None,
    dst_ip: str,
    dst_port: int,
    *,
    verdict: int | None,
    named: tuple[str | None, str | None],
) -> tuple[str, str | None, str | None]:
    """An L4 event's verdict and the policy and rule it names: the deciding ones, or the
    audited rule that would have denied a flow let through."""
    if verdict in (VERDICT_DENY, VERDICT_NO_BACKEND):
        return "denied", *named
    audited = None if src_ip is None else view.l4_audit_for(src_ip, dst_ip, dst_port)
    if audited is not None:
        return "audit", *audited
    return "allowed", *named


# --- flows into a pod from elsewhere ---------------------------------------------------------

# How a flow ended, by the TCP state conntrack last saw it in; any other state means the
# entry was deleted (by a revocation, or by hand) or expired while the flow was live.
_CONNTRACK_END = {TCP_TIME_WAIT: "fin", TCP_CLOSE: "reset"}


def _named_as_decided(
    views: Sequence[NodeView], src: str, dst: str, port: int, mark: int
) -> tuple[NodeView, str | None, str | None]:
    """The view, policy and rule that name a verdict the kernel applied (`mark`): the
    newest of the agent's last views (newest first) under which the decision code
    reaches that verdict, since a flow's event can be read after its policy changed
    again. Where none does (a verdict no view explains, such as an L7 flow after a
    NodePort's translation refused), the policy is the one whose id the mark carries,
    and no rule is named rather than a wrong one."""
    verdict, policy_id = mark_decision(mark)
    for view in views:
        decided, policy, rule = view.l4_verdict_for(src, dst, port)
        if decided == verdict:
            return view, policy, rule
    for view in views:
        if view.enforcement is not None and (key := view.enforcement.policy_key(policy_id)):
            return views[0], key, None
    return views[0], None, None


def _netfilter_event(
    view: NodeView, src: tuple[str, int], dst: str, backend: tuple[str, int], **fields: Any
) -> Event | None:
    """What the events of flows from netfilter share; None for a flow with no pod of the
    node at either end (the node's own services)."""
    # Pods steer does not steer are no event's subject.
    client, server = (
        known if known is not None and known[1] is not None else None
        for known in (view.pods.get(src[0]), view.pods.get(backend[0]))
    )
    subject = client or server
    if subject is None:
        return None
    pod = subject[0]
    return {
        "layer": "l4",
        "pod": pod.name,
        "namespace": pod.namespace,
        # Conntrack and NFLOG know no process: the client is off the node, or a pod no
        # hook records.
        "cgroup": None,
        "pid": None,
        "comm": None,
        "src": f"{src[0]}:{src[1]}",
        "dst": dst,
        "backend": f"{backend[0]}:{backend[1]}",
        # Flows from elsewhere are iptables' to decide, whatever the pod's datapath.
        "dataplane": "iptables",
        # A client that is a pod of the node (one no hook records) makes it the subject.
        "direction": "egress" if client else "ingress",
        "method": None,
        "path": None,
        "status": None,
        **fields,
    }


def inbound_flow_event(
    views: Sequence[NodeView],
    flow: ConntrackFlow,
    now_ns: int,
    revoked: Revoked,
    *,
    live: bool = False,
) -> Event | None:
    """A flow steer's iptables rules let through and no socket hook of a pod recorded (it
    came from off the node, or from a pod steer does not steer), at its close; or, `live`,
    while it is open (no end, no bytes: as a pod's own open flow). On a node without BPF,
    where no hook records the pods' own flows, theirs come this way too."""
    verdict, _ = mark_decision(flow.mark)
    via_envoy = verdict == VERDICT_L7
    # Past a REDIRECT conntrack's reply names Envoy: the pod is the one dialled.
    backend = (flow.dst, flow.dport) if via_envoy else (flow.reply_src, flow.reply_sport)
    view, policy, rule = _named_as_decided(views, flow.src, *backend, flow.mark)
    outcome, policy, rule = _l4_outcome(
        view, flow.src, *backend, verdict=verdict, named=(policy, rule)
    )
    return _netfilter_event(
        view,
        (flow.src, flow.sport),
        f"{flow.dst}:{flow.dport}",
        backend,
        time=flow.start_ns / 1e9 if flow.start_ns else now_ns / 1e9,
        verdict=outcome,
        via_envoy=via_envoy,
        policy=policy,
        rule=rule,
        # Conntrack's counts: whole IP packets, headers included, each way.
        bytes_sent=None if live else flow.bytes_orig,
        bytes_received=None if live else flow.bytes_reply,
        duration_ms=round(((flow.stop_ns or now_ns) - flow.start_ns) / 1e6, 3)
        if flow.start_ns
        else None,
        end=None
        if live
        else _CONNTRACK_END.get(flow.state or 0)
        or ("revoked" if revoked.get(f"{flow.src}:{flow.sport}") is not None else "expired"),
    )


def refused_event(views: Sequence[NodeView], packet: LoggedPacket, now: float) -> Event | None:
    """A packet steer's deny rules refused (copied to NFLOG) as the flow's event. The next
    packet of a live flow a policy change revoked is refused too (its conntrack entry
    deleted, it walked the new rules): the flow's own event, from conntrack, ends
    `revoked`, and this one says what refused it."""
    view, policy, rule = _named_as_decided(views, packet.src, packet.dst, packet.dport, packet.mark)
    return _netfilter_event(
        view,
        (packet.src, packet.sport),
        f"{packet.dst}:{packet.dport}",
        (packet.dst, packet.dport),
        time=now,
        verdict="denied",
        via_envoy=False,
        policy=policy,
        rule=rule,
        bytes_sent=0,
        bytes_received=0,
        duration_ms=0.0,
        end="refused",
    )


class Recent(Generic[V]):
    """What is known of the last connections, by their client end (pod ip:port), closed
    ones too: an access log entry or a flow's close can come after the fact."""

    def __init__(self, size: int = 16_384) -> None:
        self._size = size
        self._by_source: OrderedDict[str, V] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, source: str, value: V) -> None:
        with self._lock:
            self._by_source[source] = value
            self._by_source.move_to_end(source)
            while len(self._by_source) > self._size:
                self._by_source.popitem(last=False)

    def get(self, source: str) -> V | None:
        # No lock: one dict lookup is atomic under the GIL, and a reader racing a
        # `remember` sees the entry or not, either of which is right. Runs per request.
        return self._by_source.get(source)


# The process behind each recent connection (pid, comm): Envoy's access log knows the
# client's address, not its process.
Openers = Recent[tuple[int, str]]
# Connections a policy change revoked, with when.
Revoked = Recent[float]


# How often the flow reader looks for the ring buffer's pin, or checks it is still its own.
_PIN_CHECK_S = 0.1
# A flow still open after this long is an event of its own, once, with no end yet: one
# that lives for hours (a database pool's connection, say) is seen while it lives, not
# only when it closes. The reader looks for them this often, in one read of steer_flows
# (batches of 1,024 entries).
LIVE_AFTER_S = 5.0
_LIVE_SCAN_S = 2.0
# ... or less often on a node with so many flows that reading them takes more than this
# share of the time between reads: 130-200 ms for the 262,144 a full map holds, read
# every 7-10 s then.
_LIVE_SCAN_SHARE = 0.02
# At most this many such events per read: a pool of thousands of connections opened at
# once (or an agent started on a busy node) is told over several reads, not in one burst
# that would push every recent event out of the ring.
_LIVE_PER_SCAN = 1000
_COOKIE = 8
# Above this many records a second, the flow reader lets records gather this long after
# reading some. Below it each record is read as it comes: an HTTP event looks up the open
# record of its connection when it arrives, and a quiet node should not make it wait.
_GATHER_ABOVE_PER_S = 1000
_GATHER_S = 0.02


@dataclass
class _Rate:
    """Whether records come faster than `above` a second, over windows of 0.1 s."""

    above: float
    window_start: float = 0.0
    count: int = 0
    fast: bool = False

    def busy(self, read: int) -> bool:
        now = time.monotonic()
        if now - self.window_start >= 0.1:
            self.fast = self.count >= self.above * (now - self.window_start)
            self.window_start, self.count = now, 0
        self.count += read
        return self.fast


class _Worker:
    """A daemon thread running `_run` until `stop`."""

    def __init__(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class FlowReader(_Worker):
    """Reads the eBPF datapath's flow events from its ring buffer (pinned by the agent's
    BPF build), once the datapath is loaded; each becomes an event."""

    def __init__(
        self,
        pin: Path,
        on_flows: Callable[[Sequence[PendingFlow]], None],
        view: Callable[[], NodeView],
        openers: Openers,
        *,
        on_live: Callable[[Sequence[PendingFlow]], None] = lambda flows: None,
        live_after_s: float = LIVE_AFTER_S,
    ) -> None:
        self.openers = openers
        self._pin = pin
        self._on_flows = on_flows
        self._on_live = on_live
        self._view = view
        self._rate = _Rate(_GATHER_ABOVE_PER_S)
        self._lock = threading.Lock()
        self._ring: _PinnedRing | None = None
        self._live_after_ns = int(live_after_s * 1e9)
        self._next_live_scan = 0.0
        # The cookies of the flows told of while still open, as long as they are.
        self._told_live: set[bytes] = set()
        super().__init__("steer-flows")

    def _read(self, ring: RingReader) -> int:
        """Read every record there, and hand the closed flows over as one batch."""
        records = ring.read()
        view, offset = self._view(), _monotonic_to_epoch()
        flows: list[PendingFlow] = []
        for record in records:
            if len(record) != FLOW_RECORD_SIZE:
                log.error("a flow record of %d bytes is not a steer_flow_event", len(record))
            elif record[FLOW_KIND_AT] == FLOW_OPENED:
                # Not an event of its own (one record per flow, at its close): who opened
                # the connection, for the HTTP events Envoy logs of it.
                raw = FlowRecord.unpack(record)
                source = f"{_ip(raw.src_ip)}:{raw.src_port}"
                self.openers.remember(source, (raw.tgid, _comm(raw.comm)))
            else:
                try:
                    flows.append((known_shape(view, record), record, offset))
                except Exception:  # one bad record must not stop every later one
                    log.exception("a flow record could not be read; it is dropped")
        if flows:
            try:
                self._on_flows(flows)
            except Exception:
                log.exception("%d flow events were lost on their way to the ring", len(flows))
        return len(records)

    def tell_live(self) -> None:
        """An event for each flow open for `live_after_s` and not told of yet (up to
        `_LIVE_PER_SCAN`; the rest next time). The flows are those still in steer_flows:
        the hooks keep a flow there from connect() to its close (one whose connect()
        failed before choosing an address stays until the LRU map evicts it, untold)."""
        fd = libbpf.obj_get(self._pin.parent / "steer_flows")
        if fd < 0:  # the datapath is not loaded
            return
        try:
            info = libbpf.map_info(fd)
            # A stale pin of an older build, until the sync after a start replaces it.
            if info is not None and info.value_size == FLOW_SIZE:
                self._tell_live(fd)
        finally:
            os.close(fd)

    def _tell_live(self, fd: int) -> None:
        now_ns = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        view, offset = self._view(), _monotonic_to_epoch()
        told, still_open = self._told_live, set()
        live: list[PendingFlow] = []
        try:
            # Batch by batch: the map can hold 262,144 flows, which as Python objects all
            # at once would cost the agent ~50 MiB for a moment.
            for count, cookies, flows in libbpf.read_batches(fd):
                for index in range(count):
                    cookie = cookies[index * _COOKIE : (index + 1) * _COOKIE]
                    if cookie in told:
                        still_open.add(cookie)
                        continue
                    at = index * FLOW_SIZE
                    if (
                        len(live) >= _LIVE_PER_SCAN
                        or now_ns - flow_started_ns(flows, at) < self._live_after_ns
                    ):
                        continue
                    record = live_record(cookie, flows[at : at + FLOW_SIZE], now_ns)
                    if record is None:
                        continue
                    try:
                        live.append((known_shape(view, record), record, offset))
                    except Exception:  # one bad record must not stop every later one
                        log.exception("an open flow could not be read; it is told at its close")
                    still_open.add(cookie)
        except OSError as exc:
            log.warning("steer_flows could not be read (%s): open flows wait for next time", exc)
            return
        # What was told of and has closed since is forgotten.
        self._told_live = still_open
        if live:
            self._on_live(live)

    def open_now(self) -> None:
        """Open the ring buffer now if it is pinned and not open yet: the agent calls this
        after each sync, so the reader is on the ring before the first flows of a freshly
        loaded datapath are over (their open records name the processes behind the first
        HTTP requests, which are read back at once)."""
        with self._lock:
            self._open()

    def _open(self) -> None:
        if self._ring is None:
            self._ring = _PinnedRing.open(self._pin)
            if self._ring is not None:
                # Records the programs wrote before this reader came (since the datapath
                # loaded): the kernel wakes a reader only for a record written when it had
                # caught up, so these would otherwise wait for the next flow.
                self._read(self._ring.reader)

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._open()
                ring = self._ring
            if ring is None:  # the datapath has not loaded its programs (yet)
                self._stop.wait(_PIN_CHECK_S)
                continue
            # Only this thread closes or replaces an open ring: read outside the lock.
            try:
                read = self._read(ring.reader) if ring.reader.wait(0.2) else 0
            except OSError as exc:
                log.warning("reading flow events failed (%s); opening the ring buffer again", exc)
                self._close()
                continue
            if (started := time.monotonic()) >= self._next_live_scan:
                try:
                    self.tell_live()
                except Exception:  # the events of flows open now; their closes still come
                    log.exception("looking for flows open long failed")
                took = time.monotonic() - started
                self._next_live_scan = started + max(_LIVE_SCAN_S, took / _LIVE_SCAN_SHARE)
            if read > 0 and self._rate.busy(read):
                # Let records gather: the kernel wakes a reader only when it has caught up,
                # so reading each one as it came cost a wake-up per flow, about a third of
                # a core at 10k short connections a second. A pause bounds them to ~50/s.
                self._stop.wait(_GATHER_S)
            if ring.replaced():
                # The agent rebuilt its BPF objects (a stale pin from an older build, or an
                # unload): the programs now write to the new ring. Drain the old one first.
                self._read(ring.reader)
                self._close()
        self._close()

    def _close(self) -> None:
        with self._lock:
            if self._ring is not None:
                self._ring.close()
                self._ring = None


# Sysctls of the node's namespace that give conntrack's entries the bytes each way and a
# start time, for the events of flows from elsewhere (new entries only). Left on when the
# agent stops: turning them off would leave other readers of conntrack without them.
_CONNTRACK_SYSCTLS = ("netfilter/nf_conntrack_acct", "netfilter/nf_conntrack_timestamp")


def _told_keep_s() -> float:
    """How long a flow told at its close waits for its destroy event: conntrack's
    TIME_WAIT in this namespace, two sweeps, and margin."""
    try:
        time_wait = int((proc_sys_net() / _TIME_WAIT_SYSCTL).read_text())
    except (OSError, ValueError):
        time_wait = 120
    return time_wait + 2 * _SWEEP_S + 30.0


def proc_sys_net() -> Path:
    # Either way a file under net/ is the sysctl of the writer's network namespace (the
    # agent's: the node's), not the mount's.
    return HOST_PROC_SYS_NET if HOST_PROC_SYS_NET.is_dir() else Path("/proc/sys/net")


# How often the agent makes conntrack let go of the ended flows (`ConntrackEvents.sweep`):
# a dump walks the table (~7 ms at 262,144 buckets).
_SWEEP_S = 5.0
_HOLD_S = 1.0
# A flow's client sent FIN or RST (NFLOG_CLOSE_GROUP): its entry is read this long after,
# when the other side has nearly always closed too, and again after each later delay if it
# had not; then its destroy event tells of it. At most so many flows wait at once.
CLOSE_READS_S = (0.5, 2.0, 8.0)
CLOSING_MAX = 16_384
# Flows told at their close, kept until their destroy events come (after conntrack's
# TIME_WAIT and a sweep): at most so many (~220 bytes each). Past that the oldest go, and
# their destroy events tell of them a second time: at over ~1,000 closes a second from
# elsewhere, held for two minutes.
TOLD_MAX = 1 << 17
# What a flow told at its close may still carry before its destroy event is told too:
# the last ACK and a retransmitted FIN or two, not a flow that went on (a client whose
# in-window RST or FIN conntrack took and the pod did not).
TOLD_SLACK_BYTES = 256
_TIME_WAIT_SYSCTL = "netfilter/nf_conntrack_tcp_timeout_time_wait"
_VIEWS_KEPT = 4
# Events a second each netfilter source may cost the agent. Past it the reader leaves
# the socket alone for the rest of the second: the kernel queues what fits and counts
# the rest as lost (NFLOG by number, conntrack as overruns). A flood of refused SYNs, or
# of short flows from off the node, costs the agent this much and no more.
INBOUND_EVENTS_PER_S = 2000


class _Budget:
    """So many events a second, then a pause until the next second."""

    def __init__(self, per_second: int) -> None:
        self.per_second = per_second
        self.window_start = time.monotonic()
        self.spent = 0

    def spend(self, count: int) -> float:
        """Count `count` events; how long to pause reading (0: none)."""
        now = time.monotonic()
        if now - self.window_start >= 1.0:
            self.window_start, self.spent = now, 0
        self.spent += count
        return max(0.0, self.window_start + 1.0 - now) if self.spent >= self.per_second else 0.0


ClosingKey = tuple[str, int, str, int]  # the original tuple: src, sport, dst, dport


class ClosingFlows:
    """The flows from elsewhere whose client sent FIN or RST, from the packet's copy to
    the flow's event: which entries to read when, what a read says, and which destroy
    events tell of flows already told. Bookkeeping only: the reader reads."""

    def __init__(self, verdict_mask: int, keep_s: float, told_max: int = TOLD_MAX) -> None:
        self.verdict_mask, self.keep_s, self.told_max = verdict_mask, keep_s, told_max
        # One queue per read: the delays are fixed, so each queue is in due order.
        self._queues: tuple[deque[tuple[float, ClosingKey]], ...] = tuple(
            deque() for _ in CLOSE_READS_S
        )
        # key -> (which read is next, the client's close (wall clock ns), the conntrack id
        # the first read found, or 0)
        self._waiting: dict[ClosingKey, tuple[int, int, int]] = {}
        # (conntrack id, source port) of a flow told -> (when to forget it, its bytes then)
        self._told: OrderedDict[int, tuple[float, int]] = OrderedDict()

    def copied(self, key: ClosingKey, now: float, seen_ns: int) -> None:
        """A copy of the client's FIN or RST: read the entry after the first delay."""
        known = self._waiting.get(key)
        if known is not None:
            # A RST after a FIN, or a FIN sent again: the close is the later one, and the
            # read stays when it was (a client cannot put its flow's event off).
            self._waiting[key] = (known[0], seen_ns, known[2])
        elif len(self._waiting) < CLOSING_MAX:
            self._waiting[key] = (0, seen_ns, 0)
            self._queues[0].append((now + CLOSE_READS_S[0], key))

    def due(self, now: float) -> list[ClosingKey]:
        """The flows whose entries are to be read now (each answered with `read`)."""
        keys = []
        for queue in self._queues:
            while queue and queue[0][0] <= now:
                keys.append(queue.popleft()[1])
        return keys

    def read(self, key: ClosingKey, flow: ConntrackFlow | None, now: float) -> ConntrackFlow | None:
        """The entry of a due flow, as read (None: conntrack has none): the flow to tell,
        stopped at the client's close, or None (not steer's, not closed yet, or its
        destroy event is to tell of it)."""
        step, closed_ns, first_id = self._waiting.pop(key)
        if (
            flow is None  # gone: its destroy event tells of it
            or not flow.mark & self.verdict_mask
            or flow.bytes_orig is None  # no counters: nothing to tell a later change by
            or flow.bytes_reply is None
            or (first_id and flow.id != first_id)  # a new flow on the same tuple
            or _told_key(flow) in self._told
        ):
            return None
        if flow.state not in (TCP_TIME_WAIT, TCP_CLOSE):
            if step + 1 < len(CLOSE_READS_S):
                self._waiting[key] = (step + 1, closed_ns, flow.id)
                self._queues[step + 1].append((now + CLOSE_READS_S[step + 1], key))
            return None
        self.forget(now)
        self._told[_told_key(flow)] = (now + self.keep_s, flow.bytes_orig + flow.bytes_reply)
        return replace(flow, stop_ns=closed_ns)

    def told(self, flow: ConntrackFlow) -> bool:
        """Whether a destroy event is of a flow told at its close that carried (almost)
        nothing since: such an event is not told again."""
        told = self._told.pop(_told_key(flow), None)
        if told is None:
            return False
        return (flow.bytes_orig or 0) + (flow.bytes_reply or 0) - told[1] <= TOLD_SLACK_BYTES

    def forget(self, now: float) -> None:
        """Let go of flows told whose destroy events are overdue, and of the oldest past
        the cap (and one, to make room)."""
        told = self._told
        while told and (next(iter(told.values()))[0] <= now or len(told) >= self.told_max):
            told.popitem(last=False)

    def waiting(self) -> int:
        return len(self._waiting)


class LongFlows:
    """The flows from elsewhere that conntrack confirmed, each looked at once when it has
    been open LIVE_AFTER_S (and told then, if still open), unless its close came first.
    Bookkeeping only: the reader reads."""

    def __init__(self, live_after_s: float = LIVE_AFTER_S, watched_max: int = CLOSING_MAX):
        self.live_after_s, self.watched_max = live_after_s, watched_max
        # A heap by when due: flows found at start-up come due sooner than those seen since.
        self._queue: list[tuple[float, ClosingKey]] = []
        self._watched: dict[ClosingKey, tuple[int, float]] = {}  # -> conntrack id, when due
        # Flows found open at start-up that have lived long already: their entries as the
        # table gave them, told in turn (`found_due`).
        self._found: OrderedDict[ClosingKey, ConntrackFlow] = OrderedDict()

    def _room(self, key: ClosingKey) -> bool:
        return key in self._watched or len(self._watched) + len(self._found) < self.watched_max

    def opened(self, key: ClosingKey, conntrack_id: int, now: float) -> bool:
        """Watch the flow conntrack confirmed at `now` (or earlier: its age subtracted);
        False when past the cap."""
        known = self._watched.get(key)
        if known is not None and known[0] == conntrack_id:
            return True  # seen already
        if not self._room(key):
            return False
        # A new flow on a tuple still watched (the old one's close went unseen) takes its
        # place, with its own time.
        self._watched[key] = (conntrack_id, now + self.live_after_s)
        heapq.heappush(self._queue, (now + self.live_after_s, key))
        return True

    def found(self, key: ClosingKey, flow: ConntrackFlow) -> bool:
        """A flow found open, that has lived LIVE_AFTER_S already: told as found, with
        no second read; False when past the cap."""
        if not self._room(key):
            return False
        self._found[key] = flow
        return True

    def found_due(self, most: int) -> list[ConntrackFlow]:
        """Up to `most` of the flows found, oldest finding first: a node with thousands
        of them is told over several passes, not in one burst that would push every
        recent event out of the ring."""
        return [self._found.popitem(last=False)[1] for _ in range(min(most, len(self._found)))]

    def closed(self, key: ClosingKey, conntrack_id: int | None = None) -> None:
        """The flow on `key` closed (`conntrack_id`: that flow, where known; the events
        of a new flow on the same tuple can come before the old one's end)."""
        known = self._watched.get(key)
        if known is not None and conntrack_id in (None, known[0]):
            del self._watched[key]
        found = self._found.get(key)
        if found is not None and conntrack_id in (None, found.id):
            del self._found[key]

    def due(self, now: float) -> list[tuple[ClosingKey, int]]:
        """The flows open long enough, with their conntrack ids, each once."""
        found = []
        while self._queue and self._queue[0][0] <= now:
            when, key = heapq.heappop(self._queue)
            known = self._watched.get(key)
            if known is not None and known[1] == when:  # else closed, or a later flow's
                del self._watched[key]
                found.append((key, known[0]))
        return found

    def still_open(self, conntrack_id: int, flow: ConntrackFlow | None) -> bool:
        """Whether the entry read of a due flow is that flow, open: not closing, not gone,
        not a new flow on the same tuple."""
        return flow is not None and flow.id == conntrack_id and flow.state == TCP_ESTABLISHED


def _original_tuple(flow: ConntrackFlow | LoggedPacket) -> ClosingKey:
    return flow.src, flow.sport, flow.dst, flow.dport


def _told_key(flow: ConntrackFlow) -> int:
    # The source port beside the id: ids are hashes (pointers before Linux 5.0).
    return flow.id << 16 | flow.sport


class InboundReader(_Worker):
    """The events of flows into the node's steered pods that no socket hook of a pod
    recorded, from netfilter (steer.node.nfnetlink): those let through, at their close
    (and while open, once, when they live long: `on_live`, not counted), and those
    refused, from the deny rules' NFLOG copies. A source that cannot be opened (another
    reader holds the NFLOG group, say) is logged and left out. Made in the network
    namespace whose flows it reads (its sockets stay there)."""

    def __init__(
        self,
        on_events: Callable[[Sequence[Event]], None],
        views: Callable[[], Sequence[NodeView]],
        revoked: Revoked,
        on_lost: Callable[[str, int], None],
        on_live: Callable[[Sequence[Event]], None] = lambda events: None,
    ) -> None:
        self._on_events, self._views, self._revoked, self._on_lost, self._on_live = (
            on_events,
            views,
            revoked,
            on_lost,
            on_live,
        )
        self._recorded: frozenset[str] = frozenset()
        self._steered: frozenset[str] = frozenset()
        # Flows whose entry went while they were live, held a moment: the agent notes
        # the flows it revokes only once its sync is done.
        self._held: list[tuple[float, ConntrackFlow]] = []
        self._closes: ConntrackEvents | None = None
        self._refusals: NflogGroup | None = None
        self._closing: NflogGroup | None = None
        self._opens: ConntrackEvents | None = None
        self._nflog_lost = 0
        self._closing_flows = ClosingFlows(MARK_VERDICT_MASK, _told_keep_s())
        self._long_flows = LongFlows()
        self._pods_known = self._found_open_flows = False
        self._budgets = {
            "conntrack": _Budget(INBOUND_EVENTS_PER_S),
            "nflog": _Budget(INBOUND_EVENTS_PER_S),
            "closing": _Budget(INBOUND_EVENTS_PER_S),
            "opens": _Budget(INBOUND_EVENTS_PER_S),
        }
        for name in _CONNTRACK_SYSCTLS:
            sysctl = proc_sys_net() / name
            try:
                sysctl.write_text("1\n")
            except OSError as exc:
                log.warning(
                    "%s could not be set (%s): events of flows from elsewhere will lack "
                    "bytes and duration",
                    sysctl,
                    exc,
                )
        try:
            self._closes = ConntrackEvents(MARK_VERDICT_MASK)
        except OSError as exc:
            log.error("conntrack events are unavailable (%s): no events of flows let in", exc)
        try:
            self._refusals = NflogGroup(NFLOG_GROUP)
        except OSError as exc:
            log.error(
                "NFLOG group %d is unavailable (%s): no events of refused flows from "
                "elsewhere. Fix: stop the other reader of that group",
                NFLOG_GROUP,
                exc,
            )
        if self._closes is not None:
            try:
                # One copy a datagram, so that the socket filter can drop one.
                self._closing = NflogGroup(NFLOG_CLOSE_GROUP, batch=1)
            except OSError as exc:
                log.warning(
                    "NFLOG group %d is unavailable (%s): flows let in are told when "
                    "conntrack forgets them (two minutes after a FIN). Fix: stop the other "
                    "reader of that group",
                    NFLOG_CLOSE_GROUP,
                    exc,
                )
            try:
                self._opens = ConntrackEvents(
                    MARK_VERDICT_MASK, buffer_bytes=1 << 20, group=CONNTRACK_NEW_GROUP
                )
            except OSError as exc:
                log.warning(
                    "conntrack's events of new flows are unavailable (%s): flows let in "
                    "are not told while open",
                    exc,
                )
        super().__init__("steer-inbound")

    def stop(self) -> None:
        super().stop()
        for source in (self._closes, self._refusals, self._closing, self._opens):
            if source is not None:
                source.close()

    def addresses(self, recorded: frozenset[str], steered: frozenset[str]) -> None:
        """`recorded`: pods whose own socket hooks record their flows (their flows are not
        these events); `steered`: the pods steer steers (a flow between two others is
        none of steer's). Conntrack's events are filtered by them in the kernel where
        the filter fits; the reader checks them again either way."""
        if (recorded, steered) == (self._recorded, self._steered):
            return
        self._recorded, self._steered = recorded, steered
        recorded_ips = [IPv4Address(ip) for ip in recorded]
        steered_ips = [IPv4Address(ip) for ip in steered]
        try:
            for events in (self._closes, self._opens):
                if events is not None and not events.filter_addresses(recorded_ips, steered_ips):
                    log.info(
                        "%d pods are too many for conntrack's socket filter: addresses are "
                        "checked in the agent",
                        len(steered),
                    )
            if self._closing is not None and not self._closing.drop_sources(recorded_ips):
                log.info(
                    "%d pods are too many for the closing packets' socket filter: the "
                    "agent drops their copies itself",
                    len(recorded),
                )
        except OSError as exc:
            # The previous filters stay; the reader's own checks keep the events right.
            log.warning("a netfilter socket filter could not be replaced: %s", exc)
        # Only now: a flow the new-flow events' filter took no note of yet is one that
        # the reader's look at conntrack's table must still find.
        self._pods_known = True

    def _wanted_flow(self, flow: ConntrackFlow) -> bool:
        """`_wanted` for a conntrack entry: its ends as dialled, and where it went."""
        return self._wanted(flow.src, flow.dst, flow.reply_src)

    def _wanted(self, src: str, *ends: str) -> bool:
        if src in self._recorded:
            return False  # its pod's hooks record it
        return src in self._steered or any(end in self._steered for end in ends)

    def _run(self) -> None:
        sources: dict[str, tuple[socket.socket, Callable[[], int]]] = {}
        if self._closes is not None:
            sources["conntrack"] = (self._closes.events, self._read_closes)
        if self._refusals is not None:
            sources["nflog"] = (self._refusals.sock, self._read_refusals)
        if self._closing is not None:
            sources["closing"] = (self._closing.sock, self._read_closing)
        if self._opens is not None:
            sources["opens"] = (self._opens.events, self._read_opens)
        paused_until = dict.fromkeys(sources, 0.0)
        registered: set[str] = set()
        next_sweep = time.monotonic() + _SWEEP_S
        with selectors.DefaultSelector() as selector:
            while sources and not self._stop.is_set():
                now = time.monotonic()
                if self._closes is not None and now >= next_sweep:
                    next_sweep = now + _SWEEP_S
                    try:
                        self._closes.sweep()
                    except OSError as exc:
                        log.warning("sweeping conntrack failed: %s", exc)
                try:
                    if self._pods_known and not self._found_open_flows:
                        self._find_open_flows()
                    self._release_held(now)
                    self._settle(now)
                except Exception:  # a bad event must not end the reader (and refusals)
                    log.exception("telling of ended flows from elsewhere failed")
                for source, (sock, read) in sources.items():
                    if paused_until[source] <= now and source not in registered:
                        selector.register(sock, selectors.EVENT_READ, (source, read))
                        registered.add(source)
                    elif paused_until[source] > now and source in registered:
                        selector.unregister(sock)
                        registered.discard(source)
                for key, _ in selector.select(timeout=0.2):
                    source, read = key.data
                    try:
                        count = read()
                    except Exception:  # one bad batch must not stop every later one
                        log.exception("reading netfilter events (%s) failed", source)
                        continue
                    pause = self._budgets[source].spend(count)
                    if pause:
                        paused_until[source] = time.monotonic() + pause

    def _read_closes(self) -> int:
        assert self._closes is not None
        flows, overran = self._closes.read()
        if overran:
            self._on_lost("conntrack", 1)
        now = time.monotonic()
        ended = []
        for flow in flows:
            self._long_flows.closed(_original_tuple(flow), flow.id)
            if self._closing_flows.told(flow):
                continue
            if not self._wanted_flow(flow):
                continue
            if flow.state in (TCP_TIME_WAIT, TCP_CLOSE):
                ended.append(flow)
            else:
                self._held.append((now + _HOLD_S, flow))
        self._emit(ended)
        return len(flows)

    def _read_closing(self) -> int:
        """The client's FIN or RST copies: each flow's entry is read a moment later."""
        assert self._closing is not None
        packets = self._closing.read()
        now, seen_ns = time.monotonic(), time.time_ns()
        for packet in packets:
            if packet.src not in self._recorded:  # else the socket filter could not drop it
                key = _original_tuple(packet)
                self._closing_flows.copied(key, now, seen_ns)
                self._long_flows.closed(key)
        return len(packets)

    def _read_opens(self) -> int:
        """Conntrack's new flows: each is looked at once when it has lived long."""
        assert self._opens is not None
        flows, overran = self._opens.read()
        if overran:
            self._on_lost("conntrack_new", 1)  # open events, not the flows' own
        now = time.monotonic()
        for flow in flows:
            if self._wanted_flow(flow):
                self._long_flows.opened(_original_tuple(flow), flow.id, now)
        return len(flows)

    def _find_open_flows(self) -> None:
        """The flows let in before the reader started (by an agent restarted, say): their
        new-flow events went by unread, so each is found in conntrack's table, once. One
        that has lived LIVE_AFTER_S is told as found; a younger one is watched as if its
        event had just come, at its age (at none, where conntrack has no start time); the
        close of each is told as any other's."""
        self._found_open_flows = True
        if self._opens is None or self._closes is None:
            return  # no flow is told while open without the new-flow events
        # Ages from before the dump: a flow read late in it comes due late, never early.
        wall_ns, now = time.time_ns(), time.monotonic()
        live_after_s = self._long_flows.live_after_s
        found = past_cap = 0
        try:
            for flow in self._closes.marked((VERDICT_ALLOW, VERDICT_L7)):
                if flow.state != TCP_ESTABLISHED or not self._wanted_flow(flow):
                    continue
                key = _original_tuple(flow)
                age_s = max((wall_ns - flow.start_ns) / 1e9, 0.0) if flow.start_ns else 0.0
                if age_s >= live_after_s:
                    kept = self._long_flows.found(key, flow)
                else:
                    kept = self._long_flows.opened(key, flow.id, now - age_s)
                if kept:
                    found += 1
                else:
                    past_cap += 1
        except OSError as exc:
            log.warning(
                "the flows let in before the agent started could not all be listed (%s): "
                "the rest are told at their close only",
                exc,
            )
        if past_cap:
            self._on_lost("conntrack_new", past_cap)  # open events, not the flows' own
            log.warning(
                "%d flows let in before the agent started are past the %d watched: they "
                "are told at their close only",
                past_cap,
                self._long_flows.watched_max,
            )
        log.info("found %d flows let in before the agent started, still open", found)

    def _settle(self, now: float) -> None:
        """Read the entries of the flows whose closes are due: one both sides ended is
        told now."""
        if self._closes is None:
            return
        closes = self._closes

        def entry(key: ClosingKey) -> ConntrackFlow | None:
            try:
                return closes.get(*key)
            except OSError as exc:
                log.warning("reading conntrack's entry of %s:%d failed: %s", *key[:2], exc)
                return None

        ended = [
            flow
            for key in self._closing_flows.due(now)
            if (flow := self._closing_flows.read(key, entry(key), now)) is not None
            and self._wanted_flow(flow)
        ]
        self._emit(ended)
        live = [
            flow
            for key, conntrack_id in self._long_flows.due(now)
            if (flow := entry(key)) is not None
            and self._long_flows.still_open(conntrack_id, flow)
            and self._wanted_flow(flow)
        ]
        self._emit(live, live=True)
        self._emit(self._long_flows.found_due(_LIVE_PER_SCAN), live=True)

    def _release_held(self, now: float) -> None:
        if self._held and self._held[0][0] <= now:
            due = [flow for when, flow in self._held if when <= now]
            self._held = [(when, flow) for when, flow in self._held if when > now]
            self._emit(due)

    def _emit(self, flows: Sequence[ConntrackFlow], *, live: bool = False) -> None:
        """The flows' events, to `on_events`; with `live` (flows still open), to `on_live`."""
        if not flows:
            return
        views, now_ns = self._views(), time.time_ns()
        events = [
            event
            for flow in flows
            if (event := inbound_flow_event(views, flow, now_ns, self._revoked, live=live))
            is not None
        ]
        if events:
            (self._on_live if live else self._on_events)(events)

    def _read_refusals(self) -> int:
        assert self._refusals is not None
        packets = self._refusals.read()
        if self._refusals.lost > self._nflog_lost:
            self._on_lost("nflog", self._refusals.lost - self._nflog_lost)
            self._nflog_lost = self._refusals.lost
        views, now, events = self._views(), time.time(), []
        for packet in packets:
            if not self._wanted(packet.src, packet.dst):
                continue
            event = refused_event(views, packet, now)
            if event is not None:
                events.append(event)
        if events:
            self._on_events(events)
        return len(packets)


@dataclass
class _PinnedRing:
    """The ring buffer behind a pin, and which map it is: the pin can be replaced while
    it is read, and a reader left on the old map would never see another event."""

    pin: Path
    fd: int
    map_id: int
    reader: RingReader
    checked: float = 0.0

    @classmethod
    def open(cls, pin: Path) -> _PinnedRing | None:
        fd = libbpf.obj_get(pin)
        if fd < 0:
            return None
        info = libbpf.map_info(fd)
        try:
            if info is None:
                raise OSError(f"reading the info of {pin}")
            ring = cls(pin, fd, info.id, RingReader(fd), time.monotonic())
        except OSError as exc:
            log.error("flow events unavailable: %s", exc)
            os.close(fd)
            return None
        log.debug("reading flow events from %s (map %d)", pin, info.id)
        return ring

    def replaced(self, every_s: float = _PIN_CHECK_S) -> bool:
        """Whether the pin now names another map (checked at most every `every_s`)."""
        now = time.monotonic()
        if now - self.checked < every_s:
            return False
        self.checked = now
        fd = libbpf.obj_get(self.pin)
        if fd < 0:
            return True
        try:
            info = libbpf.map_info(fd)
            return info is None or info.id != self.map_id
        finally:
            os.close(fd)

    def close(self) -> None:
        self.reader.close()
        os.close(self.fd)


class EventRing:
    """The last `size` events, for `--last`, and a wait for new ones, for `--follow`.
    Flows and HTTP requests are kept as read (`Pending`) and made events when first read
    out, in place, so that what `join_late` writes into an event stays for every later
    read."""

    def __init__(self, size: int = OBSERVE_RING_SIZE) -> None:
        self._items: deque[Event | Pending] = deque(maxlen=size)
        self._changed = threading.Condition()
        # The sequence number of the newest item; the oldest is `_seq - len(_items) + 1`.
        self._seq = 0
        # Events pushed out of the ring before anyone read them: `--last` is bounded.
        self.evicted = 0

    def add(self, event: Event) -> None:
        self.extend((event,))

    def extend(self, items: Sequence[Event | Pending]) -> None:
        """Add a batch under one lock, waking `--follow` readers once."""
        with self._changed:
            room = self._items.maxlen or 0
            self.evicted += max(0, len(self._items) + len(items) - room)
            self._items.extend(items)
            self._seq += len(items)
            self._changed.notify_all()

    def last(self, count: int) -> tuple[list[Event], int]:
        """The newest `count` events, oldest first, and the sequence number to follow from."""
        with self._changed:
            return self._from(len(self._items) - max(count, 0)), self._seq

    def after(self, seq: int, timeout: float) -> tuple[list[Event], int]:
        """The events newer than `seq` (waiting up to `timeout` for one), and the new seq."""
        with self._changed:
            self._changed.wait_for(lambda: self._seq > seq, timeout=timeout)
            return self._from(len(self._items) - (self._seq - seq)), self._seq

    def _from(self, index: int) -> list[Event]:
        """The events from position `index` on (called with the lock held)."""
        items = self._items
        events = []
        for position in range(max(index, 0), len(items)):
            item = items[position]
            if not isinstance(item, dict):
                try:
                    event = materialized(item)
                except Exception:  # one bad record must not fail every later read
                    log.exception("a flow record could not be read; its shape stands in")
                    event = dict(item[0])
                item = items[position] = event
            events.append(item)
        return events


# --- servers --------------------------------------------------------------------------------


class _AccessLogs(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        add: Callable[[Sequence[Pending]], None],
        view: Callable[[], NodeView],
        openers: Openers,
    ) -> None:
        self._add = add
        self._view = view
        self._openers = openers

    def StreamAccessLogs(
        self, request_iterator: Iterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        for message in request_iterator:
            view = self._view()
            requests = []
            for entry in message.http_logs.log_entry:
                try:
                    requests.append(pending_http(entry, view, self._openers))
                except Exception:  # one odd entry must not end Envoy's stream
                    log.exception("access log entry not understood: %s", entry)
            # A message carries a worker's entries of up to 200 ms: one batch each.
            self._add(requests)
        return als_pb2.StreamAccessLogsResponse()


def _bind_path(path: Path) -> None:
    """Make way for a socket at `path`: a stale one is removed, a live one (another agent's)
    is left alone and raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink(missing_ok=True)
            else:
                raise OSError(f"another process serves {path}; fix: stop the other agent")


class _ObserveServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    ring: EventRing
    openers: Openers
    revoked: Revoked


class _ObserveHandler(socketserver.StreamRequestHandler):
    """One request line {"last": N, "follow": bool}; then events, one JSON line each."""

    server: _ObserveServer

    def handle(self) -> None:
        try:
            query = json.loads(self.rfile.readline() or b"{}")
            last, follow = int(query.get("last", 20)), bool(query.get("follow", False))
        except (ValueError, AttributeError, TypeError):
            self.wfile.write(b'{"error": "bad request; fix: send {\\"last\\": N}"}\n')
            return
        ring = self.server.ring
        events, seq = ring.last(last)
        try:
            self._send(events)
            while follow:
                events, seq = ring.after(seq, timeout=1.0)
                self._send(events)
        except (BrokenPipeError, ConnectionResetError):
            return  # the reader went away (Ctrl-C on `steer observe --follow`)

    def _send(self, events: Sequence[Event]) -> None:
        for event in events:
            join_late(event, self.server.openers, self.server.revoked)
            self.wfile.write(json.dumps(_readable(event)).encode() + b"\n")
        self.wfile.flush()


def join_late(event: Event, openers: Openers, revoked: Revoked) -> None:
    """What was learnt of an event's connection after the event: the process behind an
    HTTP event whose open record came later (the access log and the kernel's ring buffer
    are read by different threads, in no set order), and the revocation of a flow that
    closed while the sync that revoked it was still running. Written into the stored
    event, so every later read agrees."""
    source = str(event.get("src"))
    if event.get("layer") == "http" and event.get("pid") is None:
        opener = openers.get(source)
        if opener is not None:
            event["pid"], event["comm"] = opener
    elif (
        event.get("layer") == "l4"
        # A flow told of while open (no end yet) was open then, revoked or not later.
        and event.get("end") not in (None, "refused", "revoked")
        and revoked.get(source) is not None
    ):
        event["end"] = "revoked"


def _readable(event: Event) -> Event:
    """The event as `steer observe` shows it: its time as UTC ISO 8601. Formatting is left
    to the reader, off the path of every request."""
    when = event.get("time")
    if not isinstance(when, float):
        return event
    stamp = datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")
    return {**event, "time": stamp}


@dataclass
class Observability:
    """The agent's event plumbing: the ring, the ALS server Envoy streams to, and the
    socket `steer observe` reads. `view` is swapped whole after each sync."""

    als_socket: Path = ALS_SOCKET
    observe_socket: Path = OBSERVE_SOCKET
    ring: EventRing = field(default_factory=EventRing)
    view: NodeView = field(default_factory=NodeView)
    flow_events: Path = BPF_PIN_DIR / "steer_events"
    openers: Openers = field(default_factory=Openers)
    revoked: Revoked = field(default_factory=Revoked)
    # Called with every batch of events (the agent's metrics count them).
    on_events: Callable[[Sequence[Event]], None] = lambda events: None
    # Read netfilter's events of flows from elsewhere, in `netns` (a name or a path; ""
    # for this process's own: the agent's, the node's).
    inbound: bool = False
    netns: str = ""
    # Called with (source, count) for netfilter events lost.
    on_lost: Callable[[str, int], None] = lambda source, count: None
    _grpc: grpc.Server | None = None
    _observe: _ObserveServer | None = None
    _flows: FlowReader | None = None
    _inbound: InboundReader | None = None
    # The last few views, newest first, for events read after the policy that decided
    # them changed again (`_named_as_decided`).
    _views: deque[NodeView] = field(default_factory=lambda: deque(maxlen=_VIEWS_KEPT))

    def update(
        self,
        pods: Sequence[Pod],
        dataplanes: Mapping[str, str],
        enforcement: Any,
        slots: Mapping[int, str] | None = None,
        recorded: frozenset[str] = frozenset(),
    ) -> None:
        """`recorded`: the addresses of pods whose socket hooks record their own flows."""
        by_key = {p.key: p for p in pods}
        if self._flows is not None:
            self._flows.open_now()
        if self._inbound is not None:
            steered = frozenset(p.ip for p in pods if p.key in dataplanes)
            self._inbound.addresses(recorded, steered)
        self.view = NodeView(
            {p.ip: (p, dataplanes.get(p.key)) for p in pods},
            enforcement,
            {slot: by_key[key] for slot, key in (slots or {}).items() if key in by_key},
        )
        self._views.appendleft(self.view)

    def _last_views(self) -> Sequence[NodeView]:
        return tuple(self._views) or (self.view,)

    def _add(self, events: Sequence[Event]) -> None:
        self.ring.extend(events)
        self.on_events(events)

    def _add_pending(self, items: Sequence[Pending]) -> None:
        self.ring.extend(items)
        # What the metrics count of an event (layer, verdict, policy...) is in its shape.
        self.on_events([item[0] for item in items])

    def start(self) -> None:
        _bind_path(self.als_socket)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(
            _AccessLogs(self._add_pending, lambda: self.view, self.openers), server
        )
        # Owner-only from the start: the umask covers the moment before a chmod could.
        old = os.umask(0o077)
        try:
            server.add_insecure_port(f"unix:{self.als_socket}")
            server.start()
            _bind_path(self.observe_socket)
            observe = _ObserveServer(str(self.observe_socket), _ObserveHandler)
        finally:
            os.umask(old)
        observe.ring, observe.openers, observe.revoked = self.ring, self.openers, self.revoked
        threading.Thread(target=observe.serve_forever, name="steer-observe", daemon=True).start()
        self._grpc, self._observe = server, observe
        self._flows = FlowReader(
            self.flow_events,
            self._add_pending,
            lambda: self.view,
            self.openers,
            # Not counted: the metrics count each flow once, at its close.
            on_live=self.ring.extend,
        )
        self._flows.start()
        if self.inbound:

            def reader() -> InboundReader:
                # Open flows are not counted: the metrics count each flow once, at its close.
                return InboundReader(
                    self._add, self._last_views, self.revoked, self.on_lost, self.ring.extend
                )

            self._inbound = run_in_netns(self.netns, reader) if self.netns else reader()
            self._inbound.start()

    def stop(self) -> None:
        if self._flows is not None:
            self._flows.stop()
        if self._inbound is not None:
            self._inbound.stop()
        if self._observe is not None:
            self._observe.shutdown()
            self._observe.server_close()
        if self._grpc is not None:
            self._grpc.stop(grace=None)


def read_events(last: int, *, follow: bool = False, path: Path = OBSERVE_SOCKET) -> Iterator[Event]:
    """The agent's events, oldest first: the last `last`, then (with `follow`) new ones as
    they come. Raises OSError when no agent listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(path))
        sock.sendall(json.dumps({"last": last, "follow": follow}).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for line in lines:
                yield json.loads(line)


def matches(event: Event, filters: Mapping[str, Any]) -> bool:
    """`steer observe`'s filters: every one given must hold."""
    for key, wanted in filters.items():
        if wanted is None:
            continue
        if key == "pod":
            if wanted not in (event.get("pod"), f"{event.get('namespace')}/{event.get('pod')}"):
                return False
        elif key == "port":
            if not str(event.get("dst", "")).endswith(f":{wanted}"):
                return False
        elif str(event.get(key)) != str(wanted):
            return False
    return True


def one_line(event: Event) -> str:
    """The readable default of `steer observe`: one line per event."""
    when = event.get("time", "")
    with contextlib.suppress(ValueError, TypeError):
        when = datetime.fromisoformat(when).strftime("%H:%M:%S.%f")[:-3]
    who = f"{event.get('namespace')}/{event.get('pod')}" if event.get("pod") else event["src"]
    decided = f"{event.get('policy')}/{event.get('rule')}" if event.get("policy") else "-"
    head = f"{when} {event.get('verdict', '?').upper():<7} {event.get('layer')}"
    if event.get("layer") == "l4":
        process = f" {event.get('comm')}[{event.get('pid')}]"
        backend = event.get("backend")
        dst = str(event.get("dst"))
        to = dst + (f" ({backend})" if backend and backend != dst else "")
        if event.get("direction") == "ingress":
            # From a client elsewhere (no process of this node) to the pod.
            who, process, to = str(event["src"]), "", f"{who} {to}"
        via = " via Envoy" if event.get("via_envoy") else ""
        end = event.get("end")
        if end is None:  # still open: how long so far
            traffic, end = f" {event.get('duration_ms')}ms", "open"
        elif end == "refused":
            traffic = ""
        else:
            traffic = (
                f" {event.get('bytes_sent')}B/{event.get('bytes_received')}B "
                f"{event.get('duration_ms')}ms"
            )
        return (
            f"{head} {who}{process} -> {to}{via} {end}{traffic} "
            f"[{event.get('dataplane') or '-'}] {decided}"
        )
    service = f" via {event['service']}" if event.get("service") else ""
    return (
        f"{head} {who} -> {event.get('dst')}{service} {event.get('method')} {event.get('path')} "
        f"{event.get('status')} [{event.get('dataplane') or '-'}] {decided}"
    )
