"""The table a live digest holds: every entry by identity, and the counts and XOR they add up to.

:class:`DigestTable` holds every entry of a conntrack table by its identity
(:mod:`.ctevents`): its value in the digest (the 64-bit value
model.table_digest XORs in for a session) or None (an untranslated entry),
with the XOR, the untranslated count and the entries counted untranslated
only for a TCP state of NONE (:data:`.ctevents.UNSURE`: no event tells when
that changes, so they are read again by key).  Its algebra is the same for
an event and for a line of a full read: a NEW puts (a key already held
with the same value: nothing; with another: replaced), a DESTROY drops
(an unknown key: nothing).  Applied in the kernel's order, that is last
writer wins per entry, so a full read with the events around it folded in
gives the table, whatever the race between subscribing and dumping.

:class:`WriteLog` is what one of the agent's writes told it (see
:meth:`.ctdigest.LiveDigest.writing`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from functools import reduce
from operator import xor
from typing import Callable, Collection, Final, Iterable, Sequence
from zlib import crc32

from ..model import KEY_OF, RANGES, NatSession, SessionKey, digest_values, session_text
from .ctevents import DESTROY, UNSURE, Ident, Record


class _Missing(enum.Enum):
    """What ``held`` gives for an entry it lacks: an enum member, so that ``is`` narrows its type."""

    MISSING = 0


_MISSING: Final = _Missing.MISSING


def _range(ident: Ident) -> int:
    """The key range of an entry (model.key_range of its five key values; an identity may carry more after them)."""
    # A format of the 5-tuple: ~0.6 us, against ~1.3 us for a join of str()s (run for every change followed).
    return crc32(("%s %s %s %s %s" % ident[:5]).encode()) & _MASK


_MASK: Final = RANGES - 1


@dataclass(frozen=True)
class Summary:
    """The nat-statistics of a table: sessions, untranslated entries, the digest accumulator (model.format_digest spells it)."""

    sessions: int
    untranslated: int
    digest: int


class DigestTable:
    """Every entry of a table by identity, and the counts and XOR they add up to (see the module docstring)."""

    def __init__(self) -> None:
        self.held: dict[Ident, int | None] = {}
        self.acc = 0
        self.untranslated = 0
        #: entries counted untranslated only for their TCP state (UNSURE): read again by key.
        self.unsure: set[Ident] = set()
        #: per key range (model.key_range): its sessions and the XOR of their
        #: values, kept with every change as the whole count and XOR are (one
        #: CRC-32 of the key a change), so that nat-range-digests is answered
        #: from memory.  Untranslated entries are in no range.
        self.range_count = [0] * RANGES
        self.range_acc = [0] * RANGES

    def summary(self) -> Summary:
        """The counts and the XOR now."""
        return Summary(len(self.held) - self.untranslated, self.untranslated, self.acc)

    def put(self, ident: Ident, value: int | None, unsure: bool = False) -> None:
        """The entry ``ident`` exists with ``value`` (its digest value, None: untranslated), replacing what was held."""
        old = self.held.get(ident, _MISSING)
        if old is not _MISSING:
            if old == value:
                if not unsure:
                    self.unsure.discard(ident)
                elif value is None:
                    self.unsure.add(ident)
                return
            if old is None:
                self.untranslated -= 1
            else:
                self.acc ^= old
                r = _range(ident)
                self.range_count[r] -= 1
                self.range_acc[r] ^= old
        self.held[ident] = value
        if value is None:
            self.untranslated += 1
            if unsure:
                self.unsure.add(ident)
            else:
                self.unsure.discard(ident)
        else:
            self.acc ^= value
            self.unsure.discard(ident)
            r = _range(ident)
            self.range_count[r] += 1
            self.range_acc[r] ^= value

    def drop(self, ident: Ident) -> bool:
        """The entry ``ident`` is gone; whether it was held."""
        old = self.held.pop(ident, _MISSING)
        if old is _MISSING:
            return False
        if old is None:
            self.untranslated -= 1
            self.unsure.discard(ident)
        else:
            self.acc ^= old
            r = _range(ident)
            self.range_count[r] -= 1
            self.range_acc[r] ^= old
        return True

    def ranges(self) -> dict[int, tuple[int, int]]:
        """Each non-empty key range's (sessions, XOR): what model.range_digests gives for the sessions held."""
        count, acc = self.range_count, self.range_acc
        return {r: (n, acc[r]) for r, n in enumerate(count) if n}

    def in_ranges(self, ranges: Collection[int]) -> list[Ident]:
        """The identities of the sessions held in these key ranges (a pass over the table: ~1 s at 1,000,000)."""
        want = set(ranges)
        return [i for i, v in self.held.items() if v is not None and _range(i) in want]

    def apply(self, records: Sequence[Record], watch: set | None = None) -> set[Ident]:
        """Apply records in order (their texts hashed first, in C); the identities among ``watch`` that they touched."""
        values = iter(digest_values([t for _, _, t in records if type(t) is bytes]))
        hit: set[Ident] = set()
        put, drop = self.put, self.drop
        for kind, ident, text in records:
            if watch and ident in watch:
                hit.add(ident)
            if kind == DESTROY:
                drop(ident)
            elif text is None:
                put(ident, None)
            elif text is UNSURE:
                put(ident, None, True)
            else:
                put(ident, next(values))
        return hit

    def created(self, sessions: Sequence[NatSession]) -> list[Ident]:
        """Sessions the kernel confirmed creating (each entry as cttext's rules count it); their keys."""
        keys = self.created_fresh(sessions)
        if keys is not None:
            return keys
        keys = list(map(KEY_OF, sessions))
        each = iter(digest_values([session_text(s) for s in sessions if not _untranslated(s)]))
        for k, s in zip(keys, sessions):
            self.put(k, None if _untranslated(s) else next(each))
        return keys

    def created_fresh(self, sessions: Sequence[NatSession]) -> list[Ident] | None:
        """:meth:`created` when no key is held and every session is translated (a copy of a table); else None, nothing done.

        Those go in by one dict update and one XOR over the values, computed
        in C (100k: ~0.2 s put one by one, measured); and as none replaced
        an entry, a key taken out again with :meth:`drop` leaves the table
        as before (a create the kernel then refused).
        """
        keys = list(map(KEY_OF, sessions))
        if any(map(_untranslated, sessions)) or len(set(keys)) != len(keys) or not self.held.keys().isdisjoint(keys):
            return None
        # Each key's text once: its CRC-32 is the key's range (_range), and
        # with the translation after it, the session's text (session_text).
        # 100k: ~400 -> ~290 ms of CPU, measured (a copy's commit waits for it).
        kts = ["%s %s %s %s %s" % k for k in keys]
        values = digest_values([("%s %s %s" % (kt, s.translated_address, s.translated_port)).encode() for kt, s in zip(kts, sessions)])
        self.held.update(zip(keys, values))
        self.acc ^= reduce(xor, values, 0)
        count, acc, mask = self.range_count, self.range_acc, _MASK
        for r, v in zip(map(crc32, map(str.encode, kts)), values):
            r &= mask
            count[r] += 1
            acc[r] ^= v
        return keys


