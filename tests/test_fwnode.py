"""The firewall node's pure parts: its config, ruleset, sysctls and hold rules; the module it is served by;
the NAT's ctnetlink code writing and reading untranslated entries (no root)."""

from __future__ import annotations

import dataclasses
import struct

import pytest

from natmig.agent import ctnetlink as nl
from natmig.agent import ctlayout
from natmig.agent import ctread
from natmig.agent.fwnode import (
    BLOCKED_SET, HOLD_MARK, HOLD_QUEUE_INSIDE, HOLD_QUEUE_OUTSIDE, TABLE, FwNodeConfig, FwNodeError, Service,
    admission_rule, hold_rules, ruleset, sysctls,
)
from natmig.model import NatSession
from natmig.schema import YANG_DIR
from natmig.statemodel import load_module


def cfg(**kw: object) -> FwNodeConfig:
    return FwNodeConfig("fw1", services=(Service("tcp", "10.0.0.10", 80),), mgmt_if="mgmt0", mgmt_address="192.0.2.1/24", **kw)  # type: ignore[arg-type]


def test_ruleset_is_a_stateful_firewall_with_a_block_set_fed_by_a_meter() -> None:
    rs = ruleset(cfg(new_rate=5, new_burst=7, block_timeout=90))
    fwd = rs[rs.index("chain forward"):rs.index("chain input")]
    lines = [l.strip() for l in fwd.splitlines()]
    assert "type filter hook forward priority filter; policy drop;" in lines
    order = ["ip saddr @blocked", "ct state established,related", "ct state invalid", "update @flood", 'iifname "inside0" oifname "outside0" ct state new',
             '@services counter accept']
    where = [next(i for i, l in enumerate(lines) if o in l) for o in order]
    assert where == sorted(where)
    assert "limit rate over 5/second burst 7 packets } add @blocked { ip saddr } counter drop" in fwd
    assert f"set {BLOCKED_SET} {{\n    type ipv4_addr; size 65535; flags dynamic, timeout; timeout 90s;" in rs
    assert "elements = { tcp . 10.0.0.10 . 80 }" in rs
    assert rs.startswith(f"table ip {TABLE} {{}}\ndelete table ip {TABLE}\n")  # idempotent, one transaction
    assert 'iifname "mgmt0" accept' in rs and admission_rule(cfg()) not in rs
    assert admission_rule(cfg()) in ruleset(cfg(), admit=False)


def test_sysctls_make_a_midstream_packet_invalid_and_every_entry_report_its_end() -> None:
    s = sysctls(cfg())
    assert s["net/netfilter/nf_conntrack_tcp_loose"] == 0
    assert s["net/netfilter/nf_conntrack_events"] == 1
    assert s["net/ipv4/ip_forward"] == 1


def test_hold_rules_queue_each_leg_to_its_own_queue() -> None:
    assert hold_rules(cfg()) == [
        ["-i", "inside0", "-m", "mark", "--mark", f"{HOLD_MARK:#x}", "-j", "NFQUEUE", "--queue-num", str(HOLD_QUEUE_INSIDE)],
        ["-i", "outside0", "-m", "mark", "--mark", f"{HOLD_MARK:#x}", "-j", "NFQUEUE", "--queue-num", str(HOLD_QUEUE_OUTSIDE)],
    ]
    assert "mgmt0" not in admission_rule(cfg())


@pytest.mark.parametrize("kw, field", [
    ({"name": "bad name"}, "name"), ({"inside_if": "x" * 16}, "inside_if"), ({"outside_if": "inside0"}, "outside_if"),
    ({"inside_address": "10.0.0.1"}, "inside_address"), ({"new_rate": 0}, "new_rate"), ({"block_timeout": True}, "block_timeout"),
    ({"routes": (("198.51.100.0/24", "nowhere"),)}, "routes"), ({"inside_mac": "01:00:00:00:00:01"}, "inside_mac"),
])
def test_config_names_the_bad_field(kw: dict, field: str) -> None:
    with pytest.raises(FwNodeError, match=f"FwNodeConfig.{field}"):
        FwNodeConfig(**{"name": "fw1", **kw})  # type: ignore[arg-type]
    with pytest.raises(FwNodeError, match="FwNodeConfig.services"):
        Service("icmp", "10.0.0.10", 80)


def test_own_addresses_are_the_legs_and_management() -> None:
    assert cfg().own_addresses == {"10.0.0.1", "203.0.113.1", "192.0.2.1"}


def test_module_compiles_to_two_lists_keyed_as_the_issue_says() -> None:
    m = load_module(YANG_DIR / "fw-state.yang")
    assert [l.qname for l in m.lists] == ["fw-state:session", "fw-state:blocked"]
    sess, blocked = m.lists
    assert sess.keys == ("protocol", "src-address", "src-port", "dst-address", "dst-port")
    assert [s.name for s in sess.leaves][5:] == ["tcp-state", "timeout", "assured", "mark"]
    assert blocked.keys == ("address",) and [s.name for s in blocked.leaves] == ["address", "timeout"]
    # The digest is the keys': lifetimes, states and marks change on their own on a live node.
    assert [s.name for s in sess.leaves if s.mandatory] == list(sess.keys)


