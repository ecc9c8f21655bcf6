"""What a migration did: per-phase timings, counts, and where each NAT was left.

A :class:`MigrationReport` is filled in while the migration runs (so a
failure still reports everything up to the failing step), printed for people
by :func:`format_report` and written as JSON by :meth:`MigrationReport.to_dict`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator


@dataclass
class PhaseTiming:
    """One phase: its name, wall time in seconds, sub-steps, and whether it finished."""

    name: str
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)
    ok: bool = False
    detail: str = ""
    started: float = 0.0  # time.perf_counter() (CLOCK_MONOTONIC on Linux) at the start


@dataclass
class MigrationReport:
    """Everything a migration reports; ``ok`` only when every phase succeeded.

    ``traffic_on`` names the NAT that carries traffic at the end;
    ``node_state`` says, per NAT name, what state it was left in (in words),
    so a failure message can tell an operator where things stand.
    """

    source: str
    target: str
    ok: bool = False
    failed_phase: str | None = None
    error: str | None = None
    traffic_on: str | None = None
    copied: int = 0
    events: int = 0
    caught_up: int = 0
    caught_up_deleted: int = 0
    reconciled: int = 0
    #: source sessions that timed out on the source before verify found them missing on the target (nothing to move)
    expired: int = 0
    verified: int = 0
    #: how verify knew the frozen source's table: "digest" (its nat-statistics
    #: digest matched the snapshot folded with the events), "read" (re-read) or
    #: "ranges" (its sessions read in the key ranges whose digests differ from the target's).
    source_check: str | None = None
    #: how verify checked the target: "digest" (its nat-statistics digest equals
    #: the source's final table's), "read" (its table read and compared) or "ranges"
    #: (only the key ranges whose digests differ from the source's read and compared).
    target_check: str | None = None
    #: sessions verify read by key range, both nodes together (source_check "ranges"); None: not by range
    range_sessions_read: int | None = None
    retired: int = 0
    #: the hold window (time.perf_counter, CLOCK_MONOTONIC): from the source's admission
    #: closing (the freeze) to the target's admission opening; None when it never closed
    hold_started: float | None = None
    hold_ended: float | None = None
    phases: list[PhaseTiming] = field(default_factory=list)
    node_state: dict[str, str] = field(default_factory=dict)
    #: per NAT name, read back from the node at the end: admits (bool), sessions (count), carries_traffic (bool)
    readback: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: sessions the target held before the migration (read in preflight; None: not read)
    target_sessions_before: int | None = None

    @property
    def outcome(self) -> str:
        """"ok"; "unchanged": failed, and as read back nothing is changed; "attention": failed, the state needs recover.

        Derived from what was read back at the end, never from what the code
        meant to undo: traffic on the source, both nodes read and admitting
        new sessions, and the target holding no more sessions than before
        (nothing copied remains; its own may have expired meanwhile).
        Preflight changes nothing (it reads, and takes locks that end with
        the sessions), so a failure there is "unchanged" even when a node
        could not be read.
        """
        if self.ok:
            return "ok"
        if self.failed_phase in (None, "preflight"):
            return "unchanged"
        src, tgt = self.readback.get(self.source), self.readback.get(self.target)
        if (self.traffic_on == self.source and src is not None and tgt is not None and src.get("admits") and tgt.get("admits")
                and self.target_sessions_before is not None and tgt.get("sessions") is not None
                and tgt["sessions"] <= self.target_sessions_before):
            return "unchanged"
        return "attention"

    @property
    def total_seconds(self) -> float:
        """Sum of the phase times."""
        return sum(p.seconds for p in self.phases)

    @property
    def blackout_seconds(self) -> float | None:
        """How long new sessions were held (the freeze to the target's admit); None when admission never closed or never reopened."""
        if self.hold_started is None or self.hold_ended is None:
            return None
        return self.hold_ended - self.hold_started

    def phase_seconds(self, name: str) -> float:
        """Time of a phase by name (0 when it did not run)."""
        return sum(p.seconds for p in self.phases if p.name == name)

    def phase_at(self, t: float) -> str | None:
        """The phase running at perf_counter time ``t`` (None: outside the migration)."""
        for p in self.phases:
            if p.started <= t <= p.started + p.seconds:
                return p.name
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (phase times in seconds)."""
        d = asdict(self)
        d["total_seconds"] = self.total_seconds
        d["blackout_seconds"] = self.blackout_seconds
        d["outcome"] = self.outcome
        return d

    def to_json(self) -> str:
        """The report as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)


class PhaseClock:
    """Times phases with :func:`time.perf_counter` into a report.

    ``with clock.phase("copy") as ph:`` records the phase even when its body
    raises (the time up to the failure, ``ok`` False); ``ph.step("commit")``
    times a sub-step.  ``on_phase`` is called with each phase as it ends,
    for progress output.
    """

    def __init__(self, report: MigrationReport, on_phase: Callable[[PhaseTiming], None] | None = None) -> None:
        self.report = report
        self.on_phase = on_phase
        self.current: PhaseTiming | None = None

    @contextmanager
    def phase(self, name: str) -> Iterator["_PhaseHandle"]:
        """Time one phase (see the class docstring)."""
        t0 = time.perf_counter()
        ph = PhaseTiming(name, started=t0)
        self.report.phases.append(ph)
        self.current = ph
        try:
            yield _PhaseHandle(ph)
            ph.ok = True
        except BaseException:
            self.report.failed_phase = self.report.failed_phase or name
            raise
        finally:
            ph.seconds = time.perf_counter() - t0
            self.current = None
            if self.on_phase is not None:
                self.on_phase(ph)


class _PhaseHandle:
    def __init__(self, ph: PhaseTiming) -> None:
        self.ph = ph

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.ph.steps[name] = self.ph.steps.get(name, 0.0) + time.perf_counter() - t0

    def note(self, text: str) -> None:
        self.ph.detail = f"{self.ph.detail}; {text}" if self.ph.detail else text


def ms(seconds: float) -> str:
    """Seconds as a short millisecond string."""
    return f"{seconds * 1000:.1f} ms"


def format_report(r: MigrationReport) -> str:
    """A human-readable, multi-line summary of a migration."""
    head = "migration OK" if r.ok else f"migration FAILED in phase {r.failed_phase}"
    lines = [f"{head}: {r.source} -> {r.target}"]
    if r.error:
        lines.append(f"  error: {r.error}")
    lines.append(
        f"  sessions: copied {r.copied}, events {r.events} (written {r.caught_up}, deleted {r.caught_up_deleted}), "
        f"reconciled {r.reconciled}, verified {r.verified}, retired {r.retired}" + (f", ended on the source before verify {r.expired}" if r.expired else "")
    )
    lines.append("  phases:")
    for p in r.phases:
        steps = ", ".join(f"{k} {ms(v)}" for k, v in p.steps.items())
        mark = "" if p.ok else "  <- failed"
        extra = f" ({steps})" if steps else ""
        detail = f" [{p.detail}]" if p.detail else ""
        lines.append(f"    {p.name:<10} {ms(p.seconds):>11}{extra}{detail}{mark}")
    lines.append(f"    {'total':<10} {ms(r.total_seconds):>11}")
    if r.blackout_seconds is not None:
        lines.append(f"  new sessions held for {ms(r.blackout_seconds)} (the source's freeze to the target's admit)")
    lines.append(f"  traffic on: {r.traffic_on}")
    for name, state in r.node_state.items():
        lines.append(f"  {name}: {state}")
    for n in r.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)