def _untranslated(s: NatSession) -> bool:
    """Whether the entry created for ``s`` is no session by cttext's rules: its reply goes back to the original source endpoint."""
    return s.translated_address == s.src_address and s.translated_port == s.src_port

class WriteLog:
    """What one of the agent's writes did, as the kernel confirmed it, in the order it happened."""

    def __init__(self, early: Callable[[Sequence[NatSession]], list[Ident] | None] | None = None) -> None:
        self.steps: list[tuple[bool, list]] = []
        self.unknown = False
        #: folds sessions none of whose keys the table holds into it now, giving their keys (None, nothing done,
        #: for others); None: no table follows the write.  What a writer calls while the kernel creates the
        #: next batch, where folding after the last one would wait for it (:meth:`created_early`).
        self.early = early
        #: keys folded by :attr:`early`
        self.folded: list[Ident] = []

    def created(self, sessions: Iterable[NatSession]) -> None:
        """These sessions were created (the kernel acknowledged each)."""
        self.steps.append((True, list(sessions)))

    def created_early(self, sessions: Sequence[NatSession]) -> bool:
        """These sessions are being created: folded now, when :attr:`early` takes them (True).

        The writer then tells :meth:`not_created` of any the kernel did not
        create; those it does not take are told with :meth:`created` as usual.
        """
        keys = self.early(sessions) if self.early is not None else None
        if keys is None:
            return False
        self.folded.extend(keys)
        return True

    def not_created(self, keys: Iterable[SessionKey]) -> None:
        """Keys :meth:`created_early` folded whose create the kernel refused or never got: taken out of the table, as
        deleted ones are."""
        self.deleted(keys)

    def deleted(self, keys: Iterable[SessionKey]) -> None:
        """The entries with these keys were deleted (the kernel acknowledged each)."""
        self.steps.append((False, list(keys)))

    def lost(self) -> None:
        """What the write did is not known (an error part way, errors the kernel could not queue)."""
        self.unknown = True
