"""`natmig demo --topology testbed/topologies/two-hosts.toml`: the four steps across two machines joined by GRE.

The original deployment: client and nat1 on machine A, nat2 and the server
on machine B, each machine with its own switch.  With state every live flow
survives with its public port; without, the flows break.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from natmig import netns
from natmig.controller.demo import Demo, DemoOptions
from natmig.testbed.prefix import leftovers

pytestmark = pytest.mark.root

TWO_HOSTS = str(Path(__file__).resolve().parents[2] / "testbed" / "topologies" / "two-hosts.toml")


def test_the_demo_across_two_machines_moves_live_flows_and_every_one_survives():
    prefix = netns.run_prefix("dh")
    out = io.StringIO()
    res = Demo(DemoOptions(sessions=500, tcp=5, udp=5, prefix=prefix, topology=TWO_HOSTS, after=1.0), out).run()
    text = out.getvalue()
    assert res.ok, text
    assert res.migration.ok and res.migration.copied >= 500 and res.migration.verified >= 500
    assert res.migration.traffic_on == "nat2"  # read back from both machines' switches
    assert res.traffic.live_total == 10 and res.traffic.live_survived == 10
    assert not any(leftovers(prefix).values())


def test_the_demo_across_two_machines_without_state_breaks_the_flows():
    prefix = netns.run_prefix("dj")
    out = io.StringIO()
    res = Demo(DemoOptions(sessions=0, tcp=3, udp=3, prefix=prefix, topology=TWO_HOSTS, no_state=True, after=1.0), out).run()
    assert not res.ok
    assert res.migration.ok
    assert not any(f.survived for f in res.traffic.of("live")), [f.why for f in res.traffic.of("live")]
    assert not any(leftovers(prefix).values())
