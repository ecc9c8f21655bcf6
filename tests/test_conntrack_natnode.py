"""Unit tests (no root) of the NAT node's configuration data and the ctnetlink encoder."""

from __future__ import annotations

import socket
import struct

import pytest

from natmig.agent import ctnetlink as nl
from natmig.agent.natnode import HOLD_MARK, HOLD_QUEUE, NatNodeConfig, NatNodeError, admission_rule, hold_rule, ruleset, sysctls
from natmig.model import NatSession

CFG = NatNodeConfig(name="nmtest", inside_if="in0", outside_if="out0")


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("name", "bad name", "NatNodeConfig.name"),
        ("inside_if", "x" * 16, "NatNodeConfig.inside_if"),
        ("outside_if", "in0", "NatNodeConfig.outside_if"),
        ("inside_address", "10.0.0.1", "NatNodeConfig.inside_address"),
        ("inside_address", "10.0.1.1/24", "not in inside_subnet"),
        ("outside_address", "203.0.113.300/24", "NatNodeConfig.outside_address"),
        ("public_address", "203.0.113.1/24", "NatNodeConfig.public_address"),
        ("inside_subnet", "10.0.0.1/24", "NatNodeConfig.inside_subnet"),
        ("port_range", (30000, 20000), "NatNodeConfig.port_range"),
        ("port_range", (0, 10), "NatNodeConfig.port_range"),
        ("inside_mac", "02:00:00:00:00", "NatNodeConfig.inside_mac"),
        ("outside_mac", "01:00:5e:00:00:01", "multicast"),
        ("mgmt_if", "mgmt0", "give both or neither"),
    ],
)
def test_config_errors_name_the_field(field: str, value: object, needle: str) -> None:
    args = dict(name="nmtest", inside_if="in0", outside_if="out0")
    args[field] = value
    with pytest.raises(NatNodeError, match=needle.replace(".", r"\.")):
        NatNodeConfig(**args)


def test_config_defaults_and_public_address() -> None:
    assert CFG.port_range == (20000, 29999) and CFG.public_is_outside
    other = NatNodeConfig(name="n", public_address="203.0.113.9")
    assert not other.public_is_outside
    NatNodeConfig(name="n", mgmt_if="m0", mgmt_address="192.0.2.5/24")


def test_ruleset_translates_tcp_udp_and_icmp_into_the_range() -> None:
    r = ruleset(CFG)
    assert "table ip natmig {" in r and "delete table ip natmig" in r
    assert 'oifname "out0" ip saddr 10.0.0.0/24 meta l4proto { tcp, udp } snat to 203.0.113.1:20000-29999' in r
    assert 'meta l4proto icmp snat to 203.0.113.1:20000-29999' in r
    assert "hook postrouting priority srcnat" in r
    # Admission: the rule is there only when new sessions are refused.
    assert admission_rule(CFG) not in r
    closed = ruleset(CFG, admit=False)
    assert admission_rule(CFG) in closed and 'iifname "in0"' in admission_rule(CFG)
    assert "confirmed" in admission_rule(CFG) and f"meta mark set {HOLD_MARK:#x}" in admission_rule(CFG)
    # Marked in prerouting before xtables' mangle (-150) queues it; what is still marked after it is dropped.
    assert "hook prerouting priority mangle - 10" in r and f"meta mark {HOLD_MARK:#x} counter drop" in r
    assert "hook prerouting priority mangle + 10" in r
    assert "chain fwd" not in r  # `fwd` is an nft keyword


def test_the_xtables_rule_queues_marked_inside_packets_without_bypass() -> None:
    rule = hold_rule(CFG)
    assert rule == ["-i", "in0", "-m", "mark", "--mark", f"{HOLD_MARK:#x}", "-j", "NFQUEUE", "--queue-num", str(HOLD_QUEUE)]
    assert "--queue-bypass" not in rule  # nobody listening: dropped, never let through


def test_sysctls_of_a_nat_node() -> None:
    s = sysctls(CFG)
    assert s["net/ipv4/ip_forward"] == 1
    assert s["net/netfilter/nf_conntrack_tcp_be_liberal"] == 1
    assert s["net/ipv4/conf/in0/rp_filter"] == 0 and s["net/ipv6/conf/all/disable_ipv6"] == 1


