"""A state list's entries as the text an agent sent: cut into whole entries while the reply arrives, and read for the little
a controller keeps of them, without decoding them.

A move copies a whole list: ~35 MB of XML at 100,000 NAT sessions.
Decoding it in the controller only to encode the same entries again for the
target costs more CPU than the target's own checks (at 100k: ~3.1 s of the
controller's against ~0.7 s forwarded), on a machine whose other core the
target needs for validating those very entries; the controller's decode
adds no check the target does not make.  So an entry in the plain form
every natmig agent writes (its list element declaring the module's
namespace and nothing else, its leaves as child elements with text, keys
first, RFC 7950 7.8.5) goes on as it came.  What is not plain (a prefix,
whitespace or a comment between entries, a nested element) is said so
before anything of it is sent, and the caller decodes that list instead.

One home for this, whatever the module: :class:`EntryStream` cuts a reply
into slices, :class:`ListText` checks a slice and keeps what a retire
needs (the count, each entry's key as the text of its removal).  The
nat-session specific reader of the same text (its public addresses) is
:mod:`.nattext`'s.
"""

from __future__ import annotations

import codecs
import re
from typing import Iterator

from ..codec import NETCONF_NS
from ..statemodel import StateList

#: How much larger each slice of an :class:`EntryStream` is than the one before.
#: Measured at 10k sessions (get-config + edit-config, median of 5): 1 (slices
#: of 1,000 throughout) 176-190 ms, 1.5 ~176 ms, 2 ~190 ms: with 2 the last
#: slices are large, and the target works through them after the source is
#: done; with 1 a 100k table would take a hundred requests.
GROWTH = 1.5


class EntryStream:
    """The entries of a get-config reply cut into slices while the reply still arrives.

    The agent streams a whole-table reply as the kernel's table is read; fed
    the reply's chunks as they come (:meth:`feed`), this hands out slices of
    whole entries, ready to forward, and :meth:`finish` the rest once the
    reply is complete.  The first slice is small (``first`` entries), so the
    receiver starts early; each next one is :data:`GROWTH` times as large,
    up to ``most``, so that a large table does not go in thousands of
    requests.  Both sizes are the caller's (each engine's copy has its own,
    measured for it).  Only the body of a plain ``<data>`` element is cut; a
    reply without one (an error, another spelling) yields nothing here and
    is left to the caller, whole.
    """

    def __init__(self, list_name: str, *, first: int, most: int) -> None:
        #: bytes fed so far
        self.fed = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        # A state list's entries hold leaves only: every closing tag of its name in the body ends an entry.
        self._close = f"</{list_name}>"
        # What arrived and is not cut yet, as parts: joined only when a slice
        # is due, so a 35 MB reply is copied once, not once per chunk.
        self._parts: list[str] = []
        self._held = 0
        self._started = False  # <data> has arrived; the parts start inside its body
        self._refused = False  # an error or another spelling: nothing is cut
        self._entries = first
        self._most = max(first, most)
        self._entry_size = 0  # bytes of the first entry: slices are cut by length

    def feed(self, chunk: bytes) -> list[str]:
        """Take one more chunk of the reply; the slices now complete (maybe none)."""
        self.fed += len(chunk)
        if self._refused:
            return []
        text = self._decoder.decode(chunk)  # a chunk may end inside a multi-byte character
        self._parts.append(text)
        self._held += len(text)
        if not self._started and not self._start():
            return []
        if not self._entry_size:
            buf = self._join()
            first_end = buf.find(self._close)
            if first_end < 0:
                return []
            self._entry_size = first_end + len(self._close)
        out: list[str] = []
        while self._held >= self._entries * self._entry_size:
            buf = self._join()
            want = self._entries * self._entry_size
            cut = buf.rfind(self._close, 0, want + len(self._close))
            if cut < 0:
                break
            cut += len(self._close)
            out.append(buf[:cut])
            self._parts, self._held = [buf[cut:]], len(buf) - cut
            self._entries = min(int(self._entries * GROWTH), self._most)
        return out

    def finish(self) -> list[str] | None:
        """The entries after the last slice, once the whole reply was fed; None when its body was not cut here."""
        if self._refused or not self._started:
            return None
        buf = self._join()
        end = buf.rfind("</data>")
        if end < 0:
            return None
        self._parts, self._held = [], 0
        return [buf[:end]] if end else []

    def _join(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def _start(self) -> bool:
        buf = self._join()
        i = buf.find("<data>")
        if i < 0:
            # Not yet (the rpc-reply start tag is still arriving), or never a plain <data> body.
            if "rpc-error" in buf or _OTHER_DATA.search(buf) or len(buf) > 4096:
                self._refused = True
                self._parts, self._held = [], 0
            return False
        body = buf[i + len("<data>"):]
        self._parts, self._held = [body], len(body)
        self._started = True
        return True


#: a <data> element spelled otherwise than plain <data> (empty, attributes, a prefix)
_OTHER_DATA = re.compile(r"<data[\s/]|<\w+:data[\s/>]")


class ListText:
    """What a controller keeps of one state list it forwarded slice by slice: how many entries, and how to remove them.

    Each slice is checked to be plain entries of the list back to back
    (one pass of a possessive pattern, no captures: ~70 ms for 100k NAT
    sessions, where capturing every entry's keys took ~180 ms), then kept
    as it came.  The removal of its entries (an ``nc:operation="remove"``
    entry of the key leaves as the source wrote them) is written only when
    asked for: a retire of the source, or the undo of a confirmed copy,
    after the switch; a move that keeps its source never writes it.  The
    kept text (~350 bytes an entry) is about what the removals it replaces
    held (~290 bytes an entry, their start tag carrying two namespaces).
    """

    def __init__(self, lst: StateList) -> None:
        self.lst = lst
        self.count = 0
        # Possessive repeats: no leaf text holds '<', and no leaf element starts with '</', so what each
        # repeat takes is what a backtracking one would keep; without a backtrack state per leaf, ~2x faster.
        keys = "".join(f"<{k}>[^<]*+</{k}>" for k in lst.keys)
        others = "|".join(re.escape(s.name) for s in lst.leaves if not s.is_key)
        rest = f"(?:<(?:{others})>[^<]*+</(?:{others})>|<(?:{others})/>)*+" if others else ""
        start = f'<{lst.name} xmlns="{re.escape(lst.namespace)}">'
        #: entries back to back, nothing else
        self._run = re.compile(f"(?:{start}{keys}{rest}</{lst.name}>)*+")
        #: an entry's key leaves (in a slice :attr:`_run` took, every such start tag begins an entry)
        self._keys = re.compile(f"{start}({keys})")
        self._head = f'<{lst.name} xmlns="{lst.namespace}" xmlns:nc="{NETCONF_NS}" nc:operation="remove">'
        self._tail = f"</{lst.name}>"
        self._parts: list[str] = []

    @staticmethod
    def forwardable(lst: StateList) -> bool:
        """Whether the list's entries can be cut by their closing tag: no leaf bears the list's own name."""
        return all(s.name != lst.name for s in lst.leaves)

    def add(self, part: str) -> bool:
        """Take one slice; False (nothing taken) when it is not plain entries of the list back to back."""
        if self._run.fullmatch(part) is None:
            return False
        # The list's end tag closes each entry once: no leaf bears the list's name (forwardable).
        self.count += part.count(self._tail)
        if part:
            self._parts.append(part)
        return True

    def removals(self) -> Iterator[str]:
        """The removal of every entry taken, as edit-config bodies (one per slice), each written as it is asked for."""
        for part in self._parts:
            yield self._head + (self._tail + self._head).join(self._keys.findall(part)) + self._tail
