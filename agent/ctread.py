"""Reading single conntrack entries over ctnetlink: GETs by tuple, the table's count, an entry decoded.

:class:`EntryReader` asks the kernel for the entries holding given tuples
(a key: the original tuple; :func:`.ctnetlink.reply_tuple`: who holds a
session's reply tuple) over one socket kept open, and for how many entries
the table holds (one CT_GET_STATS); :func:`entry_session` decodes an answer
by the rules of ``conntrack -L`` parsing, so that what a GET finds is what
list() shows.  The messages themselves are :mod:`.ctnetlink`'s.
"""

from __future__ import annotations

import errno
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

from ..model import NatSession
from .ctnetlink import (
    BATCH, CTA_MARK, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_NUM, CTA_PROTO_SRC_PORT,
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TIMEOUT,
    CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW, IPS_ASSURED, NFNL_SUBSYS_CTNETLINK, NLM_F_ACK, NLMSG_ERROR, PROTO_NAMES, PROTO_NUMBERS,
    TCP_STATE_NAMES, NetlinkError, Op, Tuple5, describe, frame, open_socket, parse_attrs, untranslated,
)
from .ctlayout import TupleEncoder


@dataclass(frozen=True)
class CtTuple:
    """One direction of a conntrack entry (IPv4): for ICMP ``sport`` is the identifier and ``itype`` the type."""

    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    itype: int = 0


def parse_tuple(payload: bytes) -> CtTuple | None:
    """A CTA_TUPLE_* payload, or None when it is not IPv4."""
    a = parse_attrs(payload)
    ip = parse_attrs(a.get(CTA_TUPLE_IP, b""))
    l4 = parse_attrs(a.get(CTA_TUPLE_PROTO, b""))
    src, dst, num = ip.get(CTA_IP_V4_SRC), ip.get(CTA_IP_V4_DST), l4.get(CTA_PROTO_NUM)
    if src is None or dst is None or len(src) != 4 or len(dst) != 4 or not num:
        return None
    proto = num[0]

    def be16(kind: int) -> int:
        v = l4.get(kind)
        return struct.unpack("!H", v[:2])[0] if v and len(v) >= 2 else 0

    if proto == PROTO_NUMBERS["ICMP"]:
        t = l4.get(CTA_PROTO_ICMP_TYPE)
        return CtTuple(proto, socket.inet_ntoa(src), socket.inet_ntoa(dst), be16(CTA_PROTO_ICMP_ID), 0, t[0] if t else 0)
    return CtTuple(proto, socket.inet_ntoa(src), socket.inet_ntoa(dst), be16(CTA_PROTO_SRC_PORT), be16(CTA_PROTO_DST_PORT))


def _be32(attrs: dict[int, bytes], kind: int) -> int | None:
    v = attrs.get(kind)
    return struct.unpack("!I", v[:4])[0] if v is not None and len(v) >= 4 else None


def _tcp_state(attrs: dict[int, bytes]) -> str | None:
    tcp = parse_attrs(parse_attrs(attrs.get(CTA_PROTOINFO, b"")).get(CTA_PROTOINFO_TCP, b""))
    st = tcp.get(CTA_PROTOINFO_TCP_STATE)
    return TCP_STATE_NAMES.get(st[0]) if st else None


def entry_flow(attrs: dict[int, bytes]) -> NatSession | None:
    """One ctnetlink entry (its top-level attributes) as a session record, translated or not.

    An entry whose reply comes back to its original source is returned as
    :func:`.ctnetlink.untranslated` (translated endpoint = source): a
    firewall's session.  None for what no such record holds: the reply
    coming from elsewhere than the original destination (destination NAT),
    ICMP other than echo, TCP without a known state, other protocols, IPv6.
    """
    o, r = parse_tuple(attrs.get(CTA_TUPLE_ORIG, b"")), parse_tuple(attrs.get(CTA_TUPLE_REPLY, b""))
    if o is None or r is None or o.proto != r.proto or o.proto not in PROTO_NAMES:
        return None
    proto = PROTO_NAMES[o.proto]
    if proto == "ICMP":
        if o.itype != ICMP_ECHO_REQUEST or r.src != o.dst:
            return None
        dst_port, translated_port = 0, r.sport
    else:
        if r.src != o.dst or r.sport != o.dport:
            return None
        dst_port, translated_port = o.dport, r.dport
    tcp_state = None
    if proto == "TCP":
        tcp_state = _tcp_state(attrs)
        if tcp_state is None:
            return None
    timeout = _be32(attrs, CTA_TIMEOUT)
    status = _be32(attrs, CTA_STATUS) or 0
    return NatSession(
        proto, o.src, o.sport, o.dst, dst_port, r.dst, translated_port, tcp_state,
        None if timeout is None else max(1, timeout), bool(status & IPS_ASSURED), _be32(attrs, CTA_MARK) or 0,
    )


