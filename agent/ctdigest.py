"""nat-statistics kept up to date as the table changes, not recomputed from a full read.

:class:`.ctdigesttable.DigestTable` holds every entry of a conntrack table by
its identity, with the counts and the XOR they add up to; folded in, in the
kernel's order, a full read and the events around it give the table.

:class:`LiveDigest` keeps one table true for one namespace:

* started by the first :meth:`LiveDigest.statistics`: subscribe
  (:class:`.ctevents.EventSocket`), then one full read
  (:func:`.ctevents.read_table`), then the events queued meanwhile;
* a thread reads the events as they come (see :func:`_follow`
  for why a thread rather than a read at each call);
* each :meth:`LiveDigest.statistics` is a barrier: the socket is read
  until empty, so every change the kernel made before the call is in; the
  entries whose timeout, as last told, has run out (:class:`.ctdeadlines.Deadlines`) and
  the UNSURE ones are read again by key, which makes the kernel remove
  those that expired.  Then it answers from memory;
* the agent's own writes reach the table by what the kernel confirmed
  (:meth:`LiveDigest.writing`); their events are dropped in the kernel;
* an event lost (ENOBUFS), or a write whose outcome is not known, and the
  table is no longer trusted: the next call starts again from a full read.

Not followed, because no event tells it: a ctnetlink update that sets a
session's TCP state to NONE (no packet can: the kernel's TCP state table
never leads back to NONE; only a writer naming state 0 can, which natmig
never does), and entries made while nothing listened and
nf_conntrack_events was 2, whose DESTROY the kernel never reports (the NAT
node sets it to 1; without 1 the provider does not use this module).
"""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Callable, Collection, Final, Iterable, Iterator, Sequence

from ..gcpause import gc_paused
from ..model import NatSession, digest_values
from . import ctevents as ev
from .ctdeadlines import Deadlines
from .ctdigesttable import DigestTable, Summary, WriteLog
from .ctevents import UNSURE, Ident, Record
from .ctnetlink import NetlinkError
from .ctread import EntryReader

log = logging.getLogger(__name__)


