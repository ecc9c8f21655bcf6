"""The session provider: where a NAT node's session table really lives.

The NETCONF front end and the datastore talk to a provider and never to the
kernel; a provider never sees XML (the netopeer2/sysrepo split).  The real
implementation is :class:`natmig.agent.conntrack.ConntrackProvider`;
:class:`MemoryProvider` is the in-memory stand-in for unit tests.
"""

from __future__ import annotations

import builtins  # builtins.list in signatures: the class's own list() method shadows it there
import abc
import queue
import threading
from dataclasses import dataclass, field, replace
from operator import attrgetter
from collections.abc import Set as AbstractSet
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Sequence

from .. import pool
from ..codec import Codec
from ..errors import ProviderError
from ..model import KEY_OF, REPLY_KEY_OF, NatSession, SessionKey, format_key, index_by_key, key_range, range_digests, table_digest

#: (protocol, translated address and port, remote address and port): :attr:`NatSession.reply_key`.
ReplyKey = tuple[str, str, int, str, int]

#: What a provider's apply tells of the keys it is about to create (see SessionProvider.apply).
BeforeCreate = Callable[[list[SessionKey]], None]


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

    def batches(self) -> Iterator[builtins.list[NatSession]]:
        """The sessions :meth:`list` returns, in batches, each as soon as it is read.

        This default reads the whole table as one batch; a provider that reads
        its table as a stream (conntrack) hands out each part while the rest
        is still being read.
        """
        yield self.list().sessions

    def entries_xml(self, codec: Codec) -> Iterator[bytes]:
        """:meth:`batches`, each as the codec's bare XML entries (``codec.encode_xml(batch, root=None)``).

        What a streamed get-config sends; a provider that reads its table as
        text (conntrack) writes the XML from the text, without the records.
        """
        for batch in self.batches():
            yield codec.encode_xml(batch, root=None)

    def statistics(self) -> dict[str, Any]:
        """The nat-statistics leaves, read now: ``{"sessions", "untranslated", "digest"}``.

        ``digest`` is :func:`natmig.model.table_digest` of the sessions
        :meth:`list` would return.  This default reads the whole table; a
        provider that can count and digest without building the sessions
        overrides it (the migration asks both nodes for it on its critical path).
        """
        snap = self.list()
        return {"sessions": len(snap.sessions), "untranslated": snap.untranslated, "digest": table_digest(snap.sessions)}

    def range_digests(self) -> dict[int, tuple[int, int]]:
        """nat-range-digests: each non-empty key range's (sessions, digest accumulator), read now.

        :func:`natmig.model.range_digests` of what :meth:`list` returns: the
        ranges' counts add up to ``statistics()["sessions"]`` and their
        accumulators XOR to its digest.  This default reads the whole
        table; a provider that follows its table answers from memory.
        """
        return range_digests(self.list().sessions)

    def range_sessions(self, ranges: Collection[int]) -> builtins.list[NatSession]:
        """The sessions whose key is in one of these key ranges (:func:`natmig.model.key_range`), as :meth:`list` shows them.

        This default reads the whole table and keeps those; a provider that
        knows which keys a range holds reads only them.
        """
        want = set(ranges)
        return [s for s in self.list().sessions if key_range(s.key) in want]

    def lookup(self, keys: Iterable[SessionKey]) -> builtins.list[NatSession]:
        """The sessions with these keys, as :meth:`list` shows them, in the order asked; missing keys are absent.

        What a running edit reads: only the entries it names.  This default
        reads the whole table; a provider that can find an entry by its key
        overrides it (conntrack: a ctnetlink GET each; memory: the dict).
        """
        have = index_by_key(self.list().sessions)
        return [have[k] for k in dict.fromkeys(keys) if k in have]

    def check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        """Why each entry of a batch could not be applied now, the sessions of ``freed`` gone first; empty when it could.

        :func:`check_batch` against the live table: what :meth:`apply` would
        refuse the batch for, asked before anything changes (an edit that
        deletes or sets nat-control first, test-only, continue-on-error).
        This default reads the whole table; providers override it with a
        check that reads only what the batch names.
        """
        existing = {k: s for k, s in index_by_key(self.list().sessions).items() if k not in freed}
        return check_batch(sessions, existing, self.public_addresses())

    @abc.abstractmethod
    def apply(self, sessions: Sequence[NatSession], before_create: BeforeCreate | None = None) -> None:
        """Create or replace a batch of sessions, all or nothing.

        ``before_create(keys)`` is told the keys of sessions about to be
        created, each before the node gets it (a confirmed commit's undo,
        written ahead as the writes go out): a key told may still be refused.
        """

    @abc.abstractmethod
    def delete(self, keys: Iterable[SessionKey] | None = None) -> int:
        """Delete sessions by key (missing keys are ignored), or all when ``keys`` is None.

        Returns how many were deleted.
        """

    @abc.abstractmethod
    def watch(self) -> "Watch":
        """Start following table changes; use as a context manager and iterate."""

    @abc.abstractmethod
    def public_addresses(self) -> AbstractSet[str]:
        """Addresses this node translates to (the only valid translated_address values); a :class:`~natmig.pool.Owned` also limits their ports."""

    @abc.abstractmethod
    def set_admission(self, admit: bool) -> None:
        """Admit (True) or drop (False) packets that would create a new session.

        The nat-control/admit-new-sessions leaf of the module; see its description.
        """

    @abc.abstractmethod
    def admission(self) -> bool:
        """Whether new sessions are admitted now."""

    def held(self) -> int | None:
        """Packets of new sessions held now while admission is closed (natmig-state's state-control/held); None: this node never holds."""
        return None


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
_PORT = attrgetter("translated_port")


