"""The locks of a running/candidate pair (RFC 6241 7.5, 7.6), shared by the NAT datastore and the state store.

What a lock refuses (lock-denied, in-use), what a session's end releases (its
locks; the changes of a candidate it had locked, 8.3.5.2; a confirmed commit
it made without <persist>, 8.4.1), and which datastores there are.  The store
gives its mutex, its session naming and the four hooks at the end.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from ..wire.problems import refuse

log = logging.getLogger(__name__)

DATASTORES = ("running", "candidate")


class DatastoreLocks:
    """Locks of ``running`` and ``candidate`` by session id, under the store's ``_mutex``."""

    describe: Callable[[int], str]
    _mutex: Any  # the store's RLock
    _locks: dict[str, int]

    def lock(self, name: str, sid: int) -> None:
        """Lock a datastore for session ``sid`` (lock-denied when held, or when the candidate has changes, RFC 6241 7.5)."""
        self._check_name(name)
        with self._mutex:
            holder = self._locks.get(name)
            if holder is not None:
                raise refuse("lock-denied", f"{name} is locked by {self.describe(holder)}", type="protocol", info={"session-id": str(holder)})
            if name == "candidate" and self._candidate_changed():
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
            # RFC 6241 8.3.5.2: releasing the candidate lock does not discard its
            # changes; only the session's end does (see release_session).

    def release_session(self, sid: int) -> None:
        """A session ended: its locks go; a candidate it had locked loses its changes; its confirmed commit without <persist> is rolled back."""
        with self._mutex:
            for name in [n for n, h in self._locks.items() if h == sid]:
                del self._locks[name]
                if name == "candidate":
                    self._drop_candidate()
                log.info("session %d ended: released lock of %s", sid, name)
            if self._unpersisted_owner() == sid:
                self._roll_back_pending(f"session {sid}, which issued it without <persist>, ended")

    def lock_holder(self, name: str) -> int | None:
        """The session holding the lock of ``name``, if any."""
        return self._locks.get(name)

    def _check_write(self, name: str, sid: int) -> None:
        """in-use when another session holds ``name``'s lock, or made a confirmed commit without <persist> not yet confirmed.

        That session alone may confirm it, and a change made meanwhile by
        another session would be mixed into what it confirms or rolls back.
        """
        holder = self._locks.get(name)
        if holder is not None and holder != sid:
            raise refuse("in-use", f"{name} is locked by {self.describe(holder)}", type="protocol", info={"session-id": str(holder)})
        owner = self._unpersisted_owner()
        if owner is not None and owner != sid:
            raise refuse("in-use", f"a confirmed commit of {self.describe(owner)} awaits confirmation; only that session may change the configuration until it is confirmed or cancelled",
                         type="protocol", info={"session-id": str(owner)})

    @staticmethod
    def _check_name(name: str) -> None:
        if name not in DATASTORES:
            raise refuse("invalid-value", f"unknown datastore {name!r} (this agent has {', '.join(DATASTORES)})", type="protocol")

    # -- the store's hooks ----------------------------------------------------

    def _candidate_changed(self) -> bool:
        """Whether the candidate differs from running (uncommitted changes)."""
        raise NotImplementedError

    def _drop_candidate(self) -> None:
        """Discard the candidate's changes (its locking session ended)."""
        raise NotImplementedError

    def _unpersisted_owner(self) -> int | None:
        """The session of a pending confirmed commit made without <persist>, if there is one."""
        raise NotImplementedError

    def _roll_back_pending(self, why: str) -> None:
        """Roll the pending confirmed commit back now."""
        raise NotImplementedError
