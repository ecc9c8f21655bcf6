"""Unit tests of the migration report: phase timing, failure marking, text and JSON."""

from __future__ import annotations

import json
import time

import pytest

from natmig.controller.report import MigrationReport, PhaseClock, format_report


def test_phases_are_timed_and_failures_marked():
    r = MigrationReport("nat1", "nat2")
    seen = []
    clock = PhaseClock(r, on_phase=seen.append)
    with clock.phase("copy") as ph:
        with ph.step("get-config"):
            time.sleep(0.01)
        ph.note("10 sessions")
    with pytest.raises(RuntimeError):
        with clock.phase("switch"):
            raise RuntimeError("boom")
    assert [p.name for p in seen] == ["copy", "switch"]
    assert r.phases[0].ok and r.phases[0].seconds >= 0.01 and r.phases[0].steps["get-config"] >= 0.01
    assert not r.phases[1].ok and r.failed_phase == "switch"
    assert r.total_seconds == pytest.approx(r.phases[0].seconds + r.phases[1].seconds)
    assert r.phase_seconds("copy") == r.phases[0].seconds and r.phase_seconds("nope") == 0
    text = format_report(r)
    assert "FAILED in phase switch" in text and "get-config" in text and "<- failed" in text and "10 sessions" in text
    d = json.loads(r.to_json())
    assert d["phases"][0]["name"] == "copy" and d["total_seconds"] > 0
