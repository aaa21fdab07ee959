"""The eBPF datapath's layouts: build options, maps and programs, as one Python table.

The C side declares every map in bpf/include/steer/maps.h and every build option with a
default in bpf/include/steer/config.h. Here each option gets the value steer compiles with
(passed as -D, so C never disagrees with Python), each map key and value a ctypes mirror,
and each map the size it must have. The build child checks the compiled sizes against
this table, and the agent checks every pinned map again when it opens the pins.
"""

from __future__ import annotations

import ctypes as ct
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final, NamedTuple

from steer.constants import (
    BPF_MAX_FLOWS,
    BPF_MAX_PENDING,
    BPF_MAX_PODS,
    BPF_MAX_PREFIXES,
    BPF_MAX_SEGMENTS,
    BPF_MAX_SERVICE_ENTRIES,
    ENVOY_INBOUND_PORT,
    ENVOY_OUTBOUND_PORT,
    ENVOY_SERVICE_PORTS,
)

# The flow events' ring buffer (steer_events), in pages of 4 KiB: ~12k events.
EVENT_PAGES: Final = 256
PAGE_SIZE: Final = 4096

BUILD_OPTIONS: Final[dict[str, int]] = {
    "STEER_OUTBOUND_PORT": ENVOY_OUTBOUND_PORT,
    "STEER_INBOUND_PORT": ENVOY_INBOUND_PORT,
    "STEER_SERVICE_PORT_MIN": ENVOY_SERVICE_PORTS.start,
    "STEER_SERVICE_PORT_MAX": ENVOY_SERVICE_PORTS.stop - 1,
    "STEER_MAX_PODS": BPF_MAX_PODS,
    "STEER_MAX_PREFIXES": BPF_MAX_PREFIXES,
    "STEER_MAX_SEGMENTS": BPF_MAX_SEGMENTS,
    "STEER_MAX_PENDING": BPF_MAX_PENDING,
    "STEER_MAX_FLOWS": BPF_MAX_FLOWS,
    "STEER_MAX_SERVICE_ENTRIES": BPF_MAX_SERVICE_ENTRIES,
    "STEER_EVENT_PAGES": EVENT_PAGES,
}
CFG_SKMSG: Final = 0x1


def cflags() -> list[str]:
    return [f"-D{name}={value}" for name, value in BUILD_OPTIONS.items()]


# --- ctypes mirrors of bpf/include/steer/maps.h -------------------------------------------


class Cfg(ct.Structure):
    _fields_ = (
        ("envoy_ip", ct.c_uint32),
        ("flags", ct.c_uint32),
        ("node_netns_cookie", ct.c_uint64),
    )


class PodVal(ct.Structure):
    _fields_ = (("slot", ct.c_uint32), ("ip", ct.c_uint32))


class PolicyKey(ct.Structure):
    _fields_ = (("prefixlen", ct.c_uint32), ("slot", ct.c_uint32), ("addr", ct.c_uint32))


