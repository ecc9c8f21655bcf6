"""What the live traffic saw: both programs' records merged into one judgement per flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: of each flow's TOP_GAPS largest gaps, how many a JSON report keeps (100 flows: ~100 KB).
PLOTTED_GAPS = 32


@dataclass
class FlowResult:
    """One flow as both ends saw it; ``survived`` with ``why`` when it did not."""

    fid: int
    proto: str
    kind: str
    endpoints: list[str]
    sent: int
    at_server: int
    echoed: int
    max_gap: float
    error: str | None
    survived: bool
    why: str = ""
    gap_end: float | None = None
    top_gaps: list[tuple[float, float]] = field(default_factory=list)
    #: when the client opened it (CLOCK_MONOTONIC) and how long its connect took (seconds; TCP only)
    born: float | None = None
    connect_time: float | None = None


@dataclass
class TrafficResult:
    """Every flow's outcome, and the figures the demo reports."""

    flows: list[FlowResult]
    interval: float

    def of(self, kind: str) -> list[FlowResult]:
        """Flows of a kind ("live" or "churn")."""
        return [f for f in self.flows if f.kind == kind]

    @property
    def live_total(self) -> int:
        """Number of live (long-running) flows."""
        return len(self.of("live"))

    @property
    def live_survived(self) -> int:
        """Live flows that survived with the same public address and port."""
        return sum(f.survived for f in self.of("live"))

    @property
    def largest_gap(self) -> float:
        """The largest silence (seconds) any live flow saw, at either end."""
        return max((f.max_gap for f in self.of("live")), default=0.0)

    @property
    def largest_gap_end(self) -> float | None:
        """When (CLOCK_MONOTONIC) the largest gap of a live flow ended."""
        live = self.of("live")
        return max(live, key=lambda f: f.max_gap).gap_end if live else None

    def largest_gap_during(self, start: float, end: float) -> tuple[float, bool]:
        """The largest gap of a live flow that overlapped [start, end] (CLOCK_MONOTONIC seconds), and whether it is exact.

        Only each flow's TOP_GAPS largest gaps are kept.  When none of them
        overlapped the window, every gap there was smaller than the smallest
        kept one, which is returned as an upper bound (exact False).
        """
        best, bound = 0.0, 0.0
        found = False
        for f in self.of("live"):
            if f.top_gaps:
                bound = max(bound, min(g for g, _ in f.top_gaps))
            for gap, t in f.top_gaps:
                if t >= start and t - gap <= end:
                    best = max(best, gap)
                    found = True
        return (best, True) if found else (bound, False)

    def connects_during(self, start: float, end: float) -> list[float]:
        """Connect times (seconds) of the new connections opened between ``start`` and ``end`` (CLOCK_MONOTONIC)."""
        return [f.connect_time for f in self.of("churn")
                if f.born is not None and f.connect_time is not None and start <= f.born <= end]

    @property
    def all_survived(self) -> bool:
        """Every flow, live or churn, survived."""
        return all(f.survived for f in self.flows)

    def broken(self) -> list[FlowResult]:
        """The flows that did not survive."""
        return [f for f in self.flows if not f.survived]

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        live = self.of("live")
        churn = self.of("churn")
        return {
            "live_flows": len(live),
            "live_survived": sum(f.survived for f in live),
            "tcp": {"total": sum(f.proto == "TCP" for f in live), "survived": sum(f.survived for f in live if f.proto == "TCP")},
            "udp": {"total": sum(f.proto == "UDP" for f in live), "survived": sum(f.survived for f in live if f.proto == "UDP")},
            "largest_gap_ms": round(self.largest_gap * 1000, 2),
            "new_connections": len(churn),
            "new_connections_survived": sum(f.survived for f in churn),
            "broken": [asdict(f) for f in self.broken()[:20]],
            "interval_ms": round(self.interval * 1000, 3),
            # Each live flow's largest silences (seconds, and when each ended on
            # CLOCK_MONOTONIC, the phases' clock): what `natmig plot` draws.
            "flows": [{"fid": f.fid, "proto": f.proto, "survived": f.survived,
                       "top_gaps": [[round(g, 6), round(t, 6)] for g, t in sorted(f.top_gaps, reverse=True)[:PLOTTED_GAPS]]}
                      for f in live],
        }


def merge(client_doc: dict[str, Any], server_doc: dict[str, Any]) -> TrafficResult:
    """Judge every flow from both ends' records.

    A TCP flow survived when it saw no error, the server saw it from one
    public address:port only, and every message it sent came back.  A UDP
    flow survived when the server saw one public address:port and echoes
    kept arriving until the end (losses during the move are allowed).
    """
    interval = float(client_doc.get("interval", 0.01))
    stopped = float(client_doc.get("stopped", 0.0))
    sflows = server_doc.get("flows", {})
    out = []
    for fid_s, c in sorted(client_doc.get("flows", {}).items(), key=lambda kv: int(kv[0])):
        s = sflows.get(fid_s, {})
        endpoints = list(s.get("endpoints", []))
        gap, gap_end = max((float(c.get("max_gap") or 0.0), c.get("gap_end")), (float(s.get("max_gap") or 0.0), s.get("gap_end")), key=lambda g: g[0])
        if c.get("kind") == "live" and c.get("last") is not None and stopped and stopped - float(c["last"]) > gap:
            # A flow that went silent for good has a gap that lasts until the stop.
            gap, gap_end = stopped - float(c["last"]), stopped
        why = []
        if c.get("error"):
            why.append(f"client error: {c['error']}")
        if len(endpoints) > 1:
            why.append(f"public endpoint changed: {' -> '.join(endpoints)}")
        if not endpoints and c.get("sent", 0):
            why.append("never reached the server")
        if c.get("kind") == "churn" and c.get("connect_time") is None and not c.get("error"):
            why.append("connection never completed")
        if c["proto"] == "TCP":
            if s.get("ended") not in (None, "eof"):
                why.append(f"server side: {s['ended']}")
            if c.get("received", 0) < c.get("sent", 0):
                why.append(f"{c['sent'] - c['received']} of {c['sent']} messages not echoed")
        else:
            last = c.get("last")
            if last is None or stopped - float(last) > max(0.5, 20 * interval):
                why.append("echoes stopped before the end")
        out.append(FlowResult(
            int(fid_s), c["proto"], c["kind"], endpoints, int(c.get("sent", 0)), int(s.get("received", 0)),
            int(c.get("received", 0)), gap, c.get("error"), not why, "; ".join(why), gap_end,
            [tuple(g) for g in (c.get("top") or []) + (s.get("top") or [])],
            c.get("born"), c.get("connect_time"),
        ))
    return TrafficResult(out, interval)
