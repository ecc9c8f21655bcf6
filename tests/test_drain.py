"""Unit tests of NAT instances and draining a machine (no root): the topology extension, per-instance planning, pairing, the inventory.

The switches are in-memory flow tables (tests/test_multihost.py's): moves
of several instances are applied interleaved, as `natmig drain --parallel`
applies them, and each must end where it was sent without touching another.
"""

from __future__ import annotations

import ipaddress
import random
import re
import threading
import time
import tomllib
from pathlib import Path

import pytest

from natmig.agent.provider import MemoryProvider
from natmig.cli import main
from natmig.controller import fabric as fb
from natmig.controller.drain import Drain, DrainOptions, Move, PairingError, pair_moves
from natmig.controller.inventory import InventoryError, dump_toml, parse
from natmig.controller.migrate import Endpoint, MigrateOptions
from natmig.controller.plan import PlanError
from natmig.controller.steering import FabricSteering, SteeringError
from natmig.testbed import flows, topology
from natmig.testbed.bed import Testbed
from natmig.testbed.topomodel import Topology, TopologyError

from .controller_fakes import FakeNode, sessions
from .test_multihost import Switch
from .test_topology import edited

TOPOS = Path(topology.__file__).parent / "topologies"
EIGHT = TOPOS / "eight-nats.toml"
EIGHT_DOC = tomllib.loads(EIGHT.read_text())


def _eight(**changes):
    return edited(EIGHT_DOC, **changes)


# ------------------------------------------------------------ the topology


def test_eight_nats_has_eight_instances_each_with_its_client_network_public_address_and_twin():
    t = topology.load(EIGHT)
    assert t.active_nats == tuple(f"a{i}" for i in range(1, 9)) and t.active_nat == "a1"
    pairs = t.pairs()
    assert list(pairs) == [(f"inside{i}", "public") for i in range(1, 9)]
    for i in range(1, 9):
        assert pairs[(f"inside{i}", "public")] == [f"a{i}", f"b{i}"] and t.twins(f"a{i}") == [f"b{i}"]
        assert t.nats[f"a{i}"].machine == "A" and t.nats[f"b{i}"].machine == "B"
        assert t.public_addresses_of(f"a{i}") == t.public_addresses_of(f"b{i}") == [f"203.0.113.{i}"]
        assert t.hosts[f"c{i}"].address in t.networks[f"inside{i}"].subnet
        assert t.active_of(f"b{i}") == f"a{i}"
    assert all(n.subnet.subnet_of(ipaddress.IPv4Network("10.0.0.0/24")) for n in t.networks.values() if n.name != "public")


@pytest.mark.parametrize("name", ["demo.toml", "two-hosts.toml", "firewall.toml", "pool.toml"])
def test_the_existing_topologies_are_one_instance(name):
    t = topology.load(TOPOS / name)
    assert list(t.pairs()) == [("inside", "public")] and t.active_nats == (t.active_nat,)


def test_testbed_nodes_of_an_instance_get_its_networks():
    tb = Testbed(topology.load(EIGHT), "nm1")
    c = tb.nat_config("b5")
    assert c.inside_address == "10.0.0.65/28" and c.inside_subnet == "10.0.0.64/28" and c.inside_mac == "02:6e:6d:00:00:05"
    assert c.outside_address == "203.0.113.1/24" and c.public_address == "203.0.113.5"


