"""Unit tests: a NAT's public address pool as the agent, the inventory and the planner read it; what lies outside is refused."""

from __future__ import annotations

import argparse
import re

import pytest

from natmig.agent import config as agent_config
from natmig.agent.cli import public_addresses
from natmig.agent.provider import MemoryProvider
from natmig.cli import build_parser
from natmig.controller.inventory import InventoryError, parse
from natmig.controller.migrate import endpoint_from_spec
from natmig.controller.plan import PlanError, plan_copy
from natmig.errors import AgentError, NatmigError, UsageError
from natmig.model import NatSession
from natmig.pool import describe

POOL = {"203.0.113.1", "203.0.113.2", "203.0.113.3"}


def session(sport: int, pub: str, tport: int = 20000) -> NatSession:
    return NatSession("UDP", "10.0.0.5", sport, "198.51.100.7", 53, pub, tport, None, 60)


def agent_args(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["agent", *argv])
    return agent_config.resolve(args, args.agent_options)


def test_the_agent_takes_a_pool_as_addresses_and_ranges_from_flags_and_config(tmp_path) -> None:
    a = agent_args("--public-address", "203.0.113.1-203.0.113.2", "--public-address", "203.0.113.3")
    assert public_addresses(a.public_address) == ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
    cfg = tmp_path / "a.toml"
    cfg.write_text('public_address = ["203.0.113.1-203.0.113.3"]\n')
    assert public_addresses(agent_args("--config", str(cfg)).public_address) == sorted(POOL)


@pytest.mark.parametrize("value, says", [
    ("203.0.113.9-203.0.113.1", "--public-address: '203.0.113.9-203.0.113.1' is an empty range"),
    ("224.0.0.1", "--public-address: 224.0.0.1 is multicast"),
    ("nowhere", "--public-address: 'nowhere' is not an IPv4 address"),
])
def test_a_bad_pool_flag_or_key_names_it(tmp_path, capsys, value: str, says: str) -> None:
    with pytest.raises(SystemExit):
        agent_args("--public-address", value)
    assert says in capsys.readouterr().err
    cfg = tmp_path / "a.toml"
    cfg.write_text(f'public_address = ["{value}"]\n')
    with pytest.raises(UsageError, match=re.escape("public_address: " + says)):
        agent_args("--config", str(cfg))


def test_an_address_given_twice_is_refused() -> None:
    with pytest.raises(AgentError, match=r"--public-address: 203\.0\.113\.2 is given twice \(in values 1 and 2\)"):
        public_addresses(["203.0.113.1-203.0.113.3", "203.0.113.2"])


def test_every_pool_address_is_owned_and_one_outside_is_refused() -> None:
    p = MemoryProvider(owned=set(POOL))
    ok = [session(1, "203.0.113.1"), session(2, "203.0.113.3"), session(3, "203.0.113.2", 20000)]
    assert p.check(ok) == {}
    bad = session(4, "203.0.113.4")
    problems = p.check([*ok, bad])
    assert list(problems) == [bad.key]
    assert problems[bad.key] == "translated_address 203.0.113.4 is not an address of this node (203.0.113.1, 203.0.113.2, 203.0.113.3)"


def test_a_large_pool_is_named_in_short() -> None:
    big = {f"198.51.100.{i}" for i in range(1, 101)}
    text = describe(big)
    assert text.startswith("198.51.100.1, 198.51.100.2, ") and text.endswith("198.51.100.8 and 92 more")
    assert describe(()) == "none"


def test_the_plan_refuses_a_source_address_outside_the_targets_pool() -> None:
    src = [session(1, "203.0.113.1"), session(2, "203.0.113.2"), session(3, "203.0.113.9")]
    plan_copy(src[:2], [], POOL)  # every address in the pool: planned
    with pytest.raises(PlanError, match=r"source translates to 203\.0\.113\.9, which the target does not own \(203\.0\.113\.1, 203\.0\.113\.2, 203\.0\.113\.3\)"):
        plan_copy(src, [], POOL)


def _inventory(public: object) -> dict:
    return {"agents": {"nat1": {"host": "192.0.2.11", "key": "k", "public_address": public}, "nat2": {"host": "192.0.2.12", "key": "k"}}}


