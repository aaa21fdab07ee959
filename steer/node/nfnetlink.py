"""Netfilter's netlink, for the flows into a pod from elsewhere: the conntrack events of
the flows steer's iptables rules let through, and the NFLOG copies of the packets they
refused.

A flow a pod of the node opens is recorded by the pod's own socket hooks, in the context
of the process behind it. A flow from off the node (or from a pod steer does not steer)
has no such hook: its verdict is iptables' in the node's namespace, saved in the flow's
conntrack mark (steer.render.iptables), so conntrack is where it is seen:
- a flow let through (allowed, or sent to Envoy) is recorded when conntrack forgets it:
  its destroy event carries the counters each way and the start and stop times. A socket
  filter in the kernel takes only those of flows steer decided, into a steered pod, from
  a source no pod hook records. Conntrack finds an ended flow's entry expired in a
  periodic sweep, up to a minute late; a dump walks the table and reaps the expired
  entries it meets, so the agent sweeps with an empty dump every few seconds. (One
  destroy event per flow, and one new-flow event below: subscribing to state changes
  instead cost ~6 events per flow on every flow of the node, ~10 us of kernel time per
  connection.)
- a flow let through that lives long is told while open: conntrack's event of each new
  flow, through the same socket filter, and a lookup of its entry by tuple a few seconds
  later, if its close has not come by then. A reader just started finds the flows open
  before it in a dump of the table, filtered by the kernel on the verdict in the mark.
- a flow let through that closes with FIN or RST is told at its close, not when
  conntrack forgets it (two minutes after a FIN: conntrack's TIME_WAIT): a rule copies
  the client's FIN and RST packets of flows steer decided to an NFLOG group of their own,
  and the agent reads the entry (`ConntrackEvents.get`, one lookup by tuple, no table
  walk) a moment later, once both sides are done; the destroy event of a flow told so is
  then dropped by its conntrack id. Best effort: a copy lost, or a flow closed some
  other way, is still told by its destroy event.
- a refused flow is never confirmed in conntrack (its SYN is rejected before), so no
  conntrack event tells of it: the deny rules copy the packet to an NFLOG group.

Parsed here with `struct`, not pyroute2: pyroute2 decodes a conntrack entry in ~740 us
(steer.node.conntrack), and a message here is read in a few microseconds. Acts on the
calling thread's network namespace.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

NETLINK_NETFILTER = 12
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_DUMP = 0x1, 0x4, 0x300
_NLA_TYPE_MASK = 0x3FFF
_NLA_F_NESTED = 0x8000
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NFGEN = struct.Struct("=BBH")  # struct nfgenmsg: family, version, res_id (big-endian)
_ATTR = struct.Struct("=HH")
# The subsystems, in the high byte of a message's type.
_SUBSYS_CTNETLINK, _SUBSYS_ULOG = 1, 4
_CT_NEW, _CT_GET, _CT_DELETE = 0, 1, 2
# The message type of an entry (an event of a new one, or an answer to a GET or a dump).
_CT_ENTRY = (_SUBSYS_CTNETLINK << 8) | _CT_NEW
_ULOG_PACKET, _ULOG_CONFIG = 0, 1
# The conntrack multicast groups of entries confirmed (a flow's first packet passed) and
# of entries going away.
CONNTRACK_NEW_GROUP, CONNTRACK_DESTROY_GROUP = 1, 3

# Conntrack attributes (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_PROTOINFO, CTA_MARK = 1, 2, 4, 8
CTA_MARK_MASK = 21
CTA_COUNTERS_ORIG, CTA_COUNTERS_REPLY, CTA_ID, CTA_TIMESTAMP = 9, 10, 12, 20
_TUPLE_IP, _TUPLE_PROTO = 1, 2
_IP_V4_SRC, _IP_V4_DST = 1, 2
_PROTO_NUM, _PROTO_SRC_PORT, _PROTO_DST_PORT = 1, 2, 3
_PROTOINFO_TCP, _PROTOINFO_TCP_STATE = 1, 1
_COUNTERS_BYTES = 2
_TIMESTAMP_START, _TIMESTAMP_STOP = 1, 2
# Conntrack's TCP states that end a flow.
TCP_ESTABLISHED, TCP_TIME_WAIT, TCP_CLOSE = 3, 7, 8

# NFLOG (linux/netfilter/nfnetlink_log.h).
_NFULA_MARK, _NFULA_PAYLOAD, _NFULA_SEQ = 2, 9, 12
_CFG_CMD, _CFG_MODE, _CFG_TIMEOUT, _CFG_QTHRESH, _CFG_FLAGS = 1, 2, 4, 5, 6
_CFG_CMD_BIND = 1
_COPY_PACKET = 2
_CFG_F_SEQ = 0x1
# Enough of a refused packet for its IPv4 and TCP headers, options included.
_NFLOG_COPY = 120
# The kernel batches copies into one datagram until this many are queued or this long
# (in 1/100 s) has passed: a flood of refused SYNs costs the agent a read per batch, and
# an event is at most 50 ms late (the kernel's defaults, 100 copies or 1 s, held one
# refusal a second).
_NFLOG_BATCH, _NFLOG_FLUSH_CS = 64, 5
# Where an NFLOG copy's packet starts, past nlmsghdr and nfgenmsg: its attributes; the
# payload attribute's value is the IPv4 header, whose source is 12 bytes in.
_NFLOG_ATTRS_AT, _IPV4_SRC_IN_PAYLOAD = 20, 4 + 12

# Classic BPF (linux/filter.h), for the conntrack socket's filter.
_LD_B_ABS, _LD_W_ABS, _LD_IMM, _LDX_IMM = 0x30, 0x20, 0x00, 0x01
_LD_B_IND, _LD_W_IND, _TAX = 0x50, 0x40, 0x07
_JEQ_K, _AND_K, _RET_K = 0x15, 0x54, 0x06
_SKF_AD_NLATTR = -0x1000 + 12
_SO_ATTACH_FILTER = 26
_SO_RCVBUFFORCE = 33
# Where an IPv4 conntrack event puts what the filter looks at: the original tuple comes
# first (nlmsghdr 16, nfgenmsg 4, then CTA_TUPLE_ORIG > CTA_TUPLE_IP > CTA_IP_V4_SRC,
# V4_DST; CTA_TUPLE_PROTO), then the reply tuple, laid out the same (its V4_SRC: the
# backend, or the node after a REDIRECT).
_EVENT_FAMILY_AT, _EVENT_ATTRS_AT = 16, 20
EVENT_SRC_AT, EVENT_DST_AT, EVENT_PROTO_AT, EVENT_REPLY_SRC_AT = 32, 40, 52, 84
# A filter is charged to the socket's option memory (net.core.optmem_max), the old and
# the new program together while one replaces the other (`filter_fits`; with margin).
_OPTMEM_MAX = Path("/proc/sys/net/core/optmem_max")
_FILTER_OVERHEAD, _FILTER_BYTES_PER_INSN = 1536, 16
_BPF_MAXINSNS = 4096


class NetlinkError(OSError):
    pass


def attributes(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes by type: where each one's value starts and ends."""
    found: dict[int, tuple[int, int]] = {}
    end = min(end, len(data))
    while start + 4 <= end:
        length, kind = _ATTR.unpack_from(data, start)
        if length < 4 or start + length > end:
            break
        found[kind & _NLA_TYPE_MASK] = (start + 4, start + length)
        start += (length + 3) & ~3
    return found


def messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, start of the payload, end) of each netlink message in a datagram."""
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, kind, _flags, _seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            break
        yield kind, offset + _HEADER.size, offset + length
        offset += (length + 3) & ~3


def _attr(kind: int, value: bytes) -> bytes:
    length = _ATTR.size + len(value)
    return _ATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | _NLA_F_NESTED, b"".join(parts))


def _message(
    kind: int, flags: int, seq: int, family: int, body: bytes, *, res_id: int = 0
) -> bytes:
    payload = _NFGEN.pack(family, 0, socket.htons(res_id)) + body
    return _HEADER.pack(_HEADER.size + len(payload), kind, flags, seq, 0) + payload


def _error_of(data: bytes, start: int) -> int:
    """The errno of an NLMSG_ERROR message (0 for an acknowledgement)."""
    (code,) = struct.unpack_from("=i", data, start)
    return -int(code)


def _netfilter_socket() -> socket.socket:
    return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)


def _grow_receive_buffer(sock: socket.socket, size: int) -> None:
    # Past net.core.rmem_max for root: bursts of short flows must not overrun it.
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# --- conntrack ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConntrackFlow:
    """An IPv4 TCP entry of conntrack, as its event gave it."""

    id: int
    src: str
    sport: int
    dst: str  # as dialled: a node address for a NodePort, say
    dport: int
    reply_src: str  # where the flow went: the backend, or the node for a REDIRECT
    reply_sport: int
    mark: int
    state: int | None
    bytes_orig: int | None = None  # as conntrack counts them: IP packets, headers included
    bytes_reply: int | None = None
    start_ns: int | None = None  # wall clock
    stop_ns: int | None = None


def _tuple(data: bytes, start: int, end: int) -> tuple[str, int, str, int, int] | None:
    parts = attributes(data, start, end)
    ip, proto = parts.get(_TUPLE_IP), parts.get(_TUPLE_PROTO)
    if ip is None or proto is None:
        return None
    ips, ports = attributes(data, *ip), attributes(data, *proto)
    if _IP_V4_SRC not in ips or _PROTO_SRC_PORT not in ports or _PROTO_NUM not in ports:
        return None
    src = str(IPv4Address(data[ips[_IP_V4_SRC][0] : ips[_IP_V4_SRC][0] + 4]))
    dst = str(IPv4Address(data[ips[_IP_V4_DST][0] : ips[_IP_V4_DST][0] + 4]))
    (sport,) = struct.unpack_from("!H", data, ports[_PROTO_SRC_PORT][0])
    (dport,) = struct.unpack_from("!H", data, ports[_PROTO_DST_PORT][0])
    return src, sport, dst, dport, data[ports[_PROTO_NUM][0]]


def _u(data: bytes, where: tuple[int, int] | None, fmt: str) -> int | None:
    return None if where is None else int(struct.unpack_from(fmt, data, where[0])[0])


def parse_conntrack(data: bytes, start: int, end: int) -> ConntrackFlow | None:
    """A conntrack message's entry (`start`: its nfgenmsg), or None for one that is not
    IPv4 TCP, or not whole."""
    try:
        return _parse_conntrack(data, start, end)
    except (struct.error, ValueError, IndexError, KeyError):
        return None


def _parse_conntrack(data: bytes, start: int, end: int) -> ConntrackFlow | None:
    if data[start] != socket.AF_INET:
        return None
    top = attributes(data, start + _NFGEN.size, end)
    orig, reply = top.get(CTA_TUPLE_ORIG), top.get(CTA_TUPLE_REPLY)
    if orig is None or reply is None:
        return None
    there, back = _tuple(data, *orig), _tuple(data, *reply)
    if there is None or back is None or there[4] != socket.IPPROTO_TCP:
        return None
    state = None
    if CTA_PROTOINFO in top:
        tcp = attributes(data, *top[CTA_PROTOINFO]).get(_PROTOINFO_TCP)
        if tcp is not None:
            state = _u(data, attributes(data, *tcp).get(_PROTOINFO_TCP_STATE), "B")

    def counted(kind: int) -> int | None:
        where = top.get(kind)
        if where is None:
            return None
        return _u(data, attributes(data, *where).get(_COUNTERS_BYTES), "!Q")

    stamps = attributes(data, *top[CTA_TIMESTAMP]) if CTA_TIMESTAMP in top else {}
    return ConntrackFlow(
        id=_u(data, top.get(CTA_ID), "!I") or 0,
        src=there[0],
        sport=there[1],
        dst=there[2],
        dport=there[3],
        reply_src=back[0],
        reply_sport=back[1],
        mark=_u(data, top.get(CTA_MARK), "!I") or 0,
        state=state,
        bytes_orig=counted(CTA_COUNTERS_ORIG),
        bytes_reply=counted(CTA_COUNTERS_REPLY),
        start_ns=_u(data, stamps.get(_TIMESTAMP_START), "!Q"),
        stop_ns=_u(data, stamps.get(_TIMESTAMP_STOP), "!Q"),
    )


def _instruction(code: int, jt: int, jf: int, k: int) -> tuple[int, int, int, int]:
    return code, jt, jf, k & 0xFFFFFFFF


Instruction = tuple[int, int, int, int]
_DROP = _instruction(_RET_K, 0, 0, 0)
_TAKE = _instruction(_RET_K, 0, 0, 0xFFFFFFFF)


def _find_attribute(kind: int) -> list[Instruction]:
    """A: where the attributes start. A becomes the offset of the attribute `kind`; a
    message without one is dropped."""
    return [
        _instruction(_LDX_IMM, 0, 0, kind),
        _instruction(_LD_W_ABS, 0, 0, _SKF_AD_NLATTR),
        _instruction(_JEQ_K, 0, 1, 0),
        _DROP,
    ]


def _ends_when_equal(addresses: Collection[IPv4Address], then: Instruction) -> list[Instruction]:
    """A: an address. Two instructions an address, no long jumps: an equal one ends the
    program with `then`."""
    program = []
    for ip in sorted(addresses):
        program += [_instruction(_JEQ_K, 0, 1, int(ip)), then]
    return program


def closes_filter(
    verdict_mask: int,
    recorded: Collection[IPv4Address] = (),
    steered: Collection[IPv4Address] | None = None,
) -> list[Instruction]:
    """A classic BPF program for the conntrack socket. It takes an event only of an IPv4
    TCP flow whose mark carries a verdict (`verdict_mask`: steer decided it), whose
    source is none of `recorded` (pods whose socket hooks record their own flows), and,
    unless `steered` is None, with a steered pod at one end (the source, the address
    dialled, or the reply's source: a NodePort's backend). Everything else is dropped in
    the kernel, before any copy to the agent: a node's pods open most of its flows, and
    flows between pods steer does not steer are not its to show. Cheap checks first:
    every flow of the node runs it."""

    def on_equal(
        at: int, addresses: Collection[IPv4Address], then: Instruction
    ) -> list[Instruction]:
        return [_instruction(_LD_W_ABS, 0, 0, at), *_ends_when_equal(addresses, then)]

    program = [
        _instruction(_LD_B_ABS, 0, 0, _EVENT_FAMILY_AT),
        _instruction(_JEQ_K, 1, 0, socket.AF_INET),
        _DROP,
        _instruction(_LD_B_ABS, 0, 0, EVENT_PROTO_AT),
        _instruction(_JEQ_K, 1, 0, socket.IPPROTO_TCP),
        _DROP,
        _instruction(_LD_IMM, 0, 0, _EVENT_ATTRS_AT),
        *_find_attribute(CTA_MARK),
        _instruction(_TAX, 0, 0, 0),
        _instruction(_LD_W_IND, 0, 0, 4),
        _instruction(_AND_K, 0, 0, verdict_mask),
        _instruction(_JEQ_K, 0, 1, 0),
        _DROP,
        *(on_equal(EVENT_SRC_AT, recorded, _DROP) if recorded else []),
    ]
    if steered is None:
        return [*program, _TAKE]
    for at in (EVENT_SRC_AT, EVENT_DST_AT, EVENT_REPLY_SRC_AT):
        program += on_equal(at, steered, _TAKE)
    return [*program, _DROP]


def closing_filter(recorded: Collection[IPv4Address]) -> list[Instruction]:
    """A classic BPF program for the socket of the closing packets' NFLOG group: a copy
    whose packet comes from one of `recorded` (a pod whose own hooks tell of its flows)
    is dropped in the kernel. One copy a datagram (`NflogGroup(batch=1)`), so dropping a
    datagram drops exactly that copy."""
    return [
        _instruction(_LD_IMM, 0, 0, _NFLOG_ATTRS_AT),
        *_find_attribute(_NFULA_PAYLOAD),
        _instruction(_TAX, 0, 0, 0),
        _instruction(_LD_W_IND, 0, 0, _IPV4_SRC_IN_PAYLOAD),
        *_ends_when_equal(recorded, _DROP),
        _TAKE,
    ]


def filter_fits(program: Sequence[Instruction]) -> bool:
    """Whether the kernel takes `program` in place of another as long: both are charged
    to the socket's option memory while one replaces the other (measured on 6.18: about
    1 KiB a filter plus 12 bytes an instruction)."""
    try:
        optmem = int(_OPTMEM_MAX.read_text())
    except (OSError, ValueError):
        optmem = 20480  # the default of kernels before 6.9
    needed = 2 * (_FILTER_OVERHEAD + _FILTER_BYTES_PER_INSN * len(program))
    return len(program) <= _BPF_MAXINSNS and needed <= optmem


def attach_fitting(
    sock: socket.socket, program: Sequence[Instruction], shorter: Sequence[Instruction]
) -> bool:
    """Attach `program` if the kernel takes it (`filter_fits`), else `shorter`; whether
    `program` went on."""
    fits = filter_fits(program)
    attach_filter(sock, program if fits else shorter)
    return fits


def attach_filter(sock: socket.socket, program: Sequence[Instruction]) -> None:
    """Attach (or replace, atomically) a classic BPF socket filter."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *insn) for insn in program))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