@pytest.mark.parametrize(
    ("changes", "field", "why"),
    [
        ({"nats__b3__inside": "inside9"}, "nats.b3.inside", "'inside9' is not a network"),
        ({"networks__public2": {"subnet": "198.18.0.0/24", "gateway": "198.18.0.1", "gateway_mac": "02:6e:6d:00:02:01"},
          "nats__b3__public": "public2"}, "nats.b3.public", "the NAT nodes of one client network are twins"),
        ({"nats__a3__public": "inside2"}, "nats.a3.public", "is the inside network of nats.a2"),
        ({"nats__a3__pool": ["203.0.113.2"], "nats__b3__pool": ["203.0.113.2"]}, "nats.a3.pool", "each need their own public addresses"),
        ({"active_nat": ["a1", "b1", "a2", "a3", "a4", "a5", "a6", "a7", "a8"]}, "active_nat", "name one active NAT node per network pair"),
        ({"active_nat": ["a1", "a2", "a3", "a4", "a5", "a6", "a7"]}, "active_nat", "no active NAT node for networks inside8/public (one of: a8, b8)"),
        ({"active_nat": "a1"}, "active_nat", "no active NAT node for networks inside2/public"),
        ({"active_nat": ["a1", "x9"]}, "active_nat", "'x9' is not a NAT node"),
        ({"networks__inside2__subnet": "10.0.0.0/27", "networks__inside2__gateway": "10.0.0.17"}, "networks.inside2.subnet", "overlaps networks.inside1.subnet"),
        ({"networks__inside2__gateway_mac": "02:6e:6d:00:00:01"}, "networks.inside2.gateway_mac", "same as networks.inside1.gateway_mac"),
        ({"hosts__c4": None}, "hosts", "no host on the inside4 network (a client is needed)"),
    ],
)
def test_a_bad_instance_layout_is_refused_naming_the_field(changes, field, why):
    with pytest.raises(TopologyError) as exc:
        topology.parse(_eight(**changes), "bad.toml")
    matching = [p for p in exc.value.problems if p.startswith(f"{field}:")]
    assert any(why in p for p in matching), exc.value.problems


def one_machine(k: int = 3) -> Topology:
    """eight-nats.toml's first ``k`` instances, all on one machine (no [machines]): one switch steers them."""
    doc = _eight(machines=None, underlay=None)
    for section in ("hosts", "nats"):
        for node in doc[section].values():
            del node["machine"]
    for i in range(k + 1, 9):
        del doc["networks"][f"inside{i}"], doc["hosts"][f"c{i}"], doc["nats"][f"a{i}"], doc["nats"][f"b{i}"]
    doc["active_nat"] = doc["active_nat"][:k]
    return topology.loads(dump_toml(doc), "one-machine.toml")


def test_on_one_switch_each_instance_is_steered_and_moved_on_its_own():
    t = one_machine()
    f = flows.fabric(t)
    assert list(f.machines) == [""] and not f.machines[""].tunnels
    sws = {"": Switch(fb.machine_table(f, "", t.active_nats)[:-1])}
    ports = flows.port_names(t)
    steps = fb.plan_move(f, "a2", "b2")
    # One switch: one bundle, atomic, as without instances.
    assert [(s.switch, s.stage) for s in steps] == [("", "ingress")]
    sws[""].add_flows(steps[0].flows)
    for i, want in ((1, "a1"), (2, "b2"), (3, "a3")):
        assert reaches(f, sws, "", ports[f"c{i}"], f"inside{i}", "203.0.113.100") == {want}
        assert reaches(f, sws, "", ports["server"], "public", f"203.0.113.{i}") == {want}
    # A testbed of it is steered per instance; one of one instance keeps its one-bundle table.
    assert Testbed(t, "nm1").per_instance and not Testbed(topology.load(None), "nm1").per_instance


# ------------------------------------------------------------ per-instance planning


def switches(f: fb.Fabric, actives) -> dict[str, Switch]:
    return {m: Switch(fb.machine_table(f, m, actives)[:-1]) for m in f.machines}


def rule(sw: Switch, port: int, dst: str | None) -> list[int]:
    """The outputs of the rule a non-ARP IPv4 packet to ``dst`` entering ``port`` matches (a nw_dst rule above a port-only one)."""
    best = None
    for m, a in sw.table.items():
        if not re.search(rf"in_port={port}(,|$)", m) or "dl_dst" in m or ",arp," in m:
            continue
        d = re.search(r"nw_dst=([0-9.]+)", m)
        if d is not None and d.group(1) != dst:
            continue
        if best is None or d is not None:
            best = a
    return [int(p) for p in re.findall(r"output:(\d+)", best or "")]


def reaches(f: fb.Fabric, sws: dict[str, Switch], machine: str, port: int, network: str, dst: str | None) -> set[str]:
    """The NATs a packet to ``dst`` from ``port`` on ``machine`` reaches, following tunnels."""
    out, todo = set(), [(machine, port)]
    while todo:
        m, p = todo.pop()
        mp = f.machines[m]
        for o in rule(sws[m], p, dst):
            peer = next((k for k, v in mp.tunnels.items() if v == o), None)
            if peer is not None:
                todo.append((peer[0], f.machines[peer[0]].tunnels[(m, peer[1], peer[2])]))
            else:
                out |= {n for n, legs in mp.nats.items() if f.leg(n, legs, network) == o}
    return out