def attrs(data: bytes) -> dict[int, bytes]:
    """Decode one level of netlink attributes (the test's own decoder)."""
    out, off = {}, 0
    while off < len(data):
        ln, kind = struct.unpack_from("=HH", data, off)
        assert ln >= 4 and off + ln <= len(data)
        out[kind & ~nl.NLA_F_NESTED] = data[off + 4 : off + ln]
        off += (ln + 3) & ~3
    assert off == len(data), "attributes are 4-byte aligned and fill the message"
    return out


def test_icmp_create_carries_the_translated_identifier() -> None:
    s = NatSession("ICMP", "10.0.0.2", 7777, "203.0.113.100", 0, "203.0.113.1", 21500, None, 30, True, 3)
    top = attrs(nl.create_attrs(s, 30))
    orig = attrs(top[nl.CTA_TUPLE_ORIG])
    reply = attrs(top[nl.CTA_TUPLE_REPLY])
    assert attrs(orig[nl.CTA_TUPLE_IP])[nl.CTA_IP_V4_SRC] == socket.inet_aton("10.0.0.2")
    op = attrs(orig[nl.CTA_TUPLE_PROTO])
    assert op[nl.CTA_PROTO_NUM] == b"\x01" and op[nl.CTA_PROTO_ICMP_ID] == struct.pack("!H", 7777)
    assert op[nl.CTA_PROTO_ICMP_TYPE] == b"\x08"
    rp = attrs(reply[nl.CTA_TUPLE_PROTO])
    # The un-NATed reply tuple (back to the inside host) carrying the public identifier.
    assert attrs(reply[nl.CTA_TUPLE_IP])[nl.CTA_IP_V4_DST] == socket.inet_aton("10.0.0.2")
    assert rp[nl.CTA_PROTO_ICMP_ID] == struct.pack("!H", 21500) and rp[nl.CTA_PROTO_ICMP_TYPE] == b"\x00"
    nat = attrs(top[nl.CTA_NAT_SRC])
    assert nat[nl.CTA_NAT_V4_MINIP] == nat[nl.CTA_NAT_V4_MAXIP] == socket.inet_aton("203.0.113.1")
    pr = attrs(nat[nl.CTA_NAT_PROTO])
    assert pr[nl.CTA_PROTONAT_PORT_MIN] == pr[nl.CTA_PROTONAT_PORT_MAX] == struct.pack("!H", 21500)
    (status,) = struct.unpack("!I", top[nl.CTA_STATUS])
    assert status & nl.IPS_CONFIRMED and status & nl.IPS_ASSURED and status & nl.IPS_SEEN_REPLY
    assert struct.unpack("!I", top[nl.CTA_TIMEOUT]) == (30,) and struct.unpack("!I", top[nl.CTA_MARK]) == (3,)
    assert nl.CTA_PROTOINFO not in top


def test_tcp_update_sets_state_and_never_clears_flags() -> None:
    s = NatSession("TCP", "10.0.0.2", 1, "203.0.113.100", 80, "203.0.113.1", 20000, "FIN_WAIT", 60, False, 0)
    top = attrs(nl.update_attrs(s, 60))
    assert nl.CTA_STATUS not in top and nl.CTA_NAT_SRC not in top and nl.CTA_TUPLE_REPLY not in top
    tcp = attrs(attrs(top[nl.CTA_PROTOINFO])[nl.CTA_PROTOINFO_TCP])
    assert tcp[nl.CTA_PROTOINFO_TCP_STATE] == bytes([nl.TCP_STATE_NUMBERS["FIN_WAIT"]])
    delete = attrs(nl.delete_op(s).attrs)
    assert set(delete) == {nl.CTA_TUPLE_ORIG}
    assert nl.create_op(s, 1).flags == nl.NLM_F_CREATE | nl.NLM_F_EXCL


def test_tcp_create_is_liberal_about_windows() -> None:
    s = NatSession("TCP", "10.0.0.2", 1, "203.0.113.100", 80, "203.0.113.1", 20000, "ESTABLISHED", 60, True, 0)
    tcp = attrs(attrs(attrs(nl.create_attrs(s, 60))[nl.CTA_PROTOINFO])[nl.CTA_PROTOINFO_TCP])
    for side in (nl.CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, nl.CTA_PROTOINFO_TCP_FLAGS_REPLY):
        flags, mask = tcp[side]
        assert flags & nl.IP_CT_TCP_FLAG_BE_LIBERAL and mask & nl.IP_CT_TCP_FLAG_BE_LIBERAL
