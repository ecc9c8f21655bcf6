"""Notifications on their way to one subscribed session, with a bounded queue.

The SSH channel buffers whatever is written to it; a subscriber that stops
reading made the agent buffer without limit (~25 MB per 40k events).  A
notification is written to the channel only while the client keeps up (the
channel's unsent bytes below :data:`KEEPING_UP`); otherwise it waits here.
The subscriber is given up (``on_overflow``: the server logs it and ends the
session, the only way RFC 5277 has to tell a client its subscription is
over) when more than ``limit`` bytes wait and it has taken nothing for
``stall`` seconds, or when more than ``hard`` bytes wait whatever it does: a
client that reads, only slower than a burst comes (a whole 100k-session
table deleted is ~53 MB of events in ~1.5 s), is not mistaken for one that
stopped.

Runs on the event loop only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Callable

#: Unsent bytes in the channel below which the client counts as keeping up.
KEEPING_UP = 1 << 20
#: How often a queue waiting for the client is looked at again (seconds).
RETRY = 0.02
#: Seconds without taking anything, past ``limit``, before a subscriber is given up.
STALL = 5.0
#: ``hard`` is this many times ``limit`` unless given.
HARD_FACTOR = 8


class Outbox:
    """The notifications of one session: written now, or queued up to ``limit`` bytes."""

    def __init__(self, loop: asyncio.AbstractEventLoop, write: Callable[[bytes], None], unsent: Callable[[], int],
                 limit: int, on_overflow: Callable[[int, int], None], stall: float = STALL, hard: int | None = None) -> None:
        self.loop = loop
        self.write = write
        self.unsent = unsent
        self.limit = limit
        self.stall = stall
        self.hard = HARD_FACTOR * limit if hard is None else hard
        self.on_overflow = on_overflow
        #: RFC 5277: nothing before the create-subscription reply; :meth:`open` after it.
        self.held = True
        self.closed = False
        self.queue: deque[bytes] = deque()
        self.queued = 0
        self.sent = 0
        #: when the client last showed it reads (a notification written while it kept up).
        self.last_taken = time.monotonic()
        self._timer: asyncio.TimerHandle | None = None

    def put(self, message: bytes) -> None:
        """One notification for this session."""
        if self.closed:
            return
        self.queue.append(message)
        self.queued += len(message)
        self.flush()
        # While held the client is not the one who is slow: only the hard limit applies.
        if self.queued > self.limit and (self.queued > self.hard or (not self.held and time.monotonic() - self.last_taken > self.stall)):
            n, size = len(self.queue), self.queued
            self.close()
            self.on_overflow(n, size)

    def open(self) -> None:
        """The create-subscription reply is out (or a streamed reply has ended): notifications may follow."""
        self.held = False
        self.last_taken = time.monotonic()  # the hold was the agent's doing, not a client's stall
        self.flush()

    def hold(self) -> None:
        """A reply is being streamed: nothing may come between its pieces until :meth:`open`."""
        self.held = True

    def flush(self) -> None:
        """Write what is queued while the client keeps up; look again soon if some is left."""
        while self.queue and not self.held and not self.closed and self.unsent() < KEEPING_UP:
            m = self.queue.popleft()
            self.queued -= len(m)
            self.write(m)
            self.sent += 1
            self.last_taken = time.monotonic()
        if self.queue and not self.held and not self.closed and self._timer is None:
            self._timer = self.loop.call_later(RETRY, self._retry)

    def _retry(self) -> None:
        self._timer = None
        self.flush()

    def close(self) -> None:
        """Drop everything queued; later notifications are dropped too."""
        self.closed = True
        self.queue.clear()
        self.queued = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