def check_instances(f: fb.Fabric, t: Topology, sws: dict[str, Switch], actives: dict[int, str]) -> None:
    """Each client reaches exactly its instance's active NAT; the server's packets to 203.0.113.i reach it too."""
    ports = flows.port_names(t)
    for i, active in actives.items():
        assert reaches(f, sws, "A", ports[f"c{i}"], f"inside{i}", "203.0.113.100") == {active}, (i, active)
        assert reaches(f, sws, "B", ports["server"], "public", f"203.0.113.{i}") == {active}, (i, active)


def test_moving_one_instance_changes_only_its_own_rules():
    t = topology.load(EIGHT)
    f = flows.fabric(t)
    steps = fb.plan_move(f, "a3", "b3")
    assert [(s.switch, s.stage) for s in steps] == [("B", "prepare"), ("A", "ingress"), ("B", "ingress"), ("A", "retire")]
    mine = {str(flows.port_names(t)[p]) for p in ("c3", "a3-in", "b3-in")}
    for s in steps:
        for line in s.flows:
            port = re.search(r"in_port=(\d+)", line).group(1)
            assert port in mine or "nw_dst=203.0.113.3," in line or "nw_dst" not in line and _tunnel_of(f, s.switch, int(port)) == "inside3", line
    sws = switches(f, t.active_nats)
    for s in steps:
        sws[s.switch].add_flows(s.flows)
    after = switches(f, ["a1", "a2", "b3", "a4", "a5", "a6", "a7", "a8"])
    assert {m: s.table for m, s in sws.items()} == {m: s.table for m, s in after.items()}
    check_instances(f, t, sws, {i: f"a{i}" if i != 3 else "b3" for i in range(1, 9)})


def _tunnel_of(f: fb.Fabric, machine: str, port: int) -> str | None:
    return next((net for (_, net, _), p in f.machines[machine].tunnels.items() if p == port), None)


@pytest.mark.parametrize("seed", range(6))
def test_moves_of_several_instances_interleaved_on_the_same_switches_each_land_and_none_clobbers_another(seed):
    t = topology.load(EIGHT)
    f = flows.fabric(t)
    sws = switches(f, t.active_nats)
    moving = [2, 5, 7, 8]
    plans = {i: fb.plan_move(f, f"a{i}", f"b{i}") for i in moving}
    # Every interleaving keeps each move's own order (as its thread does): a seeded shuffle of the merge.
    rnd = random.Random(seed)
    cursors = {i: 0 for i in moving}
    while any(cursors[i] < len(plans[i]) for i in moving):
        i = rnd.choice([i for i in moving if cursors[i] < len(plans[i])])
        step = plans[i][cursors[i]]
        sws[step.switch].add_flows(step.flows)
        cursors[i] += 1
        # At every instant each instance reaches one NAT of its own (old or new).
        for k in range(1, 9):
            ports = flows.port_names(t)
            assert reaches(f, sws, "A", ports[f"c{k}"], f"inside{k}", "203.0.113.100") <= {f"a{k}", f"b{k}"}
    actives = {i: f"b{i}" if i in moving else f"a{i}" for i in range(1, 9)}
    check_instances(f, t, sws, actives)
    assert {m: s.table for m, s in sws.items()} == {m: s.table for m, s in switches(f, actives.values()).items()}


def test_rolling_back_one_instance_while_another_has_moved_leaves_the_other_moved():
    t = topology.load(EIGHT)
    f = flows.fabric(t)
    sws = switches(f, t.active_nats)
    one, two = fb.plan_move(f, "a1", "b1"), fb.plan_move(f, "a2", "b2")
    for s in one[:2] + two + one[2:3]:
        sws[s.switch].add_flows(s.flows)
    for s in fb.rollback(one[:3]):
        sws[s.switch].add_flows(s.flows)
    check_instances(f, t, sws, {i: "b2" if i == 2 else f"a{i}" for i in range(1, 9)})


def test_a_move_between_nats_of_different_instances_is_refused():
    f = flows.fabric(topology.load(EIGHT))
    with pytest.raises(PlanError, match="a1 serves networks inside1/public, b2 serves inside2/public"):
        fb.plan_move(f, "a1", "b2")


