"""The strict reader of list entries written exactly as the codec writes them (the fast path of a large edit-config)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable

from .editentry import CompletedRun, EditEntry
from .model import NatSession

if TYPE_CHECKING:  # the codec builds this reader: its type only, for the annotation
    from .codecencode import CodecEncoder


#: Leaf text the canonical reader takes: printable ASCII without '<', '&' and
#: ']' (no markup, no entity or character reference, no ']]>', nothing the
#: XML parser would normalise), at least one character.
_TEXT = rb"[\x20-\x25\x27-\x3b\x3d-\x5c\x5e-\x7e]+"
#: How many validated texts the canonical reader remembers per leaf.
_MEMO_SIZE = 1 << 12
#: Attribute text of an entry's start tag: ASCII without '<', '>', '&', '/'.
_ATTRS = rb"(?:[\t\n\r ][\t\n\r\x20-\x25\x27-\x2e\x30-\x3b\x3d\x3f-\x7e]*)?"


class CanonicalEntries:
    """Reader of list entries written exactly as :meth:`~natmig.codec.Codec.encode_xml` writes them.

    A 100k-entry edit-config is ~30 MB of entries that all look alike; an XML
    parser spends most of its time building elements for them.  This reader
    matches the codec's own form with one regular expression per entry
    (leaves in module order, keys present, no attributes on leaves, no
    comments, CDATA, references or whitespace between elements) and decodes
    the leaves with the schema's validators.  It is strict on purpose: it only
    answers for text that every XML parser reads the same way, and returns
    None for anything else, so that the caller can hand the document to the
    general decoder, which names every problem.  The one thing it cannot
    judge alone is the start tag's attributes (namespace declarations, the
    operation): the caller interprets them, in the scope of the document.
    """

    def __init__(self, codec: "CodecEncoder") -> None:
        schema = codec.schema
        name = re.escape(schema.list_name.encode())
        leaves: list[bytes] = []
        plain: list[bytes] = []
        for spec in schema.leaves:
            n = re.escape(spec.name.encode())
            for out, group in ((leaves, b"("), (plain, b"(?:")):
                leaf = rb"<" + n + rb">" + group + _TEXT + rb")</" + n + rb">"
                out.append(leaf if spec.is_key else rb"(?:" + leaf + rb")?")
        self._name = name
        #: the leaves and end tag of one entry, after its start tag
        self._body = b"".join(leaves) + rb"</" + name + rb">"
        #: the same without capturing groups, for :meth:`is_run` (which reads no value): a 25k run in ~60 ms, not ~100
        self._plain_body = b"".join(plain) + rb"</" + name + rb">"
        #: one entry; groups: the start tag's attribute text, then each leaf's text in module order.
        self.entry = re.compile(rb"<" + name + rb"(" + _ATTRS + rb")>" + self._body)
        self.end_tag = b"</" + schema.list_name.encode() + b">"
        self._runs: dict[bytes, Any] = {}
        self._names = tuple(spec.name for spec in schema.leaves)
        # Validated values by leaf text (bytes: a hit needs no decoding), kept
        # across documents: protocols, states, timeouts, the node's public
        # addresses recur in every request.  Each stops growing at a small
        # size, so that a table's many distinct addresses and ports (validated
        # through the schema's own memo) do not stay in memory for ever.
        self._memos = [_LeafMemo(spec.parse) for spec in schema.leaves]
        #: the key leaves' columns, in the key's order
        self._key_columns = [self._names.index(k) for k in schema.keys]

    def span(self, data: bytes) -> tuple[int, int] | None:
        """(start, end): from the first canonical entry of ``data`` to the end of the last entry end tag; None without one.

        Whether everything between them is canonical entries is
        :meth:`decode`'s to say.
        """
        first = self.entry.search(data)
        if first is None:
            return None
        return first.start(), data.rfind(self.end_tag) + len(self.end_tag)

    def is_run(self, data: bytes, attrs: bytes) -> bool:
        """Whether ``data`` is nothing but entries in this form, back to back, each start tag carrying exactly ``attrs``.

        One C-level pass and no decoding: for a caller that forwards entries
        (a migration's copy) and leaves their values to the receiver.
        """
        run = self._runs.get(attrs)
        if run is None:
            run = self._runs[attrs] = re.compile(rb"(?:<" + self._name + re.escape(attrs) + rb">" + self._plain_body + rb")*")
        return run.fullmatch(data) is not None

    def decode(self, data: bytes, start: int, end: int, operation_of: Callable[[bytes], str | None],
               complete: Callable[[list[list[Any]]], list[list[Any]] | None] | None = None,
               chunk: int = 1 << 20) -> list[EditEntry] | CompletedRun | None:
        """The entries of ``data[start:end]``; None unless it is canonical entries and nothing else.

        ``operation_of`` turns a start tag's attribute text into the entry's
        operation (None: no nc:operation), raising ValueError for anything it
        does not accept; it is asked once per distinct text.  A leaf value
        the module refuses, or the same key twice, also gives None.  The
        result equals what :meth:`~natmig.codec.Codec.decode_edit_xml` returns for the same
        entries.  With ``complete`` (:meth:`~natmig.codec.Codec.complete_columns`),
        entries that all carry one start tag and are each complete alone come
        as a :class:`CompletedRun` instead, its :meth:`~CompletedRun.entries`
        that same list.
        """
        split = self.entry.split
        end_tag = self.end_tag
        stride = len(self._names) + 2  # split gives: text before, the groups, then text after each entry
        # Leaf by leaf, each column's texts looked up in C (a miss, an absent
        # leaf's None aside, parses it in _LeafMemo.__missing__); the entries'
        # rows are only made where a caller needs them one by one.
        columns: list[list[Any]] = [[] for _ in self._names]
        attrs: list[bytes] = []
        view = memoryview(data)
        pos = start
        try:
            while pos < end:
                # Chunks end at an entry end tag; one that does not end an
                # entry leaves text between matches, which refuses the run.
                stop = data.find(end_tag, min(pos + chunk, end - len(end_tag)), end)
                stop = end if stop < 0 else stop + len(end_tag)
                parts = split(view[pos:stop])
                if any(parts[::stride]):
                    return None  # something between, before or after the entries
                attrs.extend(parts[1::stride])
                for i, memo in enumerate(self._memos):
                    columns[i].extend(map(memo.__getitem__, parts[i + 2::stride]))
                pos = stop
            keys = list(zip(*(columns[i] for i in self._key_columns)))
            if len(set(keys)) != len(keys):
                return None  # the same entry twice
            distinct = set(attrs)
            ops = {a: operation_of(a) for a in distinct}
        except ValueError:  # LeafValueError, or an attribute text operation_of refused
            return None
        if complete is not None and len(distinct) == 1:
            done = complete(columns)
            if done is not None:
                return CompletedRun(ops[attrs[0]] if attrs else None, keys, list(map(NatSession, *done)), columns)
        # Several operations, or an entry not complete alone (the planner's
        # complete words its problem): the entries one by one.
        names = self._names
        return [EditEntry(ops[a], k, {n: v for n, v in zip(names, row) if v is not None}) for a, k, row in zip(attrs, keys, zip(*columns))]


class _LeafMemo(dict[Any, Any]):
    """One leaf's validated values by text (bytes), kept across documents up to a size; None (the leaf absent) gives None."""

    __slots__ = ("parse",)

    def __init__(self, parse: Callable[[str], Any]) -> None:
        super().__init__({None: None})
        self.parse = parse

    def __missing__(self, text: bytes) -> Any:
        # Tables repeat values: each distinct text is validated once while the memo has room.
        v = self.parse(text.decode("ascii"))
        if v is None:
            raise ValueError("a leaf value the canonical reader cannot tell from an absent leaf")
        if len(self) < _MEMO_SIZE:
            self[text] = v
        return v
