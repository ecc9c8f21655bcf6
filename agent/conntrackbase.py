"""The conntrack provider's reading side: its sockets, list, statistics, lookups and streamed reads.

:class:`ConntrackBase` is what :class:`.conntrack.ConntrackProvider` (the
writes, events and admission) builds on; see :mod:`.conntrack` for how each
operation reaches the kernel.
"""

from __future__ import annotations

import builtins  # builtins.list in signatures: the class's own list() method shadows it there
import io
import socket
import subprocess
import threading
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

from .. import netns as nsmod, pool
from ..codec import Codec
from ..errors import ProviderError
from ..gcpause import gc_paused
from ..model import NatSession, SessionKey, format_digest, index_by_key
from . import ctnetlink as nl
from . import ctread, cttext
from .natnode import NatNode
from .ctbatch import invalid_keys
from .ctdigest import LiveDigest
from .ctdigesttable import WriteLog
from .provider import ApplyError, SessionProvider, Snapshot

#: Bytes read from ``conntrack -L`` per parsing step (about 10,000 lines).
LIST_CHUNK = 1 << 20
#: ``conntrack -L`` output per batch of :meth:`ConntrackProvider.batches` (~1,100 sessions):
#: small enough that a streamed get-config reply starts early, large enough
#: that the per-batch costs (an encode call, an SSH chunk) stay negligible.
STREAM_BATCH = 256 << 10
#: The kernel's entry count of the namespace the reading process lives in.
CONNTRACK_COUNT = "/proc/sys/net/netfilter/nf_conntrack_count"
#: What a read costs, in microseconds, measured here (2 cores; docs/provider.md):
#: a GET per key, encoded, answered and decoded (a key found 37-56 us, one
#: missing 6-8 us), against a ``conntrack -L`` dump (an empty table 16 ms,
#: then ~10 us per entry parsed, 10k and 100k alike).  They decide between
#: reading a batch's entries by key and reading the whole table
#: (:meth:`ConntrackProvider._reads_by_key`): by key up to ~375 + N/4 entries.
KEY_READ_US = 40.0
#: A table of at most this many entries is read by key when the live digest names them all (:meth:`ConntrackBase._read_few`):
#: ~80 ms of GETs at most, against a dump that walks the machine's whole conntrack hash with softirqs off.
FEW_ENTRIES = 2048
DUMP_START_US = 15_000.0
LINE_READ_US = 10.0


def _distinct(keys: Iterable[SessionKey], what: str) -> list[SessionKey]:
    """The keys, each once, in order; ProviderError for what is no key at all (not a 5-tuple)."""
    try:
        distinct = list(dict.fromkeys(keys))
    except TypeError as e:
        raise ProviderError(f"cannot {what}: {e} (a key is (protocol, src_address, src_port, dst_address, dst_port))") from None
    for k in distinct:
        if type(k) is not tuple or len(k) != 5:
            raise ProviderError(f"cannot {what}: {k!r} is not a key (protocol, src_address, src_port, dst_address, dst_port)")
    return distinct


def _checked_keys(keys: Iterable[SessionKey], what: str) -> tuple[list[SessionKey], dict[SessionKey, str]]:
    """The distinct keys the kernel can be asked about, in order, and why each other one cannot.

    ProviderError for what is no key at all (not a 5-tuple).
    """
    distinct = _distinct(keys, what)
    bad = invalid_keys(distinct)
    if not bad:
        return distinct, {}
    return [k for i, k in enumerate(distinct) if i not in bad], {distinct[i]: why for i, why in bad.items()}