def test_fabric_steering_of_one_instance_reads_and_moves_that_instance_only():
    t = topology.load(EIGHT)
    f = flows.fabric(t)
    sws = switches(f, t.active_nats)
    with pytest.raises(SteeringError, match="several NAT instances"):
        FabricSteering(f, sws).active()
    st = FabricSteering(f, sws, instance="a4")
    assert st.active() == "a4"
    st.point_to("b4")
    assert st.active() == "b4" and FabricSteering(f, sws, instance="b4").active() == "b4"
    assert FabricSteering(f, sws).actives() == {(f"inside{i}", "public"): "b4" if i == 4 else f"a{i}" for i in range(1, 9)}
    routes = FabricSteering(f, sws).routes("a6")
    assert routes == {("A", "inside6"): "a6", ("B", "public of inside6"): "a6"}


# ------------------------------------------------------------ the inventory and pairing


def _agents(**extra) -> dict:
    agents = {}
    for i in (1, 2, 3):
        for m in ("a", "b"):
            agents[f"{m}{i}"] = {"host": f"192.0.2.{i + (0 if m == 'a' else 8)}", "key": "/k", "machine": m.upper(),
                                 "networks": [f"inside{i}", "public"]}
    for path, value in extra.items():
        name, field = path.split("__")
        if value is None:
            del agents[name][field]
        else:
            agents[name][field] = value
    return {"agents": agents, "switch": {"testbed": "nm1"}}


def test_inventory_agents_name_their_machine_and_networks():
    inv = parse(_agents())
    assert inv.agents["b2"].machine == "B" and inv.agents["b2"].networks == ("inside2", "public")
    assert parse({"agents": {"nat1": {"host": "h", "key": "/k"}}}).agents["nat1"].networks == ("inside", "public")
    with pytest.raises(InventoryError, match=r"agents.a1.networks: \['inside1'\] is not the two networks"):
        parse(_agents(a1__networks=["inside1"]))


def test_each_nat_on_the_drained_machine_is_paired_with_its_twin():
    moves = pair_moves(parse(_agents()), "A", "B")
    assert [(m.source, m.target) for m in moves] == [("a1", "b1"), ("a2", "b2"), ("a3", "b3")]
    assert [(m.source, m.target) for m in pair_moves(parse(_agents()), "B", "A")] == [("b1", "a1"), ("b2", "a2"), ("b3", "a3")]


@pytest.mark.parametrize(
    ("changes", "host", "to", "why"),
    [
        ({"b2__networks": ["inside9", "public"]}, "A", "B", "agents.a2: no agent on machine B serves its networks inside2/public"),
        ({"b3__networks": ["inside2", "public"]}, "A", "B", "agents.a2: several agents on machine B serve its networks inside2/public (b2, b3)"),
        ({"a3__networks": ["inside2", "public"], "b3__machine": "C"}, "A", "B", "agents.a3: its twin b2 on B is also the twin of a2"),
        ({"a1__machine": None}, "A", "B", "agents.a1.machine: missing"),
        ({}, "A", "A", "--host and --to are both A"),
        ({}, "Z", "B", "--host Z: no agent of the inventory runs on it (machines: A, B)"),
    ],
)
def test_pairing_problems_are_named(changes, host, to, why):
    with pytest.raises(PairingError) as e:
        pair_moves(parse(_agents(**changes)), host, to)
    assert any(why in p for p in e.value.problems), e.value.problems
    assert e.value.exit_code == 2


def test_the_fleet_inventory_says_where_each_nat_runs_and_what_it_serves(tmp_path):
    from natmig.controller.agentfleet import AgentFleet

    tb = Testbed(topology.load(EIGHT), "nm1")
    doc = AgentFleet(tb, tmp_path).inventory_doc("a1", "b1")
    assert doc["agents"]["b7"]["machine"] == "B" and doc["agents"]["b7"]["networks"] == ["inside7", "public"]
    assert [(m.source, m.target) for m in pair_moves(parse(doc), "A", "B")] == [(f"a{i}", f"b{i}") for i in range(1, 9)]
    legacy = AgentFleet(Testbed(topology.load(None), "nm2"), tmp_path / "demo").inventory_doc("nat1", "nat2")
    assert "machine" not in legacy["agents"]["nat1"] and "networks" not in legacy["agents"]["nat1"]


