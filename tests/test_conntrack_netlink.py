"""Unit tests (no root) of the ctnetlink encoding and decoding used by ConntrackProvider.

Entries are encoded here the way the kernel sends them (the NATed reply
tuple), decoded by :func:`ctread.entry_session`, and compared with what
``conntrack -L`` parsing gives for the same entry: lookup and list must agree.
The fast create encoder (:class:`ctlayout.CreateEncoder`) is compared byte
for byte with :func:`ctnetlink.create_attrs`, its readable reference.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent import ctnetlink as nl
from natmig.agent import ctlayout
from natmig.agent import ctread, cttext
from natmig.agent.ctbatch import validate
from natmig.model import NatSession

from .strategies import ipv4
from .test_conntrack_text import render_list_line, translated


def kernel_entry(proto: str, orig: tuple, reply: tuple, *, state: int | None = None, timeout: int | None = 100,
                 status: int = nl.IPS_CONFIRMED, mark: int | None = 0, otype: int = 8, rtype: int = 0) -> dict[int, bytes]:
    """Top-level attributes of one entry as a CT_GET answer carries them, decoded by parse_attrs."""
    buf = nl._tuple(nl.CTA_TUPLE_ORIG, *orig[:2], proto, *orig[2:], icmp_type=otype)
    buf += nl._tuple(nl.CTA_TUPLE_REPLY, *reply[:2], proto, *reply[2:], icmp_type=rtype)
    buf += nl._attr(nl.CTA_STATUS, struct.pack("!I", status))
    if timeout is not None:
        buf += nl._attr(nl.CTA_TIMEOUT, struct.pack("!I", timeout))
    if mark is not None:
        buf += nl._attr(nl.CTA_MARK, struct.pack("!I", mark))
    if state is not None:
        buf += nl._nest(nl.CTA_PROTOINFO, nl._nest(nl.CTA_PROTOINFO_TCP, nl._attr(nl.CTA_PROTOINFO_TCP_STATE, bytes([state]))))
    return nl.parse_attrs(buf)


def of_session(s: NatSession) -> dict[int, bytes]:
    """The kernel's entry for a translated session."""
    if s.protocol == "ICMP":
        orig = (s.src_address, s.dst_address, s.src_port, 0)
        reply = (s.dst_address, s.translated_address, s.translated_port, 0)
    else:
        orig = (s.src_address, s.dst_address, s.src_port, s.dst_port)
        reply = (s.dst_address, s.translated_address, s.dst_port, s.translated_port)
    status = nl.IPS_CONFIRMED | (nl.IPS_ASSURED if s.assured else 0)
    state = nl.TCP_STATE_NUMBERS[s.tcp_state] if s.protocol == "TCP" and s.tcp_state else None
    return kernel_entry(s.protocol, orig, reply, state=state, timeout=s.timeout, status=status, mark=s.mark)


@given(translated)
@settings(max_examples=200, deadline=None)
def test_decoded_entry_is_what_list_parses_from_the_same_entry(s: NatSession) -> None:
    if s.protocol == "ICMP" and s.translated_port == s.src_port:
        return  # not translated by definition; covered below
    got = ctread.entry_session(of_session(s))
    assert got == s
    assert cttext.parse_table(render_list_line(s)).sessions == [got]


def test_what_list_leaves_out_lookup_leaves_out() -> None:
    tcp = ("10.0.0.2", "198.51.100.7", 4000, 80)
    assert ctread.entry_session(kernel_entry("TCP", tcp, ("198.51.100.7", "203.0.113.1", 80, 20001), state=3)) is not None
    cases = {
        "not translated": kernel_entry("UDP", tcp, ("198.51.100.7", "10.0.0.2", 80, 4000)),
        "destination-NATed": kernel_entry("UDP", tcp, ("10.0.0.50", "10.0.0.2", 80, 4000)),
        "TCP state NONE": kernel_entry("TCP", tcp, ("198.51.100.7", "203.0.113.1", 80, 20001), state=0),
        "TCP without protoinfo": kernel_entry("TCP", tcp, ("198.51.100.7", "203.0.113.1", 80, 20001)),
        "ICMP not echo": kernel_entry("ICMP", ("10.0.0.2", "198.51.100.7", 5, 0), ("198.51.100.7", "203.0.113.1", 20001, 0), otype=13, rtype=14),
        "ICMP same identifier back to the source": kernel_entry("ICMP", ("10.0.0.2", "10.0.0.1", 5, 0), ("10.0.0.1", "10.0.0.2", 5, 0)),
        "no tuples": {},
    }
    for why, attrs in cases.items():
        assert ctread.entry_session(attrs) is None, why
    # Another protocol (SCTP, 132): the tuple has ports but the module has no such protocol.
    sctp = nl.parse_attrs(
        nl._nest(nl.CTA_TUPLE_ORIG, nl._nest(nl.CTA_TUPLE_IP, nl._attr(nl.CTA_IP_V4_SRC, socket.inet_aton("10.0.0.2")), nl._attr(nl.CTA_IP_V4_DST, socket.inet_aton("198.51.100.7"))),
                 nl._nest(nl.CTA_TUPLE_PROTO, nl._attr(nl.CTA_PROTO_NUM, bytes([132]))))
    )
    assert ctread.entry_session(sctp | {nl.CTA_TUPLE_REPLY: sctp[nl.CTA_TUPLE_ORIG]}) is None


