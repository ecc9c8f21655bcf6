"""A small ctnetlink encoder for what the conntrack tool cannot do in bulk.

The tool's ``-R`` creates TCP and UDP sessions fast, but it cannot give an
ICMP session a translated echo identifier, and its ``-D``/``-U`` lines dump
the whole table once per line (10,000 deletes took minutes).  So creating
ICMP sessions, updating sessions in place and deleting by key go straight to
the kernel here: one netlink message per session, sent in batches, with the
kernel's per-message errors matched back to the session by sequence number.

The socket is opened inside the node's namespace by switching only the
calling thread into it for the ``socket()`` call; a netlink socket stays in
the namespace it was created in.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
from dataclasses import dataclass
from typing import Iterable, Sequence

from ..errors import ProviderError
from ..model import NatSession

NETLINK_NETFILTER = 12
CLONE_NEWNET = 0x40000000

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

_libc = ctypes.CDLL(None, use_errno=True)
_setns_lock = threading.Lock()


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


def create_attrs(s: NatSession, timeout: int) -> bytes:
    """Attributes of a CT_NEW that creates ``s`` with its translation.

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
    out = orig_tuple(s) + reply + nat + _attr(CTA_STATUS, struct.pack("!I", status))
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


def open_socket(netns: str | None) -> socket.socket:
    """A ctnetlink socket in the named namespace (the caller's when None)."""
    if netns is None:
        return socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    except OSError as e:
        raise NetlinkError(f"namespace {netns}: {e.strerror}") from e
    with _setns_lock:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            if _libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise NetlinkError(f"setns into {netns}: {os.strerror(err)}")
            try:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
            finally:
                # Always go home: this thread must not stay in the node's namespace.
                if _libc.setns(home, CLONE_NEWNET) != 0:
                    raise NetlinkError(f"setns back from {netns}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(home)
            os.close(target)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((0, 0))
    return sock


def run_ops(netns: str | None, ops: Sequence[Op]) -> dict[int, int]:
    """Send ``ops`` to the kernel; the errno of each one that failed, by index into ``ops``."""
    failed: dict[int, int] = {}
    if not ops:
        return failed
    sock = open_socket(netns)
    try:
        for start in range(0, len(ops), BATCH):
            buf = bytearray()
            for i in range(start, min(start + BATCH, len(ops))):
                op = ops[i]
                body = struct.pack("=BBH", socket.AF_INET, 0, 0) + op.attrs
                buf += struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | op.msg, NLM_F_REQUEST | op.flags, i + 1, 0)
                buf += body
            sock.sendto(bytes(buf), (0, 0))
            _collect_errors(sock, failed)
    finally:
        sock.close()
    return failed


def _collect_errors(sock: socket.socket, failed: dict[int, int]) -> None:
    """Read the error messages already queued (the kernel answered synchronously)."""
    while True:
        try:
            data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        off = 0
        while off + 16 <= len(data):
            ln, typ, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
            if typ == NLMSG_ERROR:
                (code,) = struct.unpack_from("=i", data, off + 16)
                if code != 0:
                    failed[seq - 1] = -code
            off += (ln + 3) & ~3


def describe(err: int) -> str:
    """A readable name of a netlink errno."""
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def delete_sessions(netns: str | None, sessions: Iterable[NatSession]) -> tuple[int, dict[int, int]]:
    """Delete by key; (how many were deleted, errors other than 'no such entry' by index)."""
    items = list(sessions)
    failed = run_ops(netns, [delete_op(s) for s in items])
    missing = sum(1 for e in failed.values() if e == errno.ENOENT)
    other = {i: e for i, e in failed.items() if e != errno.ENOENT}
    return len(items) - missing - len(other), other


# -- reading single entries (CT_GET) ------------------------------------------


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


