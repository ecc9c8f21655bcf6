"""Unit tests of several machines joined by tunnels: topologies with machines, the fabric planner, its steering (no root).

The switches are in-memory flow tables here (faucet's way): a frame is
walked through them port by port, so every state a move passes through is
checked for where each host's traffic ends up.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from natmig.controller import fabric as fb
from natmig.controller.plan import NETWORKS, flow_table
from natmig.controller.steering import FabricSteering, SteeringError
from natmig.netns import CommandError
from natmig.testbed import flows, topology
from natmig.testbed.bed import Testbed
from natmig.testbed.topomodel import TopologyError

from .test_topology import edited

TWO = Path(topology.__file__).parent / "topologies" / "two-hosts.toml"
TWO_DOC = tomllib.loads(TWO.read_text())


def _two(**changes):
    return edited(TWO_DOC, **changes)


# ------------------------------------------------------------ topologies


def test_two_hosts_is_the_original_deployment():
    t = topology.load(TWO)
    assert t.multi_machine and list(t.machines) == ["A", "B"]
    assert t.underlay is not None and t.underlay.tunnel == "gre" and str(t.underlay.subnet) == "198.51.100.0/24"
    assert t.nats["nat1"].machine == "A" and t.nats["nat2"].machine == "B"
    assert t.on_machine("A") == ["client", "nat1"] and t.on_machine("B") == ["server", "nat2"]


def test_the_demo_has_no_machines():
    t = topology.load(None)
    assert not t.multi_machine and t.underlay is None and all(h.machine == "" for h in t.hosts.values())


@pytest.mark.parametrize("changes,field,why", [
    ({"hosts__client__machine": "C"}, "hosts.client.machine", "'C' is not a machine (one of: A, B)"),
    ({"nats__nat2__machine": None}, "nats.nat2.machine", "missing"),
    ({"underlay__tunnel": "ipip"}, "underlay.tunnel", "not a tunnel type (one of: gre, vxlan, geneve)"),
    ({"machines__B__underlay": "198.51.100.1"}, "machines.B.underlay", "already used by machines.A.underlay"),
    ({"machines__B__underlay": "192.0.2.9"}, "machines.B.underlay", "is not in underlay.subnet"),
    ({"underlay__subnet": "10.0.0.0/16"}, "underlay.subnet", "overlaps networks.inside.subnet"),
    ({"underlay": None}, "underlay", "missing"),
    ({"machines": {"A-1": {"underlay": "198.51.100.1"}}}, "machines.A-1", "at most 8 characters"),
])
def test_a_bad_machine_layout_is_refused_naming_the_field(changes, field, why):
    with pytest.raises(TopologyError) as e:
        topology.parse(_two(**changes))
    assert any(p.startswith(f"{field}:") and why in p for p in e.value.problems), e.value.problems


def test_a_machine_named_without_machines_is_refused():
    doc = tomllib.loads(topology.DEFAULT_TOPOLOGY.read_text())
    doc["hosts"]["client"]["machine"] = "A"
    with pytest.raises(TopologyError, match=r"hosts.client.machine: no \[machines\] are declared"):
        topology.parse(doc)


def test_cli_refuses_a_misplaced_node_naming_the_field(tmp_path, capsys):
    from natmig.cli import main

    bad = tmp_path / "bad.toml"
    bad.write_text(TWO.read_text().replace('machine = "B"\n\n# Separate', 'machine = "C"\n\n# Separate'))
    assert main(["testbed", "up", "--topology", str(bad), "--prefix", "nmunit"]) == 2  # usage: the file is wrong
    err = capsys.readouterr().err
    assert "hosts.server.machine: 'C' is not a machine (one of: A, B)" in err and "Traceback" not in err


def test_tunnel_ports_carry_one_key_per_network_and_direction_the_same_on_both_ends():
    t = topology.load(TWO)
    a, b = flows.tunnel_ports(t, "A"), flows.tunnel_ports(t, "B")
    assert sorted(a) == ["tB-1", "tB-2", "tB-3", "tB-4"] and sorted(b) == ["tA-1", "tA-2", "tA-3", "tA-4"]
    for name, (peer, net, towards, _) in a.items():
        assert int(name[-1]) == fb.tunnel_code(net, towards)
        assert b[f"tA-{name[-1]}"][1:3] == (net, towards)
    assert flows.machine_ports(t, "A") == {"client": 1, "nat1-in": 100, "nat1-out": 101, "tB-1": 211, "tB-2": 212, "tB-3": 213, "tB-4": 214}


def test_testbed_names_of_machines():
    tb = Testbed(topology.load(TWO), "nm1")
    assert tb.machine_netns("A") == "nm1-machine-A" and tb.underlay_netns == "nm1-underlay"
    assert tb.switches["B"].netns == "nm1-machine-B" and str(tb.switches["B"].home).endswith("nm1/ovs-B")
    assert tb.node_switch("server") == "nm1-machine-B"


# ------------------------------------------------------------ in-memory switches


class Switch:
    """A flow table in memory, fed and dumped like Ofctl."""

    def __init__(self, lines=()):
        self.table: dict[str, str] = {}
        self.fail = False
        self.applied: list[tuple[str, ...]] = []
        self.add_flows(lines)

    def add_flows(self, lines):
        if self.fail:
            raise CommandError(["ovs-ofctl", "add-flows", "br-int"], 1, "failed to connect to socket")
        self.applied.append(tuple(lines))
        for line in lines:
            match, _, actions = line.partition(",actions=")
            match = re.sub(r"^cookie=[^,]+,", "", match)
            self.table[match] = actions

    def dump_flows(self, match=None):
        return [f"cookie=0x6e6d, {m} actions={a}" for m, a in self.table.items()]

    def outputs(self, port):
        for m, a in self.table.items():
            if re.search(rf"in_port={port}(,|$)", m) and "dl_dst" not in m and ",arp," not in m:
                return [int(p) for p in re.findall(r"output:(\d+)", a)]
        return []


def switches(f: fb.Fabric, active: str) -> dict[str, Switch]:
    return {m: Switch(fb.machine_table(f, m, active)[:-1]) for m in f.machines}


def walk(f: fb.Fabric, sws: dict[str, Switch], machine: str, port: int, network: str) -> tuple[set[str], set[int]]:
    """Where a frame entering ``port`` of ``machine`` ends up: the NATs and the host ports it reaches."""
    nats, hosts = set(), set()
    todo, seen = [(machine, port)], set()
    while todo:
        m, p = todo.pop()
        if (m, p) in seen:
            continue
        seen.add((m, p))
        mp = f.machines[m]
        for out in sws[m].outputs(p):
            peer = next((k for k, v in mp.tunnels.items() if v == out), None)
            if peer is not None:
                far, net, towards = peer
                todo.append((far, f.machines[far].tunnels[(m, net, towards)]))
            elif out in mp.local_hosts(network):
                hosts.add(out)
            else:
                nats.update(n for n, legs in mp.nats.items() if legs.leg(network) == out)
    return nats, hosts


def check_every_path(f: fb.Fabric, sws: dict[str, Switch], allowed: set[str]) -> None:
    """Each host reaches exactly one NAT of ``allowed``; every NAT's leg reaches every host of the network."""
    for name, mp in f.machines.items():
        for net in NETWORKS:
            for p in mp.local_hosts(net):
                nats, _ = walk(f, sws, name, p, net)
                assert len(nats) == 1 and nats <= allowed, (name, net, p, nats)
    for name, mp in f.machines.items():
        for nat, legs in mp.nats.items():
            for net in NETWORKS:
                _, hosts = walk(f, sws, name, legs.leg(net), net)
                everyone = {p for m in f.machines.values() for p in m.local_hosts(net)}
                assert hosts == everyone, (nat, net, hosts)