class SegmentVal(ct.Structure):
    _fields_ = (
        ("lo", ct.c_uint16),
        ("hi", ct.c_uint16),
        ("verdict", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
    )


class PolicyVal(ct.Structure):
    _fields_ = (
        ("default_verdict", ct.c_uint8),
        ("nsegments", ct.c_uint8),
        ("pad", ct.c_uint8 * 2),
        ("seg", SegmentVal * BPF_MAX_SEGMENTS),
    )


class OrigDst(ct.Structure):
    _fields_ = (("ip", ct.c_uint32), ("port_be", ct.c_uint16), ("slot", ct.c_uint16))


class FlowKey(ct.Structure):
    _fields_ = (
        ("netns_cookie", ct.c_uint64),
        ("client_ip", ct.c_uint32),
        ("envoy_ip", ct.c_uint32),
        ("client_port", ct.c_uint16),
        ("envoy_port", ct.c_uint16),
        ("pad", ct.c_uint32),
    )


class SvcKey(ct.Structure):
    _fields_ = (("ip", ct.c_uint32), ("port_be", ct.c_uint16), ("slot", ct.c_uint16))


class SvcVal(ct.Structure):
    _fields_ = (("ip", ct.c_uint32), ("port_be", ct.c_uint16), ("count", ct.c_uint16))


class Addr(ct.Structure):
    _fields_ = (("ip", ct.c_uint32), ("port_be", ct.c_uint16), ("pad", ct.c_uint16))


COUNTER_NAMES = (
    "redirects",
    "direct",
    "denied",
    "msgs",
    "bytes",
    "sockopt_hits",
    "sockopt_miss",
    "map_full",
    "svc_balanced",
    "svc_empty",
    "events_lost",
)


class CountersVal(ct.Structure):
    _fields_ = tuple((name, ct.c_uint64) for name in COUNTER_NAMES)


class Flow(ct.Structure):
    """`struct steer_flow`: what connect4 knew of a flow (bpf/include/steer/maps.h)."""

    _fields_ = (
        ("start_ns", ct.c_uint64),
        ("tgid", ct.c_uint32),
        ("slot", ct.c_uint32),
        ("dialled_ip", ct.c_uint32),
        ("dst_ip", ct.c_uint32),
        ("dialled_port_be", ct.c_uint16),
        ("dst_port_be", ct.c_uint16),
        ("verdict", ct.c_uint8),
        ("pad", ct.c_uint8 * 3),
        ("comm", ct.c_char * 16),
        ("local_ip", ct.c_uint32),
        ("local_port", ct.c_uint16),
        ("pad2", ct.c_uint16),
    )


class FlowEnd(ct.Structure):
    """`struct steer_flow_end`: how and when a flow ended (or was refused)."""

    _fields_ = (
        ("at_ns", ct.c_uint64),
        ("bytes_sent", ct.c_uint64),
        ("bytes_received", ct.c_uint64),
        ("src_ip", ct.c_uint32),
        ("src_port", ct.c_uint16),
        ("kind", ct.c_uint8),
        ("end_state", ct.c_uint8),
    )


class FlowEvent(ct.Structure):
    """`struct steer_flow_event`, as the ring buffer hands it over."""

    _fields_ = (("flow", Flow), ("cookie", ct.c_uint64), ("end", FlowEnd))


class FlowRecord(NamedTuple):
    """A `struct steer_flow_event` as plain values: the flow reader unpacks ten thousand a
    second, and a tuple's fields cost a fraction of a ctypes structure's."""

    start_ns: int
    tgid: int
    slot: int
    dialled_ip: int
    dst_ip: int
    dialled_port_be: int
    dst_port_be: int
    verdict: int
    comm: bytes
    local_ip: int
    local_port: int
    cookie: int
    at_ns: int
    bytes_sent: int
    bytes_received: int
    src_ip: int
    src_port: int
    kind: int
    end_state: int

    @classmethod
    def unpack(cls, data: bytes) -> FlowRecord:
        return cls._make(_FLOW_RECORD.unpack_from(data))


# Native byte order, as the programs write it; the addresses stay in network order, as
# in FlowEvent. A record is a struct steer_flow, the socket's cookie, a struct
# steer_flow_end.
_FLOW = "QIIIIHHB3x16sIH2x"
_END = "QQQIHBB"
_FLOW_RECORD = struct.Struct(f"={_FLOW}Q{_END}")
_FLOW_END = struct.Struct(f"={_END}")
if _FLOW_RECORD.size != ct.sizeof(FlowEvent) or _FLOW_END.size != ct.sizeof(FlowEnd):
    raise ImportError("FlowRecord's layout disagrees with struct steer_flow_event's")
FLOW_RECORD_SIZE: Final = _FLOW_RECORD.size
# Where a record's fields sit, for the flow reader, which looks at a few of them in each
# record and unpacks a record whole only when it is read out.
FLOW_KIND_AT: Final = FlowEvent.end.offset + FlowEnd.kind.offset
FLOW_VERDICT_AT: Final = FlowEvent.flow.offset + Flow.verdict.offset
# The bytes a flow's event depends on beyond its own numbers (which pod, where to, which
# verdict): from `slot` to `verdict`, the source address too on iptables.
FLOW_SHAPE: Final = slice(FlowEvent.flow.offset + Flow.slot.offset, FLOW_VERDICT_AT + 1)
FLOW_SOURCE: Final = slice(
    FlowEvent.end.offset + FlowEnd.src_ip.offset, FlowEvent.end.offset + FlowEnd.src_port.offset
)


_FLOW_LOCAL = struct.Struct("=IH")
_FLOW_START = struct.Struct("=Q")
FLOW_SIZE: Final = ct.sizeof(Flow)


def flow_started_ns(flows: bytes, at: int = 0) -> int:
    """When the `struct steer_flow` at `at` in `flows` (as steer_flows holds them) was
    recorded, in bpf_ktime_get_ns() time."""
    return int(_FLOW_START.unpack_from(flows, at)[0])


def live_record(cookie: bytes, flow: bytes, at_ns: int) -> bytes | None:
    """A record of kind FLOW_LIVE for a flow still in steer_flows (its socket has not
    closed), as its close record will be but with no bytes yet; None before connect()
    chose the socket's own address."""
    local_ip, local_port = _FLOW_LOCAL.unpack_from(flow, Flow.local_ip.offset)
    if not local_port:
        return None
    return flow + cookie + _FLOW_END.pack(at_ns, 0, 0, local_ip, local_port, FLOW_LIVE, 0)


FLOW_REFUSED: Final = 1
FLOW_CLOSED: Final = 2
FLOW_OPENED: Final = 3
# Made by the agent, from a flow still in steer_flows (`live_record`).
FLOW_LIVE: Final = 4
VERDICT_NO_BACKEND: Final = 4
# A pod on iptables: its rules decided the flow; the record says who opened it and how.
VERDICT_IPTABLES: Final = 5


@dataclass(frozen=True)
class MapLayout:
    key: Any  # a ctypes type; None for the sockhash, whose values are sockets
    value: Any
    max_entries: int


MAPS: Final[dict[str, MapLayout]] = {
    "steer_cfg": MapLayout(ct.c_uint32, Cfg, 1),
    "steer_pods": MapLayout(ct.c_uint64, PodVal, BPF_MAX_PODS),
    "steer_podips": MapLayout(ct.c_uint32, ct.c_uint32, BPF_MAX_PODS),
    "steer_policy": MapLayout(PolicyKey, PolicyVal, BPF_MAX_PREFIXES),
    "steer_cookie": MapLayout(ct.c_uint64, OrigDst, BPF_MAX_PENDING),
    "steer_origdst": MapLayout(FlowKey, OrigDst, BPF_MAX_FLOWS),
    "steer_counters": MapLayout(ct.c_uint32, CountersVal, BPF_MAX_PODS),
    "steer_sockhash": MapLayout(None, None, BPF_MAX_FLOWS),
    "steer_svc": MapLayout(SvcKey, SvcVal, BPF_MAX_SERVICE_ENTRIES),
    "steer_dialled": MapLayout(ct.c_uint64, Addr, BPF_MAX_FLOWS),
    "steer_flows": MapLayout(ct.c_uint64, Flow, BPF_MAX_FLOWS),
    # A ring buffer: no key or value, its size in bytes.
    "steer_events": MapLayout(None, None, EVENT_PAGES * PAGE_SIZE),
}

# The maps that can fill up. Arrays (steer_cfg, steer_counters) are full by construction,
# and the ring buffer counts what it drops instead (events_lost).
FILLABLE_MAPS: Final = tuple(
    name for name in MAPS if name not in ("steer_cfg", "steer_counters", "steer_events")
)


@dataclass(frozen=True)
class Program:
    name: str
    prog_type: str
    attach_type: str


PROGRAMS: Final = (
    Program("steer_connect4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_CONNECT"),
    Program("steer_connect6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_CONNECT"),
    Program("steer_getpeer4", "CGROUP_SOCK_ADDR", "CGROUP_INET4_GETPEERNAME"),
    Program("steer_getpeer6", "CGROUP_SOCK_ADDR", "CGROUP_INET6_GETPEERNAME"),
    Program("steer_sockops", "SOCK_OPS", "CGROUP_SOCK_OPS"),
    Program("steer_skmsg", "SK_MSG", "SK_MSG_VERDICT"),
    Program("steer_sockopt", "CGROUP_SOCKOPT", "CGROUP_GETSOCKOPT"),
    Program("steer_observe_ops", "SOCK_OPS", "CGROUP_SOCK_OPS"),
)
PROGRAM_BY_NAME: Final = {p.name: p for p in PROGRAMS}
POD_PROGRAMS: Final = (
    "steer_connect4",
    "steer_connect6",
    "steer_getpeer4",
    "steer_getpeer6",
    "steer_sockops",
)
ENVOY_PROGRAMS: Final = ("steer_sockops", "steer_sockopt")
# On the cgroups of pods on the iptables datapath: flow records only (when BPF is there).
OBSERVE_PROGRAMS: Final = ("steer_observe_ops",)


def ip_be(ip: IPv4Address | str) -> int:
    """An IPv4 address as the kernel stores it (network order) read as a native u32."""
    return int.from_bytes(IPv4Address(ip).packed, "little")


def ip_from_be(value: int) -> IPv4Address:
    return IPv4Address(value.to_bytes(4, "little"))


def size_mismatches(name: str, key_size: int, value_size: int, max_entries: int) -> list[str]:
    """How a map as compiled or pinned differs from its layout here (nothing if it fits)."""
    layout = MAPS[name]
    want: list[tuple[str, int, int]] = [("max_entries", max_entries, layout.max_entries)]
    if layout.key is not None:
        want += [
            ("key size", key_size, ct.sizeof(layout.key)),
            ("value size", value_size, ct.sizeof(layout.value)),
        ]
    return [f"{name}: {what} {got}, expected {exp}" for what, got, exp in want if got != exp]
