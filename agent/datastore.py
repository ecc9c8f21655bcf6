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
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from ..errors import ProviderError
from ..model import NatSession, SessionKey
# EditRequest, Problem and problems_of_codec are named here for agent/rpc.py and the tests,
# which take the datastore's vocabulary from this module.
from ..wire.problems import DatastoreError, EditRequest, Problem, problems_of_codec, refuse  # noqa: F401
from .confirmed import DEFAULT_TIMEOUT, MAX_TIMEOUT, JournalError, Undo
from .datastorebase import _reading_table
from .datastoreedit import DatastoreEdits
from .editplan import Plan

log = logging.getLogger(__name__)

DEFAULT_OPERATIONS = ("merge", "replace", "none")
#: Created keys of a confirmed commit beyond which they are journalled as the writes go out (ConfirmedCommits.created).
JOURNAL_AHEAD = 4096
TEST_OPTIONS = ("test-then-set", "set", "test-only")
ERROR_OPTIONS = ("stop-on-error", "continue-on-error", "rollback-on-error")


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


class Datastore(DatastoreEdits):
    """Running (the provider's live table) and candidate, with locks and confirmed commits; thread-safe.

    Locks, reads and the candidate's copy are :class:`.datastorebase.DatastoreBase`'s,
    edit-config and validate :class:`.datastoreedit.DatastoreEdits`'; commits are here.
    """

    def _candidate_plan(self) -> tuple[Plan, dict[SessionKey, NatSession]]:
        """What a commit changes on running, checked; and running's table when it had to be read."""
        plan = Plan()
        cand, base = self._cand, self._cand_base
        if cand is not None:
            plan.deletes = {k for k in base if k not in cand}
            # A key new to the base (all of a copy's) is written without an __eq__ call (a Python one for a dataclass).
            plan.upserts = {k: s for k, s in cand.items() if (old := base.get(k)) is None or old != s}
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
                # A large commit's created keys go to the journal batch by batch, while the node creates the one
                # before (ConfirmedCommits.created); a few go with the rest of its undo.
                later = len(undo.created) > JOURNAL_AHEAD
                try:
                    nxt = self.confirmed.prepare(sid, undo, timeout, persist, created_later=later)
                except JournalError as e:
                    raise refuse("operation-failed", f"{e}; nothing was committed") from e

                def journalled(keys: list[SessionKey]) -> None:
                    try:
                        self.confirmed.created(nxt, [k for k in keys if k in undo.created])
                    except JournalError as e:
                        raise ProviderError(f"{e}: not created") from e

                try:
                    self._apply_running(plan, current, control, journalled if later else None)
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
    def discard(self, sid: int) -> None:
        """Reset the candidate to running (discard-changes)."""
        with self._mutex:
            self._check_write("candidate", sid)
            self._reset_candidate()


def select(sessions: Iterable[NatSession], matches: Sequence[dict[str, Any]] | None) -> list[NatSession]:
    """Sessions matching any of ``matches`` (leaf -> value, all must be equal); all when None."""
    if matches is None:
        return list(sessions)
    if not matches:
        return []
    if any(not m for m in matches):
        return list(sessions)
    return [s for s in sessions if any(all(getattr(s, k) == v for k, v in m.items()) for m in matches)]
