"""The session provider over Linux conntrack in a NAT node's namespace.

How each operation reaches the kernel (measured, see docs/provider.md):

* list: ``conntrack -L`` in the namespace, parsed by :mod:`.cttext`.
* statistics: from memory, kept up to date by the table's events
  (:mod:`.ctdigest`): the first call reads the table whole, each later one
  costs what changed since (and the kernel's removal of what has expired);
  the apply and delete below tell it what they wrote.  Where the kernel
  would not report every entry's end (nf_conntrack_events not 1): the read
  of ``list``, counted and digested by :mod:`.cttext` without building the
  sessions.
* lookup: one ctnetlink GET per key over a socket kept open
  (:class:`.ctread.EntryReader`): no process start, no table dump.
* check: one GET per reply tuple of the batch: who holds it, a session or
  an entry that is not one.
* apply: :mod:`.ctnetlink`: new sessions (one precompiled struct per
  protocol packs each create message; some three times faster than the
  tool's own ``conntrack -R``), in-place updates and the deletes of
  replaced sessions.
* delete: :mod:`.ctnetlink`, one message per key (one struct packs it),
  batched; all: one dump, then the same.
* watch: ``conntrack -E`` in the namespace, read by a thread.

Writing or deleting K sessions costs O(K) at any table size: lookup, check
and apply read the K entries by key, unless K is about as large as the
table (:meth:`ConntrackProvider._reads_by_key` weighs a GET per key against
one dump, the table's size being one CT_GET_STATS away), when one dump
serves them.

apply is all-or-nothing.  By key: every entry is validated and the batch
checked against itself (:func:`.provider.check_batch_by_holders`); a reply
tuple held by the rest of the table is the kernel's to refuse -- every
session is created with its public port pinned, so a create on a taken
reply tuple fails with EEXIST rather than getting another port -- and then
what was written is undone and each offender named by a GET of its reply
tuple, in the words of check_batch and held_elsewhere.  By dump: the batch
is checked against the whole table (:func:`check_batch`, and the tuples of
untranslated entries: :func:`.ctbatch.held_elsewhere`) before anything is
written.  Either way, if the kernel refuses part of it (a session created
by traffic in between), what was written is undone: created sessions are
deleted, replaced ones recreated, updated ones set back.
"""

from __future__ import annotations

import builtins  # builtins.list in signatures: the class's own list() method shadows it there
import errno
import io
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence, cast

from .. import netns as nsmod, pool
from ..codec import Codec
from ..errors import ProviderError
from ..gcpause import gc_paused
from ..model import NatSession, SessionKey, format_digest, format_key, index_by_key
from . import ctnetlink as nl
from .ctbulk import create_sessions, delete_tuples
from . import ctread, cttext
from .natnode import NatNode
from .ctbatch import ApplyPlan, DEFAULT_TIMEOUT_SYSCTL, held_elsewhere, invalid_entries, invalid_keys, plan_apply, timeout_key, validate
from .ctdigest import LiveDigest
from .ctdigesttable import WriteLog
from .provider import ApplyError, SessionEvent, SessionProvider, Snapshot, Watch, as_written, check_batch, check_batch_by_holders

__all__ = ["ApplyPlan", "ConntrackProvider", "invalid_entries", "plan_apply", "validate"]

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