def test_decoding_details() -> None:
    tcp, rep = ("10.0.0.2", "198.51.100.7", 4000, 80), ("198.51.100.7", "203.0.113.1", 80, 20001)
    s = ctread.entry_session(kernel_entry("TCP", tcp, rep, state=9, timeout=0, mark=None, status=nl.IPS_ASSURED | nl.IPS_SEEN_REPLY))
    # SYN_SENT2 (which conntrack prints as LISTEN), a zero timeout read as 1, no mark attribute = 0.
    assert s == NatSession("TCP", "10.0.0.2", 4000, "198.51.100.7", 80, "203.0.113.1", 20001, "SYN_SENT2", 1, True, 0)
    assert ctread.entry_session(kernel_entry("UDP", tcp, rep, timeout=None)).timeout is None
    # A truncated attribute ends the parse instead of looping.
    assert nl.parse_attrs(b"\x02\x00\x01\x00") == {}


# -- the fast create encoder against create_attrs, the readable reference -----

valid = st.builds(
    NatSession,
    protocol=st.sampled_from(["TCP", "UDP", "ICMP"]),
    src_address=ipv4,
    src_port=st.integers(0, 65535),
    dst_address=ipv4,
    dst_port=st.integers(0, 65535),
    translated_address=ipv4,
    translated_port=st.integers(1, 65535),
    tcp_state=st.sampled_from([None, *nl.TCP_STATE_NUMBERS]),
    timeout=st.none(),
    assured=st.booleans(),
    mark=st.integers(0, 2**32 - 1),
).map(lambda s: dataclasses.replace(
    s, tcp_state=s.tcp_state if s.protocol == "TCP" else None, dst_port=0 if s.protocol == "ICMP" else s.dst_port,
))


def reference(items: list[tuple[NatSession, int]]) -> bytes:
    """The messages run_ops would send for create_op of each item, numbered by index + 1."""
    return b"".join(nl.frame(nl.create_op(s, t), i + 1) for i, (s, t) in enumerate(items))


@given(st.lists(st.tuples(valid, st.integers(1, 2**32 - 1)), max_size=40))
@settings(max_examples=300, deadline=None)
def test_fast_create_messages_are_byte_for_byte_the_reference(items: list[tuple[NatSession, int]]) -> None:
    assert all(validate(s) is None for s, _ in items)
    assert ctlayout.create_messages(items) == reference(items)


