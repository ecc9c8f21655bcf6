"""Unit tests of the pure planning: copy plan, event folding, verification, OpenFlow rules."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natmig.controller.plan import (
    CatchUp, NatPorts, PlanError, SwitchLayout, compare, expected_table, flow_table, nats_in_flows, plan_copy, static_flows,
    steering_flows,
)
from natmig.errors import ControllerError

from .controller_fakes import sessions


def test_idle_target_copies_everything_and_rollback_removes_all():
    src = sessions(10)
    p = plan_copy(src, [])
    assert p.sessions == src and p.already == frozenset() and len(p.added_keys) == 10


def test_compatible_target_keeps_its_own_and_same_mapping_is_not_removed_on_rollback():
    src = sessions(10)
    own = sessions(2, base_port=25000)  # other keys, other ports
    p = plan_copy(src, own + src[:3])
    assert p.already == {s.key for s in src[:3]}
    assert set(p.added_keys) == {s.key for s in src[3:]}
    assert p.target_before == 5


def test_conflicts_are_all_listed():
    src = sessions(3)
    remapped = replace(src[0], translated_port=29999)
    squatter = replace(src[1], src_port=60000)  # other key holding src[1]'s public port
    with pytest.raises(PlanError) as ei:
        plan_copy(src, [remapped, squatter], target_public={"203.0.113.1"})
    assert len(ei.value.conflicts) == 2
    msg = str(ei.value)
    assert "29999" in msg and "held on the target" in msg
    assert isinstance(ei.value, ControllerError)


def test_foreign_public_address_is_a_conflict():
    with pytest.raises(PlanError, match="does not own"):
        plan_copy(sessions(2), [], target_public={"203.0.113.9"})


def test_catch_up_folds_events_last_one_wins():
    a, b, c = sessions(3)
    cu = CatchUp().extend([("created", a), ("destroyed", a), ("destroy", b), ("new", b), ("created", c)])
    ups, dels = cu.take()
    assert {s.key for s in ups} == {b.key, c.key}
    assert dels == [a.key]  # a may be in the snapshot: it must go
    assert cu.events == 5
    cu.add("destroyed", c)
    ups, dels = cu.take()
    assert ups == [] and dels == [c.key]
    with pytest.raises(PlanError, match="unknown event kind"):
        cu.add("moved", a)


def test_expected_table_and_compare():
    snap = sessions(4)
    extra = sessions(1, base_port=21000)[0]
    table = expected_table(snap, [("created", extra), ("destroyed", snap[0])])
    assert set(table) == {s.key for s in snap[1:]} | {extra.key}
    target = list(table.values()) + sessions(1, base_port=22000)
    v = compare(table.values(), target)
    assert v.ok and v.extra == 1 and v.checked == 4
    bad = [replace(s, translated_port=s.translated_port + 1) if s.key == extra.key else s for s in target if s.key != snap[1].key]
    v = compare(table.values(), bad)
    assert not v.ok and [s.key for s in v.missing] == [snap[1].key] and len(v.remapped) == 1
    assert "1 missing" in v.describe() and "re-mapped" in v.describe()


LAYOUT = SwitchLayout("br0", 1, 2, {"nat1": NatPorts(3, 4), "nat2": NatPorts(5, 6)})


def test_steering_flows_move_both_directions():
    assert steering_flows(LAYOUT, "nat2") == [
        "priority=100,in_port=1,actions=output:5",
        "priority=100,in_port=2,actions=output:6",
    ]
    assert steering_flows(LAYOUT, "nat1")[1].endswith("output:4")
    with pytest.raises(PlanError, match="no NAT named 'nat9'.*nat1, nat2"):
        steering_flows(LAYOUT, "nat9")


def test_steering_hairpins_what_a_nat_releases_to_the_active_nat():
    layout = replace(LAYOUT, gateway_mac="02:6e:6d:00:00:01")
    assert steering_flows(layout, "nat2") == [
        "priority=100,in_port=1,actions=output:5",
        "priority=100,in_port=2,actions=output:6",
        # Above the static return rule of the same port (priority 100).
        "priority=101,in_port=3,dl_dst=02:6e:6d:00:00:01,actions=output:5",
        "priority=101,in_port=5,dl_dst=02:6e:6d:00:00:01,actions=output:in_port",
    ]
    assert steering_flows(layout, "nat1")[2:] == [
        "priority=101,in_port=3,dl_dst=02:6e:6d:00:00:01,actions=output:in_port",
        "priority=101,in_port=5,dl_dst=02:6e:6d:00:00:01,actions=output:3",
    ]


def test_the_testbed_plans_the_same_hairpins_as_the_controller():
    from natmig.testbed import flows, topology

    t = topology.load(None)
    ports = flows.port_names(t)
    layout = SwitchLayout("br0", ports["client"], ports["server"],
                          {n: NatPorts(ports[f"{n}-in"], ports[f"{n}-out"]) for n in t.nats},
                          gateway_mac=t.networks["inside"].gateway_mac)
    for active in t.nats:
        table = {line.removeprefix(f"cookie={flows.COOKIE:#x},") for line in flows.plan(t, active).splitlines()}
        assert set(steering_flows(layout, active)) <= table
        assert set(static_flows(layout)) <= table


def test_the_whole_table_is_the_static_and_the_steering_rules_and_a_drop():
    layout = replace(LAYOUT, gateway_mac="02:6e:6d:00:00:01")
    for active in ("nat1", "nat2"):
        table = flow_table(layout, active)
        assert len(table) == len(set(table)) and table[-1] == "priority=0,actions=drop"
        assert set(table) == set(static_flows(layout)) | set(steering_flows(layout, active)) | {"priority=0,actions=drop"}
    with pytest.raises(PlanError, match="nat9"):
        flow_table(layout, "nat9")


def test_a_network_with_several_hosts_is_a_hub_and_a_cookie_marks_every_rule():
    layout = replace(LAYOUT, more_inside_hosts=(7,), cookie=0x6E6D)
    assert steering_flows(layout, "nat2") == [
        "cookie=0x6e6d,priority=100,in_port=1,actions=output:7,output:5",
        "cookie=0x6e6d,priority=100,in_port=7,actions=output:1,output:5",
        "cookie=0x6e6d,priority=100,in_port=2,actions=output:6",
    ]
    assert "cookie=0x6e6d,priority=100,in_port=3,actions=output:1,output:7" in static_flows(layout)
    assert flow_table(layout, "nat1")[-1] == "cookie=0x6e6d,priority=0,actions=drop"


def test_the_active_nat_is_read_back_from_a_dump_by_output_port():
    dump = ["priority=100,in_port=1 actions=output:5", "priority=100,in_port=6 actions=output:2"]
    assert nats_in_flows(LAYOUT, dump) == ["nat2"]
    # A port number that merely starts like another NAT's (output:30 is not output:3) names none.
    assert nats_in_flows(LAYOUT, ["priority=100,in_port=1 actions=output:30", "actions=IN_PORT"]) == []
    assert nats_in_flows(LAYOUT, dump + ["in_port=2 actions=output:4"]) == ["nat1", "nat2"]


def test_static_flows_return_from_every_nat():
    flows = static_flows(LAYOUT)
    assert "priority=100,in_port=3,actions=output:1" in flows
    assert "priority=100,in_port=6,actions=output:2" in flows
    assert len(flows) == 4


def test_handshake_states_are_written_as_read_the_node_makes_them_established():
    """The copy carries what the source said; the NAT node's provider writes it as ESTABLISHED (agent.provider.as_written)."""
    a, b = sessions(2)
    a = replace(a, tcp_state="SYN_SENT", timeout=100)
    assert plan_copy([a], []).sessions[0].tcp_state == "SYN_SENT"
    cu = CatchUp().extend([("created", replace(b, tcp_state="SYN_RECV"))])
    assert cu.take()[0][0].tcp_state == "SYN_RECV"


def test_a_public_port_shared_towards_another_remote_is_not_a_conflict():
    src = sessions(1)
    other_remote = replace(src[0], src_port=60000, dst_address="198.51.100.7")  # same public port, other remote
    p = plan_copy(src, [other_remote])
    assert p.added_keys == [src[0].key]
    same_remote = replace(src[0], src_port=60000)
    with pytest.raises(PlanError, match="held on the target"):
        plan_copy(src, [same_remote])