def three() -> fb.Fabric:
    """Client on A, server on B, nat1 on A, nat2 on C, nat3 on B: a move may touch three switches."""
    doc = _two()
    doc["machines"]["C"] = {"underlay": "198.51.100.3"}
    doc["nats"]["nat2"]["machine"] = "C"
    doc["nats"]["nat3"] = {"management": "192.0.2.3", "ports": "20000-29999", "machine": "B"}
    return flows.fabric(topology.parse(doc))


# ------------------------------------------------------------ the planner


def test_a_move_to_another_machine_prepares_then_moves_each_ingress_then_retires():
    f = flows.fabric(topology.load(TWO))
    steps = fb.plan_move(f, "nat1", "nat2")
    assert [(s.switch, s.stage) for s in steps] == [("B", "prepare"), ("A", "ingress"), ("B", "ingress"), ("A", "retire")]
    prepare = steps[0]
    # B accepts tunnelled traffic for nat2 (both networks) before anyone sends it.
    assert set(prepare.flows) == {"cookie=0x6e6d,priority=100,in_port=201,actions=output:102", "cookie=0x6e6d,priority=100,in_port=203,actions=output:103"}
    assert all("drop" in u for u in prepare.undo)
    assert all("drop" in fl for fl in steps[-1].flows)


@pytest.mark.parametrize("make,frm,to", [
    (lambda: flows.fabric(topology.load(TWO)), "nat1", "nat2"),
    (lambda: flows.fabric(topology.load(TWO)), "nat2", "nat1"),
    (three, "nat1", "nat2"), (three, "nat2", "nat3"), (three, "nat3", "nat1"),
])
def test_every_state_of_a_move_sends_each_host_to_one_of_the_two_nats_and_returns_reach_everyone(make, frm, to):
    f = make()
    sws = switches(f, frm)
    check_every_path(f, sws, {frm})
    for step in fb.plan_move(f, frm, to):
        sws[step.switch].add_flows(step.flows)
        check_every_path(f, sws, {frm, to})
    check_every_path(f, sws, {to})
    assert {m: s.table for m, s in sws.items()} == {m: s.table for m, s in switches(f, to).items()}


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rolling_back_after_any_step_restores_every_table(k):
    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    before = {m: dict(s.table) for m, s in sws.items()}
    steps = fb.plan_move(f, "nat1", "nat2")
    for step in steps[:k]:
        sws[step.switch].add_flows(step.flows)
    back = fb.rollback(steps[:k])
    assert [s.stage for s in back] == [f"undo {s.stage}" for s in reversed(steps[:k])]
    for step in back:
        sws[step.switch].add_flows(step.flows)
        check_every_path(f, sws, {"nat1", "nat2"})
    assert {m: s.table for m, s in sws.items()} == before


