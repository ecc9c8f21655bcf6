"""Child processes natmig starts (agents, a controller service, tools): waited for by a ready file, stopped by pid."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from .errors import NatmigError


def wait_ready(proc: "subprocess.Popen[bytes] | subprocess.Popen[str]", ready: Path, timeout: float, what: str,
               tail: Callable[[], str], error: type[NatmigError] = NatmigError) -> None:
    """Until ``proc`` has written ``ready``; ``error`` naming ``what`` and its log's ``tail`` when it exits or the time is up."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            raise error(f"{what} exited with {proc.returncode}: {tail()}")
        if time.monotonic() > deadline:
            raise error(f"{what} not listening after {timeout:g} s: {tail()}")
        time.sleep(0.02)


def stop(proc: "subprocess.Popen[bytes] | subprocess.Popen[str] | None", kill: bool = False, grace: float = 10.0) -> None:
    """SIGTERM ``proc`` (SIGKILL with ``kill``) by its pid and wait; SIGKILL when it outlives ``grace``."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)
