"""The fault-injection suite: a migration killed anywhere leaves one serving NAT and loses nothing.

Real parts throughout: agents over SSH in the NAT namespaces, conntrack,
the testbed's Open vSwitch, live TCP and UDP flows with new connections
opened during the move, and `natmig migrate` (``migration.engine = "nat"``:
the NAT's own migration; tests/functional/test_engine_faults.py has the same
cases for the generic engine) as its own process, SIGKILLed at a phase
boundary or inside a phase (tests/functional/migrate_until.py).

After each fault, with nothing but the agents themselves acting (their
confirmed commits roll back after ``CONFIRM`` seconds; a killed agent is
restarted and undoes what it had pending from its state directory):
traffic is on exactly one NAT; both NATs admit new sessions; every session
the source held is on the NAT that carries traffic with the same public
address and port; every live flow survived with its public port, and
every new connection got through.  Then `natmig recover` must find a
consistent state and leave no copy behind.

`make faults` runs the whole suite; `make test` runs the cases not marked
``faults`` (one controller kill after the switch, two migrations at once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.steering import TestbedSteering

from .helpers_migrate import bed, table, traffic

pytestmark = pytest.mark.root

#: the agents' confirm-timeout in these tests (seconds): how long a dead controller's changes may outlive it
CONFIRM = 3
SESSIONS = 2000
NATS = ("nat1", "nat2")


def record(case: str, on: str, waited: float, result, recovered: dict) -> None:
    """One line of the results table (docs/controller.md), appended to $NATMIG_FAULTS_REPORT when set."""
    path = os.environ.get("NATMIG_FAULTS_REPORT")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({
            "case": case, "traffic_on": on, "serving_after_s": round(waited, 2),
            "live": f"{result.live_survived}/{result.live_total}",
            "new_connections": f"{sum(x.survived for x in result.of('churn'))}/{len(result.of('churn'))}",
            "recover_did": recovered.get("did", []),
        }) + "\n")


def load(tb, fleet) -> dict:
    """The synthetic table every case moves; returns it as key -> mapping."""
    ss = synthetic_sessions(SESSIONS, tb.public_address, (20000, 29999))
    load_sessions(fleet.endpoint("nat1"), ss)
    return {s.key: (s.translated_address, s.translated_port) for s in ss}


def wait_serving(tb, bound: float) -> float | None:
    """Seconds until both NATs admit new sessions (read from their rulesets), None if not within ``bound``."""
    t0 = time.monotonic()
    while True:
        if all(tb.nat_node(n).admission() for n in NATS):
            return time.monotonic() - t0
        if time.monotonic() - t0 > bound:
            return None
        time.sleep(0.05)


def check_consistent(tb, fleet, moved: dict, result) -> str:
    """The suite's invariant after a fault; returns the NAT carrying traffic."""
    on = tb.active_nat()
    assert on in NATS, f"traffic on {on!r}"
    assert all(tb.nat_node(n).admission() for n in NATS), {n: tb.nat_node(n).admission() for n in NATS}
    held = table(fleet, on)
    missing = [k for k, v in moved.items() if held.get(k) != v]
    assert not missing, f"{len(missing)} of the source's sessions are not on {on} with their mapping, e.g. {missing[:3]}"
    assert not result.broken(), [f"{b.kind} {b.proto} {b.fid}: {b.why}" for b in result.broken()[:10]]
    assert result.live_survived == result.live_total == 10
    assert len(result.of("churn")) >= 10, "new connections must really be opened during the move"
    return on


def recover_clean(tb, fleet, inv, tmp_path, moved: dict, on: str) -> dict:
    """`natmig recover` finds and leaves a consistent state, and no copy on the NAT without traffic."""
    out = tmp_path / "recover.json"
    cp = subprocess.run([sys.executable, "-m", "natmig.cli", "recover", "--inventory", str(inv), "--json", str(out)],
                        capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stdout + cp.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["traffic_on"] == on == tb.active_nat()
    other = next(n for n in NATS if n != on)
    left = table(fleet, other)
    assert not any(k in left for k in moved), f"{sum(k in left for k in moved)} moved sessions left on {other}"
    assert all(tb.nat_node(n).admission() for n in NATS)
    return report


CONTROLLER_POINTS = [
    pytest.param("after:preflight", marks=pytest.mark.faults),
    pytest.param("in:get-config+15", marks=pytest.mark.faults),
    pytest.param("in:commit", marks=pytest.mark.faults),
    pytest.param("after:copy", marks=pytest.mark.faults),
    pytest.param("in:freeze", marks=pytest.mark.faults),
    # What the source's events changed during the copy, being written before the freeze
    # (the case opens more new connections, so that the copy has events to catch up).
    pytest.param("in:pre-apply+2", marks=pytest.mark.faults),
    pytest.param("in:settle+5", marks=pytest.mark.faults),
    pytest.param("in:apply", marks=pytest.mark.faults),
    pytest.param("in:confirm+hold+1", marks=pytest.mark.faults),
    pytest.param("after:catch-up", marks=pytest.mark.faults),
    # The switch's flows are being replaced (ovs-ofctl running): the bundle lands whole or not at all.
    pytest.param("in:flows+3", marks=pytest.mark.faults),
    "after:switch",
    pytest.param("in:digests", marks=pytest.mark.faults),
    pytest.param("after:verify", marks=pytest.mark.faults),
    pytest.param("after:admit", marks=pytest.mark.faults),
    pytest.param("in:delete", marks=pytest.mark.faults),
]


@pytest.mark.parametrize("point", CONTROLLER_POINTS)
def test_the_controller_killed_at(point, tmp_path):
    with bed(tmp_path, "fk") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=80 if "pre-apply" in point else 20, churn_life=0.2) as t:
            time.sleep(0.8)
            cp = subprocess.run([sys.executable, "-m", "tests.functional.migrate_until", str(inv), point, str(CONFIRM),
                                 "--set", "migration.engine=nat"], capture_output=True, text=True, timeout=120)
            assert cp.returncode == -9, f"the point {point} was never reached: {cp.returncode}\n{cp.stdout}{cp.stderr}"
            waited = wait_serving(tb, CONFIRM + 2)
            time.sleep(1.2)  # new connections after the rollback too
            result = t.stop()
        assert waited is not None, f"a NAT still refuses new sessions {CONFIRM + 2} s after the controller died"
        on = check_consistent(tb, fleet, moved, result)
        record(f"controller killed {point}", on, waited, result, recover_clean(tb, fleet, inv, tmp_path, moved, on))


