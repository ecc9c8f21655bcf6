"""A NAT moved to another machine with live flows: steering across two switches, make-before-break, and its rollback.

testbed/topologies/two-hosts.toml (client and nat1 on machine A, server and
nat2 on machine B); real agents over SSH, conntrack, the machines' own Open
vSwitch daemons, live TCP and UDP flows with new connections during the
move.  The migration is given the testbed's FabricSteering as its Steering:
it does not know there are two switches.
"""

from __future__ import annotations

import time

import pytest

from natmig import netns
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.testbed import topology

from .helpers_migrate import bed, table, traffic

pytestmark = pytest.mark.root

TWO = topology.DEFAULT_TOPOLOGY.parent / "two-hosts.toml"
SESSIONS = 300


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The two-machine testbed with both agents, shared by the module (one bring-up): each test moves away from the active NAT."""
    with bed(tmp_path_factory.mktemp("mh"), "mm", TWO) as (tb, fleet):
        yield tb, fleet


def _load(tb, fleet, nat) -> dict:
    ss = synthetic_sessions(SESSIONS, tb.public_address, (20000, 29999))
    load_sessions(fleet.endpoint(nat), ss)
    return {s.key: (s.translated_address, s.translated_port) for s in ss}


def test_a_cross_host_move_with_live_flows_keeps_every_flow_and_its_public_port(two, tmp_path):
    tb, fleet = two
    src = tb.active_nat()
    dst = "nat2" if src == "nat1" else "nat1"
    moved = _load(tb, fleet, src)
    steps = []
    steering = tb.steering(on_step=lambda s: steps.append((s.switch, s.stage)))
    with traffic(tb, tmp_path, churn=10, churn_life=0.3) as t:
        time.sleep(0.8)
        report = Migration(fleet.endpoint(src), fleet.endpoint(dst), steering, MigrateOptions()).run()
        time.sleep(1.0)
        result = t.stop()
    assert report.ok, report.error
    a, b = ("A", "B") if src == "nat1" else ("B", "A")
    assert steps == [(b, "prepare"), ("A", "ingress"), ("B", "ingress"), (a, "retire")]
    assert report.traffic_on == dst and tb.active_nat() == dst
    assert result.all_survived, [f.why for f in result.broken()]
    held = table(fleet, dst)
    assert all(held.get(k) == m for k, m in moved.items())
    # Both switches were read back: every host reaches the target now.
    assert set(steering.routes().values()) == {dst}


def test_a_target_that_dies_before_the_last_switch_is_rolled_back_with_every_flow_alive(two, tmp_path):
    tb, fleet = two
    src = tb.active_nat()
    dst = "nat2" if src == "nat1" else "nat1"
    moved = _load(tb, fleet, src)
    died = []

    def on_step(step):
        # After the first ingress step: some hosts already go to the target, the others not yet.
        if step.stage == "ingress" and not died:
            fleet.stop(dst, kill=True)
            for ifname in ("inside0", "outside0"):
                tb.exec(dst, ["ip", "link", "set", ifname, "down"])
            died.append(step.switch)

    try:
        with traffic(tb, tmp_path, churn=10, churn_life=0.3) as t:
            time.sleep(0.8)
            report = Migration(fleet.endpoint(src), fleet.endpoint(dst), tb.steering(on_step=on_step),
                               MigrateOptions(confirm_timeout=3)).run()
            time.sleep(2.0)
            result = t.stop()
    finally:
        for ifname in ("inside0", "outside0"):
            tb.exec(dst, ["ip", "link", "set", ifname, "up"])
    assert died, "the target was never killed: the test proves nothing"
    assert not report.ok and report.failed_phase in ("verify", "admit"), (report.failed_phase, report.error)
    assert "pointed back" in report.node_state[src], report.node_state
    assert report.traffic_on == src and tb.active_nat() == src
    assert tb.nat_node(src).admission()
    assert result.all_survived, [f.why for f in result.broken()]
    held = table(fleet, src)
    assert all(held.get(k) == m for k, m in moved.items())
