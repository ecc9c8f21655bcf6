"""Draining a machine: `natmig drain` moves every NAT instance on A to its twin on B, with live flows through each.

testbed/topologies/eight-nats.toml (or its first K instances): machine A
runs each instance's client and active NAT node, machine B the server and
an idle twin of each; real agents over SSH, conntrack, each machine's own
Open vSwitch.  The drain runs through the command line, as an operator
runs it, on the inventory the fleet writes.  The 8-instance drain, four at
a time, takes ~40 s here (15 s of it starting 16 agents); a drain of 3
instances with one target down shows the others move all the same; one
whose target dies half-way through its switch is rolled back while the two
others switch on the same two switches; and on one switch (no machines)
one instance moves alone with `natmig migrate`.
"""

from __future__ import annotations

import json
import time
import tomllib
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator

import pytest

from natmig import netns
from natmig.cli import main
from natmig.controller.agentfleet import AgentFleet
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.drain import Drain, DrainOptions, Move
from natmig.controller.migrate import MigrateOptions
from natmig.controller.inventory import dump_toml
from natmig.controller.traffic import LiveTraffic, TrafficSpec
from natmig.testbed import topology
from natmig.testbed.topomodel import Topology
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import leftovers

from .helpers_migrate import table

pytestmark = pytest.mark.root

EIGHT = topology.DEFAULT_TOPOLOGY.parent / "eight-nats.toml"
SESSIONS = 200


def instances(k: int) -> Topology:
    """eight-nats.toml cut to its first ``k`` instances (their networks, clients, NAT nodes and twins)."""
    doc = tomllib.loads(EIGHT.read_text())
    keep = range(k + 1, 9)
    for i in keep:
        del doc["networks"][f"inside{i}"], doc["hosts"][f"c{i}"], doc["nats"][f"a{i}"], doc["nats"][f"b{i}"]
    doc["active_nat"] = doc["active_nat"][:k]
    return topology.loads(dump_toml(doc), f"eight-nats-{k}.toml")


def one_machine(k: int) -> Topology:
    """The first ``k`` instances on one machine: no [machines], one switch."""
    doc = tomllib.loads(instances(k).text)
    del doc["machines"], doc["underlay"]
    for section in ("hosts", "nats"):
        for node in doc[section].values():
            del node["machine"]
    return topology.loads(dump_toml(doc), f"one-machine-{k}.toml")


@contextmanager
def drain_bed(tmp_path: Any, tag: str, k: int, topo: Topology | None = None, agents: list[str] | None = None) -> Iterator[tuple[Testbed, AgentFleet]]:
    """The K-instance testbed with every agent running (or those of ``agents``), torn down afterwards (also on failure): nothing may remain."""
    netns.ensure_conntrack_capacity(200_000)
    tb = Testbed(topo or instances(k), netns.run_prefix(tag))
    fleet = None
    try:
        t0 = time.perf_counter()
        tb.up()
        fleet = AgentFleet(tb, tmp_path / "agents")
        fleet.start_all(agents or list(tb.topology.nats))
        print(f"{k} instances up with {len(tb.topology.nats)} agents in {time.perf_counter() - t0:.1f} s")
        yield tb, fleet
    finally:
        if fleet is not None:
            fleet.close()
        tb.down()
    assert not any(leftovers(tb.prefix).values()), leftovers(tb.prefix)


@contextmanager
def live_flows(tb: Testbed, tmp_path: Any, k: int) -> Iterator[dict[int, LiveTraffic]]:
    """3 TCP + 3 UDP flows from each instance's client to the server (its own port), every 10 ms."""
    with ExitStack() as stack:
        flows = {}
        for i in range(1, k + 1):
            d = tmp_path / f"traffic{i}"
            d.mkdir()
            spec = TrafficSpec(tcp=3, udp=3, interval=0.01, port=5000 + i)
            flows[i] = stack.enter_context(LiveTraffic(tb.netns(f"c{i}"), tb.netns("server"), tb.address("server"), spec, str(d)))
        yield flows


def load(tb: Testbed, fleet: AgentFleet, nat: str) -> dict:
    """SESSIONS synthetic sessions into ``nat``'s table; key -> public mapping."""
    ss = synthetic_sessions(SESSIONS, tb.topology.public_pool(nat), servers=tb.topology.spare_addresses("public", 4))
    load_sessions(fleet.endpoint(nat), ss)
    return {s.key: (s.translated_address, s.translated_port) for s in ss}


def drain(tmp_path: Any, fleet: AgentFleet, frm: str, to: str, parallel: int) -> tuple[int, dict[str, Any]]:
    inv = fleet.write_inventory("a1", "b1")
    out = tmp_path / f"drain-{frm}.json"
    rc = main(["drain", "-i", str(inv), "--host", frm, "--to", to, "--parallel", str(parallel), "--json", str(out)])
    return rc, json.loads(out.read_text())


