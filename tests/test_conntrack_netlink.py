"""Unit tests (no root) of the ctnetlink entry decoding used by ConntrackProvider.lookup.

Entries are encoded here the way the kernel sends them (the NATed reply
tuple), decoded by :func:`ctnetlink.entry_session`, and compared with what
``conntrack -L`` parsing gives for the same entry: lookup and list must agree.
"""

from __future__ import annotations

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent import ctnetlink as nl
from natmig.agent import cttext
from natmig.model import NatSession

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
    got = nl.entry_session(of_session(s))
    assert got == s
    assert cttext.parse_table(render_list_line(s)).sessions == [got]


def test_what_list_leaves_out_lookup_leaves_out() -> None:
    tcp = ("10.0.0.2", "198.51.100.7", 4000, 80)
    assert nl.entry_session(kernel_entry("TCP", tcp, ("198.51.100.7", "203.0.113.1", 80, 20001), state=3)) is not None
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
        assert nl.entry_session(attrs) is None, why
    # Another protocol (SCTP, 132): the tuple has ports but the module has no such protocol.
    sctp = nl.parse_attrs(
        nl._nest(nl.CTA_TUPLE_ORIG, nl._nest(nl.CTA_TUPLE_IP, nl._attr(nl.CTA_IP_V4_SRC, socket.inet_aton("10.0.0.2")), nl._attr(nl.CTA_IP_V4_DST, socket.inet_aton("198.51.100.7"))),
                 nl._nest(nl.CTA_TUPLE_PROTO, nl._attr(nl.CTA_PROTO_NUM, bytes([132]))))
    )
    assert nl.entry_session(sctp | {nl.CTA_TUPLE_REPLY: sctp[nl.CTA_TUPLE_ORIG]}) is None


def test_decoding_details() -> None:
    tcp, rep = ("10.0.0.2", "198.51.100.7", 4000, 80), ("198.51.100.7", "203.0.113.1", 80, 20001)
    s = nl.entry_session(kernel_entry("TCP", tcp, rep, state=9, timeout=0, mark=None, status=nl.IPS_ASSURED | nl.IPS_SEEN_REPLY))
    # SYN_SENT2 (which conntrack prints as LISTEN), a zero timeout read as 1, no mark attribute = 0.
    assert s == NatSession("TCP", "10.0.0.2", 4000, "198.51.100.7", 80, "203.0.113.1", 20001, "SYN_SENT2", 1, True, 0)
    assert nl.entry_session(kernel_entry("UDP", tcp, rep, timeout=None)).timeout is None
    # A truncated attribute ends the parse instead of looping.
    assert nl.parse_attrs(b"\x02\x00\x01\x00") == {}
