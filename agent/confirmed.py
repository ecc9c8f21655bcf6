"""Confirmed commit (RFC 6241 8.4, :confirmed-commit:1.1): what a pending series changed, its undo, its journal.

No XML and no NETCONF rules here (those are in :mod:`.rpc` and
:class:`~.datastore.Datastore`): this module knows what a series of
confirmed commits changed on running and how to take it back.

The undo is *what the commits changed*, not a copy of the table before them:
running is a live NAT table, and sessions that traffic opened or closed while
the commit waited for its confirmation are no business of the rollback.  So
the rollback deletes the sessions the commits created (one already gone is
fine), puts back the old values of those they replaced, re-creates those
they deleted, and puts nat-control's admission back.

The journal keeps that undo in a file (``--state-dir``), so that an agent
that died with a confirmed commit pending rolls it back when it starts again
(a pending confirmed commit does not survive a restart).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import AgentError, ProviderError
from ..model import FIELD_NAMES, NatSession, SessionKey, format_key
from .provider import ApplyError, SessionProvider

log = logging.getLogger(__name__)

CAPABILITY = "urn:ietf:params:netconf:capability:confirmed-commit:1.1"
#: RFC 6241 8.4.5.1: seconds before an unconfirmed commit is rolled back.
DEFAULT_TIMEOUT = 600
#: ietf-netconf's confirm-timeout is a uint32 of range 1..max.
MAX_TIMEOUT = 2**32 - 1
_FORMAT = 1


class JournalError(AgentError):
    """The undo record of a confirmed commit could not be written or read."""


def parse_timeout(text: str) -> int:
    """A confirm-timeout's text as seconds; ValueError unless it is an integer in 1..2^32-1."""
    # Leading zeros off and length first: int() raises its own ValueError past
    # 4,300 digits, and 10 digits hold any uint32.
    t = text.strip().lstrip("0")
    if not (t.isascii() and t.isdigit()) or len(t) > 10 or not 1 <= int(t) <= MAX_TIMEOUT:
        raise ValueError(f"confirm-timeout {text[:40]!r} is not a number of seconds in 1..{MAX_TIMEOUT}")
    return int(t)


@dataclass
class Undo:
    """What running held, before the first confirmed commit of a series, where the series changed it."""

    #: sessions the series created: a rollback deletes them.
    created: set[SessionKey] = field(default_factory=set)
    #: old values of sessions the series replaced or deleted: a rollback writes them back.
    old: dict[SessionKey, NatSession] = field(default_factory=dict)
    #: admit-new-sessions before the series changed it; None: the series did not.
    admission: bool | None = None

    @classmethod
    def of_commit(cls, upserts: Iterable[SessionKey], deletes: Iterable[SessionKey], base: dict[SessionKey, NatSession],
                  current: dict[SessionKey, NatSession], admission: bool | None) -> "Undo":
        """The undo of one commit that wrote ``upserts`` and deleted ``deletes``.

        ``base`` is what running held when the candidate was taken: a written
        key in it was replaced (its old value is there), any other was
        created.  Computed from the base, the undo needs no read of the table
        at commit time; ``current`` (running, read by the commit for its
        deletes) gives a deleted session's latest value.
        """
        undo = cls(admission=admission)
        for k in upserts:
            old = base.get(k)
            if old is None:
                undo.created.add(k)
            else:
                undo.old[k] = old
        for k in deletes:
            undo.old[k] = current.get(k) or base[k]
        return undo

    def then(self, later: "Undo") -> "Undo":
        """The undo of this series followed by one more commit: the rollback point stays this series' start."""
        old = dict(later.old)
        for k in self.created:
            old.pop(k, None)  # created by the series, changed again since: the rollback deletes it
        old.update(self.old)
        created = self.created | {k for k in later.created if k not in self.old}
        return Undo(created, old, self.admission if self.admission is not None else later.admission)

    def summary(self) -> str:
        """``3 created, 2 replaced or deleted, admission was True``: how logs describe it."""
        adm = "" if self.admission is None else f", admission was {self.admission}"
        return f"{len(self.created)} created, {len(self.old)} replaced or deleted{adm}"


