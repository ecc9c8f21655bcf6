"""The generic engine's controller SIGKILLed on a live switch: both NAT agents serve again by themselves.

As the fault suite (tests/functional/test_faults.py) does for the NAT
engine: real NAT agents over SSH in the testbed's namespaces, its Open
vSwitch, live flows and new connections, and `natmig migrate` (here with
``migration.engine = "generic"``) as its own process, SIGKILLed at a phase's
end (tests/functional/migrate_until.py).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from .helpers_migrate import bed, table, traffic
from .test_faults import CONFIRM, NATS, check_consistent, load, record, recover_clean, wait_serving

pytestmark = pytest.mark.root


@pytest.mark.faults
def test_the_generic_controller_killed_between_the_copys_commit_and_the_freeze(tmp_path: Path) -> None:
    """The copy is committed on the target while the source serves: killed then, the source never stopped serving,
    and the target's agent rolls the copy back when its confirm timeout passes."""
    with bed(tmp_path, "gk") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)
            cp = subprocess.run([sys.executable, "-m", "tests.functional.migrate_until", str(inv), "after:copy", str(CONFIRM),
                                 "--set", "migration.engine=generic"], capture_output=True, text=True, timeout=120)
            died = time.monotonic()
            assert cp.returncode == -9, f"the point was never reached: {cp.returncode}\n{cp.stdout}{cp.stderr}"
            # Read back right after the kill (well inside the timeout): the copy is on the target, committed.
            copied = table(fleet, "nat2")
            assert time.monotonic() - died < CONFIRM, "read too late to see the copy before its rollback"
            assert all(copied.get(k) == v for k, v in moved.items()), f"{sum(k not in copied for k in moved)} of the copy not committed on nat2"
            waited = wait_serving(tb, CONFIRM + 2)
            assert waited is not None, f"a NAT still refuses new sessions {CONFIRM + 2} s after the controller died"
            # The target's rollback: its confirm timeout from the copy's commit, which was before the kill.
            deadline = time.monotonic() + CONFIRM + 2
            while any(k in table(fleet, "nat2") for k in moved) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1.2)  # new connections after the rollback too
            result = t.stop()
        left = table(fleet, "nat2")
        assert not any(k in left for k in moved), f"{sum(k in left for k in moved)} copied sessions left on nat2 after its confirm timeout"
        assert check_consistent(tb, fleet, moved, result) == "nat1"


#: Where the generic engine's controller is killed: each phase as it begins (or MS ms into it) and as it ends.
GENERIC_POINTS = [
    pytest.param(p, marks=pytest.mark.faults) for p in (
        "after:preflight", "in:copy+15", "in:copy+150", "in:freeze", "after:freeze", "in:catch-up+5", "after:catch-up",
        "after:verify", "in:hold", "after:hold", "in:switch+3", "in:finish+2")
] + [pytest.param("after:switch")]  # `make test` runs this one: traffic on a target that no rollback may empty


@pytest.mark.parametrize("point", GENERIC_POINTS)
def test_the_generic_controller_killed_at(point: str, tmp_path: Path) -> None:
    """The NAT fault suite's controller kill, for the generic engine: one serving NAT, nothing lost, recover clean."""
    with bed(tmp_path, "gp") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)
            cp = subprocess.run([sys.executable, "-m", "tests.functional.migrate_until", str(inv), point, str(CONFIRM),
                                 "--set", "migration.engine=generic"], capture_output=True, text=True, timeout=120)
            assert cp.returncode == -9, f"the point {point} was never reached: {cp.returncode}\n{cp.stdout}{cp.stderr}"
            waited = wait_serving(tb, CONFIRM + 2)
            time.sleep(1.2)  # new connections after the rollback too
            result = t.stop()
        assert waited is not None, f"a NAT still refuses new sessions {CONFIRM + 2} s after the controller died"
        on = check_consistent(tb, fleet, moved, result)
        record(f"generic controller killed {point}", on, waited, result, recover_clean(tb, fleet, inv, tmp_path, moved, on))


GENERIC_AGENT_CASES = [
    pytest.param(victim, phase, marks=pytest.mark.faults)
    for victim in NATS for phase in ("preflight", "copy", "freeze", "catch-up", "verify", "hold", "switch")
]


@pytest.mark.parametrize("victim,phase", GENERIC_AGENT_CASES)
def test_an_agent_killed_under_the_generic_engine_after(victim: str, phase: str, tmp_path: Path) -> None:
    """SIGKILL of the source's or the target's agent as a phase of the generic engine ends; restarted a second later."""
    from natmig.controller.engine import EngineMigration, EngineOptions, default_phases
    from natmig.controller.statenode import StateNode
    from natmig.controller.steering import TestbedSteering

    with bed(tmp_path, "ga") as (tb, fleet):
        moved = load(tb, fleet)
        inv = fleet.write_inventory("nat1", "nat2")
        with traffic(tb, tmp_path, churn=20, churn_life=0.2) as t:
            time.sleep(0.8)

            def on_phase(ph: Any) -> None:
                if ph.name == phase and ph.ok:
                    fleet.stop(victim, kill=True)
                    time.sleep(0.2)  # the controller's client sees the connection end

            def opener(nat: str) -> Callable[[], StateNode]:
                return lambda: StateNode(fleet.endpoint(nat).open())  # type: ignore[arg-type]

            report = EngineMigration(opener("nat1"), opener("nat2"), "nat1", "nat2", EngineOptions(confirm_timeout=CONFIRM),
                                     default_phases(TestbedSteering(tb)), on_phase=on_phase, source_events=opener("nat1")).run()
            assert not report.ok, report.text()
            time.sleep(1.0)
            fleet.start(victim)  # undoes at start what it had pending
            waited = wait_serving(tb, CONFIRM + 2)
            time.sleep(1.0)
            result = t.stop()
        assert waited is not None, f"a NAT still refuses new sessions: {report.text()}"
        on = check_consistent(tb, fleet, moved, result)
        assert report.traffic_on == on  # the report read the switch back
        record(f"generic engine: {'source' if victim == 'nat1' else 'target'} agent killed after {phase}", on, waited, result,
               recover_clean(tb, fleet, inv, tmp_path, moved, on))