def test_fast_encoder_covers_every_kind_and_batches_pack_the_same_bytes() -> None:
    # Every TCP state with and without assured, UDP and ICMP, repeated and
    # distinct addresses (the cache), the extremes of every field.
    items = []
    states = [None, *nl.TCP_STATE_NUMBERS]
    for i in range(600):
        proto = ("TCP", "UDP", "ICMP")[i % 3]
        s = NatSession(
            proto, f"10.0.{i // 250}.{i % 250}", (0, 65535, 1000 + i)[i % 3], f"198.51.100.{i % 7}",
            0 if proto == "ICMP" else (1, 65535, 80)[i % 3], ("203.0.113.1", "203.0.113.2")[i % 2], (1, 65535, 20000 + i)[i % 3],
            states[(i // 3) % len(states)] if proto == "TCP" else None, None, bool((i // 2) % 2), (0, 2**32 - 1, i)[i % 3],
        )
        items.append((s, (1, 2**32 - 1, 300 + i)[i % 3]))
    whole = ctlayout.create_messages(items)
    assert whole == reference(items)
    enc = ctlayout.CreateEncoder()  # one encoder over several batches keeps its caches and the numbering
    buf = bytearray(100 * ctlayout.CREATE_MAX)
    parts = b""
    for start in range(0, len(items), 100):
        parts += bytes(buf[:enc.pack(buf, items, start, min(start + 100, len(items)))])
    assert parts == whole


def test_fast_create_message_says_what_the_kernel_needs() -> None:
    # Decoded from the fast bytes, not the reference: exclusive create, NAT
    # pinned to exactly the public port, liberal TCP both ways, the status.
    s = NatSession("TCP", "10.0.0.2", 4000, "198.51.100.7", 80, "203.0.113.1", 20001, "SYN_SENT", 77, False, 9)
    msg = ctlayout.create_messages([(s, 77)])
    ln, typ, flags = struct.unpack_from("=IHH", msg)
    assert (ln, typ) == (len(msg), nl.NFNL_SUBSYS_CTNETLINK << 8 | nl.IPCTNL_MSG_CT_NEW)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_CREATE | nl.NLM_F_EXCL  # no NLM_F_ACK: errors only
    a = nl.parse_attrs(msg, 20)
    assert ctread.parse_tuple(a[nl.CTA_TUPLE_REPLY]) == ctread.CtTuple(6, "198.51.100.7", "10.0.0.2", 80, 20001)
    nat = nl.parse_attrs(a[nl.CTA_NAT_SRC])
    ports = nl.parse_attrs(nat[nl.CTA_NAT_PROTO])
    assert ports[nl.CTA_PROTONAT_PORT_MIN] == ports[nl.CTA_PROTONAT_PORT_MAX] == struct.pack("!H", 20001)
    assert nat[nl.CTA_NAT_V4_MINIP] == nat[nl.CTA_NAT_V4_MAXIP] == socket.inet_aton("203.0.113.1")
    tcp = nl.parse_attrs(nl.parse_attrs(a[nl.CTA_PROTOINFO])[nl.CTA_PROTOINFO_TCP])
    liberal = bytes([nl.IP_CT_TCP_FLAG_BE_LIBERAL | nl.IP_CT_TCP_FLAG_SACK_PERM] * 2)
    assert tcp[nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL] == tcp[nl.CTA_PROTOINFO_TCP_FLAGS_REPLY] == liberal
    assert tcp[nl.CTA_PROTOINFO_TCP_STATE] == bytes([nl.TCP_STATE_NUMBERS["SYN_SENT"]])
    # SYN_SENT, not assured: confirmed only; as ESTABLISHED and assured: answered and assured.
    assert struct.unpack("!I", a[nl.CTA_STATUS]) == (nl.IPS_CONFIRMED,)
    est = nl.parse_attrs(ctlayout.create_messages([(dataclasses.replace(s, tcp_state="ESTABLISHED", assured=True), 77)]), 20)
    assert struct.unpack("!I", est[nl.CTA_STATUS]) == (nl.IPS_CONFIRMED | nl.IPS_SEEN_REPLY | nl.IPS_ASSURED,)
    assert (a[nl.CTA_TIMEOUT], a[nl.CTA_MARK]) == (struct.pack("!I", 77), struct.pack("!I", 9))


class QueuedErrors:
    """A socket whose receive queue holds given datagrams (and then, optionally, an overflow)."""

    def __init__(self, datagrams: list[bytes], overflow: bool = False) -> None:
        self.q = list(datagrams)
        self.overflow = overflow

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.q:
            return self.q.pop(0)
        if self.overflow:
            self.overflow = False
            raise OSError(errno.ENOBUFS, os.strerror(errno.ENOBUFS))
        raise BlockingIOError


def error_message(seq_bytes: bytes, code: int) -> bytes:
    """An NLMSG_ERROR as the kernel echoes it with NETLINK_CAP_ACK (header of the request only)."""
    request = struct.pack("=IHH", 220, 0x100, 0x601) + seq_bytes + b"\0" * 4
    return struct.pack("=IHH", 36, nl.NLMSG_ERROR, 0x100) + seq_bytes + b"\0" * 4 + struct.pack("=i", code) + request


def test_errors_are_matched_back_by_the_sequence_number_the_encoder_wrote() -> None:
    items = [(NatSession("UDP", "10.0.0.2", p, "198.51.100.7", 53, "203.0.113.1", 20000 + p), 30) for p in range(1, 300)]
    msgs = ctlayout.create_messages(items)
    size = len(msgs) // len(items)
    seq_of = [msgs[i * size + 8:i * size + 12] for i in range(len(items))]  # as written, echoed as is
    failed: dict[int, int] = {}
    nl._collect_errors(QueuedErrors([error_message(seq_of[5], -errno.EEXIST) + error_message(seq_of[298], -errno.ENOENT)]), failed)
    assert failed == {5: errno.EEXIST, 298: errno.ENOENT}
    # Errors lost to a full queue: the batch's first message is named, so the apply is refused all the same.
    lost: dict[int, int] = {}
    nl._collect_errors(QueuedErrors([], overflow=True), lost, 1024)
    assert lost == {1024: errno.ENOBUFS}


# -- messages naming an entry by one tuple (GET, DELETE) against tuple_op -------

from natmig.agent.ctbatch import invalid_keys, key_problem  # noqa: E402

from .strategies import sessions as any_session  # noqa: E402


def tuple_reference(msg: int, flags: int, tuples: list, icmp_type: int, seq0: int = 1) -> bytes:
    return b"".join(nl.frame(nl.tuple_op(msg, flags, t, icmp_type), seq0 + i) for i, t in enumerate(tuples))


@given(st.lists(valid, max_size=40), st.sampled_from([(nl.IPCTNL_MSG_CT_GET, nl.NLM_F_ACK), (nl.IPCTNL_MSG_CT_DELETE, 0)]),
       st.integers(1, 2**31))
@settings(max_examples=300, deadline=None)
def test_fast_tuple_messages_are_byte_for_byte_the_reference(sessions: list[NatSession], kind: tuple[int, int], seq0: int) -> None:
    msg, flags = kind
    for icmp_type, tuples in ((nl.ICMP_ECHO_REQUEST, [s.key for s in sessions]), (nl.ICMP_ECHO_REPLY, [nl.reply_tuple(s) for s in sessions])):
        enc = ctlayout.TupleEncoder(msg, flags, icmp_type)
        buf = bytearray(len(tuples) * enc.max)
        got = bytes(buf[:enc.pack(buf, tuples, 0, len(tuples), seq0)])
        assert got == tuple_reference(msg, flags, tuples, icmp_type, seq0)


def test_a_reply_tuple_is_what_the_kernel_holds_in_the_reply_direction() -> None:
    # The kernel's own reply tuple of a translated entry (of_session above) is what a GET of reply_tuple() names.
    for s in (NatSession("TCP", "10.0.0.2", 4000, "198.51.100.7", 80, "203.0.113.1", 20001, "ESTABLISHED"),
              NatSession("ICMP", "10.0.0.2", 7, "198.51.100.7", 0, "203.0.113.1", 20002)):
        asked = ctread.parse_tuple(nl.tuple_op(nl.IPCTNL_MSG_CT_GET, 0, nl.reply_tuple(s), nl.ICMP_ECHO_REPLY).attrs[4:])
        assert asked == ctread.parse_tuple(of_session(s)[nl.CTA_TUPLE_REPLY])
    assert ctread.entry_tuple(of_session(s)) == ("ICMP", "10.0.0.2", 7, "198.51.100.7", 0)


keys = st.one_of(
    st.builds(lambda s: s.key, any_session()),
    st.builds(lambda s: s.key, valid),
    st.tuples(st.sampled_from(["TCP", "UDP", "ICMP", "SCTP"]), st.sampled_from(["10.0.0.1", "10.0.0.01", "1.2.3", "fe80::1", 5]),
              st.one_of(st.integers(-1, 70000), st.booleans()), st.sampled_from(["198.51.100.7", "x"]), st.sampled_from([0, 53, 65536, True])),
    st.tuples(st.just("UDP"), st.just("10.0.0.1")),
)


@given(st.lists(keys, max_size=30))
@settings(max_examples=300, deadline=None)
def test_fast_key_check_is_key_problem(batch: list) -> None:
    assert invalid_keys(batch) == {i: why for i, k in enumerate(batch) if (why := key_problem(k)) is not None}
    # What passes can be packed: the encoder never sees an invalid key.
    good = [k for i, k in enumerate(batch) if i not in invalid_keys(batch)]
    enc = ctlayout.TupleEncoder(nl.IPCTNL_MSG_CT_DELETE, 0)
    enc.pack(bytearray(len(good) * enc.max), good, 0, len(good))
