"""The in-memory form of a NAT session: one small immutable record per entry.

Field names are the leaf names of the nat-session list; a test checks that the
two agree, so the record cannot drift from the module.
"""

from __future__ import annotations

import hashlib
import sys
import zlib
from array import array
from dataclasses import dataclass, fields
from functools import reduce
from operator import attrgetter, methodcaller, xor
from typing import Callable, Iterable

from .slotinit import fast_init

#: Key of a session: (protocol, src_address, src_port, dst_address, dst_port).
SessionKey = tuple[str, str, int, str, int]


@fast_init
@dataclass(frozen=True, slots=True)
class NatSession:
    """One translated session: the inside 5-tuple and its public address and port.

    ``tcp_state`` is None for UDP and ICMP (the module's `when` condition);
    ``timeout`` is the remaining lifetime in seconds, None for "the node's
    default".
    """

    protocol: str
    src_address: str
    src_port: int
    dst_address: str
    dst_port: int
    translated_address: str
    translated_port: int
    tcp_state: str | None = None
    timeout: int | None = None
    assured: bool = False
    mark: int = 0

    @property
    def key(self) -> SessionKey:
        """The list key, in the module's key order."""
        return (self.protocol, self.src_address, self.src_port, self.dst_address, self.dst_port)

    @property
    def public(self) -> tuple[str, str, int]:
        """(protocol, translated_address, translated_port): the session's public endpoint."""
        return (self.protocol, self.translated_address, self.translated_port)

    @property
    def reply_key(self) -> tuple[str, str, int, str, int]:
        """What must be unique on a NAT: the public endpoint together with the remote one.

        Linux reuses a public port for sessions to different remote endpoints;
        what it refuses is two sessions whose reply tuple
        (remote -> public endpoint) is the same.
        """
        return (self.protocol, self.translated_address, self.translated_port, self.dst_address, self.dst_port)

    def __str__(self) -> str:
        return format_key(self.key) + f" -> {self.translated_address}:{self.translated_port}"


FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(NatSession))

#: :attr:`NatSession.key` and :attr:`NatSession.reply_key` as C callables, for
#: passes over a whole batch (``map(REPLY_KEY_OF, batch)``): the same tuples
#: without a Python frame per session (tests/test_model.py holds them equal).
KEY_OF: Callable[[NatSession], SessionKey] = attrgetter("protocol", "src_address", "src_port", "dst_address", "dst_port")
REPLY_KEY_OF: Callable[[NatSession], tuple[str, str, int, str, int]] = attrgetter(
    "protocol", "translated_address", "translated_port", "dst_address", "dst_port")


def format_key(key: Iterable[object]) -> str:
    """``nat-session[TCP 10.0.0.1 2526 203.0.113.100 80]``: how errors and logs name an entry."""
    return "nat-session[" + " ".join("?" if k is None else str(k) for k in key) + "]"


def index_by_key(sessions: Iterable[NatSession]) -> dict[SessionKey, NatSession]:
    """Sessions by key (the last one wins; use the codec to refuse duplicates)."""
    return {s.key: s for s in sessions}


def table_digest(sessions: Iterable[NatSession]) -> str:
    """The order-independent fingerprint of a table (nat-statistics/digest in the module).

    XOR of the first 8 bytes of SHA-256 of each session's key and mapping:
    adding or removing a session changes it, and so does a changed mapping.
    """
    acc = 0
    for s in sessions:
        text = f"{s.protocol} {s.src_address} {s.src_port} {s.dst_address} {s.dst_port} {s.translated_address} {s.translated_port}"
        acc ^= int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    return f"{acc:016x}"


#: The digest method of a hash object (a C callable for map()).
_DIGEST = methodcaller("digest")


def digest_xor(texts: Iterable[bytes]) -> int:
    """:func:`table_digest`'s accumulator over already formatted session texts, in C.

    Each text is what :func:`table_digest` hashes for one session ("protocol
    src_address src_port dst_address dst_port translated_address
    translated_port", every field as ``str()`` prints it).  Hashing, slicing
    and XOR run as C loops (no Python frame per session): a reader of the
    conntrack text gets the digest without building NatSession records.
    Accumulators of parts of a table combine with ``^``;
    :func:`format_digest` spells the result.
    """
    return reduce(xor, digest_values(texts), 0)


def digest_values(texts: Iterable[bytes]) -> array:
    """Each session text's own value in :func:`table_digest` (what the XOR takes in), in order, computed in C.

    For a holder of a table that changes: one session's value is XORed in
    when it comes and out again when it goes (see agent/ctdigest.py).
    """
    firsts = array("Q", b"".join(map(_DIGEST, map(hashlib.sha256, texts))))[::4]
    # table_digest reads the 8 bytes big-endian; array reads them natively.
    if sys.byteorder == "little":
        firsts.byteswap()
    return firsts


def format_digest(acc: int) -> str:
    """The nat-statistics/digest leaf's spelling of an accumulator (16 hex digits)."""
    return f"{acc:016x}"


#: Key ranges of nat-range-digests: a session's range is a function of its key
#: alone, so a session re-mapped on another node is still compared in the same
#: range.  65,536: at 1,000,000 sessions some 15 a range, so a few hundred
#: differing sessions mean reading a few thousand, not the table.
RANGES = 65536


def key_text(key: Iterable[object]) -> bytes:
    """A key's text as the range hash reads it: the five key values, as ``str()`` prints them, separated by single spaces."""
    return " ".join(map(str, key)).encode()


def key_range(key: Iterable[object]) -> int:
    """The range (0..RANGES-1) a session of this key belongs to: the low 16 bits of the CRC-32 (zlib's) of :func:`key_text`.

    CRC-32 rather than SHA-256: it is computed for every change the agent
    follows, and needs to spread keys, not resist an adversary (whoever
    could choose keys to collide could only make a range hold more).
    """
    return zlib.crc32(key_text(key)) & (RANGES - 1)


def range_digests(sessions: Iterable[NatSession]) -> dict[int, tuple[int, int]]:
    """Each non-empty range's (sessions, digest accumulator): :func:`table_digest` cut by :func:`key_range`.

    The reference computation (every session hashed here); a node that
    follows its table keeps the same figures as it changes (agent/ctdigest.py).
    """
    out: dict[int, tuple[int, int]] = {}
    sessions = list(sessions)
    values = digest_values([session_text(s) for s in sessions])
    for s, v in zip(sessions, values):
        r = key_range(s.key)
        n, acc = out.get(r, (0, 0))
        out[r] = (n + 1, acc ^ v)
    return out


def session_text(s: NatSession) -> bytes:
    """What :func:`table_digest` hashes for ``s``."""
    return f"{s.protocol} {s.src_address} {s.src_port} {s.dst_address} {s.dst_port} {s.translated_address} {s.translated_port}".encode()