class ConntrackEvents:
    """Conntrack's events of entries going away (or, with `group`
    CONNTRACK_NEW_GROUP, of new ones), filtered in the kernel (`closes_filter`); sweeps
    that make conntrack let go of the ended ones now; lookups by tuple; and the flows
    open now, by verdict (for a reader just started)."""

    def __init__(
        self, verdict_mask: int, buffer_bytes: int = 8 << 20, group: int = CONNTRACK_DESTROY_GROUP
    ) -> None:
        self.verdict_mask = verdict_mask
        self._kind = (
            _CT_ENTRY if group == CONNTRACK_NEW_GROUP else ((_SUBSYS_CTNETLINK << 8) | _CT_DELETE)
        )
        self.events = _netfilter_socket()
        self.sweeps = _netfilter_socket()
        self._seq = 0
        try:
            _grow_receive_buffer(self.events, buffer_bytes)
            # Nothing is taken before the filter is on.
            attach_filter(self.events, closes_filter(verdict_mask, steered=()))
            self.events.bind((0, 1 << (group - 1)))
            self.sweeps.bind((0, 0))
            self.sweeps.settimeout(5.0)
        except OSError:
            self.close()
            raise

    def filter_addresses(
        self, recorded: Collection[IPv4Address], steered: Collection[IPv4Address]
    ) -> bool:
        """Filter in the kernel by address; False where the lists make too long a filter
        (the kernel then filters by state and mark only, the caller by address)."""
        return attach_fitting(
            self.events,
            closes_filter(self.verdict_mask, recorded, steered),
            closes_filter(self.verdict_mask),
        )

    def read(self) -> tuple[list[ConntrackFlow], bool]:
        """The flows of one datagram of events, and whether the socket overran since the
        last read (events were lost, how many the kernel does not say)."""
        try:
            data = self.events.recv(65536)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return [], True
            raise
        flows = []
        for kind, start, end in messages(data):
            if kind == self._kind:
                flow = parse_conntrack(data, start, end)
                if flow is not None:
                    flows.append(flow)
        return flows, False

    def get(self, src: str, sport: int, dst: str, dport: int) -> ConntrackFlow | None:
        """The entry of the TCP flow whose original tuple this is, as it is now (a
        lookup by tuple, no walk of the table); None when conntrack has none."""
        tcp = _nest(
            _TUPLE_PROTO,
            _attr(_PROTO_NUM, bytes([socket.IPPROTO_TCP])),
            _attr(_PROTO_SRC_PORT, struct.pack("!H", sport)),
            _attr(_PROTO_DST_PORT, struct.pack("!H", dport)),
        )
        ips = _nest(
            _TUPLE_IP,
            _attr(_IP_V4_SRC, IPv4Address(src).packed),
            _attr(_IP_V4_DST, IPv4Address(dst).packed),
        )
        try:
            for kind, data, start, end in self._ask(0, _nest(CTA_TUPLE_ORIG, ips, tcp), "lookup"):
                if kind == _CT_ENTRY:
                    return parse_conntrack(data, start, end)
        except NetlinkError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return None  # never: the answer comes, or the socket times out

    def sweep(self) -> None:
        """Dump conntrack's table with a filter no entry matches: the dump reaps each
        expired entry it meets (conntrack's own sweep can come a minute later), and
        their destroy events follow."""
        for _ in self._dump(0xFFFFFFFF, 0xFFFFFFFF, "sweep"):
            pass

    def marked(self, verdicts: Iterable[int]) -> Iterator[ConntrackFlow]:
        """The TCP entries whose verdict (the mark's bits under the verdict mask) is one of
        `verdicts`, as they are now, as they come: one dump of the table a verdict,
        filtered by the kernel (and checked again here)."""
        shift = (self.verdict_mask & -self.verdict_mask).bit_length() - 1
        for verdict in verdicts:
            for flow in self._dump(verdict << shift, self.verdict_mask, "dump"):
                if flow is not None and flow.mark & self.verdict_mask == verdict << shift:
                    yield flow

    def _dump(self, mark: int, mask: int, what: str) -> Iterator[ConntrackFlow | None]:
        body = _attr(CTA_MARK, struct.pack("!I", mark)) + _attr(
            CTA_MARK_MASK, struct.pack("!I", mask)
        )
        for kind, data, start, end in self._ask(_NLM_F_DUMP, body, what):
            if kind == _NLMSG_DONE:
                return
            if kind == _CT_ENTRY:
                yield parse_conntrack(data, start, end)

    def _ask(self, flags: int, body: bytes, what: str) -> Iterator[tuple[int, bytes, int, int]]:
        """Send conntrack a GET on the sweeps socket; the messages that answer it (type,
        datagram, start, end), its error raised."""
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        kind = (_SUBSYS_CTNETLINK << 8) | _CT_GET
        self.sweeps.send(_message(kind, _NLM_F_REQUEST | flags, self._seq, socket.AF_INET, body))
        while True:
            data = self.sweeps.recv(65536)
            for kind, start, end in messages(data):
                (seq,) = struct.unpack_from("=I", data, start - 8)
                if seq != self._seq:
                    continue  # the end of an earlier request that timed out
                if kind == _NLMSG_ERROR and (code := _error_of(data, start)):
                    why = errno.errorcode.get(code, str(code))
                    raise NetlinkError(code, f"conntrack {what} failed: {why}")
                yield kind, data, start, end

    def close(self) -> None:
        self.events.close()
        self.sweeps.close()


