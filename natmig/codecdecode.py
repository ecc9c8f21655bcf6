"""What the codec's decoders share: reading leaves and entries, completing and checking them; nat-control and events.

Errors are collected (:class:`_Errors`) and raised together as one
:class:`~natmig.errors.CodecError`.
"""

from __future__ import annotations

from itertools import repeat
from operator import and_, eq, is_not, not_
from typing import Any, Iterable, Sequence, overload

from lxml import etree

from .codecencode import CodecEncoder
from .errors import CodecError, FieldError
from .model import FIELD_NAMES, NatSession, SessionKey, format_key
from .schema import LeafValueError

DEFAULT_ERROR_LIMIT = 100

_PARSER = etree.XMLParser(
    # No DTDs, entities or network: the input comes from the network.
    resolve_entities=False,
    no_network=True,
    load_dtd=False,
    huge_tree=True,
)


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


class CodecDecoder(CodecEncoder):
    """The leaf, entry and document readers the table decoders of :class:`~natmig.codec.Codec` are made of."""

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

    def complete_columns(self, given: list[list[Any]]) -> list[list[Any]] | None:
        """:meth:`complete` of many entries at once, given as leaf columns (module order; None: the leaf absent).

        Each leaf's column of the completed entries, for ``NatSession(*row)``;
        None when some entry is not complete alone (a mandatory leaf absent,
        a leaf outside its ``when``), which :meth:`complete` of that entry
        refuses, naming why.  Column by column, mostly in C: a copy's slices
        are complete entries, and completing them one by one was a third of
        the target's work on them.
        """
        by_name = dict(zip(FIELD_NAMES, given))
        if any(None in by_name[m] for m in self._mandatory):
            return None
        out = list(given)
        conditioned = {lname for lname, _ in self._when}
        for i, name in enumerate(FIELD_NAMES):
            default = self._defaults[name]
            if default is not None and name not in conditioned and None in given[i]:
                out[i] = [default if v is None else v for v in given[i]]
        for lname, (cond, want) in self._when:
            i = FIELD_NAMES.index(lname)
            holds = list(map(eq, by_name[cond], repeat(want)))
            if not all(holds) and any(map(and_, map(not_, holds), map(is_not, given[i], repeat(None)))):
                return None  # a leaf given where its when does not hold
            default = self._defaults[lname]
            out[i] = [(default if v is None else v) if h else None for h, v in zip(holds, given[i])]
        return out

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

    def _check_unique(self, sessions: Sequence[NatSession], errors: _Errors) -> None:
        seen: set[SessionKey] = set()
        for s in sessions:
            k = s.key
            if k in seen:
                errors.add(format_key(k), "", "duplicate key", "bad-element")
            seen.add(k)


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
