"""ctnetlink messages for what apply, delete and lookup send: creates, updates, deletes, GETs.

Every write goes straight to the kernel here: one netlink message per
session, sent in batches without NLM_F_ACK, the kernel's per-message errors
matched back to the session by sequence number.  The conntrack tool does
worse at each: ``-R`` loads TCP/UDP creates three times slower than
:func:`.ctbulk.create_sessions` (whose messages :class:`.ctlayout.CreateEncoder`
packs with one precompiled struct per protocol), cannot give an ICMP session
a translated echo identifier, and its ``-D``/``-U`` lines dump the whole table
once per line (10,000 deletes took minutes).  Deletes and GETs name an entry
by one tuple (:class:`.ctlayout.TupleEncoder`; :func:`.ctbulk.delete_keys`).
This module holds the message format: its constants, the readable encoders
(:func:`create_attrs`, :func:`tuple_op` and friends: the references the fast
ones are tested against, and what the few updates and undos use), the socket,
:func:`run_ops` and :func:`parse_attrs`.  Reading entries back is :mod:`.ctread`'s.

The socket is opened inside the node's namespace by switching only the
calling thread into it for the ``socket()`` call (:func:`natmig.netns.socket_in`);
a netlink socket stays in the namespace it was created in.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

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


# -- naming entries by one tuple (CT_GET, CT_DELETE) -------------------------
#
# The readable encoder; the fast one is :class:`.ctlayout.TupleEncoder`.

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
    """A message naming an entry by ``t`` as its CTA_TUPLE_ORIG: the readable reference of :class:`.ctlayout.TupleEncoder`."""
    return Op(msg, flags, _tuple(CTA_TUPLE_ORIG, t[1], t[3], t[0], t[2], t[4], icmp_type))

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
