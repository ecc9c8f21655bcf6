"""What every demo does around its move: the controller's priority, SIGTERM as Ctrl-C, teardown, progress lines."""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager
from typing import Callable, Iterator

from .report import PhaseTiming, ms

@contextmanager
def control_plane_priority(nice: int = 19) -> Iterator[None]:
    """Run the calling process (the controller) niced, and restore its priority afterwards.

    On this one machine the userspace switch and the hosts stand in for
    hardware and other machines; a controller parsing 100k-session replies
    must not take their CPU.  Call it after the testbed is up, so the switch
    daemons it starts are not niced.
    """
    old = os.getpriority(os.PRIO_PROCESS, 0)
    os.setpriority(os.PRIO_PROCESS, 0, nice)
    try:
        yield
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, old)


def tear_down(say: Callable[[str], None], parts: list[tuple[str, Callable[[], object] | None]]) -> None:
    """Run each part's teardown in order, going on past failures (each one said)."""
    for what, fn in parts:
        if fn is None:
            continue
        try:
            fn()
        except Exception as e:  # keep tearing down the rest
            say(f"teardown of {what} failed: {e}")


def phase_line(ph: PhaseTiming) -> str:
    """One phase of a migration as the demos print it while it runs."""
    steps = ", ".join(f"{k} {ms(v)}" for k, v in ph.steps.items())
    return f"      {ph.name:<10} {ms(ph.seconds):>10}  {'ok' if ph.ok else 'FAILED'}" + (f"  ({steps})" if steps else "")


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM interrupts like Ctrl-C while a demo runs, so its teardown runs too."""
    old = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def raise_interrupt(*_: object) -> None:
    """A signal handler: the signal interrupts as Ctrl-C does."""
    raise KeyboardInterrupt
