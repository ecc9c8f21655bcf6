"""Hypothesis strategies for nat-session tables."""

from __future__ import annotations

import ipaddress

from hypothesis import strategies as st

from natmig.model import NatSession

ports = st.integers(0, 65535)
ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
addresses = st.one_of(ipv4, ipv4, ipv6)
TCP_STATES = ["SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2"]


@st.composite
def sessions(draw: st.DrawFn) -> NatSession:
    proto = draw(st.sampled_from(["TCP", "UDP", "ICMP"]))
    return NatSession(
        protocol=proto,
        src_address=draw(addresses),
        src_port=draw(ports),
        dst_address=draw(addresses),
        dst_port=0 if proto == "ICMP" else draw(ports),
        translated_address=draw(addresses),
        translated_port=draw(ports),
        tcp_state=draw(st.sampled_from(TCP_STATES)) if proto == "TCP" else None,
        timeout=draw(st.none() | st.integers(1, 2**32 - 1)),
        assured=draw(st.booleans()),
        mark=draw(st.integers(0, 2**32 - 1)),
    )


tables = st.lists(sessions(), max_size=30, unique_by=lambda s: s.key)
