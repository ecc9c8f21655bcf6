"""Unit tests of the public address pool (natmig.pool) and of a NAT node configured with one."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent.natnode import NatNodeConfig, NatNodeError, admission_input_rule, ruleset
from natmig.pool import MAX_ADDRESSES, Owned, PoolError, PublicRange, addresses, check, parse, parse_addresses

A, B = PublicRange("203.0.113.1", (20000, 29999)), PublicRange("203.0.113.2", (30000, 39999))


def test_parse_expands_ranges_and_takes_default_ports() -> None:
    pool = parse("pool", ["203.0.113.1:20000-29999", "203.0.113.2-203.0.113.3"], default_ports=(1024, 2047))
    assert pool == (A, PublicRange("203.0.113.2", (1024, 2047)), PublicRange("203.0.113.3", (1024, 2047)))
    assert addresses(pool) == ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
    assert parse("p", "198.51.100.7:1-65535") == (PublicRange("198.51.100.7", (1, 65535)),)
    # Loopback and link-local are unicast: a protocol test's agent owns 127.0.0.1.
    assert addresses(parse("p", ["127.0.0.1:1-9", "169.254.1.1:1-9"])) == ["127.0.0.1", "169.254.1.1"]
    assert parse_addresses("a", "203.0.113.1") == ["203.0.113.1"]
    # One address in two entries with disjoint ports is one address, two ranges.
    same = check("p", [A, PublicRange(A.address, (40000, 40009))])
    assert addresses(same) == [A.address] and same[1].size == 10


@pytest.mark.parametrize(
    "entries, needle",
    [
        ([], r"^pool: is empty"),
        (["203.0.113.1"], r"pool\[0\]: .*has no port range"),
        (["203.0.113.1:2-1"], r"pool\[0\]: 2-1 is empty"),
        (["203.0.113.1:0-10"], r"pool\[0\]: 0-10 is out of 1\.\.65535"),
        (["203.0.113.1:20000-29999", "203.0.113.1:29999-30000"], r"pool\[1\]: 203\.0\.113\.1:29999-30000 overlaps 203\.0\.113\.1:20000-29999 of pool\[0\]"),
        (["203.0.113.1-203.0.113.2:1-9", "203.0.113.2:5-6"], r"pool\[1\]: 203\.0\.113\.2:5-6 overlaps .* of pool\[0\]"),
        (["224.0.0.1:1-9"], r"pool\[0\]: 224\.0\.0\.1 is multicast"),
        (["0.0.0.0:1-9"], r"pool\[0\]: 0\.0\.0\.0 is unspecified"),
        (["255.255.255.255:1-9"], r"broadcast"),
        (["203.0.113.300:1-9"], r"pool\[0\]: '203\.0\.113\.300' is not an IPv4 address"),
        (["203.0.113.9-203.0.113.1:1-9"], r"empty range"),
        (["10.0.0.0-10.255.255.255:1-9"], rf"a pool holds at most {MAX_ADDRESSES}"),
        ([7], r"pool\[0\]: 7 is not a pool entry"),
    ],
)
def test_bad_pools_are_refused_naming_the_entry(entries: list, needle: str) -> None:
    with pytest.raises(PoolError, match=needle):
        parse("pool", entries)


def test_check_refuses_what_is_not_a_pool() -> None:
    with pytest.raises(PoolError, match=r"^p: '203\.0\.113\.1' is not a sequence"):
        check("p", "203.0.113.1")  # type: ignore[arg-type]
    with pytest.raises(PoolError, match=r"p\[0\]\.ports: 5-4 is empty"):
        check("p", [PublicRange("203.0.113.1", (5, 4))])


def test_a_node_without_a_pool_is_a_pool_of_one() -> None:
    cfg = NatNodeConfig(name="n", public_address="203.0.113.9", port_range=(1000, 1999))
    assert cfg.public_pool == (PublicRange("203.0.113.9", (1000, 1999)),)
    assert cfg.public_addresses == ["203.0.113.9"]
    assert "snat to 203.0.113.9:1000-1999" in ruleset(cfg)
    assert "ip daddr 203.0.113.9 " in admission_input_rule(cfg)


def test_a_node_with_a_pool_maps_to_every_address_and_owns_them() -> None:
    cfg = NatNodeConfig(name="n", pool=(A, B))
    # The single-address fields are the pool's first entry.
    assert (cfg.public_address, cfg.port_range) == (A.address, A.ports)
    assert cfg.public_addresses == [A.address, B.address]
    r = ruleset(cfg)
    target = "snat ip to jhash ip saddr mod 2 map { 0 : 203.0.113.1 . 20000-29999, 1 : 203.0.113.2 . 30000-39999 }"
    assert r.count(target) == 2 and "icmp " + target in r
    assert "ip daddr { 203.0.113.1, 203.0.113.2 }" in admission_input_rule(cfg)


@pytest.mark.parametrize(
    "pool, needle",
    [
        ((A, PublicRange(A.address, (25000, 25000))), r"NatNodeConfig\.pool\[1\]: .* overlaps .* of NatNodeConfig\.pool\[0\]"),
        ((A, PublicRange("239.1.1.1", (1, 2))), r"NatNodeConfig\.pool\[1\]\.address: 239\.1\.1\.1 is multicast"),
        ((A, PublicRange("10.0.0.9", (1, 2))), r"NatNodeConfig\.pool\[1\]\.address: 10\.0\.0\.9 is in inside_subnet"),
        ((PublicRange(A.address, (9, 1)),), r"NatNodeConfig\.pool\[0\]\.ports: 9-1 is empty"),
        (("203.0.113.1",), r"NatNodeConfig\.pool\[0\]: '203\.0\.113\.1' is not a public range"),
    ],
)
def test_a_bad_pool_in_a_node_config_names_the_field(pool: tuple, needle: str) -> None:
    with pytest.raises(NatNodeError, match=needle):
        NatNodeConfig(name="n", pool=pool)


@settings(max_examples=200, deadline=None)
@given(ranges=st.lists(st.tuples(st.sampled_from(["203.0.113.1", "203.0.113.2"]), st.integers(1, 400), st.integers(0, 60)), min_size=1, max_size=4),
       bare=st.booleans(),
       pairs=st.lists(st.tuples(st.sampled_from(["203.0.113.1", "203.0.113.2", "203.0.113.3"]), st.integers(0, 500)), max_size=40))
def test_all_ports_inside_is_every_pair_without_a_port_problem(ranges: list, bare: bool, pairs: list) -> None:
    # Several ranges of one address, or none, or the address owned whole (every port): the columns'
    # answer is what port_problem says pair by pair.
    owned = Owned([PublicRange(a, (lo, lo + n)) for a, lo, n in ranges] + (["203.0.113.3"] if bare else []))
    addresses_, ports = [a for a, _ in pairs], [p for _, p in pairs]
    assert owned.all_ports_inside(addresses_, ports) == all(owned.port_problem(a, p) is None for a, p in pairs)