def entry_session(attrs: dict[int, bytes]) -> NatSession | None:
    """The session of one ctnetlink entry (its top-level attributes), by the rules of ``conntrack -L`` parsing.

    None for what :meth:`ConntrackProvider.list` leaves out: not source-NATed
    (the reply comes back to the original source), destination-NATed (the
    reply comes from elsewhere), ICMP other than echo, TCP without a known
    state, other protocols, IPv6.  Must agree with :func:`.cttext.parse_table`
    (the functional test compares the two on the same table).
    """
    o, r = parse_tuple(attrs.get(CTA_TUPLE_ORIG, b"")), parse_tuple(attrs.get(CTA_TUPLE_REPLY, b""))
    if o is None or r is None or o.proto != r.proto or o.proto not in PROTO_NAMES:
        return None
    proto = PROTO_NAMES[o.proto]
    if proto == "ICMP":
        if o.itype != ICMP_ECHO_REQUEST or r.src != o.dst or (r.dst == o.src and r.sport == o.sport):
            return None
        dst_port, translated_port = 0, r.sport
    else:
        if (r.dst == o.src and r.dport == o.sport) or r.src != o.dst or r.sport != o.dport:
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


class EntryReader:
    """Reads single entries of one namespace's table by key, over one ctnetlink socket kept open.

    One GET per key (``IPCTNL_MSG_CT_GET`` with the original tuple), sent in
    batches; each request is acknowledged, so every request gets exactly one
    NLMSG_ERROR (0 after its entry, ENOENT when there is none) and the reader
    knows when a batch is complete.  Thread-safe: one request at a time.
    The socket is opened at the first read and reopened after a failure.
    """

    #: Seconds to wait for the kernel's answers to one batch (it answers synchronously).
    TIMEOUT = 5.0

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._seq = 0

    def read(self, sessions: Sequence[NatSession]) -> list[tuple[int, dict[int, bytes]]]:
        """The entry (top-level attributes) found for each of ``sessions``' keys, as (index, attrs)."""
        found: list[tuple[int, dict[int, bytes]]] = []
        with self._lock:
            try:
                for start in range(0, len(sessions), BATCH):
                    self._batch(sessions, start, min(start + BATCH, len(sessions)), found)
            except OSError as e:
                self._drop()
                raise NetlinkError(f"ctnetlink GET in {self.netns}: {e}") from e
        return found

    def _batch(self, sessions: Sequence[NatSession], start: int, stop: int, found: list) -> None:
        if self._sock is None:
            self._sock = open_socket(self.netns)
            self._sock.settimeout(self.TIMEOUT)
        sock = self._sock
        base = self._seq
        self._seq = (self._seq + stop - start) & 0x7FFFFFFF
        buf = bytearray()
        pending: dict[int, int] = {}  # seq -> index into sessions
        for i in range(start, stop):
            seq = ((base + i - start) & 0x7FFFFFFF) + 1
            pending[seq] = i
            body = struct.pack("=BBH", socket.AF_INET, 0, 0) + orig_tuple(sessions[i])
            buf += struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_ACK, seq, 0)
            buf += body
        sock.sendto(bytes(buf), (0, 0))
        errors: dict[int, int] = {}
        while pending:
            data = sock.recv(1 << 20)
            off = 0
            while off + 16 <= len(data):
                ln, typ, _flags, seq, _pid = struct.unpack_from("=IHHII", data, off)
                if ln < 16:
                    break
                i = pending.get(seq)
                # Answers to another batch (one abandoned by a failure) are skipped by their seq.
                if i is not None:
                    if typ == NLMSG_ERROR:
                        (code,) = struct.unpack_from("=i", data, off + 16)
                        del pending[seq]
                        if code not in (0, -errno.ENOENT):
                            errors[i] = -code
                    elif typ == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW:
                        found.append((i, parse_attrs(data, off + 20, off + ln)))  # after nfgenmsg
                off += (ln + 3) & ~3
        if errors:
            i, e = next(iter(errors.items()))
            raise NetlinkError(f"ctnetlink GET in {self.netns} refused {len(errors)} key(s), e.g. #{i}: {describe(e)}")

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        """Close the socket (a later read opens a new one)."""
        with self._lock:
            self._drop()
