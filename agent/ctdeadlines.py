"""When each entry's timeout, as last told, runs out: what the live digest looks up again by key."""

from __future__ import annotations

import heapq
import math
from typing import Container, Iterable

from .ctevents import Ident


#: Deadlines this many seconds away or more are kept on a coarser grid (an
#: established TCP session lives 5 days: no slot per second for those).
_FINE = 600
_COARSE = 32


class Deadlines:
    """When each entry's timeout, as last told, runs out: the entries to look up again by key.

    The kernel removes an entry whose timeout has passed only when its
    collector comes by (seconds later, measured) or when something looks it
    up: a GET by key of an expired entry removes it (a DESTROY event) and
    finds nothing; of a live one it gives the timeout now (traffic renews a
    timeout without an event), which is scheduled again.  So an entry is
    looked up at most once per timeout it was told, and a call asks the
    kernel about the entries due, not about the table: a dump that walks the
    whole hash table for what has expired (ctevents.expire, 13-40 ms) runs
    with the CPU's softirqs off and stalled every packet through the node
    meanwhile (a 1 ms probe's gap went from 22 to 130 ms with one such walk
    after another in two namespaces, measured).

    Slots are whole seconds (of ``time.monotonic``), the deadline rounded
    up, and one more second: the kernel tells whole seconds, rounded down.
    An entry is in the slot of every deadline it was given; a stale one only
    costs a lookup.
    """

    def __init__(self) -> None:
        self.slots: dict[int, list[Ident]] = {}
        self.heap: list[int] = []
        #: identities in the slots, stale ones included
        self.count = 0

    def add(self, items: Iterable[tuple[Ident, int]], now: float) -> None:
        """Schedule each (identity, remaining seconds)."""
        slots, heap = self.slots, self.heap
        base = math.ceil(now) + 1
        n = 0
        for ident, secs in items:
            slot = base + secs if secs < _FINE else -(-(base + secs) // _COARSE) * _COARSE
            held = slots.get(slot)
            if held is None:
                slots[slot] = [ident]
                heapq.heappush(heap, slot)
            else:
                held.append(ident)
            n += 1
        self.count += n

    def due(self, now: float, limit: int | None = None) -> list[Ident]:
        """The entries whose deadline has passed by ``now``, taken out of the schedule (whole slots until ``limit`` is reached)."""
        out: list[Ident] = []
        heap, slots = self.heap, self.slots
        while heap and heap[0] <= now and (limit is None or len(out) < limit):
            out += slots.pop(heapq.heappop(heap))
        self.count -= len(out)
        return out

    def compact(self, held: Container[Ident]) -> None:
        """Keep one slot per entry still ``held`` (its earliest), none for the others.

        An entry removed, or told a new timeout, leaves its old slot behind
        until that comes due: a NAT closing thousands of connections a
        second, each scheduled days ahead once established, would pile them
        up.  Called when the stale ones outnumber the table (amortised O(1) an add).
        """
        first: dict[Ident, int] = {}
        for slot in sorted(self.slots):
            for ident in self.slots[slot]:
                if ident in held and ident not in first:
                    first[ident] = slot
        slots: dict[int, list[Ident]] = {}
        for ident, slot in first.items():
            slots.setdefault(slot, []).append(ident)
        self.slots, self.heap, self.count = slots, sorted(slots), len(first)

    def __len__(self) -> int:
        return self.count
