"""`natmig demo` for real, with fewer flows: every flow survives; without state, flows break."""

from __future__ import annotations

import io
import json

import pytest

from natmig import netns
from natmig.controller.demo import Demo, DemoOptions
from natmig.testbed.prefix import leftovers

pytestmark = pytest.mark.root


def test_demo_moves_live_flows_and_every_one_survives(tmp_path):
    prefix = netns.run_prefix("dm")
    out = io.StringIO()
    res = Demo(DemoOptions(sessions=1000, tcp=10, udp=10, prefix=prefix, json_path=str(tmp_path / "r.json"), after=1.0), out).run()
    text = out.getvalue()
    assert res.ok, text
    for step in ("[1/4]", "[2/4]", "[3/4]", "[4/4]"):
        assert step in text
    assert res.migration.ok and res.migration.copied >= 1000 and res.migration.verified >= 1000
    assert res.traffic.live_total == 20 and res.traffic.live_survived == 20
    assert "flows that survived with the same public port: 20/20" in text
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["ok"] and doc["traffic"]["live_survived"] == 20
    assert {p["name"] for p in doc["migration"]["phases"]} == {"preflight", "copy", "catch-up", "switch", "verify", "admit", "retire"}
    assert not any(leftovers(prefix).values())


def test_demo_without_state_breaks_the_flows(tmp_path):
    prefix = netns.run_prefix("dn")
    out = io.StringIO()
    res = Demo(DemoOptions(sessions=0, tcp=5, udp=5, prefix=prefix, no_state=True, after=1.0), out).run()
    assert not res.ok
    assert res.migration.ok  # the move itself "worked": it just carried no state
    tcp = [f for f in res.traffic.of("live") if f.proto == "TCP"]
    udp = [f for f in res.traffic.of("live") if f.proto == "UDP"]
    assert tcp and not any(f.survived for f in tcp), [f.why for f in tcp]
    # UDP flows get a new public port from the new NAT.
    assert not any(f.survived for f in udp), [f.why for f in udp]
    assert "NOT every flow survived" in out.getvalue()
    assert not any(leftovers(prefix).values())


def test_demo_via_the_controller_service_moves_live_flows_and_every_one_survives(tmp_path):
    """Agents call home to a `natmig controller` process; netconf-console2 asks its northbound for the move."""
    from natmig.controller.demoservice import ServiceDemo

    prefix = netns.run_prefix("dv")
    out = io.StringIO()
    res = ServiceDemo(DemoOptions(sessions=500, tcp=10, udp=10, prefix=prefix, json_path=str(tmp_path / "r.json"), after=1.0), out).run()
    text = out.getvalue()
    assert res.ok, text
    assert res.migration is None and res.remote.ok and res.remote.outcome == "ok"
    # The phases came as the northbound's notifications, in the engine's order, and the report is what it read back.
    assert [p.name for p in res.remote.phases] == ["preflight", "traffic", "copy", "freeze", "catch-up", "verify", "hold", "switch", "finish"]
    assert "traffic on: nat2 (read back from the switch)" in res.remote.report
    assert "nat-session:nat-session 0 " in res.remote.report  # nat1's table after retire = delete
    assert res.traffic.live_total == 20 and res.traffic.live_survived == 20
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["via_controller"]["ok"] and doc["traffic"]["live_survived"] == 20
    assert not any(leftovers(prefix).values())
