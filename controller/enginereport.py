"""The report of a state-only migration (:mod:`.engine`): phases, what was copied, what the nodes say afterwards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .report import PhaseTiming, ms


@dataclass
class NodeReadback:
    """A node as read back at the end: admission, and per list (entries, digest); or why it could not be read."""

    name: str
    admission: bool | None = None
    tables: dict[str, tuple[int, str]] = field(default_factory=dict)
    error: str | None = None
    #: packets of new entries the node holds now (natmig-state's state-control/held); None: it reports none (holds nothing ever).
    held: int | None = None

    def line(self) -> str:
        if self.error is not None:
            return f"{self.name}: not read back ({self.error})"
        adm = "admits new entries" if self.admission else "REFUSES new entries"
        if self.held is not None:
            adm += f" (holds {self.held} packet{'s' if self.held != 1 else ''} of new entries)" if self.held else ", holds nothing"
        lists = ", ".join(f"{n} {c} (digest {d})" for n, (c, d) in self.tables.items())
        return f"{self.name}: {adm}; {lists or 'no lists'}"


@dataclass
class EngineReport:
    """What a migration did; everything under ``readback`` was read from the nodes after it."""

    source: str
    target: str
    retire: str = "delete"
    ok: bool = False
    error: str = ""
    failed_phase: str = ""
    connect_seconds: float = 0.0
    phases: list[PhaseTiming] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    copied: dict[str, int] = field(default_factory=dict)
    switch: str = ""
    #: the node the switch sends traffic through, read from it at the end ("" without a switch).
    traffic_on: str = ""
    #: the target's copy was confirmed: from then on nothing is undone.
    committed: bool = False
    #: a phase that may change a node or the switch began (before one does, a failure changed nothing).
    changing: bool = False
    undone: list[str] = field(default_factory=list)
    readback: dict[str, NodeReadback] = field(default_factory=dict)

    @property
    def outcome(self) -> str:
        """"ok"; "unchanged" when it failed and what was read back says nothing is left changed; else "attention".

        Unchanged: it failed before any phase that changes something began; or
        the target's copy was never confirmed, every undo ran, both nodes were
        read back, the source admits new entries, and traffic (when there is a
        switch) is on the source.
        """
        if self.ok:
            return "ok"
        if not self.phases or not self.changing:
            # Refused before its first phase (an agent down, unknown, busy; a connection that failed), or in one that
            # only reads (preflight: a node locked by another migration, which may have frozen or switched it):
            # this migration wrote nothing, on either node.
            return "unchanged"
        clean = (not self.committed and not any("undo failed" in u for u in self.undone)
                 and len(self.readback) == 2 and all(rb.error is None for rb in self.readback.values())
                 and self.readback.get(self.source, NodeReadback(self.source)).admission is True
                 and self.traffic_on in ("", self.source))
        return "unchanged" if clean else "attention"

    @property
    def total_seconds(self) -> float:
        return self.connect_seconds + sum(p.seconds for p in self.phases)

    def text(self) -> str:
        """The report for a terminal."""
        lines = [f"state migration {self.source} -> {self.target}: {'OK' if self.ok else 'FAILED in ' + self.failed_phase}"]
        if self.modules:
            lines.append(f"  modules: {', '.join(self.modules)}")
        if self.phases:
            # Opening both agents' sessions: SSH and hello for a one-shot command, nothing for a kept session.
            lines.append(f"  {'connect':<10} {ms(self.connect_seconds):>10}")
        for p in self.phases:
            lines.append(f"  {p.name:<10} {ms(p.seconds):>10}  {'ok' if p.ok else 'FAILED'}  {p.detail}")
        if self.traffic_on:
            lines.append(f"  traffic on: {self.traffic_on} (read back from the switch)")
        elif self.switch:
            lines.append(f"  traffic: {self.switch}")
        if self.error:
            lines.append(f"  error: {self.error}")
        for u in self.undone:
            lines.append(f"  undone: {u}")
        lines.append("  read back:")
        for rb in self.readback.values():
            lines.append(f"    {rb.line()}")
        lines.append(f"  total {ms(self.total_seconds)}")
        return "\n".join(lines)

    def to_json(self) -> str:
        """The report as JSON."""
        return json.dumps({
            "source": self.source, "target": self.target, "ok": self.ok, "error": self.error or None,
            "failed_phase": self.failed_phase or None, "modules": self.modules, "copied": self.copied,
            "switch": self.switch or None, "traffic_on": self.traffic_on or None, "retire": self.retire, "outcome": self.outcome, "committed": self.committed, "undone": self.undone,
            "phases": [{"name": p.name, "seconds": round(p.seconds, 6), "ok": p.ok, "detail": p.detail} for p in self.phases],
            "readback": {n: {"admission": rb.admission, "held": rb.held,
                             "tables": {t: {"entries": c, "digest": d} for t, (c, d) in rb.tables.items()},
                             "error": rb.error} for n, rb in self.readback.items()},
            "total_seconds": round(self.total_seconds, 6),
        }, indent=2)
