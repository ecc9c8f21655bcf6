"""The picture of a move (controller/plot.py): drawn from a demo report, refused clearly when the file is not one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from natmig.controller.plot import load_report, plot
from natmig.errors import ControllerError


def report() -> dict:
    t0 = 1000.0
    phases = [{"name": n, "started": t0 + i * 0.05, "seconds": 0.04, "ok": True} for i, n in enumerate(["preflight", "copy", "switch", "admit"])]
    flows = [{"fid": i, "proto": "TCP" if i % 2 else "UDP", "survived": True, "top_gaps": [[0.012 + i / 1000, t0 + 0.11], [0.011, t0 - 0.2]]} for i in range(6)]
    return {"ok": True, "switch_gap_ms": 13.0, "migration": {"phases": phases},
            "traffic": {"live_flows": 6, "live_survived": 6, "largest_gap_ms": 17.0, "interval_ms": 10.0, "flows": flows}}


def test_a_report_is_drawn(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps(report()))
    plot(load_report(tmp_path / "r.json"), tmp_path / "r.png")
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


@pytest.mark.parametrize("text, words", [
    ("not json", "not JSON"),
    ('{"ok": true}', "not a demo report"),
    (json.dumps({**report(), "migration": {"phases": []}}), "no timed phases"),
])
def test_what_is_not_a_demo_report_is_refused(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(ControllerError, match=words):
        plot(load_report(tmp_path / "r.json"), tmp_path / "r.png")
    with pytest.raises(ControllerError, match="cannot read"):
        load_report(tmp_path / "missing.json")