def undo_changes(provider: SessionProvider, undo: Undo) -> str:
    """Take back what ``undo`` records, as far as the node lets it; what was done, for the log.

    Never raises a provider's failure: the caller is a timer or a session's
    end, where nobody could handle it.  Deletes come first, so that a restored
    session can take back a public port a created one held.
    """
    done = []
    if undo.created:
        try:
            n = provider.delete(list(undo.created))
            done.append(f"{n} created sessions deleted ({len(undo.created) - n} already gone)")
        except ProviderError as e:
            log.error("rollback: cannot delete the %d sessions the confirmed commit created: %s", len(undo.created), e)
    if undo.old:
        restore = list(undo.old.values())
        try:
            provider.apply(restore)
        except ApplyError as e:
            # One session the node now refuses (its public port taken by traffic
            # meanwhile) must not keep the others from coming back.
            for k, why in list(e.problems.items())[:20]:
                log.error("rollback: cannot restore %s: %s", format_key(k), why)
            restore = [s for s in restore if s.key not in e.problems]
            try:
                provider.apply(restore)
            except ProviderError as e2:
                log.error("rollback: cannot restore the %d replaced or deleted sessions: %s", len(restore), e2)
                restore = []
        except ProviderError as e:
            log.error("rollback: cannot restore the %d replaced or deleted sessions: %s", len(restore), e)
            restore = []
        done.append(f"{len(restore)} replaced or deleted sessions restored")
    if undo.admission is not None:
        try:
            provider.set_admission(undo.admission)
            done.append(f"admission set back to {undo.admission}")
        except ProviderError as e:
            log.error("rollback: cannot set admission back to %s: %s", undo.admission, e)
    return ", ".join(done) or "nothing to undo"


@dataclass(frozen=True)
class Record:
    """A journal's content: the undo of the pending series, its persist-id and its deadline (epoch seconds)."""

    undo: Undo
    persist: str | None
    deadline: float


