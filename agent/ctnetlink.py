"""ctnetlink messages for what apply, delete and lookup send: creates, updates, deletes, GETs.

Every write goes straight to the kernel here: one netlink message per
session, sent in batches without NLM_F_ACK, the kernel's per-message errors
matched back to the session by sequence number.  The conntrack tool does
worse at each: ``-R`` loads TCP/UDP creates three times slower than
:func:`create_sessions` (whose messages :class:`CreateEncoder` packs with one
precompiled struct per protocol), cannot give an ICMP session a translated
echo identifier, and its ``-D``/``-U`` lines dump the whole table once per
line (10,000 deletes took minutes).  Deletes and GETs name an entry by one
tuple (:class:`TupleEncoder`, one struct per protocol too; :func:`delete_keys`).
:func:`create_attrs`, :func:`tuple_op` and friends are the readable
encoders: the references the fast ones are tested against, and what the few
updates and undos use.  Reading entries back is :mod:`.ctread`'s.

The socket is opened inside the node's namespace by switching only the
calling thread into it for the ``socket()`` call (:func:`natmig.netns.socket_in`);
a netlink socket stays in the namespace it was created in.
"""

from __future__ import annotations

import errno
import os
import queue
import socket
import struct
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from .. import netns as nsmod
from ..errors import ProviderError
from ..model import NatSession

NETLINK_NETFILTER = 12

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # strips NLA_F_NESTED and NLA_F_NET_BYTEORDER
SOL_NETLINK, NETLINK_CAP_ACK = 270, 10
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # not in Python's socket module

# enum ctattr_type and its nested attribute enums (linux/netfilter/nfnetlink_conntrack.h).
CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO = 1, 2, 3, 4
CTA_NAT_SRC, CTA_TIMEOUT, CTA_MARK = 6, 7, 8
CTA_TUPLE_IP, CTA_TUPLE_PROTO = 1, 2
CTA_IP_V4_SRC, CTA_IP_V4_DST = 1, 2
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3
CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_ICMP_CODE = 4, 5, 6
CTA_NAT_V4_MINIP, CTA_NAT_V4_MAXIP, CTA_NAT_PROTO = 1, 2, 3
CTA_PROTONAT_PORT_MIN, CTA_PROTONAT_PORT_MAX = 1, 2
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, CTA_PROTOINFO_TCP_FLAGS_REPLY = 4, 5
IP_CT_TCP_FLAG_SACK_PERM, IP_CT_TCP_FLAG_BE_LIBERAL = 0x02, 0x08

IPS_SEEN_REPLY, IPS_ASSURED, IPS_CONFIRMED = 0x2, 0x4, 0x8

PROTO_NUMBERS = {"TCP": 6, "UDP": 17, "ICMP": 1}
PROTO_NAMES = {v: k for k, v in PROTO_NUMBERS.items()}
TCP_STATE_NUMBERS = {
    "SYN_SENT": 1, "SYN_RECV": 2, "ESTABLISHED": 3, "FIN_WAIT": 4, "CLOSE_WAIT": 5,
    "LAST_ACK": 6, "TIME_WAIT": 7, "CLOSE": 8, "SYN_SENT2": 9,
}
# NONE (0) and anything past SYN_SENT2 are absent: list() leaves such entries out too.
TCP_STATE_NAMES = {v: k for k, v in TCP_STATE_NUMBERS.items()}
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0

# Messages per sendmsg(): the kernel handles them synchronously and queues
# only errors (no NLM_F_ACK), so the receive buffer never overflows.
BATCH = 256

_NL_HEAD = struct.Struct("=IHH")  # nlmsghdr: length, type, flags (then seq and port id)
_SEQ = struct.Struct("!I")  # our sequence numbers, big-endian (see frame())


class NetlinkError(ProviderError):
    """The kernel's netlink interface could not be reached."""


def _attr(kind: int, payload: bytes) -> bytes:
    ln = 4 + len(payload)
    return struct.pack("=HH", ln, kind) + payload + b"\0" * ((4 - ln % 4) % 4)


def _nest(kind: int, *parts: bytes) -> bytes:
    return _attr(kind | NLA_F_NESTED, b"".join(parts))


def _tuple(kind: int, src: str, dst: str, proto: str, sport: int, dport: int, icmp_type: int = 0) -> bytes:
    """A CTA_TUPLE_* attribute; for ICMP ``sport`` is the echo identifier."""
    ip = _nest(CTA_TUPLE_IP, _attr(CTA_IP_V4_SRC, socket.inet_aton(src)), _attr(CTA_IP_V4_DST, socket.inet_aton(dst)))
    num = PROTO_NUMBERS[proto]
    if proto == "ICMP":
        l4 = (
            _attr(CTA_PROTO_ICMP_ID, struct.pack("!H", sport))
            + _attr(CTA_PROTO_ICMP_TYPE, bytes([icmp_type]))
            + _attr(CTA_PROTO_ICMP_CODE, b"\0")
        )
    else:
        l4 = _attr(CTA_PROTO_SRC_PORT, struct.pack("!H", sport)) + _attr(CTA_PROTO_DST_PORT, struct.pack("!H", dport))
    return _nest(kind, ip, _nest(CTA_TUPLE_PROTO, _attr(CTA_PROTO_NUM, bytes([num])), l4))


