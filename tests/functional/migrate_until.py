"""Run `natmig migrate` and SIGKILL this very process at a chosen point (the fault suite's controller).

    python -m tests.functional.migrate_until INVENTORY POINT [CONFIRM_TIMEOUT [--set KEY=VALUE ...]]

POINT is ``after:PHASE`` (the phase has just ended), ``in:STEP`` (a step of
a phase is about to run) or ``in:STEP+MS`` (MS milliseconds after the step
began, from a timer thread: the kill lands while the step's requests are on
the wire).  The process exits 0/1 as `natmig migrate` does only if the point
was never reached; the suite treats that as a failure of the test itself.  With
``--set migration.engine=generic`` the migration is the generic engine's
(:mod:`natmig.controller.engine`), which has phases and no steps:
``after:PHASE`` is then its phase of that name, ended (reported to its
``on_phase``), and ``in:PHASE[+MS]`` that phase as it begins (or MS
milliseconds later).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

from natmig import cli
from natmig.controller import engine, report


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Patch the phase clock so that the process kills itself at ``point``."""
    kind, _, rest = point.partition(":")
    # A step's name may hold a '+' itself (confirm+hold): only digits after the last one are a delay.
    name, _, delay = rest.rpartition("+")
    if not delay.isdigit():
        name, delay = rest, ""
    seconds = float(delay) / 1000 if delay else 0.0

    def fire() -> None:
        if seconds:
            threading.Timer(seconds, _die).start()
        else:
            _die()

    if kind not in ("after", "in"):
        raise SystemExit(f"point {point!r}: expected after:PHASE or in:STEP[+MS]")
    init = engine.EngineMigration.__init__

    def init_then_die(self: Any, *args: Any, **kw: Any) -> None:
        init(self, *args, **kw)
        if kind == "in":
            for p in self.phases:
                if p.name == name:
                    def run_then_die(ctx: Any, run: Any = p.run) -> Any:
                        fire()
                        return run(ctx)

                    p.run = run_then_die
            return
        told = self.on_phase

        def on_phase(timing: Any) -> None:
            told(timing)
            if timing.ok and timing.name == name:
                fire()

        self.on_phase = on_phase

    engine.EngineMigration.__init__ = init_then_die  # type: ignore[method-assign]
    if kind == "after":
        phase = report.PhaseClock.phase

        @contextmanager
        def phase_then_die(self: Any, pname: str) -> Iterator[Any]:
            with phase(self, pname) as h:
                yield h
            if pname == name:
                fire()

        report.PhaseClock.phase = phase_then_die  # type: ignore[method-assign]
    else:
        step = report._PhaseHandle.step

        @contextmanager
        def die_in_step(self: Any, sname: str) -> Iterator[None]:
            if sname == name:
                fire()
            with step(self, sname):
                yield

        report._PhaseHandle.step = die_in_step  # type: ignore[method-assign]


def main() -> int:
    inventory, point = sys.argv[1], sys.argv[2]
    timeout = sys.argv[3] if len(sys.argv) > 3 else "3"
    arm(point)
    return cli.main(["migrate", "--inventory", inventory, "--confirm-timeout", timeout, "--quiet", *sys.argv[4:]])


if __name__ == "__main__":
    sys.exit(main())