class LiveDigest:
    """The nat-statistics of one namespace's table, followed through its events (see the module docstring).

    ``reader`` reads entries by key (the UNSURE ones, and the agent's own
    writes that met another writer's); ``own`` gives the port id of the
    socket the agent writes with, whose events the kernel drops for us.
    Thread-safe: statistics, writes and the event thread take one lock.
    """

    #: Seconds the event thread waits for events before looking whether it should stop.
    POLL = 0.5
    #: Events the thread reads per turn of the lock (a statistics call never waits for more).
    TURN = 5000
    #: The event socket's receive buffer: a burst of BURST events from others between two reads.
    RCVBUF = ev.BURST * ev.EVENT_TRUESIZE
    #: Own events dropped by the kernel (a socket filter) rather than read and skipped by their header.
    DROP_OWN_IN_KERNEL = True
    #: Stale deadlines kept beyond twice the table before they are dropped (:meth:`Deadlines.compact`).
    STALE = 100_000

    def __init__(self, netns: str | None, reader: EntryReader, own: Callable[[], int | None]) -> None:
        self.netns = netns
        self.reader = reader
        self.own = own
        self.table: DigestTable | None = None
        self.deadlines = Deadlines()
        #: when an entry a GET cannot reach (IPv6, zones) may have expired: the whole table is walked then (ctevents.expire)
        self._walk_at = math.inf
        self.valid = False
        self._events: ev.EventSocket | None = None
        self._requests: socket.socket | None = None
        self._lock = threading.RLock()
        #: writes of ours under way (:meth:`writing`), whose outcome the table does not hold yet
        self._writes = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        #: full reads so far (the first, and one after each loss): what tests and benchmarks look at.
        self.full_reads = 0

    # -- answering --------------------------------------------------------------

    def statistics(self) -> Summary:
        """The table's counts and digest, including every change the kernel made before this call."""
        with self._lock, gc_paused():
            try:
                return self._statistics()
            except OSError as e:
                self._lose(f"netlink: {e}")
                self._close_requests()
                raise NetlinkError(f"ctnetlink in {self.netns}: {e}") from e

    def ranges(self) -> dict[int, tuple[int, int]]:
        """Each non-empty key range's (sessions, XOR), with the same barrier as :meth:`statistics`."""
        with self._lock:
            self.statistics()
            assert self.table is not None
            return self.table.ranges()

    def few_entries(self, limit: int) -> list[Ident] | None:
        """Every entry's identity, as up to date as :meth:`statistics`, when there are at most ``limit`` and a GET reaches each; else None.

        What the provider reads by key instead of dumping a small table
        (``ConntrackProvider._read_few``).
        """
        with self._lock:
            if self._writes:
                return None  # inside a write of ours (this thread: the lock is held): what it did is not folded in yet
            self.statistics()
            table = self.table
            if not self.valid or table is None or len(table.held) > limit:
                return None
            keys = list(table.held)
        return keys if all(map(_gettable, keys)) else None

    def in_ranges(self, ranges: Collection[int]) -> list[Ident]:
        """The identities of the sessions in these key ranges now (same barrier): what to read by key."""
        with self._lock:
            self.statistics()
            assert self.table is not None
            return self.table.in_ranges(ranges)

    def _statistics(self) -> Summary:
        if not self.valid or self.table is None:
            return self._rebuild()
        try:
            # The events first: an entry they removed is not looked up.
            self._read()
            if not self._expire_due(self.table.unsure):
                return self._rebuild()
            # What the lookups removed (a DESTROY event each, already dropped here) and anything since.
            self._read()
        except ev.EventsLost as e:
            self._lose(str(e))
            return self._rebuild()
        return self.table.summary()

    def _expire_due(self, also: Iterable[Ident] = (), limit: int | None = None) -> bool:
        """Look up by key the entries whose timeout may have passed (and ``also``): the kernel removes those that expired.

        ``limit``: about how many to look up (the event thread's turn).
        False when one cannot be read by key (the table must be read again).
        """
        assert self.table is not None
        now = time.monotonic()
        if self._walk_at <= now:
            self._walk_at = math.inf
            ev.expire(self._request_socket())
        held = self.table.held
        due = {i for i in self.deadlines.due(now, limit) if i in held}
        due.update(also)
        return self._recheck(due)

    def _rebuild(self) -> Summary:
        """Subscribe, read the whole table, fold in what changed meanwhile."""
        self._close_events()
        self.full_reads += 1
        self._events = ev.EventSocket(self.netns, self.own(), self.RCVBUF, self.DROP_OWN_IN_KERNEL)
        records: list[Record] = []
        timeouts: ev.Timeouts = {}
        ev.read_table(self._request_socket(), records, timeouts)
        table = DigestTable()
        table.apply(records)
        self.table = table
        self.deadlines = Deadlines()
        self._walk_at = math.inf
        self._schedule(timeouts)
        try:
            self._read()
        except ev.EventsLost:
            # The dump alone is still a full read (each entry as it was when
            # read): answer with it, and start again at the next call.
            self._lose("events were dropped while the table was read")
            return table.summary()
        if all(_gettable(i) for i in table.unsure):
            self.valid = True
            self._start_thread()
        else:
            # UNSURE entries a GET cannot reach (IPv6, zones): read whole at each call while they last.
            self._lose()
        return table.summary()

    def _read(self, watch: set | None = None, limit: int | None = None) -> set[Ident]:
        """Apply the events queued now; the identities among ``watch`` they touched.  Raises EventsLost."""
        assert self._events is not None and self.table is not None
        records: list[Record] = []
        timeouts: ev.Timeouts = {}
        self._events.read(records, limit, timeouts)
        ev.trim_memos()
        if not records:
            return set()
        hit = self.table.apply(records, watch)
        self._schedule(timeouts)
        return hit

    def _schedule(self, timeouts: dict[Ident, int]) -> None:
        """Deadlines for the entries held with the timeouts they were told."""
        if not timeouts:
            return
        assert self.table is not None
        held, now = self.table.held, time.monotonic()
        # One pass sorting the entries held into those a GET reaches and the
        # rest (_gettable, inlined: a commit of 100k schedules every entry).
        near: list[tuple[Ident, int]] = []
        far: list[int] = []
        for i, t in timeouts.items():
            if i in held:
                if len(i) == 5 and i[0] in _GET_PROTOCOLS and ":" not in i[1]:
                    near.append((i, t))
                else:
                    far.append(t)
        self.deadlines.add(near, now)
        if self.deadlines.count > 2 * len(held) + self.STALE:
            self.deadlines.compact(held)
        if far:
            self._walk_at = min(self._walk_at, now + min(far) + 1)

    def _schedule_created(self, keys: list[Ident], items: Sequence[NatSession]) -> None:
        """:meth:`_schedule` of entries just created (``keys[i]`` for ``items[i]``), all held: one pass, no lookups.

        A session written without a timeout got the node's default: looked
        up at the next call to learn it (0 s).  A commit of a copy schedules
        every entry of the table here.
        """
        assert self.table is not None
        held, now = self.table.held, time.monotonic()
        near = [(k, s.timeout or 0) for k, s in zip(keys, items) if k[0] in _GET_PROTOCOLS and ":" not in k[1]]
        self.deadlines.add(near, now)
        if self.deadlines.count > 2 * len(held) + self.STALE:
            self.deadlines.compact(held)
        if len(near) < len(keys):
            far = [s.timeout or 0 for k, s in zip(keys, items) if not (k[0] in _GET_PROTOCOLS and ":" not in k[1])]
            self._walk_at = min(self._walk_at, now + min(far) + 1)

    def _recheck(self, idents: Iterable[Ident]) -> bool:
        """Read these entries again by key and hold them as the kernel has them now; False when one cannot be read by key."""
        assert self.table is not None
        keys = list(idents)
        if not keys:
            return True
        if not all(_gettable(k) for k in keys):
            return False
        found: dict[Ident, tuple] = {}
        timeouts: ev.Timeouts = {}
        for i, attrs in self.reader.read(keys):
            record = found[keys[i]] = ev.entry_record(attrs)
            secs = ev.entry_timeout(attrs)
            if secs is not None:
                timeouts[record[0]] = secs
        for k in keys:
            got = found.get(k)
            if got is None:
                self.table.drop(k)
                continue
            ident, text = got
            if ident != k:
                # The key is another entry's reply tuple: that entry is the answer, the key itself is gone.
                self.table.drop(k)
            value = digest_values([text])[0] if type(text) is bytes else None
            self.table.put(ident, value, text is UNSURE)
        self._schedule(timeouts)
        return True

    # -- the agent's own writes -------------------------------------------------

    @contextmanager
    def writing(self, complete: tuple[type[BaseException], ...] = ()) -> Iterator[WriteLog]:
        """Around one of the agent's writes: the table is brought up to date first, then told what the write did.

        The lock is held throughout: the write's own events never reach us
        (the kernel drops them), so its outcome must land between the events
        before it and those after.  Events of others that arrived during the
        write are applied after it; an entry the write touched that one of
        them touched too is read again by key, its order against ours not
        being known.  An exception leaves what the write did unknown (the
        table is read whole at the next call), unless it is one of
        ``complete``: raised after the log was told everything (a refusal
        whose undo is logged too).
        """
        with self._lock, gc_paused():
            following = self.valid and self.table is not None
            if following:
                try:
                    self._read()
                except ev.EventsLost as e:
                    self._lose(str(e))
                    following = False
            log = WriteLog(self._fold_created if following else None)
            self._writes += 1
            try:
                yield log
            except complete:
                raise
            except BaseException:
                log.lost()
                raise
            finally:
                self._writes -= 1
                if following and self.valid:
                    self._fold(log)

    def _fold_created(self, items: Sequence[NatSession]) -> list[Ident] | None:
        """Sessions of ours being created, into the table now when none of their keys is held (WriteLog.early,
        inside :meth:`writing`); their keys, or None (nothing done)."""
        assert self.table is not None
        keys = self.table.created_fresh(items)
        if keys is not None:
            self._schedule_created(keys, items)
        return keys

    def _fold(self, log: WriteLog) -> None:
        try:
            self._fold_steps(log)
        except (OSError, NetlinkError) as e:
            self._lose(f"after a write: {e}")

    def _fold_steps(self, log: WriteLog) -> None:
        assert self.table is not None
        if log.unknown:
            self._lose("a write's outcome is not known (its errors were dropped)")
            return
        touched: set[Ident] = set(log.folded)
        for created, items in log.steps:
            if created:
                keys = self.table.created(items)
                touched.update(keys)
                self._schedule_created(keys, items)
                continue
            for k in items:
                if not self.table.drop(k):
                    # Deleted, but not held: the key was another entry's reply
                    # tuple (the kernel finds either direction), or one made a
                    # moment ago; which entry went is not known.
                    self._lose("a deleted entry was not held")
                    return
                touched.add(k)
        try:
            hit = self._read(watch=touched)
        except ev.EventsLost as e:
            self._lose(str(e))
            return
        if hit and not self._recheck(hit):
            self._lose("an entry written and changed at once could not be read again by key")

    # -- the event thread ---------------------------------------------------------

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            # The thread holds the digest weakly: a provider dropped without
            # close() is collected, its sockets closed, the thread ends.
            self._thread = threading.Thread(target=_follow, args=(weakref.ref(self), self._stop),
                                            name=f"ct-digest-{self.netns}", daemon=True)
            self._thread.start()

    def _turn(self, sock: ev.EventSocket, ready: bool = True) -> None:
        """One turn of the event thread: read what ``sock`` holds now, if it is still the one followed; look up what is due.

        The lookups run here too, a few at a time as their deadlines come,
        so that a call (inside a migration's hold window) finds few due.
        """
        if not ready and not self._due_now():
            return
        with self._lock:
            if sock is not self._events or not self.valid:
                return
            try:
                with gc_paused():
                    if ready:
                        self._read(limit=self.TURN)
                    if self._due_now() and not self._expire_due(limit=self.TURN):
                        self._lose("an entry due could not be looked up by key")
            except (OSError, NetlinkError) as e:  # EventsLost among them
                self._lose(str(e))

    def _due_now(self) -> bool:
        heap = self.deadlines.heap
        return bool(heap) and heap[0] <= time.monotonic() or self._walk_at <= time.monotonic()

    # -- sockets ------------------------------------------------------------------

    def _lose(self, why: str | None = None) -> None:
        """No longer trusted: stop subscribing (the kernel then builds no events for us); the next call reads whole.

        ``why`` is logged: the next call then costs a dump of the table
        (~10 s at 1,000,000 on a loaded machine), which an operator whose
        migration verifies by digest wants to be able to explain.
        """
        if why is not None and self.valid:
            log.warning("live digest of %s no longer follows the table (%s): the next call reads it whole", self.netns, why)
        self.valid = False
        self._close_events()

    def _close_events(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None

    def _request_socket(self) -> socket.socket:
        if self._requests is None:
            self._requests = ev.request_socket(self.netns)
        return self._requests

    def _close_requests(self) -> None:
        if self._requests is not None:
            self._requests.close()
            self._requests = None

    def close(self) -> None:
        """Stop following (the thread, the sockets); a later statistics() starts again from a full read."""
        self._stop.set()
        with self._lock:
            self.valid = False
            self._close_events()
            self._close_requests()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2 * self.POLL + 1)
        self._thread = None


def _follow(ref: "weakref.ref[LiveDigest]", stop: threading.Event) -> None:
    """The event thread: read events as they come, so that the queue never holds more than a moment's worth.

    Read only at each call, the kernel's queue must hold every event
    between two calls: an idle source NAT would lose events (and its next
    call, inside a migration's hold window, would be a full read) after
    BURST of them, some 50,000 connections.  Reading here costs the same
    per event, spent when it comes rather than in the call.
    """
    while not stop.is_set():
        digest = ref()
        if digest is None:
            return
        sock, poll = digest._events, digest.POLL
        del digest  # not held while waiting
        if sock is None:
            stop.wait(poll)
            continue
        try:
            ready = sock.wait(poll)
        except (OSError, ValueError):
            ready = False  # closed under us: look again
        digest = ref()
        if digest is None:
            return
        digest._turn(sock, ready)
        del digest


def _gettable(ident: Ident) -> bool:
    """Whether a GET by key reaches this entry: an IPv4 key of zone 0 (a 5-tuple with no extra); LiveDigest._schedule inlines it."""
    return len(ident) == 5 and ident[0] in _GET_PROTOCOLS and ":" not in ident[1]


_GET_PROTOCOLS: Final = frozenset({"TCP", "UDP", "ICMP"})