class Journal:
    """The undo record of a pending confirmed commit, kept in ``directory`` (None: nowhere).

    JSON lines, keys and sessions as lists (100k created keys: ~4.6 MB).  A
    series' first commit is written to a temporary file and renamed, so a
    crash leaves the old record or the new one, never half of one; each
    follow-up appends its own undo as one more line, of which a crash can
    leave only the last one cut short (see :meth:`load`).  Not fsync'ed: the record only has to outlive the
    agent's process; a reboot empties the kernel's table as well, and a state
    directory on /run (tmpfs) then holds no stale record.
    """

    NAME = "confirmed-commit.json"

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(directory) if directory is not None else None

    @property
    def path(self) -> Path | None:
        """The record's file, or None without a state directory."""
        return self.directory / self.NAME if self.directory is not None else None

    def save(self, record: Record) -> None:
        """Write the record of a new series, replacing any previous one (JournalError when it cannot)."""
        path = self.path
        if path is None:
            return
        tmp = path.with_name(path.name + ".tmp")
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp.write_text(self._line(record))
            os.replace(tmp, path)
        except OSError as e:
            raise JournalError(f"cannot write the confirmed commit's undo record {path}: {e}") from e

    def append(self, record: Record) -> None:
        """One more confirmed commit of the pending series: its own undo, the series' persist-id and new deadline,
        appended as a line (JournalError when it cannot).

        Rewriting the whole series' undo instead cost a follow-up ~90 ms at
        100,000 created sessions, paid in the blackout of a move whose
        target holds new sessions.  :meth:`load` folds the lines in order,
        as :meth:`ConfirmedCommits.prepare` did in memory.
        """
        path = self.path
        if path is None:
            return
        try:
            with path.open("a") as f:
                f.write(self._line(record))
        except OSError as e:
            raise JournalError(f"cannot append to the confirmed commit's undo record {path}: {e}") from e

    @staticmethod
    def _line(record: Record) -> str:
        u = record.undo
        doc: dict[str, Any] = {
            "format": _FORMAT, "persist-id": record.persist, "deadline": record.deadline,
            "written": time.time(), "admission": u.admission, "fields": FIELD_NAMES,
            "created": list(u.created), "old": [[getattr(s, n) for n in FIELD_NAMES] for s in u.old.values()],
        }
        return json.dumps(doc, separators=(",", ":"), check_circular=False) + "\n"

    def remove(self) -> None:
        """Forget the record (confirmed, cancelled or rolled back)."""
        path = self.path
        if path is None:
            return
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            log.error("cannot remove the confirmed commit's undo record %s: %s", path, e)

    def load(self) -> Record | None:
        """The record left by an earlier run, if any (JournalError when it cannot be read).

        Its first line is the series' first commit, each next one a follow-up
        (:meth:`append`).  A last line cut short (the agent died while
        appending it, before that commit changed anything) is left out.
        """
        path = self.path
        if path is None or not path.exists():
            return None
        try:
            text = path.read_text()
            lines = text.split("\n")
            if not text.endswith("\n") and len(lines) > 1:
                log.warning("%s: its last follow-up was cut short (the agent died before that commit applied): left out", path)
                lines = lines[:-1]
            record: Record | None = None
            for line in filter(None, lines):
                one = self._record(json.loads(line))
                record = one if record is None else Record(record.undo.then(one.undo), one.persist, one.deadline)
            if record is None:
                raise ValueError("it is empty")
            return record
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise JournalError(f"cannot read the confirmed commit's undo record {path}: {e}") from e

    @staticmethod
    def _record(doc: dict[str, Any]) -> Record:
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {_FORMAT}")
        names = doc["fields"]
        created = {tuple(k) for k in doc["created"]}
        old = [NatSession(**dict(zip(names, row))) for row in doc["old"]]
        return Record(Undo(created, {s.key: s for s in old}, doc["admission"]), doc["persist-id"], float(doc["deadline"]))

    def set_aside(self) -> Path | None:
        """Rename an unreadable record to ``*.failed-TIME`` (kept for a human, never read again)."""
        path = self.path
        if path is None:
            return None
        dest = path.with_name(f"{path.name}.failed-{int(time.time())}")
        try:
            os.replace(path, dest)
        except OSError as e:
            log.error("cannot set aside %s: %s", path, e)
            return None
        return dest


@dataclass
class Pending:
    """A pending series of confirmed commits."""

    undo: Undo
    #: the session that issued the latest confirmed commit of the series.
    owner: int
    #: the persist token (None: the series ends with its session).
    persist: str | None
    #: when it is rolled back unless confirmed (epoch seconds).
    deadline: float
    timeout: int
    timer: threading.Timer | None = None


