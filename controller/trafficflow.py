"""What both traffic programs share: their message, their limits, and a flow's receive record.

The programs (:mod:`.trafficserver`, :mod:`.trafficclient`) run inside
namespaces and write their records as JSON; :mod:`.trafficresult` reads both.
Times are CLOCK_MONOTONIC, which every namespace of the machine shares.
"""

from __future__ import annotations

import errno
import heapq
import json
import os
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import Any

MSG = struct.Struct("!IId")  # flow id, sequence number, client send time
MAX_FLOWS = 2000
#: new connections a client opens at most over its run: its records of them
#: are kept to the end.  Enough for 100 a second through a 1,000,000-session
#: move (~4 min), whose hold came after the 2,000th: none was held then.
MAX_CHURN = 100_000
MAX_DURATION = 900.0
UDP_BASE = 100_000
CHURN_BASE = 200_000
#: each flow's largest gaps the records keep (FlowRx.top).
TOP_GAPS = 128


@dataclass
class FlowRx:
    """Per-flow receive bookkeeping, shared by both sides."""

    proto: str
    kind: str
    received: int = 0
    first: float | None = None
    last: float | None = None
    max_gap: float = 0.0
    endpoints: list[str] = field(default_factory=list)
    ended: str | None = None
    gap_end: float | None = None
    # The TOP_GAPS largest gaps as (gap, end time): enough to tell which
    # phase of a migration each happened in.
    top: list[tuple[float, float]] = field(default_factory=list)

    def arrive(self, t: float, endpoint: str | None = None) -> None:
        """A message arrived at ``t`` (from ``endpoint``, as this side saw it)."""
        if self.last is not None:
            gap = t - self.last
            if gap > self.max_gap:
                self.max_gap = gap
                self.gap_end = t
            if len(self.top) < TOP_GAPS:
                heapq.heappush(self.top, (gap, t))
            elif gap > self.top[0][0]:
                heapq.heapreplace(self.top, (gap, t))
        else:
            self.first = t
        self.last = t
        self.received += 1
        if endpoint is not None and endpoint not in self.endpoints:
            self.endpoints.append(endpoint)


class Stopper:
    """Turns SIGTERM/SIGINT into a flag the event loops poll."""

    def __init__(self, duration: float) -> None:
        self.deadline = time.monotonic() + min(duration, MAX_DURATION)
        self.stop = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, *_: object) -> None:
        self.stop = True

    def done(self) -> bool:
        return self.stop or time.monotonic() >= self.deadline


def errname(e: OSError) -> str:
    """``ECONNRESET``: the errno's name, or the error's own words when it has none."""
    return errno.errorcode.get(e.errno, str(e)) if e.errno is not None else str(e)


def write_json(path: str, obj: Any) -> None:
    """Write ``obj`` to ``path`` whole or not at all: the reader never sees half a record."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
