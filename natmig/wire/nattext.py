"""A nat-session table as the text an agent sent: counted, sliced and forwarded without decoding it.

A migration's copy moves the whole table: ~35 MB of XML at 100k sessions.
Decoding it in the controller only to encode the same entries again for the
target cost ~1.4 s of CPU at 100k, on a machine whose other core the target
agent needs for validating those very entries (it validates every leaf
anyway: the controller's decode added no check).  So when a reply's
``<data>`` holds entries in exactly the codec's own form (what natmig's agent
sends), the controller forwards the entries as they are, cut into slices at
entry boundaries, and reads from the text only what it needs itself: how
many there are, their public addresses (the copy plan) and, when a rollback
needs them, their keys.  Verification does not rest on this scan: it
compares the agents' own digests of their kernel tables.

Any other spelling (a prefix, whitespace or a comment between entries,
another leaf order) is not "exactly": :meth:`TextTable.plain` says so for
the slice that holds it, before it is sent, and the caller decodes the reply
in full through the codec, as before.  Each slice is checked just before it
is sent, so the check of one overlaps the target's work on the previous one.
"""

from __future__ import annotations

import re

from ..codec import Codec
from ..model import SessionKey
from .slices import EntryStream

__all__ = ["EntryStream", "ForwardedEntries", "TextTable"]


class TextTable:
    """The entries of one get-config reply, kept as text (see the module docstring)."""

    def __init__(self, raw: str, start: int, end: int, count: int, codec: Codec) -> None:
        self.raw = raw
        self.start, self.end = start, end
        self.count = count
        self.codec = codec
        self._close = f"</{codec.schema.list_name}>"

    @classmethod
    def of(cls, raw: str, codec: Codec) -> "TextTable | None":
        """The <data> body of a get-config reply; None when it has none (an error, another reply)."""
        if "rpc-error" in raw:
            return None
        start, end = raw.find("<data>"), raw.rfind("</data>")
        if not 0 <= start < end:
            # An empty <data/> is an empty table.
            return cls(raw, 0, 0, 0, codec) if "<data/>" in raw else None
        start += len("<data>")
        return cls(raw, start, end, raw.count(f"</{codec.schema.list_name}>", start, end), codec)

    def plain(self, part: str) -> bool:
        """Whether a slice is nothing but entries in the codec's form, back to back (see :meth:`plain_in`).

        When every slice passes, :attr:`count` and :meth:`keys` are exact.
        """
        return self.plain_in(self.codec, part)

    @staticmethod
    def plain_in(codec: Codec, part: str) -> bool:
        """Whether ``part`` is nothing but entries in ``codec``'s form, back to back.

        The codec's own reader judges the form (:meth:`CanonicalEntries.is_run`,
        one C-level pass); the start tags must declare the module's namespace
        and nothing else.
        """
        return codec.canonical.is_run(part.encode(), f' xmlns="{codec.ns}"'.encode())

    def slices(self, pieces: int, size: int) -> list[str]:
        """The body cut at entry boundaries into about ``pieces`` slices of at most ~``size`` entries each.

        Cut by length, not by counting entries: the entries are of similar
        size and every closing tag in the body ends an entry.
        """
        if self.count == 0:
            return []
        n = max(pieces, -(-self.count // size))
        step = max(1, (self.end - self.start) // n)
        out, pos = [], self.start
        while pos < self.end:
            cut = self.raw.find(self._close, min(pos + step, self.end) - 1, self.end)
            cut = self.end if cut < 0 else cut + len(self._close)
            out.append(self.raw[pos:cut])
            pos = cut
        return out

    @staticmethod
    def public_addresses(part: str) -> set[str]:
        """Every translated address of a slice, as written."""
        return set(_ADDRESS.findall(part))

    def keys(self) -> list[SessionKey]:
        """Every entry's key, typed by the module (what a rollback deletes)."""
        spec = {s.name: s for s in self.codec.schema.leaves}
        names = self.codec.schema.keys
        pattern = "".join(f"<{k}>([^<&]*)</{k}>" for k in names)
        parse = [spec[k].parse for k in names]
        return [tuple(p(t) for p, t in zip(parse, m)) for m in re.findall(pattern, self.raw[self.start:self.end])]


_ADDRESS = re.compile(r"<translated_address>([^<&]*)</translated_address>")



class ForwardedEntries:
    """What the controller keeps of a table it forwarded slice by slice: the count, the public addresses and the keys, compactly.

    Forwarded as it arrives, the table itself is not kept (1,000,000
    sessions: a 350 MB reply).  The keys are what a rollback after the
    copy's commit deletes; kept as one line of text per entry (~45 bytes:
    as NatSession objects or tuples they took ~300), parsed only when a
    rollback needs them.  One pass of one expression per slice reads the
    keys and the public address together.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.count = 0
        self.addresses: set[str] = set()
        names = codec.schema.keys
        self._entry = re.compile("".join(f"<{k}>([^<&]*)</{k}>" for k in names) + "<translated_address>([^<&]*)</translated_address>")
        self._close = f"</{codec.schema.list_name}>"
        self._keys: list[str] = []

    def add(self, part: str) -> bool:
        """Take one slice (already :meth:`TextTable.plain_in`); False when an entry does not read as keys then address (nothing taken)."""
        found = self._entry.findall(part)
        if len(found) != part.count(self._close):
            return False
        self.count += len(found)
        self.addresses.update(m[-1] for m in found)
        self._keys.append("\n".join("\t".join(m[:-1]) for m in found))
        return True

    def keys(self) -> list[SessionKey]:
        """Every entry's key, typed by the module (what a rollback deletes)."""
        spec = {s.name: s for s in self.codec.schema.leaves}
        parse = [spec[k].parse for k in self.codec.schema.keys]
        return [tuple(p(t) for p, t in zip(parse, line.split("\t"))) for block in self._keys if block for line in block.split("\n")]
