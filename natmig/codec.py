"""Bulk codec between a nat-session table and NETCONF XML / RFC 7951 JSON.

Built for tables of 100,000 sessions: entries are plain :class:`NatSession`
records, values are checked by the per-leaf validators that
:mod:`natmig.schema` compiles from the YANG module, and XML is written as text
(validated values need no escaping) and read with lxml.  A document is
accepted whole or refused whole: :class:`CodecError` lists every problem (up to
``limit``) and nothing partial is returned.

Output follows RFC 6243 "trim" mode: a leaf equal to its default is omitted.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from functools import cached_property
from operator import itemgetter
from typing import Any, Callable, Iterable, Iterator, Sequence, overload

from lxml import etree

from .errors import CodecError, FieldError
from .gcpause import gc_paused
from .model import FIELD_NAMES, NatSession, SessionKey, format_key
from .schema import LeafValueError, Schema, load_schema
from .slotinit import fast_init

NETCONF_NS = "urn:ietf:params:xml:ns:netconf:base:1.0"
DEFAULT_ERROR_LIMIT = 100

_PARSER = etree.XMLParser(
    # No DTDs, entities or network: the input comes from the network.
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    huge_tree=True,
)

#: Operations of an edit-config entry (RFC 6241 7.2).
EDIT_OPERATIONS = frozenset({"merge", "replace", "create", "delete", "remove"})


@fast_init
@dataclass(frozen=True, slots=True)
class EditEntry:
    """One list entry of an edit-config: its operation and the leaves it names.

    ``operation`` is None when the entry carries no ``nc:operation`` attribute
    (the default-operation applies).  ``values`` holds only the leaves present
    in the request, already type-checked; :meth:`Codec.complete` fills in
    defaults and checks mandatory leaves for the operations that create.
    """

    operation: str | None
    key: SessionKey
    values: dict[str, Any]


#: Leaf text the canonical reader takes: printable ASCII without '<', '&' and
#: ']' (no markup, no entity or character reference, no ']]>', nothing the
#: XML parser would normalise), at least one character.
_TEXT = rb"[\x20-\x25\x27-\x3b\x3d-\x5c\x5e-\x7e]+"
#: How many validated texts the canonical reader remembers per leaf.
_MEMO_SIZE = 1 << 12
#: Attribute text of an entry's start tag: ASCII without '<', '>', '&', '/'.
_ATTRS = rb"(?:[\t\n\r ][\t\n\r\x20-\x25\x27-\x2e\x30-\x3b\x3d\x3f-\x7e]*)?"


class CanonicalEntries:
    """Reader of list entries written exactly as :meth:`Codec.encode_xml` writes them.

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

    def __init__(self, codec: "Codec") -> None:
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
        # Validated values by leaf text (bytes: a hit needs no decoding), kept
        # across documents: protocols, states, timeouts, the node's public
        # addresses recur in every request.  Each stops growing at a small
        # size, so that a table's many distinct addresses and ports (validated
        # through the schema's own memo) do not stay in memory for ever.
        self._leaves: list[tuple[int, str, Callable[[str], Any], dict[bytes, Any]]] = [
            (i + 1, spec.name, spec.parse, {}) for i, spec in enumerate(schema.leaves)]
        self._key_of = _key_getter(schema.keys)

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

    def decode(self, data: bytes, start: int, end: int, operation_of: Callable[[bytes], str | None], chunk: int = 1 << 20) -> list[EditEntry] | None:
        """The entries of ``data[start:end]``; None unless it is canonical entries and nothing else.

        ``operation_of`` turns a start tag's attribute text into the entry's
        operation (None: no nc:operation), raising ValueError for anything it
        does not accept; it is asked once per distinct text.  A leaf value
        the module refuses, or the same key twice, also gives None.  The
        result equals what :meth:`Codec.decode_edit_xml` returns for the same
        entries.
        """
        split = self.entry.split
        end_tag = self.end_tag
        stride = len(self._leaves) + 2  # split gives: text before, the groups, then text after each entry
        ops: dict[bytes, str | None] = {}
        leaves = self._leaves
        key_of = self._key_of
        out: list[EditEntry] = []
        append = out.append
        seen: set[SessionKey] = set()
        add = seen.add
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
                for g in zip(*[iter(parts[1:])] * stride):
                    attrs = g[0]
                    op = ops[attrs] if attrs in ops else ops.setdefault(attrs, operation_of(attrs))
                    values: dict[str, Any] = {}
                    for i, name, parse, memo in leaves:
                        t = g[i]
                        if t:  # None: an optional leaf that is absent
                            v = memo.get(t, memo)
                            if v is memo:
                                # Tables repeat values: each distinct text is validated once.
                                v = parse(t.decode("ascii"))
                                if len(memo) < _MEMO_SIZE:
                                    memo[t] = v
                            values[name] = v
                    key = key_of(values)
                    add(key)
                    append(EditEntry(op, key, values))
                pos = stop
        except ValueError:  # LeafValueError, or an attribute text operation_of refused
            return None
        if len(seen) != len(out):
            return None  # the same entry twice
        return out