def test_a_move_within_one_machine_changes_only_that_switch_ingress():
    f = three()
    steps = fb.plan_move(f, "nat2", "nat2")
    assert steps == []
    doc = _two()
    doc["nats"]["nat3"] = {"management": "192.0.2.3", "ports": "20000-29999", "machine": "A"}
    f = flows.fabric(topology.parse(doc))
    assert [(s.switch, s.stage) for s in fb.plan_move(f, "nat1", "nat3")] == [("A", "ingress")]


def test_from_an_unknown_state_every_steering_rule_is_rewritten_with_nothing_to_undo():
    f = flows.fabric(topology.load(TWO))
    steps = fb.plan_move(f, None, "nat2")
    assert [s.stage for s in steps] == ["prepare", "ingress", "ingress", "retire"]
    assert all(s.undo == () for s in steps) and fb.rollback(steps) == []
    sws = {m: Switch() for m in f.machines}
    for m in f.machines:  # the static rules, as at bring-up
        sws[m].add_flows([fl.line(f) for fl in fb.machine_flows(f, m, "nat1") if fl.role == "return"])
    for step in steps:
        sws[step.switch].add_flows(step.flows)
    check_every_path(f, sws, {"nat2"})


def test_with_one_machine_the_fabric_is_the_one_switch_table():
    t = topology.load(None)
    doc = tomllib.loads(topology.DEFAULT_TOPOLOGY.read_text())
    doc["underlay"] = {"subnet": "198.51.100.0/24"}
    doc["machines"] = {"A": {"underlay": "198.51.100.1"}}
    for node in (*doc["hosts"].values(), *doc["nats"].values()):
        node["machine"] = "A"
    one = flows.fabric(topology.parse(doc))
    for active in ("nat1", "nat2"):
        table = [fl.line(one) for fl in fb.machine_flows(one, "A", active) if fl.role != "neighbour"] + [one.flow("priority=0,actions=drop")]
        assert set(table) == set(flow_table(flows.layout(t), active))


def test_every_nat_sees_every_host_arp_whatever_the_active_nat():
    f = flows.fabric(topology.load(TWO))
    for active in ("nat1", "nat2"):
        a = {fl.match: fl.actions for fl in fb.machine_flows(f, "A", active) if fl.role == "neighbour"}
        b = {fl.match: fl.actions for fl in fb.machine_flows(f, "B", active) if fl.role == "neighbour"}
        # The client (A, port 1): nat1's inside leg and the tunnel towards B's NATs; there, nat2's inside leg.
        assert a["priority=101,arp,in_port=1"] == "output:100,output:211" and b["priority=101,arp,in_port=201"] == "output:102"
        assert b["priority=101,arp,in_port=2"] == "output:103,output:203" and a["priority=101,arp,in_port=213"] == "output:101"


def test_an_unknown_nat_is_a_plan_error_naming_the_known():
    from natmig.controller.plan import PlanError

    with pytest.raises(PlanError, match="no NAT named 'nat9' on any switch \\(known: nat1, nat2\\)"):
        fb.plan_move(flows.fabric(topology.load(TWO)), "nat1", "nat9")


# ------------------------------------------------------------ steering


