"""A get-config reply of the whole nat-session list, kept as the text the agent sent.

The controller's reader of a table reply: :class:`TableReply` answers "does
it hold these sessions?" from the text, and :func:`slices` cuts it into
entries decoded by the codec a slice at a time, so that a copy can write
the first while the rest is decoded.  :mod:`.nattext` forwards such a
table's entries without decoding them at all.
"""

from __future__ import annotations

import re
from operator import attrgetter
from typing import Any, Iterable, Iterator

from ..codec import NETCONF_NS, Codec
from ..errors import CodecError, ControllerError
from ..model import NatSession


class TableReply:
    """A get-config reply of the whole nat-session list, kept as text.

    :meth:`holds` answers "does this table hold every one of these sessions,
    with the same key and mapping?" from the text alone (~0.2 s at 100k
    entries, against ~1.1 s to build and decode the tree); :meth:`sessions`
    decodes it fully, through the codec, when the answer is not a plain yes.
    """

    #: leaves read from the text: the keys, then the mapping (the codec writes them first, in this order).
    MAPPING = ("translated_address", "translated_port")

    def __init__(self, raw: str, codec: Codec) -> None:
        self.raw = raw
        self.codec = codec
        #: whether the reply was also handed out chunk by chunk as it arrived (see NodeClient.read_table)
        self.tapped = False
        #: the reply's size in bytes as it arrived (when tapped)
        self.received = len(raw) if raw.isascii() else len(raw.encode())
        #: True when only the reply's root element was kept (read_table with keep=False): its entries went to the tap alone
        self.elided = False
        self._decoded: list[NatSession] | None = None
        self._found: dict[tuple[str, ...], tuple[str, ...]] | None = None

    def _leaves(self) -> list[Any]:
        by_name = {s.name: s for s in self.codec.schema.leaves}
        return [by_name[n] for n in (*self.codec.schema.keys, *self.MAPPING)]

    def _whole(self) -> None:
        if self.elided:
            raise ControllerError("this get-config reply was forwarded as it arrived and not kept: read the table again")

    def _scan(self) -> dict[tuple[str, ...], tuple[str, ...]]:
        self._whole()
        if self._found is None:
            # Only entries in exactly the codec's own form match; anything
            # else is simply not found, and holds() says no (never a false yes).
            leaves = "".join(f"<{s.name}>([^<&]*)</{s.name}>" for s in self._leaves())
            entry = re.compile(f'<{self.codec.schema.list_name} xmlns="{re.escape(self.codec.ns)}">{leaves}')
            k = len(self.codec.schema.keys)
            self._found = {m[:k]: m[k:] for m in entry.findall(self.raw)}
        return self._found

    def holds(self, sessions: Iterable[NatSession]) -> bool:
        """True when every one of ``sessions`` is in the table with the same key and mapping (False: not proven)."""
        found = self._scan()
        specs = self._leaves()
        k = len(self.codec.schema.keys)
        fields = attrgetter(*(spec.name for spec in specs))
        texts = [spec.text for spec in specs]
        if all(t is str for t in texts):
            # The usual leaves (enum, addresses, ports) print with str: one map per entry.
            for s in sessions:
                v = tuple(map(str, fields(s)))
                if found.get(v[:k]) != v[k:]:
                    return False
            return True
        for s in sessions:
            v = tuple(t(x) for t, x in zip(texts, fields(s)))
            if found.get(v[:k]) != v[k:]:
                return False
        return True

    @property
    def size(self) -> int:
        """Entries found in the text (meaningful after a successful :meth:`holds`)."""
        return len(self._scan())

    def sessions(self) -> list[NatSession]:
        """The whole table, decoded and validated by the codec."""
        self._whole()
        if self._decoded is None:
            from ncclient.xml_ import to_ele

            data = to_ele(self.raw, huge_tree=True).find(f"{{{NETCONF_NS}}}data")
            self._decoded = self.codec.decode_xml(data) if data is not None else []
        return self._decoded


def slices(reply: "TableReply", size: int, pieces: int = 1) -> Iterator[list[NatSession]]:
    """The entries of a get-config reply's text, decoded by the codec at most ``size`` at a time (see NodeClient.session_chunks)."""
    raw, codec = reply.raw, reply.codec
    start, end = raw.find("<data>"), raw.rfind("</data>")
    close = f"</{codec.schema.list_name}>"
    if pieces > 1:
        size = max(1, min(size, -(-raw.count(close) // pieces)))
    done = 0
    if 0 <= start < end:
        pos = start + len("<data>")
        try:
            while pos < end:
                cut = pos
                for _ in range(size):
                    i = raw.find(close, cut, end)
                    if i < 0:
                        cut = end
                        break
                    cut = i + len(close)
                # Each slice is a document of its own, decoded and validated by
                # the codec; an entry the slice would cut wrongly fails there.
                part = codec.decode_xml(f'<data xmlns="{NETCONF_NS}">{raw[pos:cut]}</data>')
                pos = cut
                done += len(part)
                if part:
                    yield part
            return
        except CodecError:
            pass  # not a plain sequence of entries: decode the whole reply below
    rest = reply.sessions()[done:]
    for i in range(0, len(rest), size):
        yield rest[i:i + size]