class ConntrackProvider(SessionProvider):
    """The live conntrack table of the NAT node in namespace ``netns``.

    ``public_addresses`` are the addresses the node translates to (default:
    the node's public addresses), a :class:`~natmig.pool.Owned` when their
    ports are checked too (the agent's ``--public-address A:LOW-HIGH``); ``node`` backs :meth:`set_admission` and
    :meth:`admission` (without one they raise :class:`ProviderError`).
    """

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
        return self._finish_read(self._start_read(), taken)

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

    # -- writing -----------------------------------------------------------

    def check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        """What :meth:`apply` would refuse in the table as it is now, ``freed`` gone first: check_batch's problems, and held_elsewhere's.

        By the batch's reply tuples (a GET each: who holds it, in either
        direction), or, for a batch about as large as the table, by one dump.
        Entries :func:`validate` refuses are apply's to name.
        """
        batch = list(sessions)
        with gc_paused():
            if not self._reads_by_key(len(batch)):
                taken: dict[cttext.ReplyKey, cttext.EntryTuple] = {}
                existing = {k: x for k, x in index_by_key(self._read(taken).sessions).items() if k not in freed}
                problems = check_batch(batch, existing, self.owned)
                problems.update(held_elsewhere(_without(batch, problems), taken))
                return problems
            return self._check_by_key(batch, freed)

    def _check_by_key(self, batch: builtins.list[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        """:meth:`check` by a GET of each entry's reply tuple: whatever the kernel holds it with is named."""
        holders, taken = self._holders(_without(batch, invalid_entries(batch)))
        problems = check_batch_by_holders(batch, holders, self.owned, freed)
        problems.update(held_elsewhere(_without(batch, problems), taken))
        return problems

    def _holders(self, batch: builtins.list[NatSession]) -> tuple[dict[cttext.ReplyKey, SessionKey], dict[cttext.ReplyKey, cttext.EntryTuple]]:
        """Who holds each entry's reply tuple: sessions by key, and the original tuple of entries that are not sessions.

        The two halves are what check_batch and held_elsewhere know from a
        dump (its sessions; its ``taken``).  A session found whose own reply
        key is another (its original tuple is the one asked) is no holder a
        dump would name: the kernel refuses such an entry by itself.
        """
        distinct = {s.reply_key: nl.reply_tuple(s) for s in batch}
        replies, asked = list(distinct), list(distinct.values())
        holders: dict[cttext.ReplyKey, SessionKey] = {}
        taken: dict[cttext.ReplyKey, cttext.EntryTuple] = {}
        for i, attrs in self._reader.read(asked, nl.ICMP_ECHO_REPLY):
            r = replies[i]
            held = ctread.entry_session(attrs)
            if held is None:
                t = ctread.entry_tuple(attrs)
                if t is not None:
                    taken[r] = t
            elif held.reply_key == r:
                holders[r] = held.key
        return holders, taken

    def apply(self, sessions: Sequence[NatSession]) -> None:
        """Create or replace a batch, all or nothing (see the module docstring); handshake states are written as ESTABLISHED (:func:`as_written`)."""
        batch = list(as_written(sessions))
        with self._lock, gc_paused():
            if self._reads_by_key(len(batch)):
                self._apply_by_key(batch)
            else:
                self._apply_by_dump(batch)

    def _apply_by_key(self, batch: builtins.list[NatSession]) -> None:
        """apply reading only the batch's entries: the kernel refuses a reply tuple the table holds.

        Checked before writing: the entries themselves and the batch against
        itself.  The rest of check_batch's rule is the kernel's: a create
        whose reply tuple another entry holds fails with EEXIST (the public
        port is pinned), and what was written (creates of new keys: a
        refusal deletes them, the table is as before) is undone.  Only then
        is each entry's reply tuple looked up, so that every offender is
        named as a read of the whole table would name it.
        """
        problems = invalid_entries(batch)
        rest = _without(batch, problems)
        if problems or check_batch_by_holders(rest, {}, self.owned):
            # Named in full, as check_batch over the whole table names them:
            # the table's holders too (what it finds is a superset).
            problems.update(self._check_by_key(rest))
            raise ApplyError(problems)
        existing = index_by_key(self._get([s.key for s in batch]))
        if any((old := existing.get(s.key)) is not None and old.public != s.public for s in batch):
            # A session moved to another public port is deleted before its
            # new form is created: were that refused, the old one could only
            # be recreated (its counters lost).  Such a batch (rare: a key
            # re-translated) is checked first, so that a refusal touches nothing.
            problems = self._check_by_key(batch)
            if problems:
                raise ApplyError(problems)
        try:
            self._write(batch, existing)
        except ApplyError as e:
            # _write has undone what it wrote: the table is as before, and
            # its holders are the ones that made the kernel refuse.
            named = self._check_by_key(batch)
            for k, why in e.problems.items():
                named.setdefault(k, why)  # refused for a reason no check sees (an untranslated entry with the key)
            raise ApplyError(named) from None

    def _apply_by_dump(self, batch: builtins.list[NatSession]) -> None:
        """apply with one read of the whole table, for a batch about as large as the table (or larger)."""
        # The read of the table starts first and comes up while the entries are validated.
        reading = self._start_read()
        try:
            problems = invalid_entries(batch)
            taken: dict[cttext.ReplyKey, cttext.EntryTuple] = {}
            existing = index_by_key(self._finish_read(reading, taken).sessions)
            problems.update(check_batch(_without(batch, problems), existing, self.owned))
            # Sessions only check each other; an untranslated connection
            # holding the reply tuple would make the kernel refuse the entry.
            problems.update(held_elsewhere(_without(batch, problems), taken))
            if problems:
                raise ApplyError(problems)
            self._write(batch, existing)
        finally:
            if reading is not None and reading.stdout is not None and not reading.stdout.closed:  # a check failed before the read
                reading.kill()
                reading.communicate()

    def _write(self, batch: builtins.list[NatSession], existing: dict[SessionKey, NatSession]) -> None:
        plan = plan_apply(batch, existing, self._timeouts(batch))
        with self._writing() as log:
            undo = _Undo(self, existing, log)
            try:
                if plan.replace:
                    failed = _deleted(self, [s.key for s in plan.replace], log)
                    undo.replaced = plan.replace
                    self._refuse_on({i: e for i, e in failed.items() if e != errno.ENOENT}, plan.replace,
                                    "could not remove the session it replaces")
                if plan.create:
                    undo.created = plan.create
                    failed = _created(self, plan.create, log)
                    if failed:
                        self._refuse_on(failed, [s for s, _ in plan.create], "kernel refused to create it")
                if plan.update:
                    updated = [s for s, _ in plan.update]
                    undo.updated = updated
                    ops = [nl.update_op(s, t) for s, t in plan.update]
                    # An update changes no key or mapping: nothing for the digest.
                    self._refuse_on(nl.run_ops(self.netns, ops, self._writer()), updated, "kernel refused to update it")
            except ProviderError:
                # A refusal, or the netlink socket failing part way: either way
                # some of the batch may be written, and apply is all or nothing.
                undo.run()
                raise

    def _refuse_on(self, failed: dict[int, int], items: builtins.list[NatSession], what: str) -> None:
        if failed:
            raise ApplyError({items[i].key: f"{what}: {nl.describe(e)}" for i, e in failed.items()})

    def _timeouts(self, batch: builtins.list[NatSession]) -> builtins.list[int]:
        """Each entry's timeout, the node's default for its protocol and state where absent."""
        if all(s.timeout is not None for s in batch):
            return cast(builtins.list[int], [s.timeout for s in batch])  # none is None (all() above)
        defaults = self._default_timeouts()
        return [s.timeout if s.timeout is not None else defaults[timeout_key(s)] for s in batch]

    def _default_timeouts(self) -> dict[tuple[str, object], int]:
        if self._defaults is None:
            names = sorted(set(DEFAULT_TIMEOUT_SYSCTL.values()))
            out = self._run(["sysctl", "-n", *(f"net.netfilter.{n}" for n in names)], self.netns).stdout.split()
            by_name = dict(zip(names, (int(v) for v in out)))
            self._defaults = {k: by_name[n] for k, n in DEFAULT_TIMEOUT_SYSCTL.items()}
        return self._defaults

    def delete(self, keys: Iterable[SessionKey] | None = None) -> int:
        """Delete by key (missing keys ignored) or every translated session; how many went.

        By key: a CT_DELETE per key, packed by one struct and sent in
        batches, no read of the table.  All: one dump of the table, then its
        sessions deleted the same way; what is not a session (the agent's
        own management connections, untranslated flows) stays.
        """
        with self._lock:
            if keys is None:
                victims = [s.key for s in self.list().sessions]
            else:
                victims, bad = _checked_keys(keys, "delete")
                if bad:
                    raise ProviderError("cannot delete: " + "; ".join(f"{format_key(k)}: {w}" for k, w in bad.items()))
            with self._writing() as log:
                errors = _deleted(self, victims, log)
            failed = {i: e for i, e in errors.items() if e != errno.ENOENT}
            count = len(victims) - len(errors)
            if failed:
                shown = "; ".join(f"{format_key(victims[i])}: {nl.describe(e)}" for i, e in list(failed.items())[:10])
                raise ProviderError(f"kernel refused to delete {len(failed)} session(s) ({count} deleted): {shown}")
            return count

    # -- events and admission ----------------------------------------------

    def watch(self) -> Watch:
        """Follow new and destroyed translated sessions of the namespace (``conntrack -E``)."""
        return _ConntrackWatch(self.netns)

    def set_admission(self, admit: bool) -> None:
        """Admit or drop packets that would create a new session (through the NAT node's ruleset)."""
        self._need_node().set_admission(admit)

    def admission(self) -> bool:
        """Whether new sessions are admitted, read from the node's ruleset."""
        return self._need_node().admission()

    def held(self) -> int | None:
        """Packets this process holds for the node now (0 before it first held: nothing is)."""
        if self.node is None:
            return None
        stats = self.node.hold_stats()
        return stats.held if stats is not None else 0

    def _need_node(self) -> NatNode:
        if self.node is None:
            raise ProviderError(f"ConntrackProvider({self.netns}): admission control needs the NatNode (pass node=)")
        return self.node


def _without(batch: list[NatSession], problems: dict[SessionKey, str]) -> list[NatSession]:
    """The entries of ``batch`` not yet refused (the batch itself when none is: no copy of 100k entries)."""
    return [s for s in batch if s.key not in problems] if problems else batch


def _created(p: ConntrackProvider, items: list[tuple[NatSession, int]], log: WriteLog) -> dict[int, int]:
    """Create (session, timeout) items through the provider's writer; the digest gets those the kernel took."""
    sent: list[tuple[int, int]] = []
    failed = create_sessions(p.netns, items, p._writer(), sent)
    if errno.ENOBUFS in failed.values():
        log.lost()  # some errors were dropped: which items exist is not known
    else:
        log.created([items[i][0] for a, b in sent for i in range(a, b) if i not in failed])
    return failed


def _deleted(p: ConntrackProvider, keys: Sequence[SessionKey], log: WriteLog) -> dict[int, int]:
    """Delete by key through the provider's writer; every errno by index (ENOENT: there was none); the digest gets the rest."""
    failed = delete_tuples(p.netns, keys, p._writer())
    if errno.ENOBUFS in failed.values():
        log.lost()
    else:
        log.deleted(k for i, k in enumerate(keys) if i not in failed)
    return failed


class _Undo:
    """What apply wrote so far, and how to take it back."""

    def __init__(self, provider: ConntrackProvider, existing: dict[SessionKey, NatSession], log: WriteLog) -> None:
        self.provider = provider
        self.existing = existing
        self.log = log
        self.created: list[tuple[NatSession, int]] = []  # (session, timeout), as planned
        self.replaced: list[NatSession] = []
        self.updated: list[NatSession] = []

    def run(self) -> None:
        """Take back what was written (best effort: the batch is being refused anyway)."""
        p = self.provider
        # Delete only what carries the translation this batch gave it: an
        # entry that traffic created meanwhile under the same key stays.
        now = index_by_key(p.lookup([s.key for s, _ in self.created]))
        ours = [s for s, _ in self.created if (got := now.get(s.key)) is not None and got.public == s.public]
        _deleted(p, [s.key for s in ours], self.log)
        back = [(o, o.timeout or 1) for o in self.replaced]
        failed = nl.run_ops(p.netns, [nl.create_op(o, t) for o, t in back], p._writer())
        if errno.ENOBUFS in failed.values():
            self.log.lost()
        else:
            self.log.created([o for i, (o, _) in enumerate(back) if i not in failed])
        olds = [self.existing[s.key] for s in self.updated]
        nl.run_ops(p.netns, [nl.update_op(o, o.timeout or 1) for o in olds], p._writer())


def _subscribed(pid: int) -> bool:
    """Whether process ``pid`` holds a netfilter netlink socket that joined multicast groups.

    ``ip netns exec`` execs conntrack in place, so the pid is conntrack's;
    /proc/PID/net/netlink lists the sockets of its namespace, and the
    process's fds say which of them are its own.
    """
    try:
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        with open(f"/proc/{pid}/net/netlink") as f:
            for line in f:
                col = line.split()
                # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
                if len(col) >= 10 and col[1] == str(nl.NETLINK_NETFILTER) and col[9] in inodes and int(col[3], 16):
                    return True
    except (OSError, ValueError):
        return False
    return False


class _ConntrackWatch(Watch):
    """Reads ``conntrack -E -e NEW,DESTROY`` of a namespace in a thread, into a queue."""

    # conntrack subscribes some time after it started (longer on a busy
    # machine); events before that are lost, so watch() returns only once
    # the kernel shows its socket joined the event groups, or after this long.
    READY_TIMEOUT = 5.0

    def __init__(self, netns: str) -> None:
        self.q: queue.Queue[SessionEvent | None] = queue.Queue()
        self.ended = False
        self.proc = subprocess.Popen(
            nsmod.ns_cmd(["conntrack", "-E", "-e", "NEW,DESTROY"], netns),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1,
        )
        self.thread = threading.Thread(target=self._read, name=f"ct-watch-{netns}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.READY_TIMEOUT
        while not _subscribed(self.proc.pid) and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            time.sleep(0.005)
        if self.proc.poll() is not None:
            raise ProviderError(f"conntrack -E in {netns} exited {self.proc.returncode}")

    def _read(self) -> None:
        assert self.proc.stdout is not None
        try:
            for line in self.proc.stdout:
                ev = cttext.parse_event(line)
                if ev is not None:
                    self.q.put(SessionEvent(ev.kind, ev.session))
        except (OSError, ValueError):
            pass  # the pipe was closed under us by close()
        finally:
            # Wake a reader blocked in get(): the stream has ended.
            self.ended = True
            self.q.put(None)

    def get(self, timeout: float | None = None) -> SessionEvent | None:
        """The next event, or None when ``timeout`` passes first or the stream has ended."""
        if self.ended and self.q.empty():
            return None
        try:
            return self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stop the reader process (our own child, by pid)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(2)