def check_drained(tmp_path: Any, k: int, parallel: int) -> None:
    with drain_bed(tmp_path, "dr", k) as (tb, fleet):
        moved = {i: load(tb, fleet, f"a{i}") for i in range(1, k + 1)}
        with live_flows(tb, tmp_path, k) as flows:
            time.sleep(0.8)
            t0 = time.perf_counter()
            rc, report = drain(tmp_path, fleet, "A", "B", parallel)
            took = time.perf_counter() - t0
            time.sleep(1.0)
            results = {i: f.stop() for i, f in flows.items()}
        assert rc == 0, report
        assert report["moved"] == k and [r["source"] for r in report["results"]] == [f"a{i}" for i in range(1, k + 1)]
        for i in range(1, k + 1):
            r = report["results"][i - 1]
            assert r["ok"] and r["target"] == f"b{i}" and r["traffic_on"] == f"b{i}", r
            assert r["sessions_moved"] >= SESSIONS
            # Read back from both switches now, not from the report.
            assert tb.active_nat(f"a{i}") == f"b{i}"
            res = results[i]
            assert res.all_survived, (i, [f.why for f in res.broken()])
            # Each instance's flows kept its own public address (and port) throughout.
            assert {e.split(":")[0] for f in res.flows for e in f.endpoints} == {f"203.0.113.{i}"}
            held = table(fleet, f"b{i}")
            assert all(held.get(key) == m for key, m in moved[i].items())
        print(f"drain of {k} instances, {parallel} at a time: {took:.1f} s; largest gap per instance: "
              + ", ".join(f"{i}: {results[i].largest_gap * 1000:.0f} ms" for i in results))


def test_a_drain_with_one_target_down_moves_the_others_and_leaves_that_instance_where_it_works(tmp_path):
    with drain_bed(tmp_path, "df", 3) as (tb, fleet):
        fleet.stop("b2")
        with live_flows(tb, tmp_path, 3) as flows:
            time.sleep(0.5)
            rc, report = drain(tmp_path, fleet, "A", "B", 3)
            time.sleep(0.8)
            results = {i: f.stop() for i, f in flows.items()}
        assert rc == 1 and report["moved"] == 2, report
        by = {r["source"]: r for r in report["results"]}
        assert not by["a2"]["ok"] and by["a2"]["outcome"] == "unchanged", by["a2"]
        assert by["a1"]["ok"] and by["a3"]["ok"]
        assert [tb.active_nat(f"a{i}") for i in (1, 2, 3)] == ["b1", "a2", "b3"]
        assert tb.nat_node("a2").admission()
        for i, res in results.items():
            assert res.all_survived, (i, [f.why for f in res.broken()])


def test_draining_eight_instances_four_at_a_time_keeps_every_flow_with_its_public_port(tmp_path):
    check_drained(tmp_path, 8, 4)


def test_on_one_switch_one_instance_moves_alone_with_every_flow_of_every_instance_alive(tmp_path):
    with drain_bed(tmp_path, "d1", 3, one_machine(3), ["a2", "b2"]) as (tb, fleet):
        moved = load(tb, fleet, "a2")
        inv = fleet.write_inventory("a2", "b2")
        with live_flows(tb, tmp_path, 3) as flows:
            time.sleep(0.5)
            assert main(["migrate", "-i", str(inv)]) == 0
            time.sleep(0.8)
            results = {i: f.stop() for i, f in flows.items()}
        assert [tb.active_nat(f"a{i}") for i in (1, 2, 3)] == ["a1", "b2", "a3"]
        for i, res in results.items():
            assert res.all_survived, (i, [f.why for f in res.broken()])
            assert {e.split(":")[0] for f in res.flows for e in f.endpoints} == {f"203.0.113.{i}"}
        held = table(fleet, "b2")
        assert all(held.get(key) == m for key, m in moved.items())


def test_a_move_rolled_back_mid_switch_while_others_switch_on_the_same_switches_leaves_each_instance_whole(tmp_path):
    """Instance 2's target dies after its first ingress bundle; instances 1 and 3 move at the same time on the same two switches."""
    with drain_bed(tmp_path, "dm", 3) as (tb, fleet):
        died: list[str] = []

        def on_step(step):
            if step.stage == "ingress" and not died:
                fleet.stop("b2", kill=True)
                for ifname in ("inside0", "outside0"):
                    tb.exec("b2", ["ip", "link", "set", ifname, "down"])
                died.append(step.switch)

        steering = {f"a{i}": tb.steering(on_step=on_step if i == 2 else None, instance=f"a{i}") for i in (1, 2, 3)}
        moves = [Move(f"a{i}", f"b{i}", (f"inside{i}", "public")) for i in (1, 2, 3)]
        try:
            with live_flows(tb, tmp_path, 3) as flows:
                time.sleep(0.5)
                report = Drain(moves, fleet.endpoint, steering.__getitem__, DrainOptions(3, MigrateOptions(confirm_timeout=3))).run("A", "B")
                time.sleep(2.0)
                results = {i: f.stop() for i, f in flows.items()}
        finally:
            for ifname in ("inside0", "outside0"):
                tb.exec("b2", ["ip", "link", "set", ifname, "up"])
        assert died, "the target was never killed: the test proves nothing"
        by = {r.move.source: r for r in report.results}
        assert by["a1"].ok and by["a3"].ok and not by["a2"].ok, report.text()
        assert by["a2"].report is not None and "pointed back" in by["a2"].report.node_state["a2"], report.text()
        # Read back from both switches: 1 and 3 moved, 2 pointed back, none clobbered by another's bundles.
        assert [tb.active_nat(f"a{i}") for i in (1, 2, 3)] == ["b1", "a2", "b3"]
        assert tb.nat_node("a2").admission()
        for i, res in results.items():
            assert res.all_survived, (i, [f.why for f in res.broken()])