def test_the_inventory_takes_a_pool_and_the_endpoint_owns_all_of_it() -> None:
    inv = parse(_inventory(["203.0.113.1-203.0.113.2", "203.0.113.3"]))
    assert inv.agents["nat1"].public_addresses == POOL
    assert parse(_inventory("203.0.113.1")).agents["nat1"].public_addresses == {"203.0.113.1"}
    assert inv.agents["nat2"].public_addresses is None
    # What the migration checks the source's table against (preflight, plan, copy).
    assert endpoint_from_spec(inv.agents["nat1"]).public == POOL


@pytest.mark.parametrize("public, says", [
    ([], "agents.nat1.public_address: [] is not an address or a non-empty list"),
    (["203.0.113.1", "nowhere"], "agents.nat1.public_address[1]: 'nowhere' is not an IP address"),
    (["203.0.113.1-203.0.113.3", "203.0.113.2"], "agents.nat1.public_address[1]: 203.0.113.2 is also in entry [0]"),
    ("203.0.113.3-203.0.113.1", "agents.nat1.public_address: '203.0.113.3-203.0.113.1' is an empty range"),
    (["239.0.0.1-239.0.0.2"], "agents.nat1.public_address[0]: 239.0.0.1 is multicast"),
])
def test_a_bad_inventory_pool_names_the_field(public: object, says: str) -> None:
    with pytest.raises(InventoryError, match=re.escape(says)):
        parse(_inventory(public))


def test_ports_given_with_an_address_are_owned_and_a_session_outside_them_is_refused() -> None:
    from natmig.agent.cli import public_pool
    from natmig.agent.provider import check_batch

    owned = public_pool(["203.0.113.1:20000-20099", "203.0.113.2", "203.0.113.3:40000-40009", "203.0.113.3:50000-50000"])
    assert owned == {"203.0.113.1", "203.0.113.2", "203.0.113.3"}
    assert dict(owned.ports) == {"203.0.113.1": ((20000, 20099),), "203.0.113.3": ((40000, 40009), (50000, 50000))}
    p = MemoryProvider(owned=owned)
    ok = [session(1, "203.0.113.1", 20099), session(2, "203.0.113.2", 65000), session(3, "203.0.113.3", 50000)]
    assert p.check(ok) == {}
    outside = [session(4, "203.0.113.1", 20100), session(5, "203.0.113.3", 40010)]
    problems = p.check([*ok, *outside])
    assert problems == {
        outside[0].key: "translated_port 20100 is outside the ports of 203.0.113.1 on this node (20000-20099)",
        outside[1].key: "translated_port 40010 is outside the ports of 203.0.113.3 on this node (40000-40009, 50000-50000)",
    }
    # The whole-batch shortcut and the entry-by-entry loop decide the same.
    big = [session(100 + i, "203.0.113.1", 20000 + i) for i in range(100)]
    assert check_batch(big, {}, owned) == {}
    assert set(check_batch([*big, outside[0]], {}, owned)) == {outside[0].key}
    assert p.apply(ok) is None and p.public_addresses() is owned


@pytest.mark.parametrize("values, says", [
    (["203.0.113.1:20000-20099", "203.0.113.1:20050-20199"], "overlaps 203.0.113.1:20000-20099"),
    (["203.0.113.1", "203.0.113.1:20000-20099"], "203.0.113.1 is given twice (in values 1 and 2)"),
])
def test_ports_of_one_address_given_twice_must_be_disjoint(values: list[str], says: str) -> None:
    from natmig.agent.cli import public_pool

    with pytest.raises(NatmigError, match=re.escape(says)):
        public_pool(values)


def test_a_bad_port_range_in_the_flag_names_it(capsys) -> None:
    with pytest.raises(SystemExit):
        agent_args("--public-address", "203.0.113.1:9-1")
    assert "--public-address: 9-1 is empty (low above high)" in capsys.readouterr().err
    assert public_addresses(agent_args("--public-address", "203.0.113.1-203.0.113.2:20000-29999").public_address) == ["203.0.113.1", "203.0.113.2"]
