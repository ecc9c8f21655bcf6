"""The agent's datastores (running, candidate), their locks, and edit-config semantics.

No XML here: the RPC layer hands over decoded :class:`~natmig.codec.EditEntry`
records, and this module decides what changes and applies it through the
session provider, all or nothing.  Running *is* the provider's live table;
the candidate is a private copy taken when it is first edited.

Commit applies the candidate's changes (entries the candidate added, changed
or removed since it was copied from running).  Sessions that traffic created
on running meanwhile are kept: on a live NAT table, "running := candidate"
taken literally would tear down connections nobody asked to touch.

The candidate's two parts are copied apart: nat-control at the first edit,
the session list only when an edit, a read or a validate needs it.  A
migration's candidate edits that only stop admission must not read a 100k
table (~0.5 s) to copy a list they never touch.

A confirmed commit (RFC 6241 8.4) is rolled back by undoing what it changed
(:mod:`.confirmed`), when its timeout passes, when its session ends (without
<persist>), on <cancel-commit>, or when the agent stops or restarts.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Generator, Iterable, Iterator, Sequence

from ..codec import Codec, EditEntry
from ..errors import CodecError, ProviderError
from ..model import FIELD_NAMES, NatSession, SessionKey, format_key
from ..wire.problems import DatastoreError, EditRequest, Problem, problems_of_codec, refuse
from .confirmed import DEFAULT_TIMEOUT, MAX_TIMEOUT, ConfirmedCommits, Journal, JournalError, Undo
from .provider import ApplyError, ReplyKey, SessionProvider, check_batch, check_batch_by_holders, yields_port

log = logging.getLogger(__name__)

DATASTORES = ("running", "candidate")
DEFAULT_OPERATIONS = ("merge", "replace", "none")
TEST_OPTIONS = ("test-then-set", "set", "test-only")
ERROR_OPTIONS = ("stop-on-error", "continue-on-error", "rollback-on-error")
CONTROL_DEFAULTS = {"admit-new-sessions": True}


@dataclass
class Plan:
    """What an edit changes: entries to write (created or replaced) and keys to delete."""

    upserts: dict[SessionKey, NatSession] = field(default_factory=dict)
    deletes: set[SessionKey] = field(default_factory=set)
    control: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)


def _values_of(s: NatSession) -> dict[str, Any]:
    return {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None}


def _complete(codec: Codec, values: dict[str, Any], problems: list[Problem]) -> NatSession | None:
    try:
        return codec.complete(values)
    except CodecError as e:
        problems.extend(problems_of_codec(e))
        return None


def _op_merge(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    values = {**_values_of(old), **e.values} if old is not None else e.values
    s = _complete(codec, values, plan.problems)
    if s is not None and s != old:
        plan.upserts[e.key] = s


def _op_replace(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    s = _complete(codec, e.values, plan.problems)
    if s is not None and s != old:
        plan.upserts[e.key] = s


def _op_create(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is not None:
        plan.problems.append(Problem("data-exists", "the entry already exists", format_key(e.key)))
        return
    _op_replace(codec, e, old, plan)


def _op_delete(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is None:
        plan.problems.append(Problem("data-missing", "the entry does not exist", format_key(e.key)))
        return
    plan.deletes.add(e.key)


def _op_remove(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    if old is not None:
        plan.deletes.add(e.key)


def _op_none(codec: Codec, e: EditEntry, old: NatSession | None, plan: Plan) -> None:
    # default-operation none: an entry without its own operation only navigates,
    # so it must exist (RFC 6241 7.2).
    if old is None:
        plan.problems.append(Problem("data-missing", "the entry does not exist (default-operation none)", format_key(e.key)))


#: edit-config operation -> how one list entry is planned (RFC 6241 7.2).
ENTRY_OPERATIONS: dict[str, Callable[[Codec, EditEntry, NatSession | None, Plan], None]] = {
    "merge": _op_merge,
    "replace": _op_replace,
    "create": _op_create,
    "delete": _op_delete,
    "remove": _op_remove,
    "none": _op_none,
}


#: Operations that write an entry the datastore does not hold yet.
_WRITES = frozenset({"merge", "replace", "create"})


def plan_edit(codec: Codec, current: dict[SessionKey, NatSession], control: dict[str, Any] | None, req: EditRequest, default_operation: str = "merge") -> Plan:
    """What ``req`` changes in a datastore holding ``current`` and ``control``; problems included.

    Pure: nothing is applied.  ``current`` must hold every entry the request
    names (running: the ones it names are looked up), or the whole list for
    an operation on the list or default-operation replace.  ``control`` may
    be None when the request does not touch nat-control.  With
    default-operation replace the request's entries become the whole list
    (top-level nodes absent from the request, such as nat-control, are left
    as they are).
    """
    plan = Plan()
    if req.list_operation == "delete" and not current:
        plan.problems.append(Problem("data-missing", "the list has no entries to delete", "nat-session"))
    if req.list_operation in ("delete", "remove"):
        plan.deletes.update(current)
    get = current.get
    upserts = plan.upserts
    complete = codec.complete
    for e in req.entries:
        op = e.operation or default_operation
        key = e.key
        if plan.deletes and key in plan.deletes and op not in ("delete", "remove"):
            # Deleting the whole list and writing an entry of it in one request.
            plan.deletes.discard(key)
            ENTRY_OPERATIONS["replace"](codec, e, None, plan)
            continue
        old = get(key)
        if old is None and op in _WRITES:
            # The common case (a table written into a node that lacks it):
            # what _op_merge, _op_replace and _op_create all do for a new entry.
            try:
                upserts[key] = complete(e.values)
            except CodecError as err:
                plan.problems.extend(problems_of_codec(err))
            continue
        ENTRY_OPERATIONS[op](codec, e, old, plan)
    if default_operation == "replace":
        named = {e.key for e in req.entries}
        plan.deletes.update(k for k in current if k not in named)
    if _touches_control(req):
        assert control is not None, "nat-control is edited: its current values are needed"
        cop = req.control_operation or default_operation
        if cop in ("delete", "remove"):
            if cop == "delete" and control == CONTROL_DEFAULTS:
                plan.problems.append(Problem("data-missing", "nat-control holds only defaults", "nat-control"))
            new = dict(CONTROL_DEFAULTS)
        elif cop in ("replace", "create"):
            new = {**CONTROL_DEFAULTS, **(req.control or {})}
        elif cop == "none":
            new = control
        else:
            new = {**control, **(req.control or {})}
        if new != control:
            plan.control = new
    return plan


def _touches_control(req: EditRequest) -> bool:
    return req.control is not None or req.control_operation is not None


def provider_problem(key: SessionKey, why: str) -> Problem:
    """A provider's refusal of one entry (see check_batch) as a NETCONF problem."""
    if "already used" in why:
        return Problem("operation-failed", why, format_key(key), "translated_port", app_tag="data-not-unique")
    if "not an address of this node" in why:
        return Problem("invalid-value", why, format_key(key), "translated_address")
    return Problem("operation-failed", why, format_key(key))