def orig_tuple(s: NatSession) -> bytes:
    """The original-direction tuple of a session (what identifies it to the kernel)."""
    return _tuple(CTA_TUPLE_ORIG, s.src_address, s.dst_address, s.protocol, s.src_port, s.dst_port, ICMP_ECHO_REQUEST)


def untranslated(s: NatSession) -> bool:
    """Whether ``s`` is an entry without translation: its translated endpoint is its own source.

    Such an entry (a firewall's session) is created with the inverse of its
    original tuple as its reply tuple and no NAT attribute at all.
    """
    return s.translated_address == s.src_address and s.translated_port == s.src_port


def create_attrs(s: NatSession, timeout: int) -> bytes:
    """Attributes of a CT_NEW that creates ``s`` with its translation (none: :func:`untranslated`).

    The reply tuple is the un-NATed one but already carries the public port
    (or echo identifier): the kernel derives the NAT mapping from the inverted
    reply tuple, and a NAT range pinned to exactly that port makes it refuse
    (EEXIST) rather than pick another one when the port is taken.  Sending the
    NATed reply tuple instead would show right in ``conntrack -L`` but leave
    the SRC_NAT status bit unset, and packets would not be translated.
    """
    pub = socket.inet_aton(s.translated_address)
    port = struct.pack("!H", s.translated_port)
    reply = _tuple(CTA_TUPLE_REPLY, s.dst_address, s.src_address, s.protocol, s.dst_port, s.translated_port, ICMP_ECHO_REPLY)
    if s.protocol == "ICMP":
        # For ICMP the reply's "source port" slot is the identifier too.
        reply = _tuple(CTA_TUPLE_REPLY, s.dst_address, s.src_address, "ICMP", s.translated_port, 0, ICMP_ECHO_REPLY)
    nat = _nest(
        CTA_NAT_SRC,
        _attr(CTA_NAT_V4_MINIP, pub),
        _attr(CTA_NAT_V4_MAXIP, pub),
        _nest(CTA_NAT_PROTO, _attr(CTA_PROTONAT_PORT_MIN, port), _attr(CTA_PROTONAT_PORT_MAX, port)),
    )
    from .cttext import seen_reply  # local: cttext is the single place that decides the flags

    status = IPS_CONFIRMED | (IPS_SEEN_REPLY if seen_reply(s) else 0) | (IPS_ASSURED if s.assured else 0)
    out = orig_tuple(s) + reply + (b"" if untranslated(s) else nat) + _attr(CTA_STATUS, struct.pack("!I", status))
    out += _attr(CTA_TIMEOUT, struct.pack("!I", timeout)) + _attr(CTA_MARK, struct.pack("!I", s.mark))
    if s.protocol == "TCP":
        out += _protoinfo(s, liberal=True)
    return out


def _protoinfo(s: NatSession, liberal: bool = False) -> bytes:
    """TCP state; with ``liberal``, the BE_LIBERAL and SACK_PERM flags both ways.

    A created session has no window-tracking data: without BE_LIBERAL (and
    without the namespace's nf_conntrack_tcp_be_liberal=1) the first packets
    of a busy connection moved onto the node are INVALID and it is reset.
    The conntrack tool sets the same flags on what it creates.
    """
    state = TCP_STATE_NUMBERS[s.tcp_state or "ESTABLISHED"]
    parts = [_attr(CTA_PROTOINFO_TCP_STATE, bytes([state]))]
    if liberal:
        bits = IP_CT_TCP_FLAG_BE_LIBERAL | IP_CT_TCP_FLAG_SACK_PERM
        flags = struct.pack("=BB", bits, bits)  # struct nf_ct_tcp_flags {flags, mask}
        parts += [_attr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags), _attr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags)]
    return _nest(CTA_PROTOINFO, _nest(CTA_PROTOINFO_TCP, *parts))


def update_attrs(s: NatSession, timeout: int) -> bytes:
    """Attributes of a CT_NEW that changes an existing session in place (same translation).

    Timeout, mark and TCP state are set; status bits are only ever added
    (the kernel refuses to clear SEEN_REPLY or ASSURED on a live session).
    """
    out = orig_tuple(s) + _attr(CTA_TIMEOUT, struct.pack("!I", timeout)) + _attr(CTA_MARK, struct.pack("!I", s.mark))
    if s.assured:
        out += _attr(CTA_STATUS, struct.pack("!I", IPS_CONFIRMED | IPS_SEEN_REPLY | IPS_ASSURED))
    if s.protocol == "TCP":
        out += _protoinfo(s)
    return out