#: TCP states of a connection still in its handshake.
HANDSHAKE_STATES = frozenset({"SYN_SENT", "SYN_RECV", "SYN_SENT2"})


#: TCP states whose entry gives its public port up to a newer connection that
#: wants it: Linux's NAT, when it maps a new connection onto a reply tuple held
#: by such an entry, kills that entry (nf_nat_used_tuple_harder, kernel 6.4 on;
#: the states from TIME_WAIT on).  A NAT under port pressure does so all the
#: time, so a table read while it serves (a dump is no snapshot) may hold both.
YIELDING_STATES = frozenset({"TIME_WAIT", "CLOSE", "SYN_SENT2"})


def yields_port(s: NatSession) -> bool:
    """Whether ``s`` gives its reply tuple up to another session that wants it (see :data:`YIELDING_STATES`)."""
    return s.protocol == "TCP" and s.tcp_state in YIELDING_STATES


def as_written(sessions: Sequence[NatSession]) -> Sequence[NatSession]:
    """Sessions as the node writes them into its table: handshake states become ESTABLISHED.

    A state written here was read on another node a moment ago: a connection
    seen in SYN_SENT completes its handshake through that node before traffic
    moves.  Recreated in SYN_SENT, its next data packets are invalid for the
    kernel's TCP state machine (an ACK from the inside in SYN_SENT) and are
    dropped or leave untranslated until the connection stalls out.
    ESTABLISHED accepts both the rest of the handshake (a late SYN-ACK is
    ignored, not refused) and the data; the entry's own timeout is kept.
    This is the node's business, not the writer's: any controller, the
    generic engine too, writes what it read.
    """
    if not any(s.tcp_state in HANDSHAKE_STATES for s in sessions):
        return sessions
    return [replace(s, tcp_state="ESTABLISHED") if s.tcp_state in HANDSHAKE_STATES else s for s in sessions]


def check_batch(
    sessions: Sequence[NatSession],
    existing: dict[SessionKey, NatSession],
    owned: AbstractSet[str],
) -> dict[SessionKey, str]:
    """Why each entry of a batch cannot be applied on top of ``existing``; empty when it can.

    Shared by every provider so that they refuse the same batches.
    """
    batch_keys = set(map(KEY_OF, sessions))
    if _plainly_acceptable(sessions, batch_keys, existing, owned):
        return {}
    problems: dict[SessionKey, str] = {}
    # Reply tuples held by sessions that the batch does not replace.
    held = {s.reply_key: k for k, s in existing.items() if k not in batch_keys}
    seen: dict[ReplyKey, SessionKey] = {}
    keys_seen: set[SessionKey] = set()
    for s in sessions:
        k = s.key
        if k in keys_seen:
            problems[k] = _TWICE
            continue
        keys_seen.add(k)
        why = _not_owned(s, owned)
        if why is not None:
            problems[k] = why
            continue
        pub = s.reply_key
        other = held.get(pub) or seen.get(pub)
        if other is not None and other != k:
            problems[k] = _used(s, other)
            continue
        seen[pub] = k
    return problems


