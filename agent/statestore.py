"""Running and candidate of a state agent of any state module, over a :class:`~.stateprovider.StateProvider`.

No XML here (that is :mod:`natmig.wire.state`'s), no network function
either: the lists, keys and `unique` constraints come from the compiled
module.  Locks, edit-config operations, commit and confirmed commit follow
RFC 6241 as :class:`~.datastore.Datastore` does for the NAT's live table,
and for the same reason: running may be a live table that traffic writes
too.  So commit applies what the candidate changed since it was copied
from running (not "running := candidate"), and a confirmed commit's
rollback undoes what the commits changed, leaving alone entries that
something else created or removed meanwhile.

The candidate is running plus a *delta* (per list, key -> entry, or None
for a delete), not a copy of running: an edit of K entries looks up those
K keys in running (:meth:`~.stateprovider.StateProvider.lookup`) and
changes K entries of the delta in place (undone, should the edit be
refused), a commit hands the provider the delta, and a confirmed commit
remembers the running values of the keys it touches only.  So writing K
entries costs O(K) however large running is; only a whole-datastore
replace, a read, and a list with `unique` constraints (checked over the
whole list) cost O(table).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from natmig.codec import _Errors
from natmig.errors import CodecError, ProviderError
from natmig.statemodel import Entry, Key, StateList, StateModule
from natmig.wire.state import Config, Wire

from .confirmed import DEFAULT_TIMEOUT, MAX_TIMEOUT
from .datastore import DatastoreError, Problem, problems_of_codec, refuse
from .dslocks import DatastoreLocks
from .stateprovider import Change, MemoryStateProvider, StateProvider, StateRefused, Tables

log = logging.getLogger(__name__)


@dataclass
class Plan:
    """What a commit changed (the rpc layer logs its sizes)."""

    upserts: dict[Any, Entry] = field(default_factory=dict)
    deletes: set[Any] = field(default_factory=set)
    control: dict[str, Any] | None = None


#: The candidate as running plus this: per list, each key changed -> its entry, or None when deleted.
Delta = dict[StateList, dict[Key, "Entry | None"]]


@dataclass
class _Pending:
    owner: int
    persist: str | None
    deadline: float
    #: per list, each key the commits touched -> the entry running had before the first of them (None: absent).
    before: dict[StateList, dict[Key, Entry | None]]
    admit: bool
    timer: threading.Timer | None = None


def _diff(base: Tables, new: Tables) -> Delta:
    """What turns ``base`` into ``new``, per list, as a delta (lists without a change left out)."""
    out: Delta = {}
    for lst, t in new.items():
        old = base.get(lst, {})
        d: dict[Key, Entry | None] = {k: e for k, e in t.items() if old.get(k) != e}
        d.update((k, None) for k in old if k not in t)
        if d:
            out[lst] = d
    return out


def _changes(delta: Delta) -> dict[StateList, Change]:
    """A delta as the provider's changes (lists without a change left out)."""
    out = {}
    for lst, d in delta.items():
        ch = Change([e for e in d.values() if e is not None], [k for k, e in d.items() if e is None])
        if ch:
            out[lst] = ch
    return out


def _overlay(tables: Tables, delta: Delta) -> Tables:
    """Running's ``tables`` with the delta applied (the candidate), for the lists in ``tables``."""
    out = {lst: dict(t) for lst, t in tables.items()}
    for lst, d in delta.items():
        if lst in out:
            t = out[lst]
            for k, e in d.items():
                if e is None:
                    t.pop(k, None)
                else:
                    t[k] = e
    return out


def _set(table: dict[Key, Entry], k: Key, e: Entry | None) -> None:
    if e is None:
        table.pop(k, None)
    else:
        table[k] = e


def _not_unique(lst: StateList, table: dict[Key, Entry]) -> list[Problem]:
    """RFC 7950 15.1: a `unique` violation is operation-failed with error-app-tag data-not-unique, on the entry."""
    return [Problem("operation-failed", why, lst.describe(key), app_tag="data-not-unique") for key, why in lst.clashes(table.values())]


