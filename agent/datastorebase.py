"""The datastores' common part: locks, reads, the candidate's copy of running, and applying a plan to running.

:class:`DatastoreBase` is what :class:`.datastoreedit.DatastoreEdits` (edit-config,
validate) and :class:`.datastore.Datastore` (commit, confirmed commits) build
on; see :mod:`.datastore` for the semantics.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Callable, Collection, Generator, Iterator

from ..codec import Codec
from ..errors import ProviderError
from ..model import NatSession, SessionKey
from ..wire.problems import DatastoreError, refuse
from .confirmed import ConfirmedCommits, Journal
from .dslocks import DatastoreLocks
from .editplan import Plan, provider_problem
from .provider import ApplyError, BeforeCreate, ReplyKey, SessionProvider

log = logging.getLogger(__name__)

class DatastoreBase(DatastoreLocks):
    """Running (the provider's live table) and the candidate's copy, with locks, under one mutex.

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

    # ------------------------------------------------------ the locks' hooks

    def _candidate_changed(self) -> bool:
        return self._candidate_dirty()

    def _drop_candidate(self) -> None:
        self._reset_candidate()

    def _unpersisted_owner(self) -> int | None:
        p = self.confirmed.pending
        return p.owner if p is not None and p.persist is None else None

    def _roll_back_pending(self, why: str) -> None:
        self.confirmed.roll_back(why)

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

    def _apply_running(self, plan: Plan, current: dict[SessionKey, NatSession], control: dict[str, Any] | None = None,
                       before_create: BeforeCreate | None = None) -> None:
        """nat-control, then deletes, then writes; on a failure put back what was changed.

        apply() is all-or-nothing, so only the earlier steps can need undoing.
        ``control``: running's nat-control when the caller has just read it.
        ``before_create``: as for SessionProvider.apply.
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
                self.provider.apply(list(plan.upserts.values()), before_create)
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


@contextmanager
def _reading_table() -> Iterator[None]:
    """A provider's failure to read its table, as the rpc-error every read gives for it."""
    try:
        yield
    except ProviderError as e:
        raise refuse("operation-failed", f"cannot read the session table: {e}") from e
