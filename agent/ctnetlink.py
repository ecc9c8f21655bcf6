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
IPCTNL_MSG_CT_DELETE = 2

NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000

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
TCP_STATE_NUMBERS = {
    "SYN_SENT": 1, "SYN_RECV": 2, "ESTABLISHED": 3, "FIN_WAIT": 4, "CLOSE_WAIT": 5,
    "LAST_ACK": 6, "TIME_WAIT": 7, "CLOSE": 8, "SYN_SENT2": 9,
}
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