def check_batch_by_holders(
    sessions: Sequence[NatSession],
    holders: Mapping[ReplyKey, SessionKey],
    owned: AbstractSet[str],
    freed: Collection[SessionKey] = (),
) -> dict[SessionKey, str]:
    """:func:`check_batch` without the table: what a write of K entries checks at any table size.

    ``holders`` maps reply tuples of the batch to the key of the table's
    session holding each (those not held are absent; more is harmless): a
    provider finds them by the batch's K reply tuples (an index, or a GET
    each) instead of reading the whole table.  ``freed``: keys whose
    sessions go before the batch is written (an edit's deletes).  The result
    equals ``check_batch(sessions, {k: s for k, s in table.items() if k not
    in freed}, owned)`` on a table whose reply tuples are distinct, as a
    NAT's are (tests/test_provider.py proves it on random tables); the loop
    is check_batch's, a holder in the batch or freed counting as gone.
    """
    batch_keys = {s.key for s in sessions}
    problems: dict[SessionKey, str] = {}
    seen: dict[ReplyKey, SessionKey] = {}
    keys_seen: set[SessionKey] = set()
    for s in sessions:
        k = s.key
        if k in keys_seen:
            problems[k] = _TWICE
            continue
        keys_seen.add(k)
        why = _not_owned(s, owned)
        if why is not None:
            problems[k] = why
            continue
        pub = s.reply_key
        other = holders.get(pub)
        if other is not None and (other in batch_keys or other in freed):
            other = None
        other = other or seen.get(pub)
        if other is not None and other != k:
            problems[k] = _used(s, other)
            continue
        seen[pub] = k
    return problems


_TWICE = "appears twice in the batch"


def _not_owned(s: NatSession, owned: AbstractSet[str]) -> str | None:
    """Why ``s`` translates to what this node does not own (an address, or a port of a :class:`~natmig.pool.Owned`), or None."""
    if s.translated_address not in owned:
        return f"translated_address {s.translated_address} is not an address of this node ({pool.describe(owned)})"
    if isinstance(owned, pool.Owned):
        return owned.port_problem(s.translated_address, s.translated_port)
    return None



def _used(s: NatSession, other: SessionKey) -> str:
    """The words the datastore maps to data-not-unique ("already used")."""
    return (
        f"translated {s.protocol} {s.translated_address}:{s.translated_port} towards "
        f"{s.dst_address}:{s.dst_port} is already used by {format_key(other)}"
    )


class PartsCheck:
    """:func:`check_batch` of a batch of creates taken part by part, in order, while earlier parts are written.

    Each :meth:`plainly_acceptable` call answers for the batch so far, as
    :func:`_plainly_acceptable` would for it whole: distinct keys, owned
    translations, reply tuples distinct from each other and from those the
    table's other sessions (``existing``) hold.  False names nobody: the
    caller stops, undoes what it wrote, and names the offenders with
    :func:`check_batch` over the whole batch, as before.  For creates only:
    no key of the batch may be one of ``existing``'s.
    """

    def __init__(self, existing: Mapping[SessionKey, NatSession], owned: AbstractSet[str]) -> None:
        self.owned = owned
        self.keys: set[SessionKey] = set()
        self.replies: set[ReplyKey] = {s.reply_key for s in existing.values()}

    def plainly_acceptable(self, part: Sequence[NatSession]) -> bool:
        """Whether the batch so far, with ``part``, is one check_batch finds nothing in (then ``part`` counts as checked)."""
        keys = set(map(KEY_OF, part))
        if len(keys) != len(part) or not self.keys.isdisjoint(keys):
            return False
        replies = _owned_distinct_replies(part, self.owned)
        if replies is None or not self.replies.isdisjoint(replies):
            return False
        self.keys |= keys
        self.replies |= replies
        return True


def _plainly_acceptable(
    sessions: Sequence[NatSession],
    batch_keys: set[SessionKey],
    existing: dict[SessionKey, NatSession],
    owned: AbstractSet[str],
) -> bool:
    """Whether :func:`check_batch` finds nothing, decided with whole-batch set operations.

    A large batch is almost always acceptable: distinct keys, owned
    addresses, and reply tuples distinct from each other and from those of
    the sessions it leaves in place.  Those are exactly the conditions under
    which the entry-by-entry loop finds no problem; set operations in C
    decide them about four times faster.  False means: run the loop, which
    names the offenders.
    """
    if len(batch_keys) != len(sessions):
        return False
    replies = _owned_distinct_replies(sessions, owned)
    if replies is None:
        return False
    return not any(s.reply_key in replies for k, s in existing.items() if k not in batch_keys)


def _owned_distinct_replies(sessions: Sequence[NatSession], owned: AbstractSet[str]) -> set[ReplyKey] | None:
    """The sessions' reply tuples, when every translation is owned and no two share one; else None."""
    addresses = list(map(_TRANSLATED, sessions))
    if not set(addresses) <= owned:
        return None
    if isinstance(owned, pool.Owned) and not owned.all_ports_inside(addresses, list(map(_PORT, sessions))):
        return None
    replies = set(map(REPLY_KEY_OF, sessions))
    return replies if len(replies) == len(sessions) else None