@dataclass(frozen=True)
class PendingCommit:
    """A pending confirmed commit as :meth:`Datastore.pending_commit` shows it."""

    #: the session that issued the latest confirmed commit of the series.
    session: int
    #: the persist token (None: the commit dies with its session).
    persist: str | None
    #: when it is rolled back unless confirmed (epoch seconds).
    deadline: float
    #: sessions the series created (a rollback deletes them).
    created: int
    #: sessions the series replaced or deleted (a rollback writes their old values back).
    restored: int
    #: admit-new-sessions before the series (None: the series did not change it).
    admission: bool | None


class Datastore:
    """Running (the provider's live table) and candidate, with locks and confirmed commits; thread-safe.

    ``describe`` names a session in errors (the server sets it from its
    session records: user, address, login time).  ``journal`` keeps a
    pending confirmed commit's undo across an agent restart.
    """

    def __init__(self, provider: SessionProvider, codec: Codec, journal: Journal | None = None) -> None:
        self.provider = provider
        self.codec = codec
        self.journal = journal or Journal(None)
        self.describe: Callable[[int], str] = lambda sid: f"session {sid}"
        self._mutex = threading.RLock()
        self._locks: dict[str, int] = {}
        #: the candidate's sessions; None: the same as running's (not copied yet).
        self._cand: dict[SessionKey, NatSession] | None = None
        self._cand_base: dict[SessionKey, NatSession] = {}
        #: the candidate's sessions by reply tuple, kept with it once taken (see _check_against); None: not taken.
        self._cand_replies: dict[ReplyKey, SessionKey] | None = None
        #: the candidate's nat-control; None: no candidate taken (it is running).
        self._cand_control: dict[str, Any] | None = None
        self._cand_base_control: dict[str, Any] = {}
        self.confirmed = ConfirmedCommits(provider, self.journal, self._mutex, self._reset_candidate)

    # ----------------------------------------------------------------- locks

    def lock(self, name: str, sid: int) -> None:
        """Lock a datastore for session ``sid`` (lock-denied when held, RFC 6241 7.5)."""
        self._check_name(name)
        with self._mutex:
            holder = self._locks.get(name)
            if holder is not None:
                raise refuse("lock-denied", f"{name} is locked by {self.describe(holder)}", type="protocol", info={"session-id": str(holder)})
            if name == "candidate" and self._candidate_dirty():
                raise refuse("lock-denied", "the candidate has uncommitted changes; discard-changes or commit first", type="protocol", info={"session-id": "0"})
            self._locks[name] = sid

    def unlock(self, name: str, sid: int) -> None:
        """Release a lock held by ``sid``."""
        self._check_name(name)
        with self._mutex:
            holder = self._locks.get(name)
            if holder != sid:
                why = "it is not locked" if holder is None else f"it is locked by {self.describe(holder)}"
                raise refuse("operation-failed", f"cannot unlock {name}: {why}", type="protocol", info={"session-id": str(holder or 0)})
            del self._locks[name]
            # RFC 6241 8.3.5.2: releasing the candidate lock... does not discard;
            # only session termination does (see release_session).

    def release_session(self, sid: int) -> None:
        """A session ended: drop its locks; a candidate it had locked loses its changes.

        A confirmed commit it issued without <persist> is rolled back now (RFC 6241 8.4.1).
        """
        with self._mutex:
            for name in [n for n, h in self._locks.items() if h == sid]:
                del self._locks[name]
                if name == "candidate":
                    self._reset_candidate()
                log.info("session %d ended: released lock of %s", sid, name)
            p = self.confirmed.pending
            if p is not None and p.persist is None and p.owner == sid:
                self.confirmed.roll_back(f"session {sid}, which issued it without <persist>, ended")

    def lock_holder(self, name: str) -> int | None:
        """The session holding the lock of ``name``, if any."""
        return self._locks.get(name)

    def _check_write(self, name: str, sid: int) -> None:
        holder = self._locks.get(name)
        if holder is not None and holder != sid:
            raise refuse("in-use", f"{name} is locked by {self.describe(holder)}", type="protocol", info={"session-id": str(holder)})
        self._check_not_pending_elsewhere(sid)

    def _check_not_pending_elsewhere(self, sid: int) -> None:
        """in-use while another session's confirmed commit without <persist> awaits confirmation.

        Its session alone may confirm it, and a change made meanwhile by
        another session would be mixed into what it confirms or rolls back.
        """
        p = self.confirmed.pending
        if p is not None and p.persist is None and p.owner != sid:
            raise refuse("in-use", f"a confirmed commit of {self.describe(p.owner)} awaits confirmation; only that session may change the configuration until it is confirmed or cancelled",
                         type="protocol", info={"session-id": str(p.owner)})

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in DATASTORES:
            raise refuse("invalid-value", f"unknown datastore {name!r} (this agent has {', '.join(DATASTORES)})", type="protocol")

    # ----------------------------------------------------------------- reads

    def running_control(self) -> dict[str, Any]:
        """nat-control of running, as the provider reports it."""
        return {"admit-new-sessions": bool(self.provider.admission())}

    def read(self, source: str, with_sessions: bool = True, with_control: bool = True, keys: list[SessionKey] | None = None) -> tuple[list[NatSession], dict[str, Any]]:
        """(sessions, nat-control values) of a datastore; each part read only when asked for.

        With ``keys``, only those entries are wanted (a filter naming whole
        keys): the provider's ``lookup(keys)`` answers without reading the
        whole table.
        """
        self._check_name(source)
        with self._mutex:
            cand_control = self._cand_control if source == "candidate" else None
            if source == "candidate" and self._cand is not None:
                assert cand_control is not None
                if keys is not None:
                    found = [self._cand[k] for k in keys if k in self._cand]
                    return (found if with_sessions else []), dict(cand_control)
                return (list(self._cand.values()) if with_sessions else []), dict(cand_control)
            # Running, or a candidate whose sessions are still running's.
            if with_sessions and keys is not None:
                with _reading_table():
                    sessions = self.provider.lookup(keys)
            else:
                sessions = self._list() if with_sessions else []
            if cand_control is not None:
                return sessions, dict(cand_control)
            # Reading nat-control of running asks the node (an nft call): skip it when not wanted.
            return sessions, self.running_control() if with_control else {}

    def running_entries(self, codec: Codec) -> Generator[bytes, None, None]:
        """Running's sessions in batches, each as the codec's XML entries as soon as the provider has read it (a reply sent while it is read).

        The provider writes the entries (:meth:`SessionProvider.entries_xml`):
        conntrack's straight from its text.  The datastore stays locked until
        the iterator is exhausted or closed: take it from one thread, and close it.
        """
        with self._mutex:
            with _reading_table():
                yield from self.provider.entries_xml(codec)

    def statistics(self) -> dict[str, Any]:
        """The nat-statistics leaves, read now (the digest: see the module and model.table_digest).

        The provider computes them in one read of its table without building
        the sessions (conntrack at 100k: ~0.15 s of CPU against ~0.5 s).
        """
        with _reading_table():
            return dict(self.provider.statistics())

    def range_digests(self) -> dict[int, tuple[int, int]]:
        """nat-range-digests of running: each non-empty key range's (sessions, digest accumulator)."""
        with _reading_table():
            return dict(self.provider.range_digests())

    def range_sessions(self, ranges: Collection[int]) -> list[NatSession]:
        """Running's sessions whose key is in one of these key ranges (read by key, as a keyed read is: under the datastore's lock)."""
        with self._mutex, _reading_table():
            return self.provider.range_sessions(ranges)

    def _snapshot(self) -> Any:
        with _reading_table():
            return self.provider.list()

    def _list(self) -> list[NatSession]:
        return self._snapshot().sessions

    # ---------------------------------------------------------------- writes

    def edit(self, target: str, req: EditRequest, sid: int, default_operation: str = "merge", test_option: str = "test-then-set", error_option: str = "stop-on-error") -> Plan:
        """Apply an edit-config to ``target``, all or nothing (continue-on-error: the good part).

        Returns the applied plan; raises :class:`DatastoreError` with every
        problem.  ``req`` is consumed (its entries are cleared).
        """
        self._check_name(target)
        with self._mutex:
            self._check_write(target, sid)
            # A request that names no session (nat-control only, as a
            # migration sends four times) needs no read of the table: at
            # 100k sessions that read is ~1 s of a node's time.  Into the
            # candidate, it leaves the candidate's sessions uncopied.
            needs_table = bool(req.entries) or req.list_operation is not None
            if target == "candidate":
                self._ensure_candidate(sessions=needs_table)
                current = self._cand if needs_table and self._cand is not None else {}
                control = self._cand_control
                assert control is not None
            else:
                current = self._running_current(req, default_operation) if needs_table else {}
                # Read (an nft call) only when the request touches nat-control.
                control = self.running_control() if _touches_control(req) else None
            plan = plan_edit(self.codec, current, control, req, default_operation)
            # The request is consumed: its per-entry dicts (~60 MB at 100k
            # entries) are freed before the provider builds its own batch.
            req.entries.clear()
            if target == "candidate":
                self._check_against(plan, current)
            elif plan.deletes or plan.control is not None or error_option == "continue-on-error" or test_option == "test-only":
                # Steps before the apply (deletes, nat-control) could not be
                # undone by it, and test-only and continue-on-error need every
                # problem first: the provider checks the entries against its
                # live table, reading only what they name.
                self._check_running(plan)
            # else: a plain write of entries is checked by the provider's own
            # all-or-nothing apply (the same rule), not twice.
            if plan.problems and error_option != "continue-on-error":
                raise DatastoreError(plan.problems)
            if test_option == "test-only":
                if plan.problems:
                    raise DatastoreError(plan.problems)
                return plan
            if target == "candidate":
                if needs_table:
                    self._index_candidate(plan, current)
                    for k in plan.deletes:
                        current.pop(k, None)
                    current.update(plan.upserts)
                if plan.control is not None:
                    self._cand_control = plan.control
            else:
                self._apply_running(plan, current, control)
            if plan.problems:
                # continue-on-error: the rest was applied; report what was not.
                raise DatastoreError(plan.problems)
            return plan

    def _running_current(self, req: EditRequest, default_operation: str) -> dict[SessionKey, NatSession]:
        """What of running an edit needs to be planned: the entries it names, or the whole list.

        An edit of K entries looks up those K (a catch-up of 100 sessions at
        100k: a few ms, against ~1 s for the table); only an operation on the
        whole list (delete/remove of it, default-operation replace) reads it all.
        """
        if req.list_operation is not None or default_operation == "replace":
            return {s.key: s for s in self._list()}
        with _reading_table():
            return {s.key: s for s in self.provider.lookup([e.key for e in req.entries])}

    def _check_against(self, plan: Plan, current: dict[SessionKey, NatSession]) -> None:
        """Refuse entries the node could not hold on top of ``current`` (the candidate's table): check_batch.

        Against the candidate's reply-tuple index when it has one
        (check_batch_by_holders, the same rule): a migration writes its copy
        in slices, and check_batch over the whole candidate at each slice
        was quadratic (100k in 11 slices: ~260 ms against ~80; 1M in 40: ~10 s).
        """
        if not plan.upserts:
            return
        replies = self._candidate_replies() if current is self._cand else None
        problems = self._clashes(plan, current, replies)
        if problems and self._give_way(plan, problems, current, replies):
            problems = self._clashes(plan, current, replies)
        self._refuse(plan, problems)

    def _clashes(self, plan: Plan, current: dict[SessionKey, NatSession], replies: dict[ReplyKey, SessionKey] | None) -> dict[SessionKey, str]:
        """check_batch of the plan's entries on top of ``current``, by the candidate's reply index when there is one."""
        batch = list(plan.upserts.values())
        owned = self.provider.public_addresses()
        if replies is not None:
            holders = {r: k for s in batch if (k := replies.get(r := s.reply_key)) is not None}
            # No reply tuple of the batch held (a copy's slices): only the batch against itself,
            # which check_batch decides by set operations in C when it finds nothing.
            return check_batch_by_holders(batch, holders, owned, plan.deletes) if holders else check_batch(batch, {}, owned)
        base = {k: s for k, s in current.items() if k not in plan.deletes} if plan.deletes else current
        return check_batch(batch, base, owned)

    def _give_way(self, plan: Plan, problems: dict[SessionKey, str], current: dict[SessionKey, NatSession],
                  replies: dict[ReplyKey, SessionKey] | None) -> bool:
        """Settle each public-port clash of the plan where one side is a closed TCP connection as the kernel would: it goes.

        A copy reads the source while it serves, and a dump is no snapshot:
        when the source's NAT gave a closed connection's public port to a
        new one meanwhile (provider.YIELDING_STATES), the read may hold
        both, the closed one read before the kernel killed it (measured: a
        1,000,000-session copy beside 100 new connections a second through
        10,000 ports was refused for two such pairs).  The closed one is
        left out, or taken out of the candidate, and the source's events
        delete it anyway.  Clashes of two live sessions stay refused.
        True when the plan changed (then checked again).
        """
        if replies is None:
            replies = {s.reply_key: k for k, s in current.items()}
        first: dict[ReplyKey, SessionKey] = {}
        changed = False
        for k, s in list(plan.upserts.items()):
            r = s.reply_key
            other = first.setdefault(r, k)
            if other == k and k in problems:
                held = replies.get(r)
                other = held if held is not None and held != k and held not in plan.deletes and held not in plan.upserts else k
            if other == k or k not in problems:
                continue
            o = plan.upserts.get(other) or current[other]
            if yields_port(o):
                if other in plan.upserts:
                    del plan.upserts[other]
                    first[r] = k
                else:
                    plan.deletes.add(other)
                log.info("%s (%s) gives its public port up to %s, as the NAT's kernel does", format_key(other), o.tcp_state, format_key(k))
            elif yields_port(s):
                del plan.upserts[k]
                if first[r] == k:
                    del first[r]  # the port stays ``other``'s, held in the candidate
                log.info("%s (%s) left out: its public port is %s's, as the NAT's kernel does", format_key(k), s.tcp_state, format_key(other))
            else:
                continue
            changed = True
        return changed

    def _candidate_replies(self) -> dict[ReplyKey, SessionKey] | None:
        """The candidate's sessions by reply tuple (made once, then kept by edit); None when two share one.

        check_batch_by_holders equals check_batch on a table whose reply
        tuples are distinct, as a NAT's are; a candidate where they are not
        (taken from a provider that allows it) is checked whole.
        """
        if self._cand_replies is None and self._cand is not None:
            replies = {s.reply_key: k for k, s in self._cand.items()}
            if len(replies) == len(self._cand):
                self._cand_replies = replies
        return self._cand_replies

    def _index_candidate(self, plan: Plan, current: dict[SessionKey, NatSession]) -> None:
        """Keep the candidate's reply-tuple index with an edit that is about to be applied to it."""
        replies = self._cand_replies
        if replies is None or current is not self._cand:
            return
        if not plan.deletes and current.keys().isdisjoint(plan.upserts):
            # New sessions only (a copy's slices): their reply tuples are added at once.
            size = len(replies) + len(plan.upserts)
            replies.update({s.reply_key: k for k, s in plan.upserts.items()})
            if len(replies) != size:
                self._cand_replies = None  # two sessions with one reply tuple: check the candidate whole from now on
            return
        for k in (*plan.deletes, *plan.upserts):
            old = current.get(k)
            if old is not None and replies.get(old.reply_key) == k:
                del replies[old.reply_key]
        for k, s in plan.upserts.items():
            if replies.setdefault(s.reply_key, k) != k:
                # Two sessions with one reply tuple (an edit the check let through): check the candidate whole from now on.
                self._cand_replies = None
                return

    def _check_running(self, plan: Plan) -> None:
        """Refuse entries the node cannot hold (foreign address, public port taken) before anything changes on running.

        The provider checks against its live table with the plan's deletes
        gone, reading only what the entries name (SessionProvider.check).
        """
        if not plan.upserts:
            return
        with _reading_table():
            bad = self.provider.check(list(plan.upserts.values()), freed=plan.deletes)
        self._refuse(plan, bad)

    @staticmethod
    def _refuse(plan: Plan, bad: dict[SessionKey, str]) -> None:
        for k, why in bad.items():
            plan.upserts.pop(k, None)
            plan.problems.append(provider_problem(k, why))

    def _apply_running(self, plan: Plan, current: dict[SessionKey, NatSession], control: dict[str, Any] | None = None) -> None:
        """nat-control, then deletes, then writes; on a failure put back what was changed.

        apply() is all-or-nothing, so only the earlier steps can need undoing.
        ``control``: running's nat-control when the caller has just read it.
        """
        removed = [current[k] for k in plan.deletes if k in current]
        # What a rollback restores; read (an nft call) only when this edit changes it.
        old_admit: bool | None = None
        if plan.control is not None:
            old_admit = bool(control["admit-new-sessions"]) if control is not None else self.provider.admission()
        try:
            if plan.control is not None:
                self.provider.set_admission(bool(plan.control["admit-new-sessions"]))
            if plan.deletes:
                self.provider.delete(list(plan.deletes))
            if plan.upserts:
                self.provider.apply(list(plan.upserts.values()))
        except ProviderError as e:
            self._rollback(removed, old_admit)
            if isinstance(e, ApplyError):
                raise DatastoreError([provider_problem(k, why) for k, why in e.problems.items()]) from e
            raise refuse("operation-failed", f"the node refused the change, nothing was applied: {e}") from e

    def _rollback(self, removed: list[NatSession], old_admit: bool | None) -> None:
        try:
            if removed:
                self.provider.apply(removed)
            if old_admit is not None:
                self.provider.set_admission(old_admit)
        except ProviderError as e:  # the node refused its own previous state
            log.error("rollback failed, the table may differ from before the edit: %s", e)

    # ------------------------------------------------------------- candidate

    def _ensure_candidate(self, sessions: bool) -> None:
        """Take the candidate's copy of running: nat-control now, the sessions when ``sessions``."""
        if self._cand_control is None:
            self._cand_base_control = self.running_control()
            self._cand_control = dict(self._cand_base_control)
        if sessions and self._cand is None:
            self._cand_base = {s.key: s for s in self._list()}
            self._cand = dict(self._cand_base)
            self._cand_replies = None

    def _reset_candidate(self) -> None:
        """The candidate is running again (nothing copied)."""
        self._cand = None
        self._cand_base = {}
        self._cand_replies = None
        self._cand_control = None

    def _candidate_dirty(self) -> bool:
        if self._cand is not None and self._cand != self._cand_base:
            return True
        return self._cand_control is not None and self._cand_control != self._cand_base_control

    def _candidate_plan(self) -> tuple[Plan, dict[SessionKey, NatSession]]:
        """What a commit changes on running, checked; and running's table when it had to be read."""
        plan = Plan()
        cand, base = self._cand, self._cand_base
        if cand is not None:
            plan.deletes = {k for k in base if k not in cand}
            plan.upserts = {k: s for k, s in cand.items() if base.get(k) != s}
        if self._cand_control is not None and self._cand_control != self._cand_base_control:
            plan.control = dict(self._cand_control)
        # Of running, only the sessions to delete are read (which of them
        # are still there, and their latest values for a rollback): the
        # undo of the other changes comes from the candidate's base.
        with _reading_table():
            current = {s.key: s for s in self.provider.lookup(plan.deletes)} if plan.deletes else {}
        plan.deletes &= current.keys()
        if plan.deletes or plan.control is not None:
            # Checked before the first step, which apply() could not undo.
            self._check_running(plan)
        # else: writes alone are checked by the provider's own
        # all-or-nothing apply (the same rule), not twice
        # (~0.2 s of a 100k commit).
        if plan.problems:
            raise DatastoreError(plan.problems)
        return plan, current

    def commit(self, sid: int, *, confirmed: bool = False, timeout: int = DEFAULT_TIMEOUT,
               persist: str | None = None, persist_id: str | None = None) -> Plan:
        """Apply the candidate's changes to running, all or nothing; the candidate then matches running.

        ``confirmed``: a confirmed commit (RFC 6241 8.4): rolled back unless
        confirmed within ``timeout`` seconds; while one is pending, another
        confirmed commit extends it (new timeout, same rollback point) and a
        plain commit confirms it.  ``persist``: the pending commit outlives
        its session, and ``persist_id`` (equal to it) is what lets a session
        confirm, extend or cancel it.  Raises :class:`DatastoreError`.
        """
        with self._mutex:
            self._check_write("running", sid)
            self._check_write("candidate", sid)
            self._check_confirm_rights(sid, persist_id)
            if not 1 <= timeout <= MAX_TIMEOUT:
                raise refuse("invalid-value", f"confirm-timeout {timeout} is not a number of seconds in 1..{MAX_TIMEOUT}", type="protocol", info={"bad-element": "confirm-timeout"})
            plan, current = self._candidate_plan()
            control = {"admit-new-sessions": self.provider.admission()} if plan.control is not None else None
            if not confirmed:
                self._apply_running(plan, current, control)
                if (done := self.confirmed.confirm()) is not None:
                    log.info("confirmed commit of session %d confirmed by session %d", done.owner, sid)
            else:
                undo = Undo.of_commit(plan.upserts, plan.deletes, self._cand_base, current,
                                      control["admit-new-sessions"] if control is not None else None)
                extended = self.confirmed.pending is not None
                try:
                    nxt = self.confirmed.prepare(sid, undo, timeout, persist)
                except JournalError as e:
                    raise refuse("operation-failed", f"{e}; nothing was committed") from e
                try:
                    self._apply_running(plan, current, control)
                except DatastoreError:
                    self.confirmed.abandon()
                    raise
                self.confirmed.arm(nxt)
                log.info("%s confirmed commit by session %d: rolled back in %d s unless confirmed%s (undo: %s)",
                         "extended" if extended else "new", sid, timeout,
                         f", persist-id {nxt.persist!r}" if nxt.persist is not None else f", or when session {sid} ends", nxt.undo.summary())
            self._reset_candidate()
            return plan

    def cancel_commit(self, sid: int, persist_id: str | None = None) -> None:
        """<cancel-commit>: roll the pending confirmed commit back now (RFC 6241 8.4.5.2)."""
        with self._mutex:
            if self.confirmed.pending is None:
                raise refuse("invalid-value", "no confirmed commit is pending", type="protocol",
                             info={"bad-element": "persist-id"} if persist_id is not None else {})
            self._check_confirm_rights(sid, persist_id)
            self._check_write("running", sid)
            self.confirmed.roll_back(f"cancelled by session {sid}")

    def pending_commit(self) -> PendingCommit | None:
        """The pending confirmed commit, if any."""
        with self._mutex:
            p = self.confirmed.pending
            if p is None:
                return None
            return PendingCommit(p.owner, p.persist, p.deadline, len(p.undo.created), len(p.undo.old), p.undo.admission)

    def recover(self) -> bool:
        """At start: roll back a confirmed commit left pending by an earlier run (see ConfirmedCommits.recover)."""
        return self.confirmed.recover()

    def close(self) -> None:
        """The agent stops: a pending confirmed commit cannot outlive it, so it is rolled back now."""
        self.confirmed.roll_back("the agent is stopping")

    def _check_confirm_rights(self, sid: int, persist_id: str | None) -> None:
        """Whether ``sid`` may confirm, extend or cancel the pending confirmed commit with ``persist_id`` (RFC 6241 8.4.1)."""
        p = self.confirmed.pending
        bad = {"bad-element": "persist-id"}
        if p is None:
            if persist_id is not None:
                raise refuse("invalid-value", "no confirmed commit is pending (persist-id given)", type="protocol", info=bad)
            return
        if p.persist is None:
            if p.owner != sid:
                raise refuse("in-use", f"the pending confirmed commit belongs to {self.describe(p.owner)}: only that session may confirm, extend or cancel it",
                             type="protocol", info={"session-id": str(p.owner)})
            if persist_id is not None:
                raise refuse("invalid-value", "the pending confirmed commit was made without <persist>: confirm it without <persist-id>", type="protocol", info=bad)
        elif persist_id is None:
            raise refuse("invalid-value", "a confirmed commit with <persist> is pending: give its <persist-id> to confirm, extend or cancel it", type="protocol", info=bad)
        elif persist_id != p.persist:
            raise refuse("invalid-value", "the persist-id does not match the pending confirmed commit's <persist>", type="protocol", info=bad)

    def validate(self, source: str | None, req: EditRequest | None = None) -> None:
        """<validate> (RFC 6241 8.6): would ``source``, or the inline config ``req``, be accepted by the node?

        Running is the node's own table and always valid.  The candidate is
        checked as its commit would be (its sessions only once an edit copied
        them; nat-control is always valid); an inline config as an edit that
        replaces the whole list.  Raises :class:`DatastoreError`.
        """
        with self._mutex:
            if req is not None:
                plan = plan_edit(self.codec, {}, dict(CONTROL_DEFAULTS), req, "replace")
                self._check_against(plan, {})
            elif source == "candidate" and self._cand is not None:
                plan = Plan(upserts={k: s for k, s in self._cand.items() if self._cand_base.get(k) != s},
                            deletes={k for k in self._cand_base if k not in self._cand})
                self._check_running(plan)
            else:
                self._check_name(source or "")
                return
            if plan.problems:
                raise DatastoreError(plan.problems)

    def discard(self, sid: int) -> None:
        """Reset the candidate to running (discard-changes)."""
        with self._mutex:
            self._check_write("candidate", sid)
            self._reset_candidate()


@contextmanager
def _reading_table() -> Iterator[None]:
    """A provider's failure to read its table, as the rpc-error every read gives for it."""
    try:
        yield
    except ProviderError as e:
        raise refuse("operation-failed", f"cannot read the session table: {e}") from e


def select(sessions: Iterable[NatSession], matches: Sequence[dict[str, Any]] | None) -> list[NatSession]:
    """Sessions matching any of ``matches`` (leaf -> value, all must be equal); all when None."""
    if matches is None:
        return list(sessions)
    if not matches:
        return []
    if any(not m for m in matches):
        return list(sessions)
    return [s for s in sessions if any(all(getattr(s, k) == v for k, v in m.items()) for m in matches)]