@dataclass(frozen=True)
class Op:
    """One netlink request: message type, flags and attributes."""

    msg: int
    flags: int
    attrs: bytes


def create_op(s: NatSession, timeout: int) -> Op:
    """Create ``s``; fails with EEXIST when its key or its public port is taken."""
    return Op(IPCTNL_MSG_CT_NEW, NLM_F_CREATE | NLM_F_EXCL, create_attrs(s, timeout))


def update_op(s: NatSession, timeout: int) -> Op:
    """Change ``s`` in place; fails with ENOENT when it does not exist."""
    return Op(IPCTNL_MSG_CT_NEW, 0, update_attrs(s, timeout))


def delete_op(s: NatSession) -> Op:
    """Delete the session with the key of ``s``; ENOENT when there is none."""
    return Op(IPCTNL_MSG_CT_DELETE, 0, orig_tuple(s))


def socket_in(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A new socket made in the named namespace (the caller's when None); it stays there for life.

    See :func:`natmig.netns.socket_in`; a namespace that cannot be entered
    is a :class:`NetlinkError` here, as every failure to reach the kernel.
    """
    try:
        return nsmod.socket_in(netns, family, kind, proto)
    except nsmod.NetnsError as e:
        raise NetlinkError(str(e)) from e


def open_socket(netns: str | None) -> socket.socket:
    """A bound netfilter netlink socket in the named namespace (the caller's when None)."""
    sock = socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    # Room for a whole batch's errors: should the queue overflow, which of
    # them failed is lost (then reported as ENOBUFS, see _collect_errors).
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 4 << 20)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    # Errors without a copy of the refused request: some 40 bytes each instead of ~260.
    sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
    sock.bind((0, 0))
    return sock


def frame(op: Op, seq: int) -> bytes:
    """One whole netlink message for ``op`` (IPv4), numbered ``seq``.

    The sequence number is written big-endian, as the fast create encoder
    writes it (its one precompiled struct is big-endian throughout); the
    kernel only echoes it back in the error, where :func:`_collect_errors`
    reads it the same way.
    """
    body = struct.pack("=BBH", socket.AF_INET, 0, 0) + op.attrs
    head = _NL_HEAD.pack(16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | op.msg, NLM_F_REQUEST | op.flags)
    return head + _SEQ.pack(seq) + b"\0\0\0\0" + body


def run_ops(netns: str | None, ops: Sequence[Op], sock: socket.socket | None = None) -> dict[int, int]:
    """Send ``ops`` to the kernel; the errno of each one that failed, by index into ``ops``.

    ``sock``: an :func:`open_socket` of ``netns`` to write with (kept open),
    instead of a new one: the provider writes through one socket, whose
    events its digest knows as its own (see :mod:`.ctdigest`).
    """
    failed: dict[int, int] = {}
    if not ops:
        return failed
    with _writer(netns, sock) as w:
        for start in range(0, len(ops), BATCH):
            w.sendto(b"".join(frame(ops[i], i + 1) for i in range(start, min(start + BATCH, len(ops)))), (0, 0))
            _collect_errors(w, failed, start)
    return failed


@contextmanager
def _writer(netns: str | None, sock: socket.socket | None) -> Iterator[socket.socket]:
    """``sock`` with nothing left queued from an earlier write (errors are matched by sequence number), or a new socket closed after."""
    if sock is not None:
        _collect_errors(sock, {})  # what an interrupted write left behind is nobody's now
        yield sock
        return
    own = open_socket(netns)
    try:
        yield own
    finally:
        own.close()


def _collect_errors(sock: socket.socket, failed: dict[int, int], first: int = 0) -> None:
    """Read the error messages already queued (the kernel answered synchronously).

    ``failed`` gets errno by index (seq - 1).  Should the kernel have had to
    drop errors (a full receive queue, ENOBUFS), the message numbered
    ``first`` + 1 is marked failed with ENOBUFS: which ones failed is then
    unknown, so the caller must treat the batch as refused.
    """
    while True:
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            failed.setdefault(first, errno.ENOBUFS)
            continue
        off = 0
        while off + 16 <= len(data):
            ln, typ, _flags = _NL_HEAD.unpack_from(data, off)
            if ln < 16:
                break  # malformed: stop rather than loop
            if typ == NLMSG_ERROR:
                (seq,) = _SEQ.unpack_from(data, off + 8)
                (code,) = struct.unpack_from("=i", data, off + 16)
                if code != 0:
                    failed[seq - 1] = -code
            off += (ln + 3) & ~3


def describe(err: int) -> str:
    """A readable name of a netlink errno."""
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def delete_sessions(netns: str | None, sessions: Iterable[NatSession], sock: socket.socket | None = None) -> tuple[int, dict[int, int]]:
    """Delete by key; (how many were deleted, errors other than 'no such entry' by index)."""
    return delete_keys(netns, [s.key for s in sessions], sock)


# -- creating many sessions fast (CT_NEW) ------------------------------------
#
# create_attrs() builds each message from some thirty small byte strings:
# 93 ms per 10,000 sessions, more than `conntrack -R` takes for the whole
# job.  Every attribute of an IPv4 TCP, UDP or ICMP create has a fixed size,
# so the whole message (nlmsghdr, nfgenmsg, attributes) is one precompiled
# big-endian struct per protocol, filled by one pack_into() per session.
# The layouts are built from the same attribute tree create_attrs() writes,
# and a unit test compares the bytes of both.


@dataclass(frozen=True)
class _Field:
    """A per-session value of a message layout: its name, struct code (big-endian) and size."""

    name: str
    code: str
    size: int


_Segment = bytes | _Field


def _seg_size(segs: list[_Segment]) -> int:
    return sum(x.size if isinstance(x, _Field) else len(x) for x in segs)


def _lattr(kind: int, payload: _Segment) -> list[_Segment]:
    """:func:`_attr` of a layout: the header, the payload (constant or a field), the padding."""
    ln = 4 + _seg_size([payload])
    return [struct.pack("=HH", ln, kind), payload, b"\0" * ((4 - ln % 4) % 4)]


def _lnest(kind: int, *parts: list[_Segment]) -> list[_Segment]:
    """:func:`_nest` of a layout."""
    body = [x for part in parts for x in part]
    return [struct.pack("=HH", 4 + _seg_size(body), kind | NLA_F_NESTED), *body]


def _ltuple(kind: int, proto: str, names: tuple[str, str, str, str], icmp_type: int) -> list[_Segment]:
    """:func:`_tuple` of a layout; ``names`` name the src, dst, sport and dport fields (ICMP: no dport)."""
    src, dst, sport, dport = names
    ip = _lnest(CTA_TUPLE_IP, _lattr(CTA_IP_V4_SRC, _Field(src, "4s", 4)), _lattr(CTA_IP_V4_DST, _Field(dst, "4s", 4)))
    if proto == "ICMP":
        l4 = _lattr(CTA_PROTO_ICMP_ID, _Field(sport, "H", 2)) + _lattr(CTA_PROTO_ICMP_TYPE, bytes([icmp_type]))
        l4 += _lattr(CTA_PROTO_ICMP_CODE, b"\0")
    else:
        l4 = _lattr(CTA_PROTO_SRC_PORT, _Field(sport, "H", 2)) + _lattr(CTA_PROTO_DST_PORT, _Field(dport, "H", 2))
    return _lnest(kind, ip, _lnest(CTA_TUPLE_PROTO, _lattr(CTA_PROTO_NUM, bytes([PROTO_NUMBERS[proto]])), l4))


def _create_segments(proto: str, nat: bool = True) -> list[_Segment]:
    """The whole CT_NEW create message of ``proto``, in the order create_attrs() writes it (``nat``: with CTA_NAT_SRC)."""
    attrs = _ltuple(CTA_TUPLE_ORIG, proto, ("src", "dst", "sport", "dport"), ICMP_ECHO_REQUEST)
    attrs += _ltuple(CTA_TUPLE_REPLY, proto, ("rsrc", "rdst", "rsport", "rdport"), ICMP_ECHO_REPLY)
    attrs += [] if not nat else _lnest(
        CTA_NAT_SRC,
        _lattr(CTA_NAT_V4_MINIP, _Field("minip", "4s", 4)),
        _lattr(CTA_NAT_V4_MAXIP, _Field("maxip", "4s", 4)),
        _lnest(CTA_NAT_PROTO, _lattr(CTA_PROTONAT_PORT_MIN, _Field("minport", "H", 2)),
               _lattr(CTA_PROTONAT_PORT_MAX, _Field("maxport", "H", 2))),
    )
    for kind, name in ((CTA_STATUS, "status"), (CTA_TIMEOUT, "timeout"), (CTA_MARK, "mark")):
        attrs += _lattr(kind, _Field(name, "I", 4))
    if proto == "TCP":
        bits = IP_CT_TCP_FLAG_BE_LIBERAL | IP_CT_TCP_FLAG_SACK_PERM
        flags = bytes([bits, bits])
        attrs += _lnest(CTA_PROTOINFO, _lnest(
            CTA_PROTOINFO_TCP, _lattr(CTA_PROTOINFO_TCP_STATE, _Field("state", "B", 1)),
            _lattr(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, flags), _lattr(CTA_PROTOINFO_TCP_FLAGS_REPLY, flags),
        ))
    length = 20 + _seg_size(attrs)
    head = _NL_HEAD.pack(length, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL)
    # Port id 0 (the kernel) and nfgenmsg (AF_INET, version 0, res_id 0) follow the sequence number.
    return [head, _Field("seq", "I", 4), b"\0\0\0\0" + struct.pack("=BBH", socket.AF_INET, 0, 0), *attrs]


@dataclass(frozen=True)
class _Layout:
    """A message layout compiled: the struct, the constants between its fields, the fields' names."""

    struct: struct.Struct
    consts: tuple[bytes, ...]
    names: tuple[str, ...]


def _compile(segs: list[_Segment]) -> _Layout:
    """Merge adjacent constants; the layout must alternate constant, field, constant, ..., constant.

    The alternation is what lets one pack_into() call take the constants
    and the session's values interleaved, in a fixed order.
    """
    merged: list[_Segment] = []
    for x in segs:
        if isinstance(x, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += x
        elif not (isinstance(x, bytes) and not x):
            merged.append(x)
    if isinstance(merged[-1], _Field):
        merged.append(b"")  # a trailing empty constant keeps the alternation
    consts = tuple(x for x in merged[0::2] if isinstance(x, bytes))
    fields = tuple(x for x in merged[1::2] if isinstance(x, _Field))
    if len(consts) != len(fields) + 1 or len(consts) + len(fields) != len(merged):
        raise AssertionError("a create layout must alternate constants and fields")
    fmt = ">" + "".join(f"{len(c)}s{f.code}" for c, f in zip(consts, fields)) + f"{len(consts[-1])}s"
    return _Layout(struct.Struct(fmt), consts, tuple(f.name for f in fields))


_TCP, _UDP, _ICMP = (_compile(_create_segments(p)) for p in ("TCP", "UDP", "ICMP"))
#: The same without CTA_NAT_SRC: entries that are not translated (:func:`untranslated`).
_PLAIN_TCP, _PLAIN_UDP, _PLAIN_ICMP = (_compile(_create_segments(p, nat=False)) for p in ("TCP", "UDP", "ICMP"))
# The encoder below passes the values in these orders; checked once, at import.
_PORTS_ORDER = ("seq", "src", "dst", "sport", "dport", "rsrc", "rdst", "rsport", "rdport",
                "minip", "maxip", "minport", "maxport", "status", "timeout", "mark")
assert _TCP.names == _PORTS_ORDER + ("state",) and _UDP.names == _PORTS_ORDER
assert _ICMP.names == tuple(n for n in _PORTS_ORDER if n not in ("dport", "rdport"))
_PLAIN_ORDER = tuple(n for n in _PORTS_ORDER if n not in ("minip", "maxip", "minport", "maxport"))
assert _PLAIN_TCP.names == _PLAIN_ORDER + ("state",) and _PLAIN_UDP.names == _PLAIN_ORDER
assert _PLAIN_ICMP.names == tuple(n for n in _PLAIN_ORDER if n not in ("dport", "rdport"))
#: The largest create message (TCP), what a batch buffer is sized by.
CREATE_MAX = max(x.struct.size for x in (_TCP, _UDP, _ICMP))


def _create_status(s: NatSession) -> tuple[int, int]:
    """(CTA_STATUS, TCP state number) of a created ``s``: create_attrs()'s rules."""
    from .cttext import seen_reply  # local: cttext is the single place that decides the flags

    status = IPS_CONFIRMED | (IPS_SEEN_REPLY if seen_reply(s) else 0) | (IPS_ASSURED if s.assured else 0)
    return status, TCP_STATE_NUMBERS[s.tcp_state or "ESTABLISHED"] if s.protocol == "TCP" else 0


class CreateEncoder:
    """Packs CT_NEW create messages of many sessions into a buffer, one struct pack per session.

    Byte for byte the messages :func:`frame` makes of :func:`create_op`
    (numbered by index + 1), only some ten times cheaper.  Addresses and
    the status bits are cached: a table repeats its public address, its
    servers and its few (protocol, state, assured) kinds.
    """

    def __init__(self) -> None:
        self._addr: dict[str, bytes] = {}
        self._kinds: dict[tuple[str, str | None, bool], tuple[int, int]] = {}

    def pack(self, buf: bytearray, items: Sequence[tuple[NatSession, int]], start: int, stop: int) -> int:
        """Write the messages of ``items[start:stop]`` at the start of ``buf``; the bytes written.

        ``buf`` must hold ``(stop - start) * CREATE_MAX`` bytes.  Entries must
        have passed :func:`.ctbatch.validate` (a bad one raises struct.error
        or KeyError, never a wrong message).
        """
        addr, kinds, aton = self._addr, self._kinds, socket.inet_aton
        tcp, udp, icmp = _TCP.struct.pack_into, _UDP.struct.pack_into, _ICMP.struct.pack_into
        tcp_size, udp_size, icmp_size = _TCP.struct.size, _UDP.struct.size, _ICMP.struct.size
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12, t13, t14, t15, t16, t17 = _TCP.consts
        u0, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13, u14, u15, u16 = _UDP.consts
        i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14 = _ICMP.consts
        # Untranslated entries (a firewall's): no CTA_NAT_SRC, the reply tuple the original's inverse.
        ptcp, pudp, picmp = _PLAIN_TCP.struct.pack_into, _PLAIN_UDP.struct.pack_into, _PLAIN_ICMP.struct.pack_into
        ptcp_size, pudp_size, picmp_size = _PLAIN_TCP.struct.size, _PLAIN_UDP.struct.size, _PLAIN_ICMP.struct.size
        a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13 = _PLAIN_TCP.consts
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12 = _PLAIN_UDP.consts
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10 = _PLAIN_ICMP.consts
        off = 0
        for i in range(start, stop):
            s, timeout = items[i]
            a, b, c = s.src_address, s.dst_address, s.translated_address
            src = addr.get(a) or addr.setdefault(a, aton(a))
            dst = addr.get(b) or addr.setdefault(b, aton(b))
            pub = addr.get(c) or addr.setdefault(c, aton(c))
            proto, kind = s.protocol, (s.protocol, s.tcp_state, s.assured)
            got = kinds.get(kind)
            status, state = got if got is not None else kinds.setdefault(kind, _create_status(s))
            sport, dport, tport = s.src_port, s.dst_port, s.translated_port
            if c == a and tport == sport:
                if proto == "TCP":
                    ptcp(buf, off, a0, i + 1, a1, src, a2, dst, a3, sport, a4, dport, a5, dst, a6, src, a7, dport, a8, sport,
                         a9, status, a10, timeout, a11, s.mark, a12, state, a13)
                    off += ptcp_size
                elif proto == "UDP":
                    pudp(buf, off, b0, i + 1, b1, src, b2, dst, b3, sport, b4, dport, b5, dst, b6, src, b7, dport, b8, sport,
                         b9, status, b10, timeout, b11, s.mark, b12)
                    off += pudp_size
                else:
                    picmp(buf, off, c0, i + 1, c1, src, c2, dst, c3, sport, c4, dst, c5, src, c6, sport,
                          c7, status, c8, timeout, c9, s.mark, c10)
                    off += picmp_size
            elif proto == "TCP":
                tcp(buf, off, t0, i + 1, t1, src, t2, dst, t3, sport, t4, dport, t5, dst, t6, src, t7, dport, t8, tport,
                    t9, pub, t10, pub, t11, tport, t12, tport, t13, status, t14, timeout, t15, s.mark, t16, state, t17)
                off += tcp_size
            elif proto == "UDP":
                udp(buf, off, u0, i + 1, u1, src, u2, dst, u3, sport, u4, dport, u5, dst, u6, src, u7, dport, u8, tport,
                    u9, pub, u10, pub, u11, tport, u12, tport, u13, status, u14, timeout, u15, s.mark, u16)
                off += udp_size
            else:
                # ICMP: the ports are echo identifiers, the reply's "source port" the public one.
                icmp(buf, off, i0, i + 1, i1, src, i2, dst, i3, sport, i4, dst, i5, src, i6, tport,
                     i7, pub, i8, pub, i9, tport, i10, tport, i11, status, i12, timeout, i13, s.mark, i14)
                off += icmp_size
        return off


def create_messages(items: Sequence[tuple[NatSession, int]]) -> bytes:
    """Every create message of ``items`` (session, timeout), numbered by index + 1, in one buffer."""
    buf = bytearray(len(items) * CREATE_MAX)
    return bytes(buf[:CreateEncoder().pack(buf, items, 0, len(items))])


#: Create messages per sendmsg() (~220 KB): 256 or 4,096 took as long
#: unthreaded; 1,024 leaves enough batches to overlap (see create_sessions).
CREATE_BATCH = 1024


def create_sessions(netns: str | None, items: Sequence[tuple[NatSession, int]], sock: socket.socket | None = None,
                    sent: list[tuple[int, int]] | None = None) -> dict[int, int]:
    """Create each (session, timeout) with NLM_F_CREATE|NLM_F_EXCL; errno by index of those refused.

    A thread sends batch k while this one packs batch k+1: the kernel does
    its work inside sendto(), which releases the GIL (measured: 10k 29 ms
    -> 24 ms, 100k 330 ms -> 296 ms).  Stops after the first batch the
    kernel refused any of: the caller refuses the whole apply and undoes
    what was created, so sending the rest would only create more to undo.
    ``sock``: as for :func:`run_ops`.  ``sent`` gets the (start, stop) index
    range of each batch the kernel took: an item outside them was never sent.
    """
    failed: dict[int, int] = {}
    if not items:
        return failed
    with _writer(netns, sock) as w:
        per_batch = max(1, _fit_send_buffer(w, CREATE_BATCH * CREATE_MAX) // CREATE_MAX)
        _send_overlapped(w, _create_batches(items, per_batch, failed), failed, sent=sent)
    return failed


def _fit_send_buffer(sock: socket.socket, want: int) -> int:
    """Make room for one message of ``want`` bytes; the largest the socket then takes.

    The kernel refuses a netlink message larger than the send buffer
    (EMSGSIZE); the default (212,992 bytes) is smaller than a batch of TCP creates.
    """
    for opt in (SO_SNDBUFFORCE, socket.SO_SNDBUF):  # FORCE passes net.core.wmem_max, as root
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, want + 4096)
            break
        except PermissionError:
            continue
    # The kernel keeps 32 bytes of it for itself.
    return min(want, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 64)


def _create_batches(items: Sequence[tuple[NatSession, int]], per_batch: int, failed: dict[int, int]) -> Iterator[tuple[int, int, memoryview]]:
    """(index of the first, index past the last, packed messages) of each batch, until a batch was refused."""
    enc = CreateEncoder()
    for start in range(0, len(items), per_batch):
        if failed:
            return
        stop = min(start + per_batch, len(items))
        # A new buffer per batch: the sender may still be reading the previous one.
        buf = bytearray((stop - start) * CREATE_MAX)
        yield start, stop, memoryview(buf)[:enc.pack(buf, items, start, stop)]


def _send_overlapped(sock: socket.socket, batches: Iterator[tuple[int, int, memoryview]], failed: dict[int, int],
                     what: str = "create", stop_on_error: bool = True, sent: list[tuple[int, int]] | None = None) -> None:
    """Send each batch from a thread and collect its errors into ``failed`` while the next is being packed.

    ``stop_on_error``: send nothing more once the kernel refused a message
    (creates: the caller undoes them anyway); deletes go on, a missing entry
    (ENOENT) being no failure.  ``sent`` gets (start, stop) of each batch sent.
    """
    todo: queue.Queue[tuple[int, int, memoryview] | None] = queue.Queue(maxsize=1)
    broken: list[Exception] = []

    def send() -> None:
        # Always drains the queue to its end, so the producer never blocks on it.
        while (batch := todo.get()) is not None:
            if (failed and stop_on_error) or broken:
                continue
            start, stop, data = batch
            try:
                sock.sendto(data, (0, 0))
                if sent is not None:
                    sent.append((start, stop))
                _collect_errors(sock, failed, start)
            except Exception as e:  # noqa: BLE001 -- raised again in the caller's thread
                broken.append(e)

    sender = threading.Thread(target=send, name=f"ct-{what}", daemon=True)
    sender.start()
    try:
        for batch in batches:
            if broken:
                break
            todo.put(batch)
    finally:
        todo.put(None)
        sender.join()
    if broken:
        raise NetlinkError(f"ctnetlink {what}: {broken[0]}") from broken[0]


# -- naming entries by one tuple (CT_GET, CT_DELETE) -------------------------
#
# A GET or a DELETE carries one tuple and nothing else.  Built by
# orig_tuple() from some fifteen small byte strings it cost ~25 us a key:
# 2.5 s of the 100k retire (a whole-list delete) and most of a lookup of a
# missing key.  As for creates, the whole message is one precompiled struct
# per tuple kind, filled by one pack_into(); a unit test compares its bytes
# with frame() of the readable encoder.

#: (protocol, src, sport, dst, dport) of one direction of an entry; ICMP: sport is the identifier, dport 0.
#: A session's key is its original tuple in this form.
Tuple5 = tuple[str, str, int, str, int]


def reply_tuple(s: NatSession) -> Tuple5:
    """The tuple a session's replies arrive with (remote -> public endpoint), what must be unique.

    Sent with ICMP type echo-reply, a GET of it finds the entry holding it,
    in whichever direction (:meth:`.ctread.EntryReader.read`).
    """
    if s.protocol == "ICMP":
        return ("ICMP", s.dst_address, s.translated_port, s.translated_address, 0)
    return (s.protocol, s.dst_address, s.dst_port, s.translated_address, s.translated_port)


def tuple_op(msg: int, flags: int, t: Tuple5, icmp_type: int = ICMP_ECHO_REQUEST) -> Op:
    """A message naming an entry by ``t`` as its CTA_TUPLE_ORIG: the readable reference of :class:`TupleEncoder`."""
    return Op(msg, flags, _tuple(CTA_TUPLE_ORIG, t[1], t[3], t[0], t[2], t[4], icmp_type))


def _tuple_segments(msg: int, flags: int, proto: str, icmp_type: int) -> list[_Segment]:
    """The whole message of ``msg`` naming an entry by one ``proto`` tuple, as tuple_op() writes it."""
    attrs = _ltuple(CTA_TUPLE_ORIG, proto, ("src", "dst", "sport", "dport"), icmp_type)
    head = _NL_HEAD.pack(20 + _seg_size(attrs), (NFNL_SUBSYS_CTNETLINK << 8) | msg, NLM_F_REQUEST | flags)
    return [head, _Field("seq", "I", 4), b"\0\0\0\0" + struct.pack("=BBH", socket.AF_INET, 0, 0), *attrs]


class TupleEncoder:
    """Packs messages of one kind (``msg``, ``flags``) that each name an entry by a :data:`Tuple5`.

    Byte for byte what :func:`frame` makes of :func:`tuple_op`, numbered
    ``seq0`` + index.  ``icmp_type`` is the type an ICMP tuple carries:
    echo request for an original tuple (a key), echo reply for a reply tuple.
    Tuples must be valid (:func:`.ctbatch.invalid_keys`): a bad one raises
    struct.error, OSError or KeyError, never a wrong message.
    """

    def __init__(self, msg: int, flags: int, icmp_type: int = ICMP_ECHO_REQUEST) -> None:
        self._layouts = {p: _compile(_tuple_segments(msg, flags, p, icmp_type)) for p in PROTO_NUMBERS}
        self._addr: dict[str, bytes] = {}
        #: the largest message, what a buffer is sized by.
        self.max = max(x.struct.size for x in self._layouts.values())

    def pack(self, buf: bytearray, tuples: Sequence[Tuple5], start: int, stop: int, seq0: int = 1) -> int:
        """Write the messages of ``tuples[start:stop]`` at the start of ``buf`` (room: ``(stop - start) * self.max``); the bytes written."""
        addr, aton = self._addr, socket.inet_aton
        tcp, udp, icmp = self._layouts["TCP"], self._layouts["UDP"], self._layouts["ICMP"]
        t0, t1, t2, t3, t4, t5 = tcp.consts
        u0, u1, u2, u3, u4, u5 = udp.consts
        i0, i1, i2, i3, i4 = icmp.consts
        tcp_pack, udp_pack, icmp_pack = tcp.struct.pack_into, udp.struct.pack_into, icmp.struct.pack_into
        tcp_size, udp_size, icmp_size = tcp.struct.size, udp.struct.size, icmp.struct.size
        off = 0
        for i in range(start, stop):
            proto, a, sport, b, dport = tuples[i]
            src = addr.get(a) or addr.setdefault(a, aton(a))
            dst = addr.get(b) or addr.setdefault(b, aton(b))
            seq = seq0 + i
            if proto == "TCP":
                tcp_pack(buf, off, t0, seq, t1, src, t2, dst, t3, sport, t4, dport, t5)
                off += tcp_size
            elif proto == "UDP":
                udp_pack(buf, off, u0, seq, u1, src, u2, dst, u3, sport, u4, dport, u5)
                off += udp_size
            elif proto == "ICMP":
                icmp_pack(buf, off, i0, seq, i1, src, i2, dst, i3, sport, i4)
                off += icmp_size
            else:
                raise KeyError(proto)
        return off


#: Deletes per sendto(): some 60 bytes each, so a batch fits the default send buffer.
DELETE_BATCH = 1024
_DELETES = TupleEncoder(IPCTNL_MSG_CT_DELETE, 0)


def delete_keys(netns: str | None, keys: Sequence[Tuple5], sock: socket.socket | None = None) -> tuple[int, dict[int, int]]:
    """Delete the entries whose original tuple is each key; (how many were deleted, errors other than ENOENT by index).

    One CT_DELETE per key, no NLM_F_ACK (errors only), DELETE_BATCH per
    sendto, sent from a thread while the next batch is packed (100k:
    ~360 -> ~260 ms).  Keys must be valid (:func:`.ctbatch.invalid_keys`).
    The kernel finds a tuple in either direction: a key equal to another
    entry's reply tuple deletes that entry, so keys must be keys of sessions
    (the datastore deletes only keys its lookup found, the whole-list delete
    those its dump listed).  ``sock``: as for :func:`run_ops`.
    """
    failed = delete_tuples(netns, keys, sock)
    missing = sum(1 for e in failed.values() if e == errno.ENOENT)
    other = {i: e for i, e in failed.items() if e != errno.ENOENT}
    return len(keys) - missing - len(other), other


def delete_tuples(netns: str | None, keys: Sequence[Tuple5], sock: socket.socket | None = None) -> dict[int, int]:
    """:func:`delete_keys`, answering every errno by index, ENOENT (nothing deleted) included: each other key was deleted."""
    failed: dict[int, int] = {}
    if not keys:
        return failed

    def batches() -> Iterator[tuple[int, int, memoryview]]:
        for start in range(0, len(keys), DELETE_BATCH):
            stop = min(start + DELETE_BATCH, len(keys))
            # A new buffer per batch: the sender may still be reading the previous one.
            buf = bytearray((stop - start) * _DELETES.max)
            yield start, stop, memoryview(buf)[:_DELETES.pack(buf, keys, start, stop)]

    with _writer(netns, sock) as w:
        _send_overlapped(w, batches(), failed, "delete", stop_on_error=False)
    return failed


# -- decoding attributes -------------------------------------------------------


def parse_attrs(buf: bytes, off: int = 0, end: int | None = None) -> dict[int, bytes]:
    """The attributes of ``buf[off:end]`` by type (flags stripped; the last one wins)."""
    end = len(buf) if end is None else end
    out: dict[int, bytes] = {}
    while off + 4 <= end:
        ln, kind = struct.unpack_from("=HH", buf, off)
        if ln < 4:
            break  # malformed: stop rather than loop
        out[kind & NLA_TYPE_MASK] = buf[off + 4:off + ln]
        off += (ln + 3) & ~3
    return out