def test_drain_refuses_bad_input_with_status_2(tmp_path, capsys):
    inv = tmp_path / "inv.toml"
    inv.write_text(dump_toml(_agents(b2__networks=["inside9", "public"])))
    assert main(["drain", "-i", str(inv), "--host", "A", "--to", "B"]) == 2
    assert "agents.a2: no agent on machine B serves its networks inside2/public" in capsys.readouterr().err
    assert main(["drain", "-i", str(inv), "--host", "A", "--to", "B", "--parallel", "0"]) == 2
    assert "--parallel 0: at least 1" in capsys.readouterr().err
    none = tmp_path / "none.toml"
    none.write_text(dump_toml({**_agents(), "switch": "none"}))
    assert main(["drain", "-i", str(none), "--host", "A", "--to", "B"]) == 2
    assert "needs a [switch]" in capsys.readouterr().err



# ------------------------------------------------------------ the drain itself, over in-memory nodes


class _SlowSteering:
    """One instance's switch: its active NAT; each move takes a moment, and the greatest number in flight at once is recorded."""

    def __init__(self, active: str, shared: dict, fail_to: str | None = None) -> None:
        self._active, self.shared, self.fail_to = active, shared, fail_to

    def point_to(self, nat: str) -> None:
        with self.shared["lock"]:
            self.shared["now"] += 1
            self.shared["most"] = max(self.shared["most"], self.shared["now"])
        time.sleep(0.3)  # long beside the fake nodes' work: moves in flight together overlap here
        with self.shared["lock"]:
            self.shared["now"] -= 1
        if nat == self.fail_to:
            raise SteeringError(f"bundle to {nat} refused")
        self._active = nat

    def active(self) -> str | None:
        return self._active


@pytest.mark.parametrize("parallel", [1, 2, 4])
def test_a_drain_runs_each_move_as_its_own_migration_n_at_a_time_and_a_failed_one_rolls_back_alone(parallel):
    nodes = {}
    for i in range(1, 5):
        nodes[f"a{i}"] = FakeNode(f"a{i}", MemoryProvider(table={s.key: s for s in sessions(20)}))
        nodes[f"b{i}"] = FakeNode(f"b{i}", MemoryProvider(table={}))
    shared = {"lock": threading.Lock(), "now": 0, "most": 0}
    steer = {f"a{i}": _SlowSteering(f"a{i}", shared, fail_to="b3" if i == 3 else None) for i in range(1, 5)}
    moves = [Move(f"a{i}", f"b{i}", (f"inside{i}", "public")) for i in range(1, 5)]
    done = []
    report = Drain(moves, lambda n: Endpoint(n, nodes[n].session), lambda s: steer[s],
                   DrainOptions(parallel, MigrateOptions(), "natmig recover --inventory i.toml --from {source} --to {target}"),
                   on_done=lambda r: done.append(r.move.source)).run("A", "B")
    assert [r.move.source for r in report.results] == ["a1", "a2", "a3", "a4"] and sorted(done) == ["a1", "a2", "a3", "a4"]
    assert [r.ok for r in report.results] == [True, True, False, True] and report.moved == 3 and not report.ok
    assert not report.attention  # the failed move was read back unchanged: exit 1, not 3
    assert shared["most"] == min(parallel, 4)
    failed = report.results[2]
    assert failed.report is not None and failed.report.failed_phase == "switch" and failed.report.traffic_on == "a3"
    # The failed move's own rollback: its copy gone from b3, a3 still holds its sessions; the others are on their twins.
    assert len(nodes["b3"].provider.table) == 0 and len(nodes["a3"].provider.table) == 20
    assert all(len(nodes[f"b{i}"].provider.table) == 20 and steer[f"a{i}"].active() == f"b{i}" for i in (1, 2, 4))
    text = report.text()
    assert "total: 3/4 moved" in text and "a3         b3         FAILED" in text
    assert report.to_dict()["results"][2]["outcome"] == "unchanged"


def test_the_demo_refuses_a_topology_of_several_instances_before_making_anything(capsys):
    assert main(["demo", "--topology", str(EIGHT), "--prefix", "nmunit"]) == 2
    assert "8 NAT instances; the demo moves one" in capsys.readouterr().err
