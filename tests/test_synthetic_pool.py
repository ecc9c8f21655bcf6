"""Unit tests: a testbed NAT with a public address pool, and synthetic tables spread over a pool (no root)."""

from __future__ import annotations

import copy
import tomllib

import pytest

from natmig.controller.demosessions import synthetic_sessions
from natmig.errors import ControllerError
from natmig.pool import PoolError, PublicRange
from natmig.testbed import topology
from natmig.testbed.bed import Testbed
from natmig.testbed.topomodel import TopologyError

POOL_FILE = topology.DEFAULT_TOPOLOGY.with_name("pool.toml")
A1, A2 = "203.0.113.1", "203.0.113.2"
POOL = (PublicRange(A1, (20000, 29999)), PublicRange(A2, (20000, 29999)))
FREE = 65536 - 1024 - 10000  # ports 1024-65535 outside 20000-29999, per address


def test_the_pool_topology_gives_each_nat_two_addresses_and_the_agent_and_node_follow() -> None:
    t = topology.load(POOL_FILE)
    assert t.public_pool("nat1") == t.public_pool("nat2") == POOL
    tb = Testbed(t, "nmunit")
    assert tb.public_addresses("nat2") == [A1, A2]
    cfg = tb.nat_config("nat1")
    assert cfg.public_pool == POOL and cfg.outside_address == "203.0.113.1/24"
    # Without a pool: the public gateway with the NAT's ports, as ever.
    demo = topology.load(None)
    assert demo.public_pool("nat1") == (PublicRange(A1, (20000, 29999)),) and demo.nats["nat1"].pool == ()
    # Made-up servers avoid every address the testbed uses.
    assert t.spare_addresses("public", 3) == ["203.0.113.200", "203.0.113.201", "203.0.113.202"]
    assert not {A1, A2, "203.0.113.100"} & set(t.spare_addresses("public", 253))


@pytest.mark.parametrize("pool, says", [
    (["198.51.100.1"], "nats.nat1.pool: 198.51.100.1 is not in networks.public.subnet 203.0.113.0/24"),
    (["203.0.113.100"], "nats.nat1.pool: 203.0.113.100 is already used by hosts.server.address"),
    (["203.0.113.255"], "nats.nat1.pool: 203.0.113.255 is the network or broadcast address"),
    ([], "nats.nat1.pool: [] is not a non-empty list"),
    (["203.0.113.1-203.0.113.3", "203.0.113.3:29000-30000"], "nats.nat1.pool[1]: 203.0.113.3:29000-30000 overlaps 203.0.113.3:20000-29999 of nats.nat1.pool[0]"),
    (["203.0.113.9:9-1"], "nats.nat1.pool[0]: 9-1 is empty"),
    (["224.0.0.9"], "nats.nat1.pool[0]: 224.0.0.9 is multicast"),
])
def test_a_bad_pool_in_a_topology_names_the_field(pool: list, says: str) -> None:
    doc = tomllib.loads(POOL_FILE.read_text())
    doc = copy.deepcopy(doc)
    doc["nats"]["nat1"]["pool"] = pool
    with pytest.raises(TopologyError) as ei:
        topology.parse(doc)
    assert says in str(ei.value)


def test_sessions_spread_over_the_pool_and_reuse_ports_towards_the_next_server() -> None:
    servers = ["203.0.113.200", "203.0.113.201", "203.0.113.202"]
    n = 2 * 2 * FREE + 10  # one server's worth over both addresses, and a few more
    ss = synthetic_sessions(n, POOL, servers=servers)
    assert len(ss) == n
    assert len({s.key for s in ss}) == n and len({s.reply_key for s in ss}) == n  # kernel-loadable: both tuples unique
    assert {s.translated_address for s in ss[:4]} == {A1, A2}  # the addresses take turns from the start
    assert all(not 20000 <= s.translated_port <= 29999 and s.translated_port >= 1024 for s in ss)
    by_server = {srv: sum(1 for s in ss if s.dst_address == srv) for srv in servers}
    assert by_server == {servers[0]: 4 * FREE, servers[1]: 10, servers[2]: 0}
    # The same public address and port, towards two servers.
    first = ss[0]
    again = [s for s in ss if (s.protocol, s.translated_address, s.translated_port) == (first.protocol, first.translated_address, first.translated_port)]
    assert [s.dst_address for s in again] == servers[:2]
    # One address alone, one server: the table of old, unchanged.
    old = synthetic_sessions(3, A1, (20000, 29999))
    assert [(s.protocol, s.src_port, s.dst_address, s.translated_address, s.translated_port) for s in old] == \
        [("TCP", 1024, "203.0.113.200", A1, 1024), ("UDP", 1024, "203.0.113.200", A1, 1024), ("TCP", 1025, "203.0.113.200", A1, 1025)]


def test_a_million_fit_a_two_address_pool_with_five_servers_and_not_fewer() -> None:
    servers = [f"203.0.113.{200 + i}" for i in range(5)]
    assert 2 * 2 * FREE * 5 >= 1_000_000 > 2 * 2 * FREE * 4
    with pytest.raises(ControllerError, match=r"--sessions 1000000: at most 872192 synthetic sessions fit .*2 public address\(es\), 109024 free public ports in all, 4 server\(s\)"):
        synthetic_sessions(1_000_000, POOL, servers=servers[:4])
    with pytest.raises(ControllerError, match=r"at most 109024 synthetic sessions fit .*1 public address\(es\)"):
        synthetic_sessions(109_025, "203.0.113.1", (20000, 29999))


def test_a_pool_with_uneven_ranges_leaves_each_addresss_own_range_free() -> None:
    pool = (PublicRange(A1, (1024, 65000)), PublicRange(A2, (30000, 30009)), PublicRange(A2, (40000, 40009)))
    ss = synthetic_sessions(2 * (535 + 64512 - 20), pool)
    assert all(not 1024 <= s.translated_port <= 65000 for s in ss if s.translated_address == A1)
    assert all(not (30000 <= s.translated_port <= 30009 or 40000 <= s.translated_port <= 40009) for s in ss if s.translated_address == A2)
    with pytest.raises(ControllerError, match="at most"):
        synthetic_sessions(2 * (535 + 64512 - 20) + 1, pool)


def test_bad_generator_input_is_refused() -> None:
    with pytest.raises(ControllerError, match="give the NAT's port range"):
        synthetic_sessions(1, A1)
    with pytest.raises(ControllerError, match="no server address"):
        synthetic_sessions(1, POOL, servers=())
    with pytest.raises(PoolError, match=r"synthetic sessions: pool\[1\]: .* overlaps"):
        synthetic_sessions(1, (POOL[0], PublicRange(A1, (29999, 30000))))


def test_synthetic_sessions_take_their_remaining_lifetime_and_refuse_one_out_of_range() -> None:
    assert {s.timeout for s in synthetic_sessions(4, A1, (20000, 29999), timeout=86400)} == {86400}
    assert {s.timeout for s in synthetic_sessions(2, A1, (20000, 29999))} == {900}
    with pytest.raises(ControllerError, match=r"timeout 0 s is not within 1\.\."):
        synthetic_sessions(1, A1, (20000, 29999), timeout=0)