def test_fabric_steering_reads_the_active_nat_back_and_moves_it():
    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    seen = []
    st = FabricSteering(f, sws, on_step=lambda s: seen.append((s.switch, s.stage)))
    assert st.active() == "nat1"
    st.point_to("nat2")
    assert st.active() == "nat2" and seen == [("B", "prepare"), ("A", "ingress"), ("B", "ingress"), ("A", "retire")]
    assert [s.stage for s, _ in st.steps] == ["prepare", "ingress", "ingress", "retire"]
    st.point_to("nat2")  # already there: nothing to change
    assert st.steps == []


def test_switches_that_disagree_are_reported_not_guessed():
    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    steps = fb.plan_move(f, "nat1", "nat2")
    for step in steps[:2]:
        sws[step.switch].add_flows(step.flows)
    with pytest.raises(SteeringError, match="the switches disagree: inside hosts on A -> nat2, public hosts on B -> nat1"):
        FabricSteering(f, sws).active()
    FabricSteering(f, sws).point_to("nat1")  # from a mixed state back to one NAT
    assert FabricSteering(f, sws).active() == "nat1"


def test_a_step_that_fails_undoes_the_steps_done_in_reverse_and_says_so():
    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    before = {m: dict(s.table) for m, s in sws.items()}
    st = FabricSteering(f, sws, on_step=lambda s: setattr(sws["B"], "fail", s.stage == "ingress" and s.switch == "A"))
    with pytest.raises(SteeringError) as e:
        st.point_to("nat2")
    msg = str(e.value)
    assert "switch of machine B (ingress)" in msg and "undone: undo ingress on A" in msg and "could NOT undo" in msg, msg
    # B's prepare could not be undone (B is down) but it is harmless: nobody sends to B's tunnels.
    assert sws["A"].table == before["A"]
    sws["B"].fail = False
    assert FabricSteering(f, sws).active() == "nat1"


def test_recover_after_a_controller_died_between_two_switches_points_back_to_the_source():
    from natmig.controller.migrate import Endpoint, MigrateOptions, Migration
    from natmig.controller.recover import recover

    from .test_controller_faults import Died, mapping, setup

    src, tgt, _ = setup(30)
    before = mapping(src)
    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    opened: list = []
    dead: list = []

    def opener(base):
        def open_():
            s = base.session()
            opened.append(s)
            s.closed = bool(dead)
            return s
        return open_

    class Driver:
        """The dead controller's hold on a switch: nothing it sends arrives once it died."""

        def __init__(self, sw):
            self.sw = sw

        def add_flows(self, lines):
            if dead:
                raise Died()
            self.sw.add_flows(lines)

        def dump_flows(self, match=None):
            return self.sw.dump_flows(match)

    def die(step):
        if step.stage == "ingress":  # the first switch moved, the second not: the controller dies here
            for s in opened:
                s.closed = True
            dead.append(step)
            raise Died()

    with pytest.raises(Died):
        Migration(Endpoint("nat1", opener(src)), Endpoint("nat2", opener(tgt)),
                  FabricSteering(f, {m: Driver(sw) for m, sw in sws.items()}, on_step=die), MigrateOptions(verify_source="read")).run()
    for s in opened:
        s.close()  # its connections dropped: the agents release its locks
    with pytest.raises(SteeringError, match="disagree"):
        FabricSteering(f, sws).active()
    r = recover(Endpoint("nat1", src.session), Endpoint("nat2", tgt.session), FabricSteering(f, sws), retire="delete")
    assert r.ok, r.text()
    assert r.found_traffic_on == "nat1" and r.traffic_on == "nat1" and FabricSteering(f, sws).active() == "nat1"
    assert any("interrupted between switches" in d and "pointed back to nat1" in d for d in r.did), r.did
    assert mapping(src) == before and mapping(tgt) == {}
    assert src.provider.admission() and tgt.provider.admission()


def test_each_step_waits_for_its_switch_to_settle_before_the_next():
    from natmig.errors import TestbedError

    f = flows.fabric(topology.load(TWO))
    sws = switches(f, "nat1")
    log = []
    for m, sw in sws.items():
        real = sw.add_flows
        sw.add_flows = lambda lines, m=m, real=real: (log.append(("bundle", m)), real(lines))[1]
    settle = {m: (lambda m=m: log.append(("settled", m))) for m in sws}
    FabricSteering(f, sws, settle=settle).point_to("nat2")
    assert log == [(w, m) for m in ("B", "A", "B", "A") for w in ("bundle", "settled")]

    def stuck():
        raise TestbedError("ovs-appctl revalidator/wait timed out")
    with pytest.raises(SteeringError, match="switch of machine B \\(ingress\\): ovs-appctl revalidator/wait timed out"):
        FabricSteering(f, sws, settle={"B": stuck}).point_to("nat1")