class ConntrackBase(SessionProvider):
    """The live conntrack table of namespace ``netns``, as it is read (see :class:`.conntrack.ConntrackProvider`)."""

    def __init__(
        self,
        netns: str,
        public_addresses: Iterable[str] | None = None,
        node: NatNode | None = None,
        *,
        run: Callable[..., subprocess.CompletedProcess] = nsmod.run,
    ) -> None:
        if public_addresses is None:
            if node is None:
                raise ProviderError("ConntrackProvider: give public_addresses or a NatNode to take them from")
            public_addresses = node.cfg.public_addresses
        self.netns = netns
        self.owned: AbstractSet[str] = public_addresses if isinstance(public_addresses, pool.Owned) else frozenset(public_addresses)
        self.node = node
        self._run = run
        self._lock = threading.Lock()
        self._defaults: dict[tuple[str, object], int] | None = None
        # One socket for every lookup: opening one in the namespace costs a
        # switch there and back per call, and a lookup is meant to take well under a millisecond.
        self._reader = ctread.EntryReader(netns)
        # One socket for every write: the kernel stamps each event with the
        # port id of the socket whose request caused it, so the digest's
        # event socket has the kernel drop exactly this one's (see _writing).
        self._wsock: socket.socket | None = None
        self._wsock_lock = threading.Lock()
        self._digest: LiveDigest | None = None
        self._digest_lock = threading.Lock()
        self._digest_checked = False

    # -- reading -----------------------------------------------------------

    def list(self) -> Snapshot:
        """Every translated session of the namespace's table; the rest counted as untranslated.

        The dump is parsed while conntrack is still writing it: on a machine
        with two cores the parsing then costs little more than the dump.
        """
        return self._read()

    def _read(self, taken: dict[cttext.ReplyKey, cttext.EntryTuple] | None = None) -> Snapshot:
        """:meth:`list`; with ``taken``, also the reply keys held by entries that are not sessions."""
        few = self._read_few(taken)
        return few if few is not None else self._finish_read(self._start_read(), taken)

    def _read_few(self, taken: dict[cttext.ReplyKey, cttext.EntryTuple] | None) -> Snapshot | None:
        """:meth:`_read` by key, when the live digest names every entry and they are at most :data:`FEW_ENTRIES`; else None.

        A dump of one namespace walks the machine's whole conntrack hash
        table, and while it finds nothing of the namespace to send (a table
        of a few entries beside a large one elsewhere) the walk goes on in
        one go with the CPU's softirqs off: no packet through that CPU
        moves meanwhile.  Measured here: an idle target (its agent's own
        management connection in its table) read beside a 100k-entry source
        stopped a 1 ms probe through the source for 130-280 ms, at each of
        the three reads a migration makes of it.  A GET walks nothing.
        The same rules as the dump's parse decide what is a session
        (:func:`.ctread.entry_session`) and what a left-out entry holds
        (:func:`.ctread.entry_holds`); the functional tests compare the two.
        """
        if self._reader.count() > FEW_ENTRIES:
            # One CT_GET_STATS: a large table is dumped as before, without asking
            # (or, the first time, building) the digest for nothing.
            return None
        digest = self._live_digest()
        keys = digest.few_entries(FEW_ENTRIES) if digest is not None else None
        if keys is None:
            return None
        sessions: list[NatSession] = []
        untranslated = 0
        for i, attrs in self._reader.read(keys):
            if ctread.entry_tuple(attrs) != keys[i]:
                continue  # the key is another entry's reply tuple (a GET finds either direction): its own entry is gone
            s = ctread.entry_session(attrs)
            if s is not None:
                sessions.append(s)
                continue
            untranslated += 1
            if taken is not None:
                taken.update(ctread.entry_holds(attrs))
        return Snapshot(sessions, untranslated)

    def _start_read(self) -> subprocess.Popen[bytes] | None:
        """Start ``conntrack -L`` (apply starts it first and does its own checks meanwhile); None: the table is empty."""
        if self._known_empty():
            return None
        return subprocess.Popen(
            nsmod.ns_cmd(["conntrack", "-L"], self.netns), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )

    def _known_empty(self) -> bool:
        """Whether the kernel counts no entry at all in the namespace's table, known without a process.

        Only from inside the namespace (as the agent runs): its
        ``nf_conntrack_count`` is then this process's to read.  An idle
        target is read three times in a migration; each ``conntrack -L``
        costs a process start (~7 ms) even for an empty table.
        """
        if not self.netns or not nsmod.inside(self.netns):
            return False
        try:
            with open(CONNTRACK_COUNT) as f:
                return f.read().strip() == "0"
        except OSError:
            return False

    def _finish_read(self, proc: subprocess.Popen[bytes] | None, taken: dict[cttext.ReplyKey, cttext.EntryTuple] | None) -> Snapshot:
        """Parse what a :meth:`_start_read` process prints, while it prints it."""
        sessions: list[NatSession] = []
        untranslated = 0

        def take(data: bytes) -> None:
            nonlocal untranslated
            table = cttext.parse_table(data, taken)
            sessions.extend(table.sessions)
            untranslated += table.untranslated

        self._stream(proc, take)
        return Snapshot(sessions, untranslated)

    def statistics(self) -> dict[str, Any]:
        """The nat-statistics leaves: what :meth:`list` would count and ``model.table_digest(list().sessions)``.

        Kept up to date by the table's events (:class:`.ctdigest.LiveDigest`):
        the first call reads the table whole and subscribes; a later one
        costs the changes since the last, and includes every change the
        kernel made before it was called.  Without the kernel reporting
        every entry's end, each call reads ``conntrack -L`` (:meth:`_counted`).
        """
        digest = self._live_digest()
        if digest is None:
            return self._counted()
        got = digest.statistics()
        return {"sessions": got.sessions, "untranslated": got.untranslated, "digest": format_digest(got.digest)}

    def range_digests(self) -> dict[int, tuple[int, int]]:
        """nat-range-digests from the live digest's ranges (kept with each change); a full read without it."""
        digest = self._live_digest()
        if digest is None:
            return super().range_digests()
        return digest.ranges()

    def range_sessions(self, ranges: Collection[int]) -> builtins.list[NatSession]:
        """The sessions of these key ranges: the live digest names their keys, each is read by key (:meth:`lookup`).

        A verify that finds a few hundred sessions differing at 1,000,000
        reads some thousands of entries, not the table.  Without the live
        digest: the whole table, filtered.
        """
        digest = self._live_digest()
        if digest is None:
            return super().range_sessions(ranges)
        keys = [i for i in digest.in_ranges(ranges) if len(i) == 5]
        return self.lookup(keys)

    def _live_digest(self) -> LiveDigest | None:
        """The namespace's live digest, made at the first call; None when the kernel would not report every end.

        nf_conntrack_events=2 (the kernel's default) gives an entry made
        while nobody listened no event at all, its DESTROY included: a
        digest that follows events would keep it forever.  The NAT node and
        the agent set 1 (see natnode.sysctls).
        """
        with self._digest_lock:
            if not self._digest_checked:
                self._digest_checked = True
                try:
                    events = self._run(["sysctl", "-n", "net.netfilter.nf_conntrack_events"], self.netns).stdout.strip()
                except nsmod.CommandError:
                    events = ""
                if events == "1":
                    self._digest = LiveDigest(self.netns, self._reader, self._writer_portid)
            return self._digest

    def _counted(self) -> dict[str, Any]:
        """The nat-statistics leaves counted straight from ``conntrack -L``: no NatSession is built.

        The same lines count as sessions as in :meth:`list`, and the digest
        is ``model.table_digest(list().sessions)`` (see
        :func:`.cttext.summarize_table`); some three times cheaper than both.
        """
        total = cttext.TableSummary(0, 0, 0)

        def take(data: bytes) -> None:
            nonlocal total
            total = total.plus(cttext.summarize_table(data))

        self._stream(self._start_read(), take)
        return {"sessions": total.sessions, "untranslated": total.untranslated, "digest": format_digest(total.digest)}

    def batches(self) -> Iterator[builtins.list[NatSession]]:
        """:meth:`list`'s sessions, a batch per ~STREAM_BATCH bytes of ``conntrack -L`` output, each parsed as soon as it is printed."""
        for data in self._pieces(self._start_read(), STREAM_BATCH):
            yield cttext.parse_table(data).sessions

    def entries_xml(self, codec: Codec) -> Iterator[bytes]:
        """:meth:`batches` as the codec's XML entries, written straight from the ``conntrack -L`` text (:func:`.cttext.entries_xml`)."""
        for data in self._pieces(self._start_read(), STREAM_BATCH):
            yield cttext.entries_xml(data, codec)

    def _stream(self, proc: subprocess.Popen[bytes] | None, take: Callable[[bytes], None]) -> None:
        """Hand ``take`` what ``conntrack -L`` prints, in whole lines, while it prints them; then check its status."""
        for data in self._pieces(proc, 0):
            take(data)

    def _pieces(self, proc: subprocess.Popen[bytes] | None, at_least: int) -> Iterator[bytes]:
        """What a :meth:`_start_read` process prints, in whole lines of at least ``at_least`` bytes (but the last); then its status.

        Cyclic GC is paused meanwhile: a 100k dump makes some hundred
        thousand short-lived tuples and records, and the collections they
        trigger walk the whole heap (measured on a 100k dump in a bare
        process: 316 ms of parsing with them, 262 ms without; more in the
        agent's larger heap).  Nothing the parse makes is cyclic.
        """
        if proc is None:
            return  # an empty table (see _known_empty)
        out = proc.stdout
        assert isinstance(out, io.BufferedReader) and proc.stderr is not None  # a binary pipe, buffered (Popen's default)
        pending = b""
        try:
            with gc_paused():
                while chunk := out.read1(LIST_CHUNK):
                    pending += chunk
                    if len(pending) < at_least:
                        continue
                    cut = pending.rfind(b"\n") + 1
                    if cut:
                        yield pending[:cut]
                        pending = pending[cut:]
                if pending:
                    yield pending
            err = proc.stderr.read().decode(errors="replace")
        finally:
            # Also when the reader stops early: the tool then ends on a closed pipe.
            out.close()
            proc.stderr.close()
            rc = proc.wait()
        if rc != 0:
            raise ProviderError(f"conntrack -L in {self.netns} exited {rc}: {err.strip()}")

    def lookup(self, keys: Iterable[SessionKey]) -> builtins.list[NatSession]:
        """The sessions with these keys, as :meth:`list` would show them, in the order asked; missing keys are absent.

        One ctnetlink GET per key (the original tuple), so the cost does not
        grow with the table -- unless the keys outnumber what one dump of
        the table costs (:meth:`_reads_by_key`; a 100k write into an idle
        node), which then serves them.  A key naming an untranslated flow, or
        one this node cannot hold (not IPv4, ICMP with a dst_port), finds nothing.
        """
        wanted = _distinct(keys, "look up")
        if not self._reads_by_key(len(wanted)):
            # A key the node cannot hold is in no dump: no need to check each (100k keys: ~0.1 s).
            have = index_by_key(self.list().sessions)
            return [have[k] for k in wanted if k in have]
        valid, _ = _checked_keys(wanted, "look up")
        return self._get(valid)

    def _get(self, keys: Sequence[SessionKey]) -> builtins.list[NatSession]:
        """:meth:`lookup` of valid, distinct keys by GET."""
        out: list[NatSession] = []
        for i, attrs in self._reader.read(keys):
            s = ctread.entry_session(attrs)
            # The kernel finds a tuple in either direction: a key equal to
            # another entry's reply tuple returns that entry, which is not this key's.
            if s is not None and s.key == keys[i]:
                out.append(s)
        return out

    def _reads_by_key(self, k: int) -> bool:
        """Whether reading ``k`` entries by key (a GET each) costs less than one dump of the whole table.

        The table's size is one CT_GET_STATS away.  The constants are
        measured (docs/provider.md): a GET ~KEY_READ_US per key, a dump
        DUMP_START_US to start the tool plus LINE_READ_US per entry.
        """
        if k == 0:
            return True
        if k * KEY_READ_US <= DUMP_START_US:
            return True  # fewer keys than the tool takes to start: no need to ask
        return k * KEY_READ_US <= DUMP_START_US + self._reader.count() * LINE_READ_US

    def close(self) -> None:
        """Release the sockets and stop following events (the provider stays usable: a later call opens what it needs)."""
        if self._digest is not None:
            self._digest.close()
        self._reader.close()
        with self._wsock_lock:
            if self._wsock is not None:
                self._wsock.close()
                self._wsock = None

    def _writer(self) -> socket.socket:
        """The one socket this provider writes with (opened at first use, kept for life)."""
        with self._wsock_lock:  # asked for by writes and by the digest's subscription, from any thread
            if self._wsock is None:
                self._wsock = nl.open_socket(self.netns)
            return self._wsock

    def _writer_portid(self) -> int:
        return self._writer().getsockname()[0]

    @contextmanager
    def _writing(self) -> Iterator[WriteLog]:
        """Around a write through :meth:`_writer`: the digest is told what the kernel confirmed (see LiveDigest.writing)."""
        if self._digest is None:
            yield WriteLog()
            return
        # A refusal (ApplyError) comes after the undo: the log holds both.
        with self._digest.writing(complete=(ApplyError,)) as log:
            yield log

    def public_addresses(self) -> AbstractSet[str]:
        """The addresses this node translates to (with their ports when it was given a pool)."""
        return self.owned