class StateStore(DatastoreLocks):
    """The datastores of one or more state modules over their one provider; thread-safe.

    Entries created or deleted on running are reported by the provider
    (``provider.on_change``): the agent turns them into state-change
    notifications.  Several modules share one provider when their lists
    are views of the same state (a chained node's one conntrack table): an
    edit may touch lists of each, and a commit hands the provider all of
    them in one change, so that it writes each kernel entry once.
    """

    def __init__(self, module: StateModule | Sequence[StateModule], provider: StateProvider | None = None) -> None:
        self.modules: tuple[StateModule, ...] = (module,) if isinstance(module, StateModule) else tuple(module)
        self.module = self.modules[0]
        #: every state list of every module, in module then schema order.
        self.lists: tuple[StateList, ...] = tuple(l for m in self.modules for l in m.lists)
        if provider is None and len(self.modules) != 1:
            raise ProviderError("a StateStore of several modules needs the one provider that holds them all")
        self.provider = provider or MemoryStateProvider(self.module)
        self.wire = Wire(list(self.lists))
        self.describe: Callable[[int], str] = lambda sid: f"session {sid}"
        self._mutex = threading.RLock()
        #: the candidate's changes to running (None: the candidate is running), and admission there and when it was taken.
        self._delta: Delta | None = None
        self._cand_admit = True
        self._cand_base_admit = True
        self._locks: dict[str, int] = {}
        self._pending: _Pending | None = None

    @property
    def on_change(self) -> Callable[[StateList, str, Entry], None]:
        return self.provider.on_change

    @on_change.setter
    def on_change(self, fn: Callable[[StateList, str, Entry], None]) -> None:
        self.provider.on_change = fn

    # ------------------------------------------------------ the locks' hooks

    def _candidate_changed(self) -> bool:
        return self._delta is not None

    def _drop_candidate(self) -> None:
        self._delta = None

    def _unpersisted_owner(self) -> int | None:
        p = self._pending
        return p.owner if p is not None and p.persist is None else None

    def _roll_back_pending(self, why: str) -> None:
        self._roll_back(why)

    # ----------------------------------------------------------------- reads

    def read(self, source: str, lists: list[StateList] | None = None) -> tuple[Tables, bool]:
        """(entries by list, admit-new) of a datastore, copied; only ``lists`` when given (none read: admission alone)."""
        self._check_name(source)
        with self._mutex:
            wanted = list(self.lists) if lists is None else [l for l in self.lists if l in lists]
            tables = self.provider.read_lists(wanted) if wanted else {}
            if source == "candidate" and self._delta is not None:
                return _overlay(tables, self._delta), self._cand_admit
            return tables, self.provider.admission()

    def admission(self) -> bool:
        """Running's state-control/admit-new."""
        return self.provider.admission()

    def statistics(self) -> list[tuple[str, int, str]]:
        """(module:list, entries, digest) of each list of running."""
        return self.provider.statistics()

    # ----------------------------------------------------------------- edits

    def edit(self, target: str, cfg: Config, sid: int, default_operation: str = "merge", test_only: bool = False) -> None:
        """Apply an edit-config to ``target``, all or nothing (RFC 6241 7.2); raises DatastoreError."""
        self._check_name(target)
        with self._mutex:
            self._check_write(target, sid)
            on_cand = target == "candidate" and not test_only
            if target == "candidate" and self._delta is not None:
                delta, admit = self._delta, self._cand_admit
            else:
                delta, admit = {}, self.provider.admission()
            if test_only and delta:
                delta = {lst: dict(d) for lst, d in delta.items()}  # a test changes nothing
            new_admit = self._plan(delta, admit, cfg, default_operation)
            if test_only:
                return
            if not on_cand:
                self._apply(_changes(delta), new_admit)
            else:
                if self._delta is None:
                    self._cand_base_admit = self.provider.admission()
                self._delta, self._cand_admit = delta, new_admit

    def _plan(self, delta: Delta, admit: bool, cfg: Config, default_operation: str) -> bool:
        """The edit onto ``delta`` in place (put back as it was when refused); the new admit-new."""
        if default_operation == "replace":
            admit = True  # state-control absent from a replacing config is at its default
        if cfg.control is not None and "admit-new" in cfg.control:
            admit = cfg.control["admit-new"]
        if default_operation == "replace":
            # The config is the whole datastore: what is not in it goes (every list read: O(table)).
            now = _overlay(self.provider.read(), delta)
            tables: Tables = {lst: {} for lst in self.lists}
            problems = self._edits(cfg, "replace", lambda lst, k: tables[lst].get(k), lambda lst, k, e: _set(tables[lst], k, e))
            problems += [p for lst in {ed.list for ed in cfg.edits} for p in _not_unique(lst, tables[lst])]
            if problems:
                raise DatastoreError(problems)
            delta.clear()
            delta.update(_diff(now, tables))
            return admit
        # Running's entries of the keys edited (the delta's own take precedence): K lookups, not a read.
        wanted: dict[StateList, list[Key]] = {}
        for ed in cfg.edits:
            if ed.key not in delta.get(ed.list, {}):
                wanted.setdefault(ed.list, []).append(ed.key)
        running = {lst: self.provider.lookup(lst, keys) for lst, keys in wanted.items()}
        undo: list[tuple[StateList, Key, bool, Entry | None]] = []

        def current(lst: StateList, k: Key) -> Entry | None:
            d = delta.get(lst)
            if d is not None and k in d:
                return d[k]
            return running.get(lst, {}).get(k)

        def put(lst: StateList, k: Key, e: Entry | None) -> None:
            d = delta.setdefault(lst, {})
            undo.append((lst, k, k in d, d.get(k)))
            d[k] = e

        problems = self._edits(cfg, default_operation, current, put)
        for lst in {ed.list for ed in cfg.edits if ed.list.uniques}:
            # A `unique` binds the whole list: checked over the candidate as it would be.
            # Of the entries this candidate changes, over running: O(changes) when the provider indexes them.
            problems += [Problem("operation-failed", why, lst.describe(key), app_tag="data-not-unique")
                         for key, why in self.provider.unique_clashes(lst, delta.get(lst, {}))]
        if problems:
            for lst, k, had, old in reversed(undo):
                if had:
                    delta[lst][k] = old
                else:
                    delta[lst].pop(k, None)
            raise DatastoreError(problems)
        return admit

    @staticmethod
    def _edits(cfg: Config, default_operation: str, current: Callable[[StateList, Key], Entry | None],
               put: Callable[[StateList, Key, Entry | None], None]) -> list[Problem]:
        """Each edit's operation (RFC 6241 7.2) through ``current`` and ``put``; the problems found."""
        problems: list[Problem] = []
        errors = _Errors(100)
        for ed in cfg.edits:
            old = current(ed.list, ed.key)
            op = ed.operation or default_operation
            where = ed.list.describe(ed.key)
            if op in ("delete", "remove"):
                if old is None:
                    if op == "delete":
                        problems.append(Problem("data-missing", "delete of an entry that does not exist", where))
                    continue
                put(ed.list, ed.key, None)
            elif op == "create" and old is not None:
                problems.append(Problem("data-exists", "create of an entry that already exists", where))
            elif op == "none":
                if old is None:
                    problems.append(Problem("data-missing", "the entry does not exist (default-operation none)", where))
            else:
                values = ed.values
                if op == "merge" and old is not None:
                    values = {s.name: v for s, v in zip(ed.list.leaves, old) if v is not None} | ed.values
                entry = Wire.complete(ed.list, values, errors)
                if entry is not None and entry != old:
                    put(ed.list, ed.key, entry)
        if errors:
            problems += problems_of_codec(CodecError(errors.items, errors.more))
        return problems

    def _apply(self, changes: dict[StateList, Change], admit: bool) -> None:
        """Changes onto running through the provider (all or nothing), then admission."""
        try:
            if changes:
                self.provider.apply(changes)
        except StateRefused as e:
            raise DatastoreError([Problem("operation-failed", why, lst.describe(k)) for (lst, k), why in e.problems.items()]) from None
        if admit != self.provider.admission():
            self.provider.set_admission(admit)

    # ---------------------------------------------------------------- commit

    def commit(self, sid: int, *, confirmed: bool = False, timeout: int = DEFAULT_TIMEOUT,
               persist: str | None = None, persist_id: str | None = None) -> Plan:
        """The candidate's changes onto running; confirmed: rolled back unless confirmed within ``timeout`` s (RFC 6241 8.4)."""
        with self._mutex:
            self._check_write("running", sid)
            self._check_write("candidate", sid)
            self._check_confirm_rights(sid, persist_id)
            if not 1 <= timeout <= MAX_TIMEOUT:
                raise refuse("invalid-value", f"confirm-timeout {timeout} is not a number of seconds in 1..{MAX_TIMEOUT}", type="protocol", info={"bad-element": "confirm-timeout"})
            changes = _changes(self._delta) if self._delta is not None else {}
            admit = self._cand_admit if self._delta is not None and self._cand_admit != self._cand_base_admit else self.provider.admission()
            plan = Plan({(l.name, l.key_of(e)): e for l, ch in changes.items() for e in ch.upserts},
                        {(l.name, k) for l, ch in changes.items() for k in ch.deletes},
                        {"admit-new": admit} if admit != self.provider.admission() else None)
            if confirmed:
                # Running's values of the keys this commit touches (K lookups): what a rollback restores.
                running = {lst: self.provider.lookup(lst, [*(lst.key_of(e) for e in ch.upserts), *ch.deletes]) for lst, ch in changes.items()}
                p = self._pending
                before = p.before if p is not None else {}
                for lst, ch in changes.items():  # the first value of each key the series touches is what a rollback restores
                    b = before.setdefault(lst, {})
                    for k in [*(lst.key_of(e) for e in ch.upserts), *ch.deletes]:
                        b.setdefault(k, running[lst].get(k))
                first_admit = p.admit if p is not None else self.provider.admission()
                self._apply(changes, admit)
                if p is not None and p.timer is not None:
                    p.timer.cancel()
                # A follow-up without <persist> keeps the series' token (as the NAT datastore does): the
                # controller's follow-ups send persist-id alone, and the series must still outlive its session.
                nxt = _Pending(sid, persist if persist is not None or p is None else p.persist, time.monotonic() + timeout, before, first_admit)
                nxt.timer = threading.Timer(timeout, self._expire, (nxt,))
                nxt.timer.daemon = True
                self._pending = nxt
                nxt.timer.start()
            else:
                self._apply(changes, admit)
                if self._pending is not None:
                    if self._pending.timer is not None:
                        self._pending.timer.cancel()
                    log.info("confirmed commit of session %d confirmed by session %d", self._pending.owner, sid)
                    self._pending = None
            self._delta = None
            return plan

    def _check_confirm_rights(self, sid: int, persist_id: str | None) -> None:
        p = self._pending
        bad = {"bad-element": "persist-id"}
        if p is None:
            if persist_id is not None:
                raise refuse("invalid-value", "no confirmed commit is pending (persist-id given)", type="protocol", info=bad)
        elif p.persist is None and p.owner != sid:
            raise refuse("in-use", f"the pending confirmed commit belongs to {self.describe(p.owner)}", type="protocol", info={"session-id": str(p.owner)})
        elif p.persist is not None and persist_id != p.persist:
            raise refuse("invalid-value", "a confirmed commit with <persist> is pending: give its <persist-id>" if persist_id is None
                         else "the persist-id does not match the pending confirmed commit's <persist>", type="protocol", info=bad)

    def cancel_commit(self, sid: int, persist_id: str | None = None) -> None:
        """<cancel-commit>: roll the pending confirmed commit back now."""
        with self._mutex:
            if self._pending is None:
                raise refuse("invalid-value", "no confirmed commit is pending", type="protocol")
            self._check_confirm_rights(sid, persist_id)
            self._roll_back(f"cancelled by session {sid}")

    def _expire(self, pending: _Pending) -> None:
        with self._mutex:
            if self._pending is pending:
                self._roll_back("its confirm-timeout passed")

    def _roll_back(self, why: str) -> None:
        """Undo what the pending series changed: each key it touched back to its first value."""
        p = self._pending
        if p is None:
            return
        if p.timer is not None:
            p.timer.cancel()
        self._pending = None
        changes = {lst: Change([e for e in keys.values() if e is not None], [k for k, e in keys.items() if e is None])
                   for lst, keys in p.before.items()}
        try:
            self._apply({l: c for l, c in changes.items() if c}, p.admit)
        except DatastoreError as e:
            log.error("confirmed commit of session %d: rollback refused (%s): %s", p.owner, why, e)
            return
        self._delta = None
        log.warning("confirmed commit of session %d rolled back: %s", p.owner, why)

    def discard(self, sid: int) -> None:
        """<discard-changes>: the candidate back to running."""
        with self._mutex:
            self._check_write("candidate", sid)
            self._delta = None

    def validate(self, source: str | None, cfg: Config | None = None) -> None:
        """<validate>: whether ``source`` or an inline config would be accepted (unique constraints)."""
        with self._mutex:
            if cfg is not None:
                tables: Tables = {lst: {} for lst in self.lists}
                problems = self._edits(cfg, "replace", lambda lst, k: tables[lst].get(k), lambda lst, k, e: _set(tables[lst], k, e))
                problems += [p for lst in {ed.list for ed in cfg.edits} for p in _not_unique(lst, tables[lst])]
                if problems:
                    raise DatastoreError(problems)
                return
            self._check_name(source or "")
            with_unique = [l for l in self.lists if l.uniques]
            tables = self.provider.read_lists(with_unique) if with_unique else {}
            if source == "candidate" and self._delta is not None:
                tables = _overlay(tables, self._delta)
            problems = [p for lst, t in tables.items() for p in _not_unique(lst, t)]
            if problems:
                raise DatastoreError(problems)

    def close(self) -> None:
        """The agent stops: a pending confirmed commit is rolled back."""
        with self._mutex:
            self._roll_back("the agent is stopping")
        self.provider.close()

    def recover(self) -> bool:
        """A memory provider keeps nothing across a restart: nothing to roll back."""
        return False
