"""One move nat1 -> nat2 by either engine, for the benchmarks: `natmig migrate`'s default (the generic engine) or the
NAT's own migration, with a report the benchmarks read the same way.

The benchmarks were written against the NAT migration's report
(:class:`~natmig.controller.report.MigrationReport`: its phases and steps,
its blackout); :class:`EngineRun` gives the generic engine's report
(:class:`~natmig.controller.enginereport.EngineReport`) the same names.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from natmig.controller.engine import EngineMigration, EngineOptions, default_phases
from natmig.controller.enginereport import EngineReport
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.report import PhaseTiming
from natmig.controller.statenode import StateNode
from natmig.controller.steering import TestbedSteering

ENGINES = ("generic", "nat")
#: Each engine's phases, in order (the benchmarks' columns).
PHASES = {
    "generic": ("preflight", "traffic", "copy", "freeze", "catch-up", "verify", "hold", "switch", "finish"),
    "nat": ("preflight", "copy", "catch-up", "switch", "verify", "admit", "retire"),
}


class EngineRun:
    """A generic engine's report under the names of the NAT migration's that the benchmarks read."""

    def __init__(self, report: EngineReport) -> None:
        self.report = report
        self.ok, self.error = report.ok, report.error
        self.phases: list[PhaseTiming] = report.phases
        self.total_seconds = report.total_seconds

    def phase_seconds(self, name: str) -> float:
        return sum(p.seconds for p in self.phases if p.name == name)

    def _phase(self, name: str) -> PhaseTiming | None:
        return next((p for p in self.phases if p.name == name and p.ok), None)

    @property
    def hold_started(self) -> float | None:
        """When the source stopped admitting new entries: the freeze's start."""
        p = self._phase("freeze")
        return p.started if p is not None else None

    @property
    def hold_ended(self) -> float | None:
        """When the target admitted again: in finish (its first commit; the phase's end, an upper bound by the source's
        own confirm after it, ~5 ms)."""
        p = self._phase("finish")
        return p.started + p.seconds if p is not None else None

    @property
    def blackout_seconds(self) -> float | None:
        start, end = self.hold_started, self.hold_ended
        return None if start is None or end is None else end - start

    def _count(self, phase: str, pattern: str) -> int:
        p = self._phase(phase)
        m = re.search(pattern, p.detail) if p is not None else None
        return int(m.group(1)) if m else 0

    @property
    def copied(self) -> int:
        return sum(self.report.copied.values())

    @property
    def caught_up(self) -> int:
        """Changes written from the source's events: during the copy, and under the freeze."""
        return self._count("copy", r"(\d+) changes since the read") + self._count("catch-up", r"(\d+) changes from events")

    @property
    def reconciled(self) -> int:
        """Entries verify wrote because the digests differed (a forwarded list), or the catch-up's re-read."""
        return self._count("verify", r"(\d+) entries the events did not bring") + self._count("catch-up", r"(\d+) from a re-read")

    @property
    def verified(self) -> int:
        return self.copied if self.ok else 0

    @property
    def source_check(self) -> str:
        return "digest"

    @property
    def target_check(self) -> str:
        p = self._phase("verify")
        return "reconciled" if self.reconciled else ("digest" if p is not None and "digest" in p.detail else "read")

    range_sessions_read = 0


def move(engine: str, fleet: Any, tb: Any, rpc_timeout: float, confirm_timeout: float, retire: str = "keep") -> Any:
    """nat1 -> nat2 through the testbed's switch by ``engine``; the NAT migration's report, or an :class:`EngineRun`."""
    if engine == "nat":
        return Migration(fleet.endpoint("nat1", timeout=rpc_timeout), fleet.endpoint("nat2", timeout=rpc_timeout), TestbedSteering(tb),
                         MigrateOptions(retire=retire, confirm_timeout=confirm_timeout)).run()

    def opener(nat: str) -> Callable[[], StateNode]:
        return lambda: StateNode(fleet.endpoint(nat, timeout=rpc_timeout).open())

    # As `natmig migrate` runs it: the catch-up's quiet time is its --settle default (10 ms).
    return EngineRun(EngineMigration(opener("nat1"), opener("nat2"), "nat1", "nat2", EngineOptions(retire=retire, confirm_timeout=confirm_timeout),
                                     default_phases(TestbedSteering(tb), settle=0.01), source_events=opener("nat1")).run())