class SessionTable(dict[SessionKey, NatSession]):
    """Sessions by key, indexed by reply tuple as well: who holds a reply tuple is a dict lookup.

    A dict, so tests (and traffic simulated by them) may write it directly;
    every write keeps the index.  ``holders[r]`` lists the keys of the
    sessions holding reply tuple ``r``, the last written last (one on a
    table built by apply, which refuses a second).
    """

    def __init__(self, sessions: Mapping[SessionKey, NatSession] | None = None) -> None:
        super().__init__()
        self.holders: dict[ReplyKey, dict[SessionKey, None]] = {}
        self.update(sessions or {})

    def holder(self, reply: ReplyKey) -> SessionKey | None:
        """The key of a session holding ``reply`` (the last written), if any."""
        keys = self.holders.get(reply)
        return next(reversed(keys)) if keys else None

    def __setitem__(self, k: SessionKey, s: NatSession) -> None:
        old = self.get(k)
        if old is not None:
            self._unindex(k, old)
        super().__setitem__(k, s)
        self.holders.setdefault(s.reply_key, {})[k] = None

    def __delitem__(self, k: SessionKey) -> None:
        self._unindex(k, self[k])
        super().__delitem__(k)

    def pop(self, k: SessionKey, *default: Any) -> Any:
        if k in self:
            self._unindex(k, self[k])
        return super().pop(k, *default)

    def popitem(self) -> tuple[SessionKey, NatSession]:
        k, s = super().popitem()
        self._unindex(k, s)
        return k, s

    def clear(self) -> None:
        super().clear()
        self.holders.clear()

    def update(self, *args: Any, **kw: Any) -> None:
        for k, s in dict(*args, **kw).items():
            self[k] = s

    def setdefault(self, k: SessionKey, s: NatSession) -> NatSession:
        if k not in self:
            self[k] = s
        return self[k]

    def _unindex(self, k: SessionKey, s: NatSession) -> None:
        keys = self.holders.get(s.reply_key)
        if keys is not None:
            keys.pop(k, None)
            if not keys:
                del self.holders[s.reply_key]


@dataclass
class MemoryProvider(SessionProvider):
    """An in-memory session table with the same semantics as the real one (for unit tests).

    Reads and writes of K entries cost O(K): ``table`` is a
    :class:`SessionTable`, whose reply-tuple index answers the uniqueness
    check (:func:`check_batch_by_holders`) without a pass over the table.
    """

    #: the public addresses (a set of them: every port), or a :class:`~natmig.pool.Owned` with their ports
    owned: AbstractSet[str] = field(default_factory=lambda: {"203.0.113.1"})
    table: dict[SessionKey, NatSession] = field(default_factory=dict)
    untranslated: int = 0
    admit: bool = True

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: list[_QueueWatch] = []
        if not isinstance(self.table, SessionTable):
            self.table = SessionTable(self.table)

    def list(self) -> Snapshot:
        with self._lock:
            return Snapshot(list(self.table.values()), self.untranslated)

    def lookup(self, keys: Iterable[SessionKey]) -> builtins.list[NatSession]:
        with self._lock:
            get = self.table.get
            return [s for k in dict.fromkeys(keys) if (s := get(k)) is not None]

    def check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        with self._lock:
            return self._check(sessions, freed)

    def _check(self, sessions: Sequence[NatSession], freed: Collection[SessionKey] = ()) -> dict[SessionKey, str]:
        table = self.table
        assert isinstance(table, SessionTable)
        holders: dict[ReplyKey, SessionKey] = {}
        for s in sessions:
            h = table.holder(s.reply_key)
            if h is not None:
                holders[s.reply_key] = h
        return check_batch_by_holders(sessions, holders, self.owned, freed)

    def apply(self, sessions: Sequence[NatSession], before_create: BeforeCreate | None = None) -> None:
        with self._lock:
            problems = self._check(sessions)
            if problems:
                raise ApplyError(problems)
            if before_create is not None:
                before_create([s.key for s in sessions if s.key not in self.table])
            for s in sessions:
                old = self.table.get(s.key)
                if old is not None:
                    self._emit("destroy", old)
                self.table[s.key] = s
                self._emit("new", s)

    def delete(self, keys: Iterable[SessionKey] | None = None) -> int:
        with self._lock:
            victims = list(self.table) if keys is None else [k for k in dict.fromkeys(keys) if k in self.table]
            for k in victims:
                self._emit("destroy", self.table.pop(k))
            return len(victims)

    def watch(self) -> "Watch":
        w = _QueueWatch(self)
        with self._lock:
            self._watchers.append(w)
        return w

    def public_addresses(self) -> AbstractSet[str]:
        return self.owned if isinstance(self.owned, pool.Owned) else frozenset(self.owned)

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
        self.q: queue.Queue[SessionEvent | None] = queue.Queue()  # None: the end of the stream

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
        self.q.put(None)  # wakes a reader blocked in get()
