"""ctnetlink entries as the digest follows them: events, dumps, and what each entry counts as.

The live digest (:mod:`.ctdigest`) holds every entry of a namespace's table
by its identity and counts it the way :func:`.cttext.summarize_table` counts
a line of ``conntrack -L``: a translated session (its digest text) or an
untranslated entry.  This module turns ctnetlink messages into such records
-- NEW and DESTROY events, and the answers of a dump, which carry the same
attributes -- and opens the sockets that read them.

* :func:`parse` reads every message of a buffer into :data:`Record` s.
  IPv4 TCP/UDP (nearly every entry of a NAT) is matched by one precompiled
  bytes pattern over both tuples; anything else (ICMP, IPv6, zones, other
  protocols) by the general attribute walk.  Both decide by cttext's rules,
  and a test holds them to each other and to the text.
* :class:`EventSocket`: subscribed to NEW and DESTROY in the node's
  namespace, with a receive buffer for a burst of :data:`BURST` events and a
  socket filter that drops, in the kernel, the events of the agent's own
  writer socket (the kernel stamps an event with the port id of the socket
  whose request caused it, 0 for its own: measured on 6.18).
* :func:`read_table` dumps the whole table (the full read the digest starts
  from); with the events, it tells each entry's remaining timeout (when the
  digest looks it up again).  :func:`expire` asks for a dump that matches
  nothing, so that the kernel walks its table, removing what has expired (a
  DESTROY event each) and ships nothing: only for entries a lookup by key
  cannot reach, since the walk runs with the CPU's softirqs off (see
  :class:`.ctdeadlines.Deadlines`).

An identity (:data:`Ident`) is the session key (protocol, src, sport, dst,
dport) for TCP and UDP (IPv4 and IPv6) and ICMP echo, extended by what else
tells two entries apart (ICMP type and code other than echo, zones); other
entries are named by their raw original tuple.  A NEW and a DESTROY of one
entry give the same identity, and so does a dump.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import socket
import struct
from typing import Any, Callable, Final, Iterator, Union

from .ctnetlink import (
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_MARK, CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID,
    CTA_PROTO_ICMP_TYPE, CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE,
    CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, IPCTNL_MSG_CT_DELETE, IPCTNL_MSG_CT_GET,
    IPCTNL_MSG_CT_NEW, NETLINK_NETFILTER, NFNL_SUBSYS_CTNETLINK, NLA_F_NESTED, NLA_TYPE_MASK, NLM_F_REQUEST, NLMSG_ERROR,
    SO_RCVBUFFORCE, NetlinkError, _attr, parse_attrs, socket_in,
)

#: Multicast groups of ctnetlink (enum nfnetlink_groups): bit (group - 1) of a bind.
NFNLGRP_CONNTRACK_NEW, NFNLGRP_CONNTRACK_DESTROY = 1, 3
CTA_ZONE, CTA_MARK_MASK = 18, 21
CTA_TUPLE_ZONE = 3
CTA_IP_V6_SRC, CTA_IP_V6_DST = 3, 4
NLM_F_DUMP = 0x300
NLMSG_DONE = 3
SO_ATTACH_FILTER = 26

#: What one queued event costs a receive buffer (its skb's truesize), measured
#: here: a buffer of 16 MiB held 13,107 events, 32 MiB 26,214, 64 MiB 52,428.
EVENT_TRUESIZE = 1280
#: Events from others that may arrive between two reads of the socket
#: without loss: a whole 100k table restored by another tool at once.
BURST = 100_000

NEW, DESTROY = 0, 1
_NEW_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
_DELETE_TYPE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE


class _Unsure:
    """The text of an entry counted untranslated only for its TCP state (NONE, or not told): re-read by key."""

    def __repr__(self) -> str:
        return "UNSURE"


UNSURE: Final = _Unsure()

#: Who an entry is: see the module docstring.
Ident = tuple
#: (NEW or DESTROY, identity, text): the session's digest text (the bytes
#: model.table_digest hashes), None for an untranslated entry, or UNSURE.
#: A DESTROY's text is always None: only its identity matters.
Text = Union[bytes, None, _Unsure]
Record = tuple[int, Ident, Text]

_HEAD = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, port id
_ATTR = struct.Struct("=HH")
_BE16 = struct.Struct("!H")
_PROTO_NAME = {6: "TCP", 17: "UDP", 1: "ICMP"}
ICMP_ECHO_REQUEST = 8
#: TCP states the module knows (SYN_SENT .. SYN_SENT2): a line with another (NONE) is no session in cttext.
_TCP_KNOWN = range(1, 10)


def _h(length: int, kind: int) -> bytes:
    return _ATTR.pack(length, kind)


def _v4_ports_tuple(kind: int, proto: bytes) -> bytes:
    """The pattern of one IPv4 TCP/UDP CTA_TUPLE_* as the kernel writes it, capturing addresses and ports."""
    return (
        re.escape(_h(52, kind | NLA_F_NESTED) + _h(20, CTA_TUPLE_IP | NLA_F_NESTED) + _h(8, CTA_IP_V4_SRC)) + b"(.{4})"
        + re.escape(_h(8, CTA_IP_V4_DST)) + b"(.{4})"
        + re.escape(_h(28, CTA_TUPLE_PROTO | NLA_F_NESTED) + _h(5, CTA_PROTO_NUM)) + proto + b"\0\0\0"
        + re.escape(_h(6, CTA_PROTO_SRC_PORT)) + b"(..)\0\0" + re.escape(_h(6, CTA_PROTO_DST_PORT)) + b"(..)\0\0"
    )


# Both tuples of an IPv4 TCP or UDP entry in one match, and no CTA_ZONE next
# (a zone makes identities differ: the general walk takes it).  Measured on
# 100k dump answers (half TCP, half UDP): parse() 0.47-0.50 s with it, the
# general attribute walk for every message 1.7 s.
_V4_PORTS = re.compile(
    _v4_ports_tuple(CTA_TUPLE_ORIG, b"([\x06\x11])") + _v4_ports_tuple(CTA_TUPLE_REPLY, b"(?:\\3)")
    + b"(?!.." + re.escape(struct.pack("=H", CTA_ZONE)) + b")",
    re.S,
)


# The TCP state after the tuples: any 4-byte attributes the kernel writes
# before CTA_PROTOINFO (id, status, timeout, mark, use, in either order),
# then its first nested attribute, the state.  Otherwise the attributes are
# walked (_tcp_state).  Measured on 100k dump answers: parse() 0.60 s
# walking for every TCP state, 0.48 s so.
_FOUR_BYTE_ATTRS = b"|".join(re.escape(_h(8, k)) for k in (12, 3, 7, CTA_MARK, 11))  # id, status, timeout, mark, use
_TCP_STATE = re.compile(
    b"(?:(?:" + _FOUR_BYTE_ATTRS + b").{4})*"
    + b".." + re.escape(struct.pack("=H", CTA_PROTOINFO | NLA_F_NESTED))
    + b".." + re.escape(struct.pack("=H", CTA_PROTOINFO_TCP | NLA_F_NESTED))
    + re.escape(_h(5, CTA_PROTOINFO_TCP_STATE)) + b"(.)",
    re.S,
)


# The remaining timeout after the tuples: any 4-byte attributes the kernel
# writes first (id, status, mark, use: their order differs between kernels),
# then CTA_TIMEOUT (a dump's answer, an event other than DESTROY); otherwise
# the attributes are walked (_walk_timeout).
_TIMEOUT = re.compile(
    b"(?:(?:" + b"|".join(re.escape(_h(8, k)) for k in (12, CTA_STATUS, CTA_MARK, 11)) + b").{4})*"  # id, status, mark, use
    + re.escape(_h(8, CTA_TIMEOUT)) + b"(.{4})",
    re.S,
)
_BE32 = struct.Struct("!I")
#: What :func:`parse` fills when asked: the remaining timeout, in whole seconds, of each entry a message told one for.
Timeouts = dict


class _Memo(dict[bytes, Any]):
    """Fills itself: ``memo[raw]`` converts once and then looks up (a table repeats its addresses and ports)."""

    def __init__(self, convert: Callable[[bytes], Any]) -> None:
        super().__init__()
        self.convert = convert

    def __missing__(self, raw: bytes) -> object:
        value = self[raw] = self.convert(raw)
        return value


_ADDR = _Memo(socket.inet_ntoa)
_ADDR_TEXT = _Memo(lambda raw: socket.inet_ntoa(raw).encode())
_PORT = _Memo(lambda raw: _BE16.unpack(raw)[0])
_PORT_TEXT = _Memo(lambda raw: str(_BE16.unpack(raw)[0]).encode())
_PROTO_BYTE = {b"\x06": "TCP", b"\x11": "UDP"}
_PROTO_BYTE_TEXT = {b"\x06": b"TCP", b"\x11": b"UDP"}
#: Distinct addresses a memo keeps before it starts over (a long-lived agent meets many).
MEMO_LIMIT = 200_000


def trim_memos() -> None:
    """Forget the converted addresses when there are too many (an agent follows a table for months)."""
    for memo in (_ADDR, _ADDR_TEXT):
        if len(memo) > MEMO_LIMIT:
            memo.clear()


def parse(buf: bytes, records: list[Record], own: int = -1, timeouts: Timeouts | None = None) -> int:
    """Append the records of every ctnetlink entry message in ``buf``; messages of port id ``own`` are skipped.

    ``timeouts``, when given, gets each entry's remaining timeout (seconds)
    by identity, for the entries whose message tells it (a dump's answers,
    NEW events): when to look the entry up again (see :mod:`.ctdigest`).
    Returns NLMSG_DONE or NLMSG_ERROR when ``buf`` ends a dump (an error
    raises :class:`NetlinkError`), else 0.
    """
    off, end = 0, len(buf)
    match, tcp_state = _V4_PORTS.match, _TCP_STATE.match
    unpack = _HEAD.unpack_from
    append = records.append
    addr, addr_text, port, port_text = _ADDR, _ADDR_TEXT, _PORT, _PORT_TEXT
    while off + 16 <= end:
        ln, typ, _flags, _seq, pid = unpack(buf, off)
        if ln < 16:
            break  # malformed: stop rather than loop
        stop = off + ln
        if (typ == _NEW_TYPE or typ == _DELETE_TYPE) and pid != own:
            kind = NEW if typ == _NEW_TYPE else DESTROY
            m = match(buf, off + 20, stop)
            if m is None:
                append(_general(buf, off, stop, kind, timeouts))
            else:
                src, dst, p, sp, dp, rsrc, rdst, rsp, rdp = m.groups()
                ident = (_PROTO_BYTE[p], addr[src], port[sp], addr[dst], port[dp])
                if kind == DESTROY or (rdst == src and rdp == sp) or rsrc != dst or rsp != dp:
                    text: Text = None
                elif p == b"\x06" and _state(tcp_state(buf, m.end(), stop), buf, m.end(), stop) not in _TCP_KNOWN:
                    text = UNSURE
                else:
                    text = b" ".join((_PROTO_BYTE_TEXT[p], addr_text[src], port_text[sp], addr_text[dst], port_text[dp],
                                      addr_text[rdst], port_text[rdp]))
                append((kind, ident, text))
                if timeouts is not None and kind == NEW:
                    t = _TIMEOUT.match(buf, m.end(), stop)
                    secs = _BE32.unpack(t.group(1))[0] if t is not None else _walk_timeout(buf, m.end(), stop)
                    if secs is not None:
                        timeouts[ident] = secs
        elif typ == NLMSG_DONE:
            return NLMSG_DONE
        elif typ == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", buf, off + 16)
            if code:
                raise NetlinkError(f"ctnetlink dump: {errno.errorcode.get(-code, -code)} ({os.strerror(-code)})")
            return NLMSG_ERROR
        off += (ln + 3) & ~3
    return 0


def _state(found: re.Match | None, buf: bytes, off: int, end: int) -> int:
    """The TCP state :data:`_TCP_STATE` found, or else the one :func:`_tcp_state` finds."""
    return found.group(1)[0] if found is not None else _tcp_state(buf, off, end)


def _tcp_state(buf: bytes, off: int, end: int) -> int:
    """The TCP state in the CTA_PROTOINFO among the attributes of ``buf[off:end]``; -1 when none is told."""
    while off + 4 <= end:
        ln, kind = _ATTR.unpack_from(buf, off)
        if ln < 4:
            return -1
        if kind & NLA_TYPE_MASK == CTA_PROTOINFO:
            tcp = parse_attrs(buf, off + 4, off + ln).get(CTA_PROTOINFO_TCP)
            state = parse_attrs(tcp).get(CTA_PROTOINFO_TCP_STATE) if tcp is not None else None
            return state[0] if state else -1
        off += (ln + 3) & ~3
    return -1


def _be16(raw: bytes | None) -> int:
    return _BE16.unpack(raw[:2])[0] if raw is not None and len(raw) >= 2 else 0


def _tuple(payload: bytes | None) -> tuple[int, str, str, dict[int, bytes], int] | None:
    """(protocol number, src, dst, the protocol's attributes, tuple zone) of a CTA_TUPLE_* payload; None if unreadable."""
    if payload is None:
        return None
    a = parse_attrs(payload)
    ip = parse_attrs(a.get(CTA_TUPLE_IP, b""))
    l4 = parse_attrs(a.get(CTA_TUPLE_PROTO, b""))
    num = l4.get(CTA_PROTO_NUM)
    if not num:
        return None
    if CTA_IP_V4_SRC in ip and CTA_IP_V4_DST in ip and len(ip[CTA_IP_V4_SRC]) == 4 and len(ip[CTA_IP_V4_DST]) == 4:
        src, dst = socket.inet_ntoa(ip[CTA_IP_V4_SRC]), socket.inet_ntoa(ip[CTA_IP_V4_DST])
    elif CTA_IP_V6_SRC in ip and CTA_IP_V6_DST in ip and len(ip[CTA_IP_V6_SRC]) == 16 and len(ip[CTA_IP_V6_DST]) == 16:
        src = socket.inet_ntop(socket.AF_INET6, ip[CTA_IP_V6_SRC])
        dst = socket.inet_ntop(socket.AF_INET6, ip[CTA_IP_V6_DST])
    else:
        return None
    return num[0], src, dst, l4, _be16(a.get(CTA_TUPLE_ZONE))


def _walk_timeout(buf: bytes, off: int, end: int) -> int | None:
    """The CTA_TIMEOUT among the top-level attributes of ``buf[off:end]``; None when none is told."""
    return entry_timeout(parse_attrs(buf, off, end))


def entry_timeout(attrs: dict[int, bytes]) -> int | None:
    """The remaining timeout (seconds) among an entry's top-level attributes; None when none is told."""
    raw = attrs.get(CTA_TIMEOUT)
    return _BE32.unpack(raw[:4])[0] if raw is not None and len(raw) >= 4 else None


def _general(buf: bytes, off: int, end: int, kind: int, timeouts: Timeouts | None = None) -> Record:
    """The record of any entry message, by walking its attributes: what :func:`parse`'s pattern does not take."""
    attrs = parse_attrs(buf, off + 20, end)
    ident, text = entry_record(attrs, buf[off + 16])
    if timeouts is not None and kind == NEW:
        secs = entry_timeout(attrs)
        if secs is not None:
            timeouts[ident] = secs
    return (kind, ident, None if kind == DESTROY else text)


def entry_record(attrs: dict[int, bytes], family: int = socket.AF_INET) -> tuple[Ident, Text]:
    """:func:`classify` of one entry's top-level attributes (an event, a dump answer, or a GET's answer)."""
    state = -1
    if CTA_PROTOINFO in attrs:
        tcp = parse_attrs(attrs[CTA_PROTOINFO]).get(CTA_PROTOINFO_TCP)
        st = parse_attrs(tcp).get(CTA_PROTOINFO_TCP_STATE) if tcp is not None else None
        state = st[0] if st else -1
    o, r = _tuple(attrs.get(CTA_TUPLE_ORIG)), _tuple(attrs.get(CTA_TUPLE_REPLY))
    return classify(family, o, r, _be16(attrs.get(CTA_ZONE)), state, attrs.get(CTA_TUPLE_ORIG, b""))


def classify(family: int, o: tuple | None, r: tuple | None, zone: int, state: int, raw: bytes) -> tuple[Ident, Text]:
    """An entry's identity and what it counts as, by :mod:`.cttext`'s rules for a line of ``conntrack -L``.

    ``o`` and ``r`` are :func:`_tuple` of the original and reply tuples,
    ``state`` the TCP state number (-1: not told), ``raw`` the original
    tuple's bytes (the identity of what has no key).  TCP and UDP (IPv4 or
    IPv6): a session when the reply comes from the original destination's
    endpoint and goes to another endpoint than the original source's, TCP
    only in a known state; ICMP (IPv4): an echo request whose reply comes
    from the destination and goes to another address or identifier.
    Everything else is untranslated.
    """
    if o is None or r is None or o[0] != r[0] or o[0] not in _PROTO_NAME:
        return ("#", family, o[0] if o else -1, zone, raw), None
    num, src, dst, l4, tzone = o
    _, rsrc, rdst, rl4, _rz = r
    name = _PROTO_NAME[num]
    extra: tuple = (zone, tzone) if zone or tzone else ()
    if name == "ICMP":
        if family != socket.AF_INET or CTA_PROTO_ICMP_ID not in l4:
            return ("#", family, num, zone, raw), None
        ident_no, rident = _be16(l4.get(CTA_PROTO_ICMP_ID)), _be16(rl4.get(CTA_PROTO_ICMP_ID))
        t, c = l4.get(CTA_PROTO_ICMP_TYPE, b"\0")[0], l4.get(CTA_PROTO_ICMP_CODE, b"\0")[0]
        if (t, c) != (ICMP_ECHO_REQUEST, 0):
            extra = (t, c) + extra
        ident = ("ICMP", src, ident_no, dst, 0) + ((extra,) if extra else ())
        if t != ICMP_ECHO_REQUEST or rsrc != dst or (rdst == src and rident == ident_no):
            return ident, None
        return ident, f"ICMP {src} {ident_no} {dst} 0 {rdst} {rident}".encode()
    if CTA_PROTO_SRC_PORT not in l4 or CTA_PROTO_DST_PORT not in l4:
        return ("#", family, num, zone, raw), None
    sport, dport = _be16(l4[CTA_PROTO_SRC_PORT]), _be16(l4[CTA_PROTO_DST_PORT])
    rsport, rdport = _be16(rl4.get(CTA_PROTO_SRC_PORT)), _be16(rl4.get(CTA_PROTO_DST_PORT))
    ident = (name, src, sport, dst, dport) + ((extra,) if extra else ())
    if (rdst == src and rdport == sport) or rsrc != dst or rsport != dport:
        return ident, None
    if name == "TCP" and state not in _TCP_KNOWN:
        return ident, UNSURE
    return ident, f"{name} {src} {sport} {dst} {dport} {rdst} {rdport}".encode()


# -- sockets --------------------------------------------------------------------


def own_filter(portid: int) -> tuple[ctypes.Array, bytes]:
    """A classic BPF socket filter dropping every message whose nlmsg_pid is ``portid``: (program, sock_fprog).

    Keep the program alive as long as the filter is attached.  BPF loads
    are big-endian, nlmsg_pid is host order: the constant is swapped to match.
    """
    swapped = struct.unpack(">I", struct.pack("=I", portid))[0]
    insns = [
        (0x20, 0, 0, 12),            # ld [12]         A = nlmsg_pid
        (0x15, 0, 1, swapped),       # jeq #own, 0, 1
        (0x06, 0, 0, 0),             # ret #0          drop
        (0x06, 0, 0, 0xFFFFFFFF),    # ret #-1         keep all of it
    ]
    prog = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *i) for i in insns))
    return prog, struct.pack("HL", len(insns), ctypes.addressof(prog))


