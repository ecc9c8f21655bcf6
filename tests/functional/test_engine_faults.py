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

import pytest

from .helpers_migrate import bed, table, traffic
from .test_faults import CONFIRM, check_consistent, load, wait_serving

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
