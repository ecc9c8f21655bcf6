"""Precompiled ctnetlink messages: one struct per protocol, filled by one pack_into() per entry.

:class:`CreateEncoder` packs CT_NEW creates, :class:`TupleEncoder` the
messages that name an entry by one tuple (CT_GET, CT_DELETE).  Each layout
is built from the same attribute tree the readable encoders of
:mod:`.ctnetlink` write, and unit tests compare the bytes of both.
Sending them is :mod:`.ctbulk`'s.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Sequence

from ..model import NatSession
from .ctnetlink import (
    CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_MARK, CTA_NAT_PROTO, CTA_NAT_SRC, CTA_NAT_V4_MAXIP, CTA_NAT_V4_MINIP,
    CTA_PROTO_DST_PORT, CTA_PROTO_ICMP_CODE, CTA_PROTO_ICMP_ID, CTA_PROTO_ICMP_TYPE, CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY, CTA_PROTOINFO_TCP_STATE, CTA_PROTONAT_PORT_MAX, CTA_PROTONAT_PORT_MIN,
    CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_TUPLE_REPLY, ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST, IP_CT_TCP_FLAG_BE_LIBERAL, IP_CT_TCP_FLAG_SACK_PERM, IPCTNL_MSG_CT_NEW, IPS_ASSURED,
    IPS_CONFIRMED, IPS_SEEN_REPLY, NFNL_SUBSYS_CTNETLINK, NLA_F_NESTED, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
    PROTO_NUMBERS, TCP_STATE_NUMBERS, Tuple5, _NL_HEAD,
)


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
#: The same without CTA_NAT_SRC: entries that are not translated (:func:`.ctnetlink.untranslated`).
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

    Byte for byte the messages :func:`.ctnetlink.frame` makes of :func:`.ctnetlink.create_op`
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

# -- naming entries by one tuple (CT_GET, CT_DELETE) -------------------------
#
# A GET or a DELETE carries one tuple and nothing else.  Built by
# orig_tuple() from some fifteen small byte strings it cost ~25 us a key:
# 2.5 s of the 100k retire (a whole-list delete) and most of a lookup of a
# missing key.  As for creates, the whole message is one precompiled struct
# per tuple kind, filled by one pack_into(); a unit test compares its bytes
# with frame() of the readable encoder.

def _tuple_segments(msg: int, flags: int, proto: str, icmp_type: int) -> list[_Segment]:
    """The whole message of ``msg`` naming an entry by one ``proto`` tuple, as tuple_op() writes it."""
    attrs = _ltuple(CTA_TUPLE_ORIG, proto, ("src", "dst", "sport", "dport"), icmp_type)
    head = _NL_HEAD.pack(20 + _seg_size(attrs), (NFNL_SUBSYS_CTNETLINK << 8) | msg, NLM_F_REQUEST | flags)
    return [head, _Field("seq", "I", 4), b"\0\0\0\0" + struct.pack("=BBH", socket.AF_INET, 0, 0), *attrs]


class TupleEncoder:
    """Packs messages of one kind (``msg``, ``flags``) that each name an entry by a :data:`Tuple5`.

    Byte for byte what :func:`.ctnetlink.frame` makes of :func:`.ctnetlink.tuple_op`, numbered
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