def _session(proto: str, sport: int = 40000) -> NatSession:
    dport = 0 if proto == "ICMP" else 80
    return NatSession(proto, "10.0.0.2", sport, "203.0.113.2", dport, "10.0.0.2", sport, "ESTABLISHED" if proto == "TCP" else None, 300, True, 7)


@pytest.mark.parametrize("proto", ["TCP", "UDP", "ICMP"])
def test_an_untranslated_create_has_the_inverse_reply_tuple_and_no_nat(proto: str) -> None:
    s = _session(proto)
    assert nl.untranslated(s)
    fast = ctlayout.create_messages([(s, 300)])
    assert fast == nl.frame(nl.create_op(s, 300), 1)  # the fast encoder and the readable one agree
    a = nl.parse_attrs(fast, 20)
    assert nl.CTA_NAT_SRC not in a
    o, r = ctread.parse_tuple(a[nl.CTA_TUPLE_ORIG]), ctread.parse_tuple(a[nl.CTA_TUPLE_REPLY])
    assert (r.src, r.dst, r.sport) == (o.dst, o.src, o.dport if proto != "ICMP" else o.sport)
    assert struct.unpack("!I", a[nl.CTA_MARK]) == (7,)
    # Read back as the kernel would answer it: the flow, and no NAT session.
    assert ctread.entry_flow(a) == dataclasses.replace(s, timeout=300)
    assert ctread.entry_session(a) is None


def test_translated_and_untranslated_creates_pack_in_one_batch() -> None:
    items = []
    for i, proto in enumerate(["TCP", "UDP", "ICMP"] * 4):
        s = _session(proto, 1000 + i)
        items.append((s, 100 + i))
        items.append((dataclasses.replace(s, translated_address="203.0.113.1", translated_port=20000 + i), 50))
    assert ctlayout.create_messages(items) == b"".join(nl.frame(nl.create_op(s, t), i + 1) for i, (s, t) in enumerate(items))


class _Ran:
    stdout = "1: lo    inet 127.0.0.1/8 scope host lo\n2: mgmt0    inet 192.0.2.1/24 scope global mgmt0\n"
    returncode = 0


def _provider():  # type: ignore[no-untyped-def]
    from natmig.agent.fwnode import FwNode
    from natmig.agent.fwprovider import FirewallProvider

    module = load_module(YANG_DIR / "fw-state.yang")
    return FirewallProvider(module, FwNode(cfg(), run=lambda *a, **k: _Ran())), module


def test_provider_entries_and_kernel_records_convert_both_ways() -> None:
    p, m = _provider()
    e = ("TCP", "10.0.0.2", 40000, "203.0.113.2", 80, None, None, False, 0)
    s = p._session(e)
    assert nl.untranslated(s) and s.tcp_state == "ESTABLISHED"  # absent state: written as ESTABLISHED
    assert p._entry(s) == ("TCP", "10.0.0.2", 40000, "203.0.113.2", 80, "ESTABLISHED", None, False, 0)
    u = ("UDP", "10.0.0.2", 5353, "203.0.113.2", 53, None, 30, True, 7)
    assert p._entry(p._session(u)) == u
    assert p._host_own(p._session(("UDP", "192.0.2.100", 1, "192.0.2.1", 830, None, 5, False, 0)))  # the namespace's address


def test_provider_refuses_before_touching_the_kernel_and_names_every_offender() -> None:
    from natmig.agent.stateprovider import Change, StateRefused

    p, m = _provider()
    sess = m.list("session")
    ok = ("TCP", "10.0.0.2", 40000, "203.0.113.2", 80, "ESTABLISHED", 60, False, 0)
    reverse = ("TCP", "203.0.113.2", 80, "10.0.0.2", 40000, "ESTABLISHED", 60, False, 0)  # its reply tuple is ok's key
    icmp_port = ("ICMP", "10.0.0.2", 7, "203.0.113.2", 9, None, 60, False, 0)
    own = ("UDP", "192.0.2.1", 5000, "203.0.113.2", 53, None, 60, False, 0)
    with pytest.raises(StateRefused) as e:
        p.apply({sess: Change([ok, reverse, icmp_port, own])})  # no namespace exists: any kernel call would fail otherwise
    why = {k: v for (lst, k), v in e.value.problems.items()}
    assert set(why) == {ok[:5], reverse[:5], icmp_port[:5], own[:5]}
    assert "reply tuple" in why[ok[:5]] and "dst_port 9 must be 0 for ICMP" in why[icmp_port[:5]] and "node itself" in why[own[:5]]
