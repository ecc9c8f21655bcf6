"""Live migration for real: agents over SSH, conntrack in namespaces, Open vSwitch, live flows.

Each test builds its own testbed (its own prefix) with both agents running,
and always tears it down.  The traffic runs through the whole migration;
the assertions are about what the flows saw and what the tables hold.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.steering import TestbedSteering

from .helpers_migrate import bed, table, traffic

pytestmark = pytest.mark.root


@pytest.mark.parametrize("engine", ["generic", "nat"])
def test_new_connections_opened_continuously_during_the_move_all_survive(tmp_path, engine):
    """The race: sessions born right before the switch must keep their mapping (via `natmig migrate`, either engine)."""
    with bed(tmp_path, "mc") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(2000, tb.public_address, (20000, 29999)))
        inv = fleet.write_inventory("nat1", "nat2")
        report_path = tmp_path / "report.json"
        with traffic(tb, tmp_path, churn=40, churn_life=0.2) as t:
            time.sleep(1.0)
            cp = subprocess.run(
                [sys.executable, "-m", "natmig.cli", "migrate", "--inventory", str(inv), "--json", str(report_path),
                 "--set", f"migration.engine={engine}"],
                capture_output=True, text=True, timeout=120,
            )
            time.sleep(2.0)
            result = t.stop()
        assert cp.returncode == 0, cp.stdout + cp.stderr
        report = json.loads(report_path.read_text())
        if engine == "nat":
            assert report["ok"] and report["copied"] >= 2000
            # Sessions really were born and closed between the copy and the switch.
            assert report["events"] > 0 and report["caught_up"] + report["caught_up_deleted"] > 0, report
        else:
            assert report["ok"] and report["copied"]["nat-session:nat-session"] >= 2000 and report["traffic_on"] == "nat2"
            copy, catch = (next(p["detail"] for p in report["phases"] if p["name"] == n) for n in ("copy", "catch-up"))
            assert "nat-session:nat-session" in copy and "(forwarded)" in copy, copy
            # Sessions really were born and closed between the read and the switch: written from the source's events.
            changes = int(re.search(r"(\d+) changes since the read", copy).group(1)) + int(re.search(r"(\d+) changes from events", catch).group(1))
            assert changes > 0, (copy, catch)
        churn = result.of("churn")
        assert len(churn) >= 80, "the churn must really run during the move"
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why}" for b in result.broken()[:10]]
        assert result.live_survived == result.live_total == 10
        assert tb.active_nat() == "nat2"
        assert table(fleet, "nat1") == {} or all(k[1] != "10.0.0.10" for k in table(fleet, "nat1"))


def test_target_agent_killed_before_the_switch_leaves_traffic_on_the_source(tmp_path):
    with bed(tmp_path, "mk") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(500, tb.public_address, (20000, 29999)))
        with traffic(tb, tmp_path) as t:
            time.sleep(0.5)
            before = table(fleet, "nat1")

            def on_phase(ph):
                if ph.name == "copy":  # copied, not yet switched: the target dies now
                    fleet.stop("nat2", kill=True)

            report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb), MigrateOptions(), on_phase).run()
            time.sleep(1.0)
            result = t.stop()
        assert not report.ok and report.failed_phase == "catch-up"
        assert report.traffic_on == "nat1" and tb.active_nat() == "nat1"
        assert report.node_state["nat1"].startswith("carries traffic")
        # The target is dead: the report says its unconfirmed copy is rolled back by the agent itself.
        assert "copy NOT cancelled now" in report.node_state["nat2"] and "rolls it back by itself" in report.node_state["nat2"], report.node_state
        assert "state unreachable" in report.node_state["nat2"]
        # Restarted, the target's agent undoes the copy it had pending (from its state directory).
        fleet.start("nat2")
        assert table(fleet, "nat2") == {} or not set(before) & set(table(fleet, "nat2"))
        assert tb.nat_node("nat2").admission() is True
        assert "catch-up" in report.failed_phase and "nat2" in report.error
        after = table(fleet, "nat1")
        assert set(before) <= set(after) and all(after[k] == v for k, v in before.items())  # nothing lost
        assert tb.nat_node("nat1").admission() is True
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why}" for b in result.broken()[:10]]


def test_a_wrong_host_key_is_refused_before_anything_changes(tmp_path):
    with bed(tmp_path, "mh") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(100, tb.public_address, (20000, 29999)))
        before = table(fleet, "nat1")
        inv = fleet.write_inventory("nat1", "nat2")
        # nat2's known host key replaced by another key.
        import asyncssh
        other = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
        bad = tmp_path / "bad_known_hosts"
        lines = fleet.known_hosts.read_text().splitlines()
        pub = " ".join(other.export_public_key("openssh").decode().split()[:2])
        bad.write_text("\n".join(l if not l.startswith(f"[{tb.mgmt_address('nat2')}]") else f"[{tb.mgmt_address('nat2')}]:830 {pub}" for l in lines) + "\n")
        cp = subprocess.run(
            [sys.executable, "-m", "natmig.cli", "migrate", "--inventory", str(inv), "--set", f"agents.nat2.known_hosts={bad}"],
            capture_output=True, text=True, timeout=60,
        )
        assert cp.returncode == 1
        assert "host key" in cp.stderr, cp.stderr  # refused as the sessions open (the default engine's "connect")
        assert tb.active_nat() == "nat1"
        assert table(fleet, "nat1") == before
        assert table(fleet, "nat2") == {}
        assert tb.nat_node("nat1").admission() and tb.nat_node("nat2").admission()


def test_verification_failing_after_the_switch_points_traffic_back(tmp_path):
    """The target's agent dies right after the switch: verify cannot read it, traffic goes back.

    verify_source="read": verify then reads the target after the switch.  (By
    digest, both digests are asked for while the switch happens, and the
    target's may already be in; the unit tests cover a digest that fails.)
    """
    with bed(tmp_path, "mv") as (tb, fleet):
        load_sessions(fleet.endpoint("nat1"), synthetic_sessions(300, tb.public_address, (20000, 29999)))
        with traffic(tb, tmp_path) as t:
            time.sleep(0.5)
            before = table(fleet, "nat1")

            def on_phase(ph):
                if ph.name == "switch":
                    fleet.stop("nat2", kill=True)

            report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb), MigrateOptions(verify_source="read"), on_phase).run()
            time.sleep(1.0)
            result = t.stop()
        assert not report.ok and report.failed_phase == "verify", report.error
        assert report.traffic_on == "nat1" and tb.active_nat() == "nat1"
        assert "pointed back" in report.node_state["nat1"] and "admission restored" in report.node_state["nat1"]
        after = table(fleet, "nat1")
        assert all(after.get(k) == v for k, v in before.items())  # nothing lost, nothing re-mapped
        assert tb.nat_node("nat1").admission() is True
        assert not result.broken(), [f"{b.proto} {b.fid}: {b.why}" for b in result.broken()[:10]]


def test_ovs_steering_moves_both_directions_in_one_bundle(tmp_path):
    """The bridge steering `natmig migrate` uses with a [switch] bridge inventory, on the testbed's bridge."""
    from natmig.controller.plan import NatPorts, SwitchLayout
    from natmig.controller.steering import OvsSteering

    with bed(tmp_path, "mo") as (tb, fleet):
        ports = tb.switch_ports()
        layout = SwitchLayout(tb.bridge, ports["client"], ports["server"],
                              {n: NatPorts(ports[f"{n}-in"], ports[f"{n}-out"]) for n in ("nat1", "nat2")})
        steer = OvsSteering(layout, str(tb.rundir))
        steer.install("nat1")
        assert steer.active() == "nat1"
        before = tb.nat_counters()
        steer.point_to("nat2")
        assert steer.active() == "nat2"
        tb.exec("client", ["ping", "-c", "3", "-i", "0.2", "-W", "2", tb.address("server")])
        after = tb.nat_counters()
        assert after["nat2"] - before["nat2"] >= 6  # 3 requests in, 3 replies back, through nat2
        assert after["nat1"] - before["nat1"] <= 1