class _Errors:
    """Collects FieldErrors up to a limit, then only counts."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: list[FieldError] = []
        self.more = 0

    def add(self, path: str, leaf: str, message: str, tag: str = "invalid-value") -> None:
        if len(self.items) < self.limit:
            self.items.append(FieldError(path, leaf, message, tag))
        else:
            self.more += 1

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise CodecError(self.items, self.more)


class Codec:
    """Encoder and decoder for one compiled schema (use :func:`default_codec`)."""

    def __init__(self, schema: Schema) -> None:
        if tuple(s.name for s in schema.leaves) != FIELD_NAMES:
            # NatSession and the module must name the same leaves in the same order.
            raise CodecError([FieldError(schema.list_name, "", f"module leaves {[s.name for s in schema.leaves]} != NatSession fields {list(FIELD_NAMES)}", "operation-failed")])
        self.schema = schema
        self.ns = schema.namespace
        self.json_name = f"{schema.module}:{schema.list_name}"
        self._list_tag = f"{{{self.ns}}}{schema.list_name}"
        self._stats_tag = f"{{{self.ns}}}{schema.stats_name}"
        self._control_tag = f"{{{self.ns}}}{schema.control_name}"
        self._by_tag = {f"{{{self.ns}}}{s.name}": s for s in schema.leaves}
        self._by_name = {s.name: s for s in schema.leaves}
        self._keys = schema.keys
        self._key_set = frozenset(schema.keys)
        self._mandatory = [s.name for s in schema.leaves if s.mandatory and not s.is_key]
        self._mandatory_set = frozenset(self._mandatory)
        self._when = [(s.name, s.when) for s in schema.leaves if s.when]
        self._defaults = {s.name: s.default for s in schema.leaves}
        self._optional = [s for s in schema.leaves if not s.mandatory]

    @cached_property
    def canonical(self) -> CanonicalEntries:
        """The strict reader of entries in this codec's own XML form (see :class:`CanonicalEntries`)."""
        return CanonicalEntries(self)

    # ------------------------------------------------------------------ encode

    def _entry_items(self, s: NatSession) -> Iterator[tuple[Any, str]]:
        for spec in self._optional:
            v = getattr(s, spec.name)
            if v is not None and v != spec.default:
                yield spec, v

    @property
    def optional_leaves(self) -> list[str]:
        """The names of the entry's optional leaves, in the order :meth:`encode_xml` writes them (after the mandatory ones)."""
        return [s.name for s in self._optional]

    def optional_leaf_xml(self, name: str, value: Any) -> str:
        """An optional leaf as :meth:`encode_xml` writes it inside an entry: "" when absent (None) or at its default."""
        spec = self._by_name[name]
        if value is None or value == spec.default:
            return ""
        return f"<{name}>{spec.text(value)}</{name}>"

    def encode_xml(self, sessions: Iterable[NatSession], root: str | None = "data") -> bytes:
        """Serialise sessions as XML list entries.

        ``root`` wraps them in a NETCONF ``<data>`` or ``<config>`` element; None
        gives the bare sequence of entries, for embedding into a reply.
        """
        ns = self.ns
        name = self.schema.list_name
        # Inside a root element the module namespace is declared once, as the
        # default namespace; a bare fragment declares it on every entry.
        head = f"<{name}>" if root else f'<{name} xmlns="{ns}">'
        tail = f"</{name}>"
        opt = [(s.name, s.default, s.text) for s in self._optional]
        parts: list[str] = []
        if root:
            parts.append(f'<nc:{root} xmlns:nc="{NETCONF_NS}" xmlns="{ns}">')
        append = parts.append
        for s in sessions:
            # f-string of the mandatory leaves: the hot path at 100k entries.
            append(
                f"{head}<protocol>{s.protocol}</protocol><src_address>{s.src_address}</src_address>"
                f"<src_port>{s.src_port}</src_port><dst_address>{s.dst_address}</dst_address>"
                f"<dst_port>{s.dst_port}</dst_port><translated_address>{s.translated_address}"
                f"</translated_address><translated_port>{s.translated_port}</translated_port>"
            )
            for lname, default, text in opt:
                v = getattr(s, lname)
                if v is not None and v != default:
                    append(f"<{lname}>{text(v)}</{lname}>")
            append(tail)
        if root:
            parts.append(f"</nc:{root}>")
        return "".join(parts).encode()

    def encode_statistics_xml(self, counters: dict[str, Any]) -> bytes:
        """The config-false statistics container, for <get> replies."""
        specs = {s.name: s for s in self.schema.stats_leaves}
        inner = "".join(f"<{k}>{specs[k].text(v)}</{k}>" for k, v in counters.items() if k in specs)
        name = self.schema.stats_name
        return f'<{name} xmlns="{self.ns}">{inner}</{name}>'.encode()

    def encode_control_xml(self, values: dict[str, Any]) -> bytes:
        """The nat-control container (trim mode: leaves at their default are omitted)."""
        inner = "".join(
            f"<{s.name}>{s.text(values[s.name])}</{s.name}>"
            for s in self.schema.control_leaves
            if values.get(s.name, s.default) != s.default
        )
        name = self.schema.control_name
        return f'<{name} xmlns="{self.ns}">{inner}</{name}>'.encode()

    def decode_control_xml(self, data: bytes | str | Any) -> dict[str, Any] | None:
        """Leaves of the nat-control container of a document; None when it has none.

        Returns only the leaves present, type-checked; raises :class:`CodecError`.
        """
        errors = _Errors(DEFAULT_ERROR_LIMIT)
        root = self._root_of(data, errors)
        errors.raise_if_any()
        found = [root] if root.tag == self._control_tag else [c for c in root if c.tag == self._control_tag]
        if not found:
            return None
        specs = {f"{{{self.ns}}}{s.name}": s for s in self.schema.control_leaves}
        values: dict[str, Any] = {}
        for cont in found:
            for child in cont:
                if not isinstance(child.tag, str):
                    continue
                spec = specs.get(child.tag)
                if spec is None:
                    leaf, msg, tag = self._unknown(child.tag)
                    errors.add(self.schema.control_name, leaf, msg.replace(f"in {self.schema.list_name}", f"in {self.schema.control_name}"), tag)
                    continue
                try:
                    values[spec.name] = spec.parse(child.text or "")
                except LeafValueError as e:
                    errors.add(self.schema.control_name, spec.name, str(e))
        errors.raise_if_any()
        return values

    def encode_event_xml(self, event: str, session: NatSession) -> bytes:
        """A ``nat-session-event`` notification body ("created" or "destroyed")."""
        inner = self.encode_xml([session], root=None).decode()
        # The entry's leaves, re-wrapped in the notification's `session` container.
        leaves = inner[inner.index(">") + 1 : inner.rindex("<")]
        return (
            f'<nat-session-event xmlns="{self.ns}"><event>{event}</event>'
            f"<session>{leaves}</session></nat-session-event>"
        ).encode()

    def decode_event_xml(self, data: bytes | str | Any) -> tuple[str, NatSession]:
        """(event, session) of a ``nat-session-event`` element (or a notification holding one)."""
        errors = _Errors(DEFAULT_ERROR_LIMIT)
        root = self._root_of(data, errors)
        errors.raise_if_any()
        tag = f"{{{self.ns}}}nat-session-event"
        ev = root if root.tag == tag else root.find(tag)
        if ev is None:
            errors.add("notification", "", "no nat-session-event in it", "missing-element")
            errors.raise_if_any()
        kind = ev.findtext(f"{{{self.ns}}}event")
        if kind not in ("created", "destroyed"):
            errors.add("nat-session-event", "event", f"{kind!r} is not one of created, destroyed")
        sess = ev.find(f"{{{self.ns}}}session")
        session = None
        if sess is None:
            errors.add("nat-session-event", "session", "missing", "missing-element")
        else:
            bad: set[str] = set()
            values = self._leaves_xml(sess, errors, bad)
            if self._check_keys(values, errors, bad):
                session = self.complete(values, errors, bad)
        errors.raise_if_any()
        assert session is not None and kind is not None
        return kind, session

    def to_json_obj(self, sessions: Iterable[NatSession]) -> dict[str, Any]:
        """The RFC 7951 JSON object of a table (module-qualified top-level name)."""
        out = []
        for s in sessions:
            d: dict[str, Any] = {
                "protocol": s.protocol,
                "src_address": s.src_address,
                "src_port": s.src_port,
                "dst_address": s.dst_address,
                "dst_port": s.dst_port,
                "translated_address": s.translated_address,
                "translated_port": s.translated_port,
            }
            for spec, v in self._entry_items(s):
                d[spec.name] = v
            out.append(d)
        return {self.json_name: out}

    def encode_json(self, sessions: Iterable[NatSession], indent: int | None = None) -> bytes:
        """Serialise sessions as RFC 7951 JSON."""
        return json.dumps(self.to_json_obj(sessions), indent=indent, separators=None if indent else (",", ":")).encode()

    # ------------------------------------------------------------------ decode

    def _path(self, values: dict[str, Any]) -> str:
        return format_key(values.get(k) for k in self._keys)

    def _check_keys(self, values: dict[str, Any], errors: _Errors, bad: set[str]) -> bool:
        ok = True
        for k in self._keys:
            if k not in values and k not in bad:
                errors.add(self._path(values), k, "missing key leaf", "missing-element")
                ok = False
        return ok and not bad & self._key_set

    @overload
    def complete(self, values: dict[str, Any]) -> NatSession: ...
    @overload
    def complete(self, values: dict[str, Any], errors: _Errors | None, bad: Iterable[str] = ()) -> NatSession | None: ...

    def complete(self, values: dict[str, Any], errors: _Errors | None = None, bad: Iterable[str] = ()) -> NatSession | None:
        """Apply defaults and `when`, check mandatory leaves; a full NatSession or None.

        ``bad`` names leaves already refused (reported, so not "missing").
        With ``errors`` None a problem raises :class:`CodecError` at once (so
        with neither ``errors`` nor ``bad`` the result is never None).
        """
        if not bad and values.keys() >= self._mandatory_set:
            # The common case, a complete entry: no error bookkeeping.
            row = self._defaults.copy()
            for lname, (cond, want) in self._when:
                if values.get(cond) != want:
                    if lname in values:
                        break  # refused below, with its message
                    row[lname] = None
            else:
                row.update(values)
                if len(row) == len(FIELD_NAMES):  # _defaults holds every field, in field order
                    return NatSession(*row.values())
                return NatSession(*[row[n] for n in FIELD_NAMES])
        own = errors if errors is not None else _Errors(DEFAULT_ERROR_LIMIT)
        ok = not bad
        for m in self._mandatory:
            if m not in values and m not in bad:
                own.add(self._path(values), m, "missing mandatory leaf", "missing-element")
                ok = False
        row = dict(self._defaults)
        for lname, (cond, want) in self._when:
            if values.get(cond) != want:
                if lname in values:
                    own.add(self._path(values), lname, f"only allowed when {cond} = '{want}'", "unknown-element")
                    ok = False
                row[lname] = None
        row.update(values)
        if not ok:
            if errors is None:
                own.raise_if_any()
            return None
        return NatSession(*[row[n] for n in FIELD_NAMES])

    def _leaves_xml(self, entry: Any, errors: _Errors, bad: set[str]) -> dict[str, Any]:
        """Type-check the leaves of one XML list entry; names of bad leaves go to ``bad``."""
        values: dict[str, Any] = {}
        raw: dict[str, Any] = {}
        by_tag = self._by_tag
        problems: list[tuple[str, str, str]] = []
        for child in entry:
            tag = child.tag
            spec = by_tag.get(tag)
            if spec is None:
                if isinstance(tag, str):  # comments and PIs have no str tag
                    problems.append(self._unknown(tag))
                continue
            name = spec.name
            if name in values or name in bad:
                problems.append((name, "appears more than once", "bad-element"))
                bad.add(name)
                continue
            if len(child):
                problems.append((name, "a leaf cannot contain elements", "bad-element"))
                bad.add(name)
                continue
            try:
                values[name] = spec.parse(child.text or "")
            except LeafValueError as e:
                problems.append((name, str(e), "invalid-value"))
                bad.add(name)
                raw[name] = child.text
        if problems:
            # A key leaf that failed to parse is shown as written, so the
            # message still points at the entry the user wrote.
            path = self._path({**raw, **values})
            for leaf, msg, tag in problems:
                errors.add(path, leaf, msg, tag)
        return values

    def _unknown(self, tag: str) -> tuple[str, str, str]:
        qn = etree.QName(tag)
        if qn.namespace != self.ns:
            return (qn.localname, f"element in namespace {qn.namespace!r}, expected {self.ns!r}", "unknown-namespace")
        return (qn.localname, f"unknown element in {self.schema.list_name}", "unknown-element")

    def _root_of(self, data: bytes | str | Any, errors: _Errors) -> Any:
        """The root element of a document (an element is its own root); None, reported, if unreadable."""
        if not isinstance(data, (bytes, str)):
            return data
        if isinstance(data, str):
            data = data.encode()
        if not data.strip():
            errors.add("document", "", "empty document", "malformed-message")
            return None
        try:
            return etree.fromstring(data, _PARSER)
        except etree.XMLSyntaxError as e:
            errors.add("document", "", f"malformed XML: {e}", "malformed-message")
            return None

    def _entries_of(self, data: bytes | str | Any, errors: _Errors) -> list[Any]:
        """The list-entry elements of a document (or of an already parsed element)."""
        root = self._root_of(data, errors)
        if root is None:
            return []
        if root.tag == self._list_tag:
            return [root]
        entries = []
        for child in root:
            if not isinstance(child.tag, str):
                continue
            if child.tag == self._list_tag:
                entries.append(child)
            elif child.tag == self._control_tag:
                continue  # read by decode_control_xml
            elif child.tag == self._stats_tag:
                errors.add(self.schema.stats_name, "", "state data (config false) cannot be written", "invalid-value")
            else:
                leaf, msg, tag = self._unknown(child.tag)
                errors.add("document", leaf, msg.replace(f"in {self.schema.list_name}", "at top level"), tag)
        return entries

    def decode_xml(self, data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
        """Parse and validate an XML document (or lxml element) of nat-session entries.

        The document is a ``<data>``/``<config>`` element holding entries, or a
        single entry.  Raises :class:`CodecError` listing every problem.
        """
        errors = _Errors(limit)
        out: list[NatSession] = []
        with gc_paused():
            entries = self._entries_of(data, errors)
            by_tag = self._by_tag
            # Fast path: an entry whose leaves all parse, with no repeats,
            # completes inline; anything odd goes the slow way, which names
            # every problem.
            defaults = self._defaults
            keys = self._keys
            mandatory = self._mandatory
            when = self._when
            append = out.append
            for entry in entries:
                values: dict[str, Any] = {}
                n = 0
                try:
                    for child in entry:
                        spec = by_tag[child.tag]
                        values[spec.name] = spec.parse(child.text or "")
                        n += 1
                except (KeyError, LeafValueError):
                    n = -1
                if n != len(values) or len(entry) != n:
                    bad: set[str] = set()
                    values = self._leaves_xml(entry, errors, bad)
                    if self._check_keys(values, errors, bad):
                        s = self.complete(values, errors, bad)
                        if s is not None:
                            append(s)
                    continue
                row = None
                for m in mandatory:
                    if m not in values:
                        break
                else:
                    for k in keys:
                        if k not in values:
                            break
                    else:
                        row = dict(defaults)
                        for lname, (cond, want) in when:
                            if values[cond] != want:
                                if lname in values:
                                    row = None
                                    break
                                row[lname] = None
                if row is None:
                    if self._check_keys(values, errors, set()):
                        s = self.complete(values, errors)
                        if s is not None:
                            append(s)
                    continue
                row.update(values)
                append(NatSession(*[row[f] for f in FIELD_NAMES]))
            self._check_unique(out, errors)
        errors.raise_if_any()
        return out

    def decode_edit_xml(self, data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[EditEntry]:
        """Parse the nat-session entries of an edit-config ``<config>``, with their operations.

        Leaves are type-checked; defaults and mandatory leaves are not applied
        (that depends on the operation and on what the datastore holds).
        """
        errors = _Errors(limit)
        out: list[EditEntry] = []
        op_attr = f"{{{NETCONF_NS}}}operation"
        seen: dict[SessionKey, int] = {}
        for entry in self._entries_of(data, errors):
            op = entry.get(op_attr)
            bad: set[str] = set()
            values = self._leaves_xml(entry, errors, bad)
            if op is not None and op not in EDIT_OPERATIONS:
                errors.add(self._path(values), "", f"unknown operation {op!r}", "bad-attribute")
                continue
            for child in entry:
                if child.get(op_attr) is not None:
                    errors.add(self._path(values), etree.QName(child).localname, "operations on single leaves are not supported; edit the whole entry", "operation-not-supported")
            if self._check_keys(values, errors, bad):
                key = tuple(values[k] for k in self._keys)
                if key in seen:
                    errors.add(format_key(key), "", "the same entry appears twice in the request", "bad-element")
                seen[key] = 1
                out.append(EditEntry(op, key, values))
        errors.raise_if_any()
        return out

    def decode_json(self, data: bytes | str | dict[str, Any], limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
        """Parse and validate an RFC 7951 JSON document of nat-session entries."""
        with gc_paused():
            return self._decode_json(data, limit)

    def _decode_json(self, data: bytes | str | dict[str, Any], limit: int) -> list[NatSession]:
        errors = _Errors(limit)
        out: list[NatSession] = []
        doc: Any = data
        if isinstance(data, (bytes, str)):
            if not (data.strip() if isinstance(data, str) else data.strip()):
                errors.add("document", "", "empty document", "malformed-message")
                errors.raise_if_any()
            try:
                doc = json.loads(data)
            except ValueError as e:
                errors.add("document", "", f"malformed JSON: {e}", "malformed-message")
                errors.raise_if_any()
        if not isinstance(doc, dict):
            errors.add("document", "", "top level must be a JSON object", "malformed-message")
            errors.raise_if_any()
        entries: list[Any] = []
        for name, value in doc.items():
            if name == self.json_name:
                if not isinstance(value, list):
                    errors.add("document", name, "a list must be a JSON array", "bad-element")
                else:
                    entries = value
            elif name.partition(":")[0] != self.schema.module:
                errors.add("document", name, f"unknown module {name.partition(':')[0]!r} (names must be qualified as {self.json_name!r})", "unknown-namespace")
            else:
                errors.add("document", name, "unknown element at top level" if name != f"{self.schema.module}:{self.schema.stats_name}" else "state data (config false) cannot be written", "unknown-element")
        by_name = self._by_name
        prefix = self.schema.module + ":"
        for obj in entries:
            if not isinstance(obj, dict):
                errors.add(self.schema.list_name, "", "a list entry must be a JSON object", "bad-element")
                continue
            values: dict[str, Any] = {}
            raw: dict[str, Any] = {}
            bad: set[str] = set()
            problems = []
            for name, v in obj.items():
                spec = by_name.get(name[len(prefix):] if name.startswith(prefix) else name)
                if spec is None:
                    problems.append((name, "unknown element in nat-session", "unknown-element"))
                    continue
                try:
                    values[spec.name] = spec.parse_json(v)
                except LeafValueError as e:
                    problems.append((spec.name, str(e), "invalid-value"))
                    bad.add(spec.name)
                    raw[spec.name] = v
            for leaf, msg, tag in problems:
                errors.add(self._path({**raw, **values}), leaf, msg, tag)
            if self._check_keys(values, errors, bad):
                s = self.complete(values, errors, bad)
                if s is not None:
                    out.append(s)
        self._check_unique(out, errors)
        errors.raise_if_any()
        return out

    def _check_unique(self, sessions: Sequence[NatSession], errors: _Errors) -> None:
        seen: set[SessionKey] = set()
        for s in sessions:
            k = s.key
            if k in seen:
                errors.add(format_key(k), "", "duplicate key", "bad-element")
            seen.add(k)


_default: Codec | None = None
_default_lock = threading.Lock()


def default_codec() -> Codec:
    """The codec of yang/nat-session.yang, compiled on first use (once, whichever thread asks first)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = Codec(load_schema())
    return _default


def encode_xml(sessions: Iterable[NatSession], root: str | None = "data") -> bytes:
    """Serialise sessions as NETCONF XML (see :meth:`Codec.encode_xml`)."""
    return default_codec().encode_xml(sessions, root)


def decode_xml(data: bytes | str | Any, limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
    """Parse and validate NETCONF XML (see :meth:`Codec.decode_xml`)."""
    return default_codec().decode_xml(data, limit)


def encode_json(sessions: Iterable[NatSession], indent: int | None = None) -> bytes:
    """Serialise sessions as RFC 7951 JSON."""
    return default_codec().encode_json(sessions, indent)


def decode_json(data: bytes | str | dict[str, Any], limit: int = DEFAULT_ERROR_LIMIT) -> list[NatSession]:
    """Parse and validate RFC 7951 JSON."""
    return default_codec().decode_json(data, limit)


def _key_getter(keys: Sequence[str]) -> Callable[[dict[str, Any]], Any]:
    """The key tuple of an entry's values (itemgetter of one name gives the value, not a 1-tuple)."""
    if len(keys) > 1:
        return itemgetter(*keys)
    key = keys[0]
    return lambda values: (values[key],)