class ConfirmedCommits:
    """A datastore's pending confirmed commit, if any: its undo, its timer, its journal.

    The mechanism only; who may confirm, extend or cancel is the datastore's
    rule.  ``mutex`` is the datastore's: a timer's rollback takes it, so it
    never runs in the middle of a request.  ``on_rolled_back`` runs after each
    rollback, under it (the datastore resets its candidate).
    """

    def __init__(self, provider: SessionProvider, journal: Journal, mutex: Any, on_rolled_back: Callable[[], None]) -> None:
        self.provider = provider
        self.journal = journal
        self._mutex = mutex
        self._on_rolled_back = on_rolled_back
        #: the pending series; read and changed under ``mutex``.
        self.pending: Pending | None = None

    def prepare(self, sid: int, undo: Undo, timeout: int, persist: str | None, created_later: bool = False) -> Pending:
        """The series after one more confirmed commit by ``sid``, its undo journalled; :meth:`arm` it once running changed.

        The undo is on disk before running changes: an agent that dies
        half-way through the apply still finds it at restart.  A follow-up
        keeps the rollback point and, without a new ``persist``, the token.
        ``created_later``: the keys the commit creates are journalled by
        :meth:`created` as the writes go out, each before the node gets it,
        not here: the JSON of 100,000 keys (~90 ms) is then written while
        the kernel creates what came before, not ahead of the first create.
        """
        written = Undo(set(), undo.old, undo.admission) if created_later else undo
        prior = self.pending
        if prior is None:
            nxt = Pending(undo, sid, persist, time.time() + timeout, timeout)
            self.journal.save(Record(written, persist, nxt.deadline))
            return nxt
        if persist is None:
            persist = prior.persist
        nxt = Pending(prior.undo.then(undo), sid, persist, time.time() + timeout, timeout)
        # This commit's own undo only: the journal folds it onto the series' as this did.
        self.journal.append(Record(written, persist, nxt.deadline))
        return nxt

    def created(self, pending: Pending, keys: list[SessionKey]) -> None:
        """Keys the commit prepared with ``created_later`` is about to create: one more line of its undo, appended now.

        A line folds onto the series like a follow-up's (its created keys
        join the series'); an agent that dies before the line is whole
        never sent those creates, and :meth:`Journal.load` leaves it out.
        """
        self.journal.append(Record(Undo(set(keys)), pending.persist, pending.deadline))

    def abandon(self) -> None:
        """A prepared commit failed to apply: the journal holds the series as it was."""
        p = self.pending
        if p is None:
            self.journal.remove()
        else:
            try:
                self.journal.save(Record(p.undo, p.persist, p.deadline))
            except JournalError as e:
                log.error("%s: the record holds the undo of a commit that was not applied", e)

    def arm(self, pending: Pending) -> None:
        """Make ``pending`` the pending series and start its timer (a previous one's is cancelled)."""
        if self.pending is not None and self.pending.timer is not None:
            self.pending.timer.cancel()
        # threading's waits cannot take more than TIMEOUT_MAX (~292 years on Linux).
        pending.timer = threading.Timer(min(pending.timeout, threading.TIMEOUT_MAX), self._expire, args=(pending,))
        pending.timer.daemon = True
        pending.timer.name = "confirmed-commit-timer"
        self.pending = pending
        pending.timer.start()

    def confirm(self) -> Pending | None:
        """The series is confirmed (or over): timer stopped, journal cleared; the series that was pending."""
        p, self.pending = self.pending, None
        if p is not None:
            if p.timer is not None:
                p.timer.cancel()
            self.journal.remove()
        return p

    def roll_back(self, why: str) -> bool:
        """Undo the pending series now, whatever locks are held (the server does it); False when none is pending."""
        with self._mutex:
            p = self.confirm()
            if p is None:
                return False
            log.warning("confirmed commit of session %d rolled back (%s): %s", p.owner, why, undo_changes(self.provider, p.undo))
            self._on_rolled_back()
            return True

    def recover(self) -> bool:
        """At start: roll back a series the journal says was pending when the agent stopped.

        RFC 6241 8.4.1: a pending confirmed commit does not survive a restart.
        True when there was one.  An unreadable record is set aside and logged.
        """
        with self._mutex:
            try:
                rec = self.journal.load()
            except JournalError as e:
                log.error("%s; set aside as %s, nothing rolled back", e, self.journal.set_aside())
                return False
            if rec is None:
                return False
            log.warning("a confirmed commit was pending when the agent stopped (persist-id %r, due %s UTC): rolling it back (%s)",
                        rec.persist, time.strftime("%H:%M:%S", time.gmtime(rec.deadline)), rec.undo.summary())
            log.warning("confirmed commit rolled back after a restart: %s", undo_changes(self.provider, rec.undo))
            self.journal.remove()
            self._on_rolled_back()
            return True

    def _expire(self, pending: Pending) -> None:
        """The timer of ``pending`` ran out (in the timer's thread)."""
        try:
            with self._mutex:
                if self.pending is not pending:
                    return  # confirmed, extended or cancelled while the timer fired
                self.roll_back(f"not confirmed within {pending.timeout} s")
        except Exception:  # a bug must not die unseen in a timer thread
            log.exception("confirmed commit rollback failed")
