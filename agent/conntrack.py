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
* apply: :mod:`.ctbulk` and :mod:`.ctnetlink`: new sessions (one
  precompiled struct per protocol, :mod:`.ctlayout`, packs each create
  message; some three times faster than the tool's own ``conntrack -R``),
  in-place updates and the deletes of replaced sessions.
* delete: :mod:`.ctbulk`, one message per key (one struct packs it),
  batched; all: one dump, then the same.
* watch: ``conntrack -E`` in the namespace, read by a thread (:mod:`.ctwatch`).

The reading side (list, statistics, lookup, streamed reads) is
:class:`.conntrackbase.ConntrackBase`'s; the writes, events and admission are here.

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
from typing import Callable, Collection, Iterable, Sequence, cast

from ..errors import ProviderError
from ..gcpause import gc_paused
from ..model import NatSession, SessionKey, format_key, index_by_key
from . import ctnetlink as nl
from .ctbulk import CREATE_BATCH, create_sessions, delete_tuples
from . import ctread, cttext
from .natnode import NatNode
from .conntrackbase import ConntrackBase, _checked_keys
from .ctbatch import ApplyPlan, DEFAULT_TIMEOUT_SYSCTL, held_elsewhere, invalid_entries, plan_apply, timeout_key, validate
from .ctdigesttable import WriteLog
from .ctwatch import _ConntrackWatch
from .provider import ApplyError, BeforeCreate, PartsCheck, Watch, as_written, check_batch, check_batch_by_holders

__all__ = ["ApplyPlan", "ConntrackProvider", "invalid_entries", "plan_apply", "validate"]


class ConntrackProvider(ConntrackBase):
    """The live conntrack table of the NAT node in namespace ``netns``.

    ``public_addresses`` are the addresses the node translates to (default:
    the node's public addresses), a :class:`~natmig.pool.Owned` when their
    ports are checked too (the agent's ``--public-address A:LOW-HIGH``); ``node`` backs :meth:`set_admission` and
    :meth:`admission` (without one they raise :class:`ProviderError`).
    """

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

    def apply(self, sessions: Sequence[NatSession], before_create: BeforeCreate | None = None) -> None:
        """Create or replace a batch, all or nothing (see the module docstring); handshake states are written as ESTABLISHED (:func:`as_written`)."""
        batch = list(as_written(sessions))
        with self._lock, gc_paused():
            if self._reads_by_key(len(batch)):
                self._apply_by_key(batch, before_create)
            else:
                self._apply_by_dump(batch, before_create)

    def _apply_by_key(self, batch: builtins.list[NatSession], before_create: BeforeCreate | None = None) -> None:
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
            self._write(batch, existing, before_create)
        except ApplyError as e:
            # _write has undone what it wrote: the table is as before, and
            # its holders are the ones that made the kernel refuse.
            named = self._check_by_key(batch)
            for k, why in e.problems.items():
                named.setdefault(k, why)  # refused for a reason no check sees (an untranslated entry with the key)
            raise ApplyError(named) from None

    def _apply_by_dump(self, batch: builtins.list[NatSession], before_create: BeforeCreate | None = None) -> None:
        """apply with one read of the whole table, for a batch about as large as the table (or larger)."""
        taken: dict[cttext.ReplyKey, cttext.EntryTuple] = {}
        few = self._read_few(taken)
        # Else the read of the table starts first and comes up while the entries are validated.
        reading = self._start_read() if few is None else None
        try:
            if few is not None and len(batch) > 2 * CREATE_BATCH:
                # Into a table of a few entries (a migration's target): creates only, checked part by part while
                # the kernel creates the parts before, not all ahead of the first create (100k: ~140 ms).  A key
                # the table holds stops it too: replacing one is the whole check's to plan.
                held = index_by_key(few.sessions)
                parts = PartsCheck(held, self.owned)

                def check(part: builtins.list[NatSession]) -> None:
                    if invalid_entries(part) or held_elsewhere(part, taken) or any(s.key in held for s in part) or not parts.plainly_acceptable(part):
                        raise _PartRefused()

                try:
                    self._write(batch, {}, before_create, check)
                    return
                except _PartRefused:
                    pass  # undone: the whole batch is checked below, and its offenders named
            problems = invalid_entries(batch)
            existing = index_by_key((few if few is not None else self._finish_read(reading, taken)).sessions)
            problems.update(check_batch(_without(batch, problems), existing, self.owned))
            # Sessions only check each other; an untranslated connection
            # holding the reply tuple would make the kernel refuse the entry.
            problems.update(held_elsewhere(_without(batch, problems), taken))
            if problems:
                raise ApplyError(problems)
            self._write(batch, existing, before_create)
        finally:
            if reading is not None and reading.stdout is not None and not reading.stdout.closed:  # a check failed before the read
                reading.kill()
                reading.communicate()

    def _write(self, batch: builtins.list[NatSession], existing: dict[SessionKey, NatSession], before_create: BeforeCreate | None = None,
               check: Callable[[builtins.list[NatSession]], None] | None = None) -> None:
        """Write a batch checked already (or, with ``check``, checked as its creates go out: see :func:`_created`)."""
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
                    failed = _created(self, plan.create, log, before_create, check)
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


def _created(p: ConntrackProvider, items: list[tuple[NatSession, int]], log: WriteLog, before_create: BeforeCreate | None = None,
             check: Callable[[list[NatSession]], None] | None = None) -> dict[int, int]:
    """Create (session, timeout) items through the provider's writer; the digest gets those the kernel took.

    ``before_create``: told each batch's keys before the kernel gets it (SessionProvider.apply).
    ``check``: run on each batch's sessions before that too, raising to stop (what was created is the caller's to undo).
    """
    sent: list[tuple[int, int]] = []
    #: batches folded into the live digest while the kernel created the next (start -> stop)
    folded: dict[int, int] = {}

    def alongside(start: int, stop: int) -> None:
        if log.created_early([s for s, _ in items[start:stop]]):
            folded[start] = stop

    def before(start: int, stop: int) -> None:
        part = [s for s, _ in items[start:stop]]
        if check is not None:
            check(part)
        if before_create is not None:
            before_create([s.key for s in part])

    try:
        failed = create_sessions(p.netns, items, p._writer(), sent, alongside if log.early is not None else None,
                                 before if check is not None or before_create is not None else None)
    except BaseException:
        if folded:
            log.lost()  # which of the batches folded early the kernel refused is not known here
        raise
    if errno.ENOBUFS in failed.values():
        log.lost()  # some errors were dropped: which items exist is not known
        return failed
    took = dict(sent)
    if failed or folded.keys() != took.keys():
        # What the early fold took of the kernel's refusals, and of batches it never got, goes out again.
        log.not_created(items[i][0].key for a, b in folded.items() for i in range(a, b) if i in failed or a not in took)
        log.created([items[i][0] for a, b in sent if a not in folded for i in range(a, b) if i not in failed])
    return failed


def _deleted(p: ConntrackProvider, keys: Sequence[SessionKey], log: WriteLog) -> dict[int, int]:
    """Delete by key through the provider's writer; every errno by index (ENOENT: there was none); the digest gets the rest."""
    failed = delete_tuples(p.netns, keys, p._writer())
    if errno.ENOBUFS in failed.values():
        log.lost()
    else:
        log.deleted(k for i, k in enumerate(keys) if i not in failed)
    return failed


class _PartRefused(ProviderError):
    """A part of a batch checked as it went out (:meth:`ConntrackProvider._apply_by_dump`) would be refused."""


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