AGENT_CASES = [
    pytest.param(victim, phase, marks=pytest.mark.faults)
    for victim in NATS for phase in ("preflight", "copy", "catch-up", "switch", "verify")
]


@pytest.mark.parametrize("victim,phase", AGENT_CASES)
def test_an_agent_killed_after(victim, phase, tmp_path):
    """SIGKILL of the source's or the target's agent as a phase ends; restarted a second later."""
    with bed(tmp_path, "fa") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)

            def on_phase(ph):
                if ph.name == phase:
                    fleet.stop(victim, kill=True)
                    time.sleep(0.2)  # the controller's client sees the connection end

            report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb),
                               MigrateOptions(confirm_timeout=CONFIRM), on_phase).run()
            assert not report.ok
            time.sleep(1.0)
            fleet.start(victim)  # undoes at start what it had pending
            waited = wait_serving(tb, CONFIRM + 2)
            time.sleep(1.0)
            result = t.stop()
        assert waited is not None, f"a NAT still refuses new sessions: {report.node_state}"
        on = check_consistent(tb, fleet, moved, result)
        assert report.traffic_on == on  # the report read the switch back
        record(f"{'source' if victim == 'nat1' else 'target'} agent killed after {phase}", on, waited, result,
               recover_clean(tb, fleet, inv, tmp_path, moved, on))


@pytest.mark.parametrize("engine", ["nat", "generic"])
def test_two_migrations_at_once_one_runs_the_other_is_refused_naming_the_holder(engine, tmp_path):
    with bed(tmp_path, "f2") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)
            argv = [sys.executable, "-m", "natmig.cli", "migrate", "--inventory", str(inv), "--quiet", "--set", f"migration.engine={engine}"]
            procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
            outs = [p.communicate(timeout=120) for p in procs]
            time.sleep(1.0)
            result = t.stop()
        codes = sorted(p.returncode for p in procs)
        assert codes == [0, 1], [o for o in outs]
        loser = outs[[p.returncode for p in procs].index(1)]
        assert "preflight" in loser[1] and "in use" in loser[1] and "locked by session" in loser[1], loser[1]
        assert tb.active_nat() == "nat2"
        check_consistent(tb, fleet, moved, result)
        left = table(fleet, "nat1")
        assert not any(k in left for k in moved)  # retired by the one that ran


@pytest.mark.faults
@pytest.mark.parametrize("when", ["during the switch", "after the switch"])
def test_the_switch_daemon_restarted(when, tmp_path):
    """ovs-vswitchd restarted the way an operator's `ovs-ctl restart` does (flows saved and restored) mid-move."""
    import threading

    with bed(tmp_path, "fo") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)
            restarts: list[threading.Thread] = []

            def on_phase(ph):
                if when == "during the switch" and ph.name == "catch-up":
                    # Down when the bundle is sent: the switch phase meets no daemon.
                    th = threading.Thread(target=tb.restart_switch, kwargs={"down": 0.5})
                    th.start()
                    restarts.append(th)
                    deadline = time.monotonic() + 5
                    while "ovs-vswitchd" in tb.ovs.pids() and time.monotonic() < deadline:
                        time.sleep(0.005)
                elif when == "after the switch" and ph.name == "switch":
                    tb.restart_switch(down=0.2)

            report = Migration(fleet.endpoint("nat1"), fleet.endpoint("nat2"), TestbedSteering(tb),
                               MigrateOptions(confirm_timeout=CONFIRM), on_phase).run()
            for th in restarts:
                th.join(30)
            waited = wait_serving(tb, CONFIRM + 2)
            time.sleep(1.0)
            result = t.stop()
        assert waited is not None, f"a NAT still refuses new sessions: {report.node_state}"
        if when == "during the switch":
            assert not report.ok and report.failed_phase == "switch", report.error
        else:
            assert report.ok, report.error
        on = check_consistent(tb, fleet, moved, result)
        assert on == ("nat1" if when == "during the switch" else "nat2")
        record(f"ovs-vswitchd restarted {when}", on, waited, result, recover_clean(tb, fleet, inv, tmp_path, moved, on))
