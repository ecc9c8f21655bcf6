"""A picture of the move: each live flow's largest gaps over time, with the migration's phases as bands.

Drawn from the demo's JSON report (``natmig demo --json``), so that a saved
run can be drawn again (``natmig plot REPORT.json -o FILE.png``).  Times
are the controller's CLOCK_MONOTONIC, which the phases and the traffic
programs share; zero is the start of the first phase.  Each dot is one
silence of one flow (its length against when it ended), from the largest
gaps each flow kept; the dashed line is the flows' send interval, so what
sits on it is a flow that never noticed anything.  The picture spans from
a second before the migration to 1.5 s after it: the demo's set-up steps
before that are not the move.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import EXIT_USAGE, ControllerError

#: how much of the traffic before and after the migration is shown (ms).
BEFORE_MS, AFTER_MS = 1000.0, 1500.0
#: phase -> colour of its band (the switch stands out).
_COLOURS = {"preflight": "#dddddd", "copy": "#cfe2f3", "catch-up": "#d9ead3", "switch": "#f4cccc",
            "verify": "#fff2cc", "admit": "#d9d2e9", "retire": "#eeeeee"}


class ReportFileError(ControllerError):
    """The report file given is missing, not JSON, or not a demo report: a usage error (exit status 2)."""

    exit_code = EXIT_USAGE


def load_report(path: str | Path) -> dict[str, Any]:
    """A demo report written by ``natmig demo --json``."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ReportFileError(f"cannot read the report {path}: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ReportFileError(f"{path}: not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("migration"), dict) or not isinstance(doc.get("traffic"), dict):
        raise ReportFileError(f"{path}: not a demo report (no migration and traffic sections; write it with natmig demo --json)")
    return doc


def plot(doc: dict[str, Any], path: str | Path) -> None:
    """Draw the report into ``path`` (PNG, or any format matplotlib knows from the suffix)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ControllerError(f"drawing needs matplotlib (pip install 'natmig[bench]'): {e}") from None
    phases = [p for p in doc["migration"].get("phases", []) if p.get("started")]
    flows = doc["traffic"].get("flows", [])
    if not phases:
        raise ReportFileError("the report has no timed phases to draw")
    t0 = min(p["started"] for p in phases)
    fig, ax = plt.subplots(figsize=(11, 5))
    from matplotlib.patches import Patch

    bands = []
    for p in phases:
        x0, x1 = (p["started"] - t0) * 1000, (p["started"] + p["seconds"] - t0) * 1000
        colour = _COLOURS.get(p["name"], "#eeeeee")
        ax.axvspan(x0, max(x1, x0 + 0.5), color=colour, alpha=0.8, lw=0)
        if p["name"] == "switch":
            ax.axvline(x0, color="tab:red", lw=1)
        # Phases of a few ms sit side by side: a legend names them, not labels on the bands.
        bands.append(Patch(color=colour, label=f"{p['name']} {p['seconds'] * 1000:.1f} ms"))
    last_ms = max((p["started"] + p["seconds"] - t0) * 1000 for p in phases)
    for proto, colour in (("TCP", "tab:blue"), ("UDP", "tab:orange")):
        xs, ys = [], []
        for f in flows:
            if f.get("proto") != proto:
                continue
            for gap, end in f.get("top_gaps", []):
                xs.append((end - t0) * 1000)
                ys.append(gap * 1000)
        if xs:
            ax.scatter(xs, ys, s=9, color=colour, alpha=0.7, label=f"{proto} flows ({sum(f.get('proto') == proto for f in flows)})")
    interval = doc["traffic"].get("interval_ms")
    if interval:
        ax.axhline(interval, color="k", ls="--", lw=0.8, label=f"send interval {interval:g} ms")
        ax.set_ylim(bottom=interval * 0.8)
    ax.set_yscale("log")
    ax.set_xlim(-BEFORE_MS, last_ms + AFTER_MS)
    ax.add_artist(ax.legend(handles=bands, loc="upper right", fontsize=7, title="phases", title_fontsize=8))
    ax.set_xlabel("ms since the migration started")
    ax.set_ylabel("gap between two messages of a flow (ms)")
    t = doc["traffic"]
    ax.set_title(f"{t.get('live_survived')}/{t.get('live_flows')} flows survived; largest gap {t.get('largest_gap_ms')} ms, "
                 f"at the switch {doc.get('switch_gap_ms')} ms", fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
