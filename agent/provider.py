"""The session provider: where a NAT node's session table really lives.

The NETCONF front end and the datastore talk to a provider and never to the
kernel; a provider never sees XML (the netopeer2/sysrepo split).  The real
implementation is :class:`natmig.agent.conntrack.ConntrackProvider`;
:class:`MemoryProvider` is the in-memory stand-in for unit tests.
"""

from __future__ import annotations

import abc
import queue
import threading
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Iterable, Iterator, Sequence

from ..errors import ProviderError
from ..model import NatSession, SessionKey, format_key, table_digest


@dataclass(frozen=True)
class Snapshot:
    """What :meth:`SessionProvider.list` read: the NATed sessions and what was left out."""

    sessions: list[NatSession]
    untranslated: int = 0


@dataclass(frozen=True)
class SessionEvent:
    """A change of the table seen by :meth:`SessionProvider.watch`: ``kind`` is "new" or "destroy"."""

    kind: str
    session: NatSession


class ApplyError(ProviderError):
    """A batch was refused whole; ``problems`` maps each offending key to why."""

    def __init__(self, problems: dict[SessionKey, str]) -> None:
        self.problems = dict(problems)
        shown = [f"{format_key(k)}: {why}" for k, why in list(self.problems.items())[:20]]
        more = len(self.problems) - len(shown)
        if more > 0:
            shown.append(f"... and {more} more")
        super().__init__(f"batch refused, nothing applied ({len(self.problems)} offending entries):\n  " + "\n  ".join(shown))


class SessionProvider(abc.ABC):
    """A NAT node's live session table.

    ``apply`` is all-or-nothing: either every entry of the batch exists
    afterwards exactly as given (created, or replaced when the key already
    exists), or the table is as it was and :class:`ApplyError` names the
    offending keys.  A batch is refused when an entry's translated address is
    not one the node owns, or when its reply tuple (protocol, translated
    address and port, remote address and port: :attr:`NatSession.reply_key`)
    is held by another session of the table or of the batch.  A public port
    alone may be shared by sessions to different remote endpoints, as Linux
    itself does once the port range is busy.
    """

    @abc.abstractmethod
    def list(self) -> Snapshot:
        """Read every translated session of the table."""

    def batches(self) -> Iterator[list[NatSession]]:
        """The sessions :meth:`list` returns, in batches, each as soon as it is read.

        This default reads the whole table as one batch; a provider that reads
        its table as a stream (conntrack) hands out each part while the rest
        is still being read.
        """
        yield self.list().sessions

    def statistics(self) -> dict[str, Any]:
        """The nat-statistics leaves, read now: ``{"sessions", "untranslated", "digest"}``.

        ``digest`` is :func:`natmig.model.table_digest` of the sessions
        :meth:`list` would return.  This default reads the whole table; a
        provider that can count and digest without building the sessions
        overrides it (the migration asks both nodes for it on its critical path).
        """
        snap = self.list()
        return {"sessions": len(snap.sessions), "untranslated": snap.untranslated, "digest": table_digest(snap.sessions)}

    @abc.abstractmethod
    def apply(self, sessions: Sequence[NatSession]) -> None:
        """Create or replace a batch of sessions, all or nothing."""

    @abc.abstractmethod
    def delete(self, keys: Iterable[SessionKey] | None = None) -> int:
        """Delete sessions by key (missing keys are ignored), or all when ``keys`` is None.

        Returns how many were deleted.
        """

    @abc.abstractmethod
    def watch(self) -> "Watch":
        """Start following table changes; use as a context manager and iterate."""

    @abc.abstractmethod
    def public_addresses(self) -> set[str]:
        """Addresses this node translates to (the only valid translated_address values)."""

    @abc.abstractmethod
    def set_admission(self, admit: bool) -> None:
        """Admit (True) or drop (False) packets that would create a new session.

        The nat-control/admit-new-sessions leaf of the module; see its description.
        """

    @abc.abstractmethod
    def admission(self) -> bool:
        """Whether new sessions are admitted now."""


class Watch(abc.ABC):
    """A stream of :class:`SessionEvent`; iterate it, close it when done."""

    @abc.abstractmethod
    def get(self, timeout: float | None = None) -> SessionEvent | None:
        """The next event, or None when ``timeout`` passes first."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop following."""

    def drain(self) -> list[SessionEvent]:
        """Every event already waiting, without blocking."""
        out = []
        while (ev := self.get(0)) is not None:
            out.append(ev)
        return out

    def __iter__(self) -> Iterator[SessionEvent]:
        while True:
            ev = self.get()
            if ev is None:
                return
            yield ev

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_TRANSLATED = attrgetter("translated_address")