# --- NFLOG ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggedPacket:
    src: str
    sport: int
    dst: str
    dport: int
    mark: int


class NflogGroup:
    """The packets steer's rules copy to an NFLOG group (`--nflog-group`), each with its
    packet mark, numbered by the kernel so that a gap counts the packets lost. `batch`:
    how many copies the kernel may put in one datagram."""

    def __init__(self, group: int, buffer_bytes: int = 4 << 20, batch: int = _NFLOG_BATCH) -> None:
        self.sock = _netfilter_socket()
        self.lost = 0
        self._next_seq: int | None = None
        try:
            _grow_receive_buffer(self.sock, buffer_bytes)
            self.sock.bind((0, 0))
            # One message: the kernel numbers the copies from the first one it queues.
            self._configure(
                group,
                _attr(_CFG_CMD, bytes([_CFG_CMD_BIND]))
                + _attr(_CFG_MODE, struct.pack("!IBx", _NFLOG_COPY, _COPY_PACKET))
                + _attr(_CFG_FLAGS, struct.pack("!H", _CFG_F_SEQ))
                + _attr(_CFG_QTHRESH, struct.pack("!I", batch))
                + _attr(_CFG_TIMEOUT, struct.pack("!I", _NFLOG_FLUSH_CS)),
            )
        except OSError:
            self.sock.close()
            raise

    def _configure(self, group: int, body: bytes) -> None:
        kind, flags = (_SUBSYS_ULOG << 8) | _ULOG_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK
        self.sock.send(_message(kind, flags, 0, socket.AF_UNSPEC, body, res_id=group))
        self.sock.settimeout(5.0)
        try:
            while True:  # the acknowledgement; nothing is queued before it
                data = self.sock.recv(65536)
                for got, start, _end in messages(data):
                    if got == _NLMSG_ERROR:
                        code = _error_of(data, start)
                        if code:
                            why = errno.errorcode.get(code, str(code))
                            raise NetlinkError(code, f"NFLOG group {group}: {why}")
                        return
        finally:
            self.sock.settimeout(None)

    def drop_sources(self, recorded: Collection[IPv4Address]) -> bool:
        """Have the kernel drop copies of packets from `recorded` (`closing_filter`, for a
        group of one copy a datagram); False where the list makes too long a filter (the
        kernel then drops none, the caller checks)."""
        return attach_fitting(self.sock, closing_filter(recorded), closing_filter(()))

    def read(self) -> list[LoggedPacket]:
        """The TCP packets of one datagram. Packets the kernel could not queue (a full
        socket) are counted in `lost` from the gap in the numbers."""
        try:
            data = self.sock.recv(65536)
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                return []  # the numbers of the next packet tell how many
            raise
        packets = []
        for kind, start, end in messages(data):
            if kind != (_SUBSYS_ULOG << 8) | _ULOG_PACKET:
                continue
            seq, packet = logged_packet(data, start, end)
            if seq is not None:
                if self._next_seq is not None and seq > self._next_seq:
                    self.lost += seq - self._next_seq
                self._next_seq = seq + 1
            if packet is not None:
                packets.append(packet)
        return packets

    def close(self) -> None:
        self.sock.close()


def logged_packet(data: bytes, start: int, end: int) -> tuple[int | None, LoggedPacket | None]:
    """An NFLOG message's number, and its packet when that is IPv4 TCP and whole."""
    try:
        found = attributes(data, start + _NFGEN.size, end)
        seq = _u(data, found.get(_NFULA_SEQ), "!I")
        mark = _u(data, found.get(_NFULA_MARK), "!I")
        return seq, _tcp_packet(data, found.get(_NFULA_PAYLOAD), mark)
    except (struct.error, ValueError, IndexError):
        return None, None


def _tcp_packet(
    data: bytes, payload: tuple[int, int] | None, mark: int | None
) -> LoggedPacket | None:
    if payload is None:
        return None
    start, end = payload
    if end - start < 20 or data[start] >> 4 != 4 or data[start + 9] != socket.IPPROTO_TCP:
        return None
    header = (data[start] & 0xF) * 4
    if end - start < header + 4:
        return None
    sport, dport = struct.unpack_from("!HH", data, start + header)
    return LoggedPacket(
        src=str(IPv4Address(data[start + 12 : start + 16])),
        sport=sport,
        dst=str(IPv4Address(data[start + 16 : start + 20])),
        dport=dport,
        mark=mark or 0,
    )