def entry_session(attrs: dict[int, bytes]) -> NatSession | None:
    """The session of one ctnetlink entry (its top-level attributes), by the rules of ``conntrack -L`` parsing.

    None for what :meth:`ConntrackProvider.list` leaves out: not source-NATed
    (the reply comes back to the original source), and whatever
    :func:`entry_flow` leaves out.  Must agree with :func:`.cttext.parse_table`
    (the functional test compares the two on the same table).
    """
    s = entry_flow(attrs)
    return None if s is None or untranslated(s) else s


def entry_holds(attrs: dict[int, bytes]) -> list[tuple[Tuple5, Tuple5]]:
    """What an entry that is not a session holds, as :func:`.cttext.parse_table` records it in ``taken``: (reply key, holder).

    TCP and UDP: both of its tuples, each in the form of a session's reply
    key, held by its original tuple; an ICMP echo: its reply tuple.  What
    apply checks a new session's reply tuple against.  Nothing for other
    protocols or ICMP types (they hold no session's reply key).
    """
    o, r = parse_tuple(attrs.get(CTA_TUPLE_ORIG, b"")), parse_tuple(attrs.get(CTA_TUPLE_REPLY, b""))
    if o is None or r is None or o.proto != r.proto:
        return []
    p = PROTO_NAMES.get(o.proto)
    if p in ("TCP", "UDP"):
        holder = (p, o.src, o.sport, o.dst, o.dport)
        return [((p, o.dst, o.dport, o.src, o.sport), holder), ((p, r.dst, r.dport, r.src, r.sport), holder)]
    if p == "ICMP" and o.itype == ICMP_ECHO_REQUEST:
        return [(("ICMP", r.dst, r.sport, r.src, 0), ("ICMP", o.src, o.sport, o.dst, 0))]
    return []


def entry_tuple(attrs: dict[int, bytes]) -> Tuple5 | None:
    """The original tuple of one ctnetlink entry in :data:`Tuple5` form (protocol by name), as :func:`.cttext.parse_table` records an entry that is not a session."""
    o = parse_tuple(attrs.get(CTA_TUPLE_ORIG, b""))
    if o is None:
        return None
    return (PROTO_NAMES.get(o.proto, str(o.proto)), o.src, o.sport, o.dst, o.dport)


_GETS = {t: TupleEncoder(IPCTNL_MSG_CT_GET, NLM_F_ACK, t) for t in (ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY)}
_ANSWER = struct.Struct("=IHH4sI")  # nlmsghdr: length, type, flags, seq as sent (big-endian), port id
_SEQ = struct.Struct("!I")  # how ctnetlink.frame and the encoders write sequence numbers
_CT_NEW_ANSWER = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
IPCTNL_MSG_CT_GET_STATS = 5
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
CTA_STATS_GLOBAL_ENTRIES = 1


