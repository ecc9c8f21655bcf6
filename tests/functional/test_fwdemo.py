"""`natmig demo --nf firewall` for real, with few flows: every flow survives and the attacker stays blocked; without state, TCP dies and the attacker is free (root)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from natmig import netns
from natmig.controller.demo import DemoOptions
from natmig.controller.fwdemo import FirewallDemo
from natmig.testbed.prefix import leftovers

pytestmark = pytest.mark.root


def test_firewall_demo_moves_live_flows_both_ways_and_the_block(tmp_path: Path) -> None:
    prefix = netns.run_prefix("fd")
    out = io.StringIO()
    res = FirewallDemo(DemoOptions(sessions=500, tcp=5, udp=5, prefix=prefix, json_path=str(tmp_path / "r.json"), after=1.0, nf="firewall"), out).run()
    text = out.getvalue()
    assert res.ok, text
    m = res.migration
    assert m is not None and m.ok and m.traffic_on == "fw2"
    assert m.copied["fw-state:session"] >= 520 and m.copied["fw-state:blocked"] == 1
    assert [p.name for p in m.phases] == ["preflight", "traffic", "copy", "freeze", "catch-up", "verify", "hold", "switch", "finish"]
    # Read back: the target holds what was copied, the source nothing.
    assert m.readback["fw2"].tables["fw-state:session"][0] == m.copied["fw-state:session"]
    assert m.readback["fw1"].tables["fw-state:session"][0] == 0
    for tr in (res.outbound, res.inbound):
        assert tr is not None and tr.live_total == 10 and tr.live_survived == 10
    b, a = res.block_before, res.block_after
    assert b is not None and a is not None and b.seconds is not None and a.seconds is not None
    # Carried: counting down from the source's, below the set's own timeout.
    assert a.seconds <= b.seconds < res.block_timeout and res.carried
    assert res.attacker_reached == {"before": False, "after": False}
    assert "RESULT: every flow survived and the attacker stayed blocked" in text
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["ok"] and doc["attacker"]["timeout_carried"] and doc["traffic"]["inbound"]["live_survived"] == 10
    assert not any(leftovers(prefix).values())


def test_firewall_demo_without_state_kills_established_tcp_and_frees_the_attacker() -> None:
    prefix = netns.run_prefix("fn")
    out = io.StringIO()
    res = FirewallDemo(DemoOptions(sessions=0, tcp=5, udp=5, prefix=prefix, no_state=True, after=1.0, nf="firewall"), out).run()
    assert not res.ok
    m = res.migration
    assert m is not None and m.ok and m.traffic_on == "fw2" and not m.copied  # the move "worked": it carried no state
    for tr in (res.outbound, res.inbound):
        assert tr is not None
        tcp = [f for f in tr.of("live") if f.proto == "TCP"]
        # Mid-stream segments without state are invalid on fw2 (tcp_loose=0): every TCP flow dies.
        assert tcp and not any(f.survived for f in tcp), [f.why for f in tcp]
    assert res.block_after is not None and res.block_after.seconds is None
    assert res.attacker_reached == {"before": False, "after": True}
    assert "NOT blocked" in out.getvalue() and "NOT every flow survived" in out.getvalue()
    assert not any(leftovers(prefix).values())