class EventSocket:
    """NEW and DESTROY events of one namespace's table, the agent's own writes left out by the kernel.

    Subscribed when made: every change the kernel makes from then on is
    queued here the moment it is made (netlink multicast delivers inside
    the change), so reading until the queue is empty gives every change
    made before the read began.  ``own`` is the port id of the writer
    socket whose events are dropped (None: keep all): by the kernel, or with
    ``drop_in_kernel`` False read and skipped after their 16-byte header
    (what the benchmark compares).  ``rcvbuf`` bytes of queue (default:
    :data:`BURST` events); past it the kernel drops events and the next
    read raises :class:`EventsLost`.
    """

    def __init__(self, netns: str | None, own: int | None = None, rcvbuf: int = BURST * EVENT_TRUESIZE,
                 drop_in_kernel: bool = True) -> None:
        self.sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            # NETLINK_NO_ENOBUFS stays off: a loss must be told (ENOBUFS), never silent.
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf // 2)  # the kernel doubles it
            except PermissionError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf // 2)
            self._prog = None
            if own is not None and drop_in_kernel:
                self._prog, fprog = own_filter(own)
                self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
            self.sock.bind((0, (1 << (NFNLGRP_CONNTRACK_NEW - 1)) | (1 << (NFNLGRP_CONNTRACK_DESTROY - 1))))
            self.sock.setblocking(False)
        except OSError:
            self.sock.close()
            raise
        self.own = own if own is not None else -1

    def fileno(self) -> int:
        """The socket's descriptor (to wait on)."""
        return self.sock.fileno()

    def read(self, records: list[Record], limit: int | None = None, timeouts: Timeouts | None = None) -> int:
        """Append the records of the events queued now (up to ``limit`` messages); how many messages were read.

        ``timeouts``: as :func:`parse` fills it.  Raises :class:`EventsLost`
        when the kernel dropped events since the last read.
        """
        n = 0
        for data in self._queued(limit):
            n += 1
            parse(data, records, self.own, timeouts)
        return n

    def _queued(self, limit: int | None) -> Iterator[bytes]:
        """The messages queued now, up to ``limit``; :class:`EventsLost` when the kernel dropped some."""
        recv, n = self.sock.recv, 0
        while limit is None or n < limit:
            try:
                data = recv(65536)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    raise EventsLost("ctnetlink events were dropped (the receive queue overflowed)") from None
                raise
            n += 1
            yield data

    def read_entries(self, out: list[tuple[int, dict[int, bytes]]], limit: int | None = None) -> int:
        """Append (NEW or DESTROY, the entry's top-level attributes) of the events queued now; how many messages were read.

        :meth:`read` keeps what the digest needs; a reader that wants the
        entries themselves (the firewall's sessions, whose timeout, state and
        mark the records leave out) takes this.  Raises :class:`EventsLost`
        as :meth:`read` does.
        """
        n = 0
        for data in self._queued(limit):
            n += 1
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, _seq, pid = _HEAD.unpack_from(data, off)
                if ln < 16:
                    break
                if (typ == _NEW_TYPE or typ == _DELETE_TYPE) and pid != self.own:
                    out.append((NEW if typ == _NEW_TYPE else DESTROY, parse_attrs(data, off + 20, off + ln)))
                off += (ln + 3) & ~3
        return n

    def wait(self, timeout: float) -> bool:
        """Whether events are queued, waiting at most ``timeout`` seconds."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    def close(self) -> None:
        """Unsubscribe (close the socket)."""
        self.sock.close()


class EventsLost(NetlinkError):
    """The kernel dropped events of a socket: what follows it is no longer complete."""


def _request(attrs: bytes, seq: int) -> bytes:
    """A CT_GET dump request of every family (AF_UNSPEC, as ``conntrack -L`` asks), numbered ``seq``."""
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0) + attrs
    head = struct.pack("=IHH", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP)
    return head + struct.pack("=II", seq, 0) + body


# A mark filter no entry passes: (mark & 0) is never 1.  The kernel checks
# expiry before any filter, so the dump still removes what has expired.
_NOTHING = _attr(CTA_MARK, struct.pack("!I", 1)) + _attr(CTA_MARK_MASK, struct.pack("!I", 0))


def read_table(sock: socket.socket, records: list[Record], timeouts: Timeouts | None = None) -> None:
    """Dump the whole table of ``sock``'s namespace into ``records`` (entries that expired are removed, not listed).

    ``timeouts``: as :func:`parse` fills it.
    """
    sock.sendto(_request(b"", 1), (0, 0))
    _answers(sock, records, timeouts)


def expire(sock: socket.socket) -> None:
    """Have the kernel walk its table and remove what has expired (a DESTROY event each), shipping no entry.

    An entry whose timeout has passed stays in the table until the
    kernel's garbage collector comes by (measured here: still there after
    10 s) or something looks it up; ``conntrack -L`` never lists one (its
    dump removes it).  One dump that matches nothing does the same without
    the listing: ~13 ms for the kernel's 262,144 buckets, ~0.25 us more
    per entry (measured: 0 entries 12.6 ms, 10k 15 ms, 100k 35-40 ms).
    """
    sock.sendto(_request(_NOTHING, 2), (0, 0))
    _answers(sock, [])


def _answers(sock: socket.socket, records: list[Record], timeouts: Timeouts | None = None) -> None:
    while True:
        data = sock.recv(1 << 20)
        if parse(data, records, -1, timeouts):
            return


def request_socket(netns: str | None) -> socket.socket:
    """A socket for :func:`read_table` and :func:`expire` in the namespace (room for large dump answers)."""
    sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
        except PermissionError:
            pass
        sock.bind((0, 0))
        sock.settimeout(30.0)
    except OSError:
        sock.close()
        raise
    return sock