class EntryReader:
    """Reads single entries of one namespace's table by tuple, over one ctnetlink socket kept open.

    One GET per tuple (``IPCTNL_MSG_CT_GET``, packed by :class:`TupleEncoder`),
    sent in batches; each request is acknowledged, so every request gets
    exactly one NLMSG_ERROR (0 after its entry, ENOENT when there is none)
    and the reader knows when a batch is complete.  Thread-safe: one request
    at a time.  The socket is opened at the first read and reopened after a failure.
    """

    #: Seconds to wait for the kernel's answers to one batch (it answers synchronously).
    TIMEOUT = 5.0

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = 0

    def read(self, tuples: Sequence[Tuple5], icmp_type: int = ICMP_ECHO_REQUEST) -> list[tuple[int, dict[int, bytes]]]:
        """The entry (top-level attributes) holding each tuple, in either direction, as (index, attrs).

        ``icmp_type``: what an ICMP tuple carries, echo request for keys
        (original tuples), echo reply for :func:`reply_tuple`.  Tuples must be
        valid (:func:`.ctbatch.invalid_keys`).
        """
        found: list[tuple[int, dict[int, bytes]]] = []
        enc = _GETS[icmp_type]
        with self._lock:
            try:
                for start in range(0, len(tuples), BATCH):
                    self._batch(enc, tuples, start, min(start + BATCH, len(tuples)), found)
            except OSError as e:
                self._drop()
                raise NetlinkError(f"ctnetlink GET in {self.netns}: {e}") from e
        return found

    def count(self) -> int:
        """How many entries the namespace's table holds now, translated or not (one CT_GET_STATS: no dump).

        What the provider weighs a read by key against a read of the whole table with.
        """
        with self._lock:
            try:
                sock = self._socket()
                seq = self._seq = (self._seq + 1) & 0x7FFFFFFF
                sock.sendto(frame(Op(IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK, b""), seq), (0, 0))
                entries: int | None = None
                while True:
                    data = sock.recv(1 << 16)
                    off = 0
                    while off + 16 <= len(data):
                        ln, typ, _flags, raw_seq, _pid = _ANSWER.unpack_from(data, off)
                        if ln < 16:
                            break
                        if _SEQ.unpack(raw_seq)[0] == seq:
                            if typ == NLMSG_ERROR:
                                (code,) = struct.unpack_from("=i", data, off + 16)
                                if code != 0:
                                    raise NetlinkError(f"ctnetlink GET_STATS in {self.netns}: {describe(-code)}")
                                if entries is None:
                                    raise NetlinkError(f"ctnetlink GET_STATS in {self.netns}: no count in the answer")
                                return entries
                            entries = _be32(parse_attrs(data, off + 20, off + ln), CTA_STATS_GLOBAL_ENTRIES)
                        off += (ln + 3) & ~3
            except OSError as e:
                self._drop()
                raise NetlinkError(f"ctnetlink GET_STATS in {self.netns}: {e}") from e

    def dump(self) -> list[dict[int, bytes]]:
        """Every IPv4 entry of the table (top-level attributes), from one dump; entries that expired are removed, not listed.

        What a reader of untranslated entries needs that ``conntrack -L``
        parsing (:mod:`.cttext`) leaves out: the NAT's list counts those
        entries, a firewall's list is made of them.
        """
        out: list[dict[int, bytes]] = []
        with self._lock:
            try:
                sock = self._socket()
                seq = self._seq = (self._seq + 1) & 0x7FFFFFFF
                sock.sendto(frame(Op(IPCTNL_MSG_CT_GET, NLM_F_DUMP, b""), seq), (0, 0))
                while True:
                    data = sock.recv(1 << 20)
                    off = 0
                    while off + 16 <= len(data):
                        ln, typ, _flags, raw_seq, _pid = _ANSWER.unpack_from(data, off)
                        if ln < 16:
                            break
                        if _SEQ.unpack(raw_seq)[0] == seq:
                            if typ == NLMSG_DONE:
                                return out
                            if typ == NLMSG_ERROR:
                                (code,) = struct.unpack_from("=i", data, off + 16)
                                if code:
                                    raise NetlinkError(f"ctnetlink dump in {self.netns}: {describe(-code)}")
                                return out
                            if typ == _CT_NEW_ANSWER:
                                out.append(parse_attrs(data, off + 20, off + ln))
                        off += (ln + 3) & ~3
            except OSError as e:
                self._drop()
                raise NetlinkError(f"ctnetlink dump in {self.netns}: {e}") from e

    def flows(self) -> list[NatSession]:
        """:func:`entry_flow` of every IPv4 entry of zone 0 in one dump, translated or not (entries of other zones left out).

        IPv4 TCP and UDP entries, nearly all of a table, are read by
        ctevents' precompiled pattern over both tuples and a walk of the
        few attributes after them; the rest by :func:`entry_flow`.
        Measured on 10k entries: 1.2 s through parse_attrs and entry_flow
        for every entry, 0.25 s so (the dump itself ~0.2 s).
        """
        out: list[NatSession] = []
        with self._lock:
            try:
                sock = self._socket()
                seq = self._seq = (self._seq + 1) & 0x7FFFFFFF
                sock.sendto(frame(Op(IPCTNL_MSG_CT_GET, NLM_F_DUMP, b""), seq), (0, 0))
                while True:
                    data = sock.recv(1 << 20)
                    if _flows_of(data, seq, out, self.netns):
                        return out
            except OSError as e:
                self._drop()
                raise NetlinkError(f"ctnetlink dump in {self.netns}: {e}") from e

    def _socket(self) -> socket.socket:
        if self._sock is None:
            self._sock = open_socket(self.netns)
            self._sock.settimeout(self.TIMEOUT)
        return self._sock

    def _batch(self, enc: TupleEncoder, tuples: Sequence[Tuple5], start: int, stop: int, found: list) -> None:
        sock = self._socket()
        base = self._seq
        self._seq = (self._seq + stop - start) & 0x7FFFFFFF
        # Numbered base + 1 onwards; seq - (base + 1 - start) is the index into tuples.
        seq0 = base + 1 - start
        buf = bytearray((stop - start) * enc.max)
        sock.sendto(memoryview(buf)[:enc.pack(buf, tuples, start, stop, seq0)], (0, 0))
        pending = set(range(base + 1, base + 1 + stop - start))
        errors: dict[int, int] = {}
        unpack_seq = _SEQ.unpack
        while pending:
            data = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, raw_seq, _pid = _ANSWER.unpack_from(data, off)
                if ln < 16:
                    break
                (seq,) = unpack_seq(raw_seq)
                # Answers to another batch (one abandoned by a failure) are skipped by their seq.
                if seq in pending:
                    if typ == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, off + 16)
                        pending.discard(seq)
                        if code not in (0, -errno.ENOENT):
                            errors[seq - seq0] = -code
                    elif typ == _CT_NEW_ANSWER:
                        found.append((seq - seq0, parse_attrs(data, off + 20, off + ln)))  # after nfgenmsg
                off += (ln + 3) & ~3
        if errors:
            i, e = next(iter(errors.items()))
            raise NetlinkError(f"ctnetlink GET in {self.netns} refused {len(errors)} tuple(s), e.g. #{i}: {describe(e)}")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the socket (a later read opens a new one)."""
        with self._lock:
            self._drop()


_TOP = struct.Struct("=HH")
_PROTO_OF_BYTE = {b"\x06": "TCP", b"\x11": "UDP"}


def _flows_of(data: bytes, seq: int, out: list[NatSession], netns: str | None) -> bool:
    """Append the flows of one buffer of dump answers numbered ``seq``; whether the dump ended."""
    from .ctevents import _ADDR, _PORT, _V4_PORTS, CTA_ZONE  # the digest's pattern: one definition of the layout

    off, end = 0, len(data)
    match = _V4_PORTS.match
    while off + 16 <= end:
        ln, typ, _flags, raw_seq, _pid = _ANSWER.unpack_from(data, off)
        if ln < 16:
            break
        stop = off + ln
        if _SEQ.unpack(raw_seq)[0] == seq:
            if typ == NLMSG_DONE:
                return True
            if typ == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, off + 16)
                if code:
                    raise NetlinkError(f"ctnetlink dump in {netns}: {describe(-code)}")
                return True
            if typ == _CT_NEW_ANSWER:
                m = match(data, off + 20, stop)
                if m is None:  # not IPv4 TCP/UDP, or a zone follows the tuples
                    attrs = parse_attrs(data, off + 20, stop)
                    zone = attrs.get(CTA_ZONE)
                    if zone is None or zone == b"\0\0":
                        f = entry_flow(attrs)
                        if f is not None:
                            out.append(f)
                else:
                    src, dst, p, sp, dp, rsrc, rdst, rsp, rdp = m.groups()
                    if rsrc == dst and rsp == dp:  # else destination-NATed: no flow (entry_flow's rule)
                        f = _rest(data, m.end(), stop, _PROTO_OF_BYTE[p], _ADDR[src], _PORT[sp], _ADDR[dst], _PORT[dp], _ADDR[rdst], _PORT[rdp])
                        if f is not None:
                            out.append(f)
        off += (ln + 3) & ~3
    return False


def _rest(buf: bytes, off: int, end: int, proto: str, src: str, sport: int, dst: str, dport: int, rdst: str, rdport: int) -> NatSession | None:
    """The flow of an IPv4 TCP/UDP entry whose tuples were matched: status, timeout, mark and TCP state from the attributes after them."""
    status = mark = 0
    timeout = None
    state = None
    unpack, be32 = _TOP.unpack_from, struct.Struct("!I").unpack_from
    while off + 4 <= end:
        ln, kind = unpack(buf, off)
        if ln < 4:
            break
        kind &= 0x3FFF
        if kind == CTA_STATUS:
            status = be32(buf, off + 4)[0]
        elif kind == CTA_TIMEOUT:
            timeout = be32(buf, off + 4)[0]
        elif kind == CTA_MARK:
            mark = be32(buf, off + 4)[0]
        elif kind == CTA_PROTOINFO:
            # The kernel writes the TCP state first in CTA_PROTOINFO_TCP (as ctevents' pattern reads it); else walk.
            if ln >= 13 and unpack(buf, off + 4)[1] & 0x3FFF == CTA_PROTOINFO_TCP and unpack(buf, off + 8) == (5, CTA_PROTOINFO_TCP_STATE):
                state = TCP_STATE_NAMES.get(buf[off + 12])
            else:
                state = _tcp_state({CTA_PROTOINFO: buf[off + 4:off + ln]})
        off += (ln + 3) & ~3
    if proto == "TCP" and state is None:
        return None
    return NatSession(proto, src, sport, dst, dport, rdst, rdport, state if proto == "TCP" else None,
                      None if timeout is None else max(1, timeout), bool(status & IPS_ASSURED), mark)
