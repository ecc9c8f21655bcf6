"""What a migration holds on a node: its datastore locks and its confirmed commits.

A migration owns both nodes from preflight to the end.  On its session to
each agent it locks running and candidate (RFC 6241 7.5): a second
migration, or any other writer, is refused at once with ``lock-denied``
naming the session that holds them, and nothing has changed when it is.

Every change a dead controller must not leave behind is a *persistent
confirmed commit* (RFC 6241 8.4, ``:confirmed-commit:1.1``): the target's
copy until the target holds every session, the source's freeze, the
target's hold of new sessions.  If the controller dies, the agent rolls
the change back by itself once ``confirm-timeout`` passes, whether or not
the controller's session is still open; the locks go with the session.
The token (``persist``) is derived from the two nodes' names, so that
``natmig recover`` can confirm or cancel a pending change at once instead
of waiting for the timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ControllerError

#: RFC 6241 8.4: what an agent must announce for a crash-safe migration.
CONFIRMED_COMMIT = "urn:ietf:params:netconf:capability:confirmed-commit:1.1"
CANDIDATE = "urn:ietf:params:netconf:capability:candidate:1.0"
WRITABLE_RUNNING = "urn:ietf:params:netconf:capability:writable-running:1.0"
#: the datastores a migration writes, locked in this order (RFC 6241 7.5 advises running first).
LOCKED = ("running", "candidate")


#: the bounds of ``confirm-timeout`` in seconds: long enough to outlast one
#: phase, short enough that a dead controller cannot keep a node frozen for long.
CONFIRM_TIMEOUT_RANGE = (1, 3600)


def check_confirm_timeout(seconds: float) -> None:
    """Refuse a ``confirm-timeout`` outside :data:`CONFIRM_TIMEOUT_RANGE`, naming it."""
    low, high = CONFIRM_TIMEOUT_RANGE
    if not low <= seconds <= high:
        raise ControllerError(f"confirm-timeout: {seconds:g} s is not in {low}..{high}")


class Writer(Protocol):
    """The part of a node's NETCONF client this module drives (see controller.netconf.NodeClient)."""

    name: str

    @property
    def capabilities(self) -> list[str]: ...
    @property
    def connected(self) -> bool: ...  # whether the session is up: a lock is released only over a live one
    def lock(self, target: str = "running") -> None: ...
    def unlock(self, target: str = "running") -> None: ...
    def set_admission(self, admit: bool, target: str = "running") -> None: ...
    def commit(self, confirmed: bool = False, timeout: float | None = None, persist: str | None = None, persist_id: str | None = None) -> None: ...
    def cancel_commit(self, persist_id: str | None = None) -> None: ...


class NodeBusy(ControllerError):
    """A node's datastore is locked by another session (another migration, or another writer)."""


def persist_token(source: str, target: str) -> str:
    """The ``persist`` token of a migration from ``source`` to ``target``.

    Derived, not random: ``natmig recover`` knows the two names from the
    inventory and can confirm or cancel what an interrupted migration left
    pending.  Two migrations of the same pair cannot overlap (the locks).
    """
    return f"natmig-migration-{source}-to-{target}"


def _is_busy(e: Exception) -> bool:
    return getattr(e, "tag", None) in ("lock-denied", "in-use")


def _holder_words(e: Exception) -> str:
    """The agent's own words for who holds the lock (its message names the session)."""
    msg = getattr(e, "message", None) or str(e)
    return msg.rstrip(".")


@dataclass
class Locks:
    """The datastores one session has locked on one node."""

    node: Writer
    held: list[str]

    @classmethod
    def take(cls, node: Writer, role: str) -> "Locks":
        """Lock running then candidate on ``node``; :class:`NodeBusy` names the holder when either is taken.

        A lock the node refused leaves the ones already taken released again:
        nothing is held by a migration that will not run.
        """
        held: list[str] = []
        try:
            for name in LOCKED:
                node.lock(name)
                held.append(name)
        except ControllerError as e:
            Locks(node, held).release()
            if _is_busy(e):
                raise NodeBusy(
                    f"{role} {node.name} is in use: {_holder_words(e)}; another migration (or another writer) holds it. "
                    "Nothing was changed; retry when it has finished"
                ) from e
            raise
        return cls(node, held)

    def release(self) -> list[str]:
        """Unlock what is held (best effort: a closed session has released them anyway); returns what failed."""
        failed: list[str] = []
        for name in reversed(self.held):
            try:
                self.node.unlock(name)
            except Exception as e:  # noqa: BLE001 - the session's end releases it too; say so, never raise
                failed.append(f"{name}: {e}")
        self.held = []
        return failed


def confirmed_admission(node: Writer, admit: bool, token: str, timeout: float) -> None:
    """Set admission through the candidate and a persistent confirmed commit: rolled back after ``timeout`` unless confirmed."""
    node.set_admission(admit, target="candidate")
    node.commit(confirmed=True, timeout=timeout, persist=token)


def confirm_admission(node: Writer, admit: bool, token: str) -> None:
    """Set admission and confirm the pending commit ``token`` in the same commit."""
    node.set_admission(admit, target="candidate")
    node.commit(persist_id=token)


def nothing_pending(e: Exception) -> bool:
    """Whether a refused confirm or cancel only says that no confirmed commit is pending (it rolled back or was confirmed)."""
    text = (getattr(e, "message", None) or str(e)).lower()
    return "no confirmed commit" in text or "not pending" in text or "nothing is pending" in text


def already_pending(e: Exception) -> bool:
    """Whether a refused confirmed commit says another confirmed commit is still pending (an interrupted migration's)."""
    text = (getattr(e, "message", None) or str(e)).lower()
    return "is pending" in text and "no confirmed commit" not in text or "awaits confirmation" in text


def cancel_pending(node: Writer, token: str) -> bool:
    """Cancel the pending confirmed commit ``token``; False when none was pending."""
    try:
        node.cancel_commit(persist_id=token)
        return True
    except ControllerError as e:
        if nothing_pending(e):
            return False
        raise


def describe_error(e: Any) -> str:
    """One line for a report."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__