def check_batch(
    sessions: Sequence[NatSession],
    existing: dict[SessionKey, NatSession],
    owned: set[str],
) -> dict[SessionKey, str]:
    """Why each entry of a batch cannot be applied on top of ``existing``; empty when it can.

    Shared by every provider so that they refuse the same batches.
    """
    batch_keys = {s.key for s in sessions}
    if _plainly_acceptable(sessions, batch_keys, existing, owned):
        return {}
    problems: dict[SessionKey, str] = {}
    # Reply tuples held by sessions that the batch does not replace.
    held = {s.reply_key: k for k, s in existing.items() if k not in batch_keys}
    seen: dict[tuple[str, str, int, str, int], SessionKey] = {}
    keys_seen: set[SessionKey] = set()
    for s in sessions:
        k = s.key
        if k in keys_seen:
            problems[k] = "appears twice in the batch"
            continue
        keys_seen.add(k)
        if s.translated_address not in owned:
            problems[k] = f"translated_address {s.translated_address} is not an address of this node ({', '.join(sorted(owned)) or 'none'})"
            continue
        pub = s.reply_key
        other = held.get(pub) or seen.get(pub)
        if other is not None and other != k:
            problems[k] = (
                f"translated {s.protocol} {s.translated_address}:{s.translated_port} towards "
                f"{s.dst_address}:{s.dst_port} is already used by {format_key(other)}"
            )
            continue
        seen[pub] = k
    return problems


def _plainly_acceptable(
    sessions: Sequence[NatSession],
    batch_keys: set[SessionKey],
    existing: dict[SessionKey, NatSession],
    owned: set[str],
) -> bool:
    """Whether :func:`check_batch` finds nothing, decided with whole-batch set operations.

    A large batch is almost always acceptable: distinct keys, owned
    addresses, and reply tuples distinct from each other and from those of
    the sessions it leaves in place.  Those are exactly the conditions under
    which the entry-by-entry loop finds no problem; set operations in C
    decide them about four times faster.  False means: run the loop, which
    names the offenders.
    """
    if len(batch_keys) != len(sessions) or not set(map(_TRANSLATED, sessions)) <= owned:
        return False
    replies = {s.reply_key for s in sessions}
    if len(replies) != len(sessions):
        return False
    return not any(s.reply_key in replies for k, s in existing.items() if k not in batch_keys)


@dataclass
class MemoryProvider(SessionProvider):
    """An in-memory session table with the same semantics as the real one (for unit tests)."""

    owned: set[str] = field(default_factory=lambda: {"203.0.113.1"})
    table: dict[SessionKey, NatSession] = field(default_factory=dict)
    untranslated: int = 0
    admit: bool = True

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: list[_QueueWatch] = []

    def list(self) -> Snapshot:
        with self._lock:
            return Snapshot(list(self.table.values()), self.untranslated)

    def apply(self, sessions: Sequence[NatSession]) -> None:
        with self._lock:
            problems = check_batch(sessions, self.table, self.owned)
            if problems:
                raise ApplyError(problems)
            for s in sessions:
                old = self.table.get(s.key)
                if old is not None:
                    self._emit("destroy", old)
                self.table[s.key] = s
                self._emit("new", s)

    def delete(self, keys: Iterable[SessionKey] | None = None) -> int:
        with self._lock:
            victims = list(self.table) if keys is None else [k for k in keys if k in self.table]
            for k in victims:
                self._emit("destroy", self.table.pop(k))
            return len(victims)

    def watch(self) -> "Watch":
        w = _QueueWatch(self)
        with self._lock:
            self._watchers.append(w)
        return w

    def public_addresses(self) -> set[str]:
        return set(self.owned)

    def set_admission(self, admit: bool) -> None:
        self.admit = admit

    def admission(self) -> bool:
        return self.admit

    def _emit(self, kind: str, s: NatSession) -> None:
        for w in self._watchers:
            w.q.put(SessionEvent(kind, s))


class _QueueWatch(Watch):
    def __init__(self, owner: MemoryProvider) -> None:
        self.owner = owner
        self.q: queue.Queue[SessionEvent] = queue.Queue()

    def get(self, timeout: float | None = None) -> SessionEvent | None:
        try:
            ev = self.q.get(timeout=timeout) if timeout != 0 else self.q.get_nowait()
        except queue.Empty:
            return None
        return ev  # None is the end-of-stream mark put by close()

    def close(self) -> None:
        with self.owner._lock:
            if self in self.owner._watchers:
                self.owner._watchers.remove(self)
        self.q.put(None)  # type: ignore[arg-type]  # wakes a reader blocked in get()
