"""The nat-session YANG module, compiled once into fast per-leaf validators.

pyang parses and checks the module; this module walks pyang's resolved type of
every leaf (ranges, enumerations, XSD patterns, unions of typedefs) and builds
a plain Python callable per leaf.  The codec applies those callables to each
entry, so validation follows the module wherever it goes: change a range in
yang/nat-session.yang and the codec enforces the new range with no code
change.  pyangbind objects cost ~5 ms per entry; these cost microseconds.
"""

from __future__ import annotations

import ipaddress
import os
import re
import sys
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import regex
from pyang import context, error, repository, types

from .errors import SchemaError

MODULE_NAME = "nat-session"
LIST_NAME = "nat-session"
STATS_NAME = "nat-statistics"
CONTROL_NAME = "nat-control"


def _yang_dir() -> Path:
    """Where the YANG modules live: NATMIG_YANG_DIR, else yang/ at the top of the
    source tree (an editable install), else natmig/yang of an installed wheel."""
    if "NATMIG_YANG_DIR" in os.environ:
        return Path(os.environ["NATMIG_YANG_DIR"])
    tree = Path(__file__).resolve().parent.parent / "yang"
    return tree if tree.is_dir() else Path(__file__).resolve().parent / "yang"


YANG_DIR = _yang_dir()
MODULE_PATH = YANG_DIR / f"{MODULE_NAME}.yang"

# How many distinct valid strings a string/union validator remembers.  NAT tables
# repeat addresses (one public address, a few hundred clients), so a memo of
# validated text turns most address checks into one dict lookup.
_MEMO_LIMIT = 1 << 16

_INT_TEXT = re.compile(r"[+-]?[0-9]+\Z")
#: digits of the largest YANG integer (uint64: 18446744073709551615, 20 digits).
_INT_DIGITS = 20

TextParser = Callable[[str], Any]


class LeafValueError(ValueError):
    """A leaf's value is invalid; the message says why in the module's terms."""


def _canonical_ipv6(text: str) -> str:
    # RFC 6991: the canonical ipv6-address is the RFC 5952 text form.
    addr, sep, zone = text.partition("%")
    return str(ipaddress.IPv6Address(addr)) + sep + zone


# Canonical forms are prose in the typedefs' descriptions, not machine-readable,
# so they are the one thing named here by typedef rather than derived.
_CANONICALIZERS: dict[str, Callable[[str], str]] = {
    "ietf-inet-types:ipv6-address": _canonical_ipv6,
}


@dataclass(frozen=True)
class LeafSpec:
    """How one leaf of the list is read, checked and written.

    ``parse`` takes the XML text of the leaf and returns the Python value, or
    raises :class:`LeafValueError`; ``parse_json`` does the same for an RFC 7951
    JSON value; ``text`` renders a value back to XML text.
    """

    name: str
    type_name: str
    kind: str  # "int", "enum", "bool" or "str": the Python/JSON shape of the value
    parse: TextParser
    parse_json: Callable[[Any], Any]
    text: Callable[[Any], str]
    is_key: bool
    mandatory: bool
    default: Any
    when: tuple[str, Any] | None  # ("protocol", "TCP") for when "../protocol = 'TCP'"
    config: bool


@dataclass(frozen=True)
class Schema:
    """The compiled nat-session module."""

    module: str
    namespace: str
    prefix: str
    revision: str
    list_name: str
    keys: tuple[str, ...]
    leaves: tuple[LeafSpec, ...]
    stats_name: str
    stats_leaves: tuple[LeafSpec, ...]
    control_name: str
    control_leaves: tuple[LeafSpec, ...]
    source_path: Path

    @property
    def leaf(self) -> dict[str, LeafSpec]:
        """Leaves of the list by name."""
        return {s.name: s for s in self.leaves}

    def yang_text(self) -> str:
        """The module's source text, as served by get-schema."""
        return self.source_path.read_text()


# --------------------------------------------------------------------------- types


def _int_parser(lo: int, hi: int, ranges: list[tuple[int, int]], desc: str) -> TextParser:
    single = len(ranges) == 1
    rlo, rhi = ranges[0]

    def parse(s: str) -> int:
        # isascii+isdigit is the fast path; the regex admits the lexical forms
        # YANG allows (sign, leading zeros) and refuses what int() would also take
        # ("1_000", " 7", unicode digits).
        if not (s.isascii() and s.isdigit()) and not _INT_TEXT.match(s):
            raise LeafValueError(f"{s[:40]!r} is not an integer")
        if len(s) > _INT_DIGITS:
            # No YANG integer type needs more than 20 digits, and int() refuses
            # texts over 4,300 digits with a ValueError of its own; leading
            # zeros are still a valid lexical form.
            digits = s.lstrip("+-").lstrip("0")
            if len(digits) > _INT_DIGITS:
                raise LeafValueError(f"{s[:20]}... ({len(s)} characters) is not in range {desc}")
            s = ("-" if s[0] == "-" else "") + (digits or "0")
        v = int(s)
        if single:
            if rlo <= v <= rhi:
                return v
        elif any(a <= v <= b for a, b in ranges):
            return v
        raise LeafValueError(f"{v} is not in range {desc}")

    return parse


def _resolve_ranges(spec: Any) -> tuple[int, int, list[tuple[int, int]], str]:
    """Flatten a chain of RangeTypeSpecs into the innermost allowed intervals."""
    if isinstance(spec, types.IntTypeSpec):
        return spec.min, spec.max, [(spec.min, spec.max)], f"{spec.min}..{spec.max}"
    if isinstance(spec, types.RangeTypeSpec):
        lo, hi, outer, _ = _resolve_ranges(spec.base)
        ranges = []
        for a, b in spec.ranges:
            a = lo if a == "min" else hi if a == "max" else int(a)
            b = a if b is None else hi if b == "max" else lo if b == "min" else int(b)
            ranges.append((a, b))
        desc = " | ".join(f"{a}..{b}" if a != b else str(a) for a, b in ranges)
        return lo, hi, ranges, desc
    raise SchemaError(f"unsupported integer restriction {type(spec).__name__}")


def _compile_pattern(pat: Any) -> Callable[[str], bool]:
    spec = str(pat)
    invert = pat.invert_match
    # XSD patterns are anchored and know \p{..} classes; the `regex` module has
    # those classes, so fullmatch gives XSD semantics for what YANG modules use.
    # XSD-only escapes (\i, \c) fall back to pyang's exact lxml XSD check.
    if re.search(r"\\[icIC]", spec):
        return lambda s: pat(s) is not invert and pat(s)
    rx = regex.compile(spec)
    if invert:
        return lambda s: rx.fullmatch(s) is None
    return lambda s: rx.fullmatch(s) is not None


def _string_checker(spec: Any) -> Callable[[str], str | None]:
    """Return f(s) -> None if s is valid, else the reason; for a string type chain."""
    checks: list[Callable[[str], str | None]] = []
    while not isinstance(spec, types.StringTypeSpec):
        if isinstance(spec, types.PatternTypeSpec):
            checks += [_pattern_check(_compile_pattern(pat), str(pat)) for pat in spec.res]
        elif isinstance(spec, types.LengthTypeSpec):
            checks.append(_length_check([(a, b) for a, b in spec.length]))
        else:
            raise SchemaError(f"unsupported string restriction {type(spec).__name__}")
        spec = spec.base

    def check(s: str) -> str | None:
        for c in checks:
            why = c(s)
            if why:
                return why
        return None

    return check


def _pattern_check(match: Callable[[str], Any], pattern: str) -> Callable[[str], str | None]:
    """A check of one ``pattern`` restriction (``match``: its compiled matcher)."""
    return lambda s: None if match(s) else f"does not match pattern {pattern!r}"


def _length_check(lengths: list[tuple[Any, Any]]) -> Callable[[str], str | None]:
    """A check of a ``length`` restriction: ``(min, max)`` pairs as pyang gives them ("min", "max", numbers or None)."""
    return lambda s: (
        None
        if any((a == "min" or len(s) >= int(a)) and (b in ("max", None) and (b == "max" or len(s) == int(a)) or (b not in ("max", None) and len(s) <= int(b))) for a, b in lengths)
        else "length out of range"
    )


def _typedef_name(type_stmt: Any) -> str:
    """Qualified name of the typedef a type statement refers to ('' for built-ins)."""
    td = getattr(type_stmt, "i_typedef", None)
    if td is None:
        return ""
    return f"{td.i_module.i_modulename}:{td.arg}"


def _compile_text(type_stmt: Any) -> tuple[str, TextParser]:
    """Compile a `type` statement into (kind, parser of XML text)."""
    spec = type_stmt.i_type_spec
    if spec is None:
        raise SchemaError(f"type {type_stmt.arg} at {type_stmt.pos} was not resolved by pyang")
    name = type_stmt.arg
    if isinstance(spec, (types.IntTypeSpec, types.RangeTypeSpec)):
        lo, hi, ranges, desc = _resolve_ranges(spec)
        return "int", _memoized(_int_parser(lo, hi, ranges, desc))
    if isinstance(spec, types.EnumTypeSpec):
        allowed = {n: n for n, _ in spec.enums}
        listing = ", ".join(allowed)

        def parse_enum(s: str) -> str:
            try:
                return allowed[s]
            except KeyError:
                raise LeafValueError(f"{s!r} is not one of {listing}") from None

        return "enum", parse_enum
    if isinstance(spec, types.BooleanTypeSpec):
        booleans = {"true": True, "false": False}

        def parse_bool(s: str) -> bool:
            try:
                return booleans[s]
            except KeyError:
                raise LeafValueError(f"{s!r} is not true or false") from None

        return "bool", parse_bool
    if isinstance(spec, (types.StringTypeSpec, types.PatternTypeSpec, types.LengthTypeSpec)):
        check = _string_checker(spec)
        canon = _CANONICALIZERS.get(_typedef_name(type_stmt), lambda s: s)

        def parse_str(s: str) -> str:
            why = check(s)
            if why:
                raise LeafValueError(f"{s!r} is not a valid {name}: {why}")
            return canon(s)

        return "str", _memoized(parse_str)
    if isinstance(spec, types.UnionTypeSpec):
        members = [_compile_text(t) for t in spec.types]
        if {k for k, _ in members} != {"str"}:
            # Mixed unions change the JSON shape per value; the module has none.
            raise SchemaError(f"union {name}: only unions of string types are supported")
        parsers = [p for _, p in members]

        def parse_union(s: str) -> str:
            for p in parsers:
                try:
                    return p(s)
                except LeafValueError:
                    continue
            raise LeafValueError(f"{s!r} is not a valid {name}")

        return "str", _memoized(parse_union)
    raise SchemaError(f"type {name} ({type(spec).__name__}) is not supported by the natmig codec")


def _memoized(parse: TextParser) -> TextParser:
    memo: dict[str, Any] = {}
    get = memo.get

    def parse_memo(s: str) -> Any:
        # get, not try/except KeyError: once the memo is full every new value
        # misses, and a raised KeyError costs more than the check it saves.
        v = get(s, memo)
        if v is not memo:
            return v
        v = parse(s)
        if len(memo) < _MEMO_LIMIT:
            memo[s] = v
        return v

    return parse_memo


def _json_parser(kind: str, parse: TextParser, name: str) -> Callable[[Any], Any]:
    # RFC 7951: integers up to 32 bits are JSON numbers, booleans are true/false,
    # enumerations and strings are JSON strings.
    if kind == "int":

        def pj(v: Any) -> int:
            if type(v) is not int:
                raise LeafValueError(f"{v!r} is not a JSON integer")
            return parse(str(v))

        return pj
    if kind == "bool":

        def pjb(v: Any) -> bool:
            if type(v) is not bool:
                raise LeafValueError(f"{v!r} is not a JSON boolean")
            return v

        return pjb

    def pjs(v: Any) -> Any:
        if type(v) is not str:
            raise LeafValueError(f"{v!r} is not a JSON string")
        return parse(v)

    return pjs


def _text_renderer(kind: str) -> Callable[[Any], str]:
    if kind == "bool":
        return lambda v: "true" if v else "false"
    # Validated values need no XML escaping: enums, digits and addresses only
    # hold characters that are safe in element content.
    return str


_WHEN = re.compile(r"\s*\.\./([A-Za-z_][\w.-]*)\s*=\s*'([^']*)'\s*\Z")


def _compile_when(leaf: Any) -> tuple[str, Any] | None:
    w = leaf.search_one("when")
    if w is None:
        return None
    m = _WHEN.match(w.arg)
    if not m:
        raise SchemaError(f"when {w.arg!r} on {leaf.arg}: only \"../leaf = 'value'\" is supported")
    return m.group(1), m.group(2)


def compile_leaf(leaf: Any, keys: tuple[str, ...]) -> LeafSpec:
    """The validator, renderer and properties of one pyang leaf statement (``keys``: its list's keys)."""
    if leaf.keyword != "leaf":
        raise SchemaError(f"{leaf.keyword} {leaf.arg}: only leaves are supported in {leaf.parent.keyword} {leaf.parent.arg}")
    type_stmt = leaf.search_one("type")
    kind, parse = _compile_text(type_stmt)
    default = None
    d = leaf.search_one("default")
    td = getattr(type_stmt, "i_typedef", None)
    while d is None and td is not None:  # a typedef may carry the default
        d = td.search_one("default")
        td = getattr(td.search_one("type"), "i_typedef", None)
    if d is not None:
        default = parse(d.arg)
    mand = leaf.search_one("mandatory")
    return LeafSpec(
        name=leaf.arg,
        type_name=type_stmt.arg,
        kind=kind,
        parse=parse,
        parse_json=_json_parser(kind, parse, leaf.arg),
        text=_text_renderer(kind),
        is_key=leaf.arg in keys,
        mandatory=leaf.arg in keys or (mand is not None and mand.arg == "true"),
        default=default,
        when=_compile_when(leaf),
        config=getattr(leaf, "i_config", True) is not False,
    )


#: One compile at a time: pyang's pattern checker shares class-level lxml
#: documents that its first instance sets up unguarded, so two threads
#: compiling at once (a controller's first RPCs in parallel) could meet a
#: half-made one ("'NoneType' object has no attribute 'set'").
COMPILE_LOCK = threading.Lock()


def load_schema(path: str | None = None) -> Schema:
    """Parse, check and compile the nat-session module (cached per path; safe from several threads)."""
    with COMPILE_LOCK:
        return _load_schema(path)


#: Where pyang installs the IETF modules (ietf-inet-types among them): named
#: rather than trusting $HOME or $YANG_MODPATH.
IETF_DIR = os.path.join(sys.prefix, "share", "yang", "modules")


def compile_texts(texts: dict[str, str], search: list[str], where: str) -> dict[str, Any]:
    """pyang's checked statements of each module in ``texts`` (name -> YANG text).

    Imports are found among ``texts`` first, then in the ``search``
    directories and pyang's IETF modules.  Call with :data:`COMPILE_LOCK`
    held.  Raises :class:`SchemaError` naming ``where`` and every error.
    """
    repo = repository.FileRepository(os.pathsep.join([*search, IETF_DIR]), use_env=False)
    ctx = context.Context(repo)
    mods = {name: ctx.add_module(f"{where}/{name}.yang" if len(texts) > 1 else where, text) for name, text in texts.items()}
    ctx.validate()
    errs = [
        f"{pos}: {error.err_to_str(tag, args)}"
        for pos, tag, args in ctx.errors
        if error.is_error(error.err_level(tag))
    ]
    if errs or any(m is None for m in mods.values()):
        raise SchemaError(f"YANG module {where} has errors:\n" + "\n".join(errs or ["not a YANG module"]))
    return mods


@lru_cache(maxsize=None)
def _load_schema(path: str | None = None) -> Schema:
    src = Path(path) if path else MODULE_PATH
    try:
        text = src.read_text()
    except OSError as e:
        raise SchemaError(f"cannot read YANG module {src}: {e}") from e
    mod = compile_texts({"main": text}, [str(src.parent)], str(src))["main"]
    lst = mod.search_one("list", LIST_NAME)
    if lst is None:
        raise SchemaError(f"module {mod.arg} has no list {LIST_NAME}")
    keys = tuple(lst.search_one("key").arg.split())
    leaves = tuple(compile_leaf(ch, keys) for ch in lst.i_children)
    # The key leaves come first, in key order: that is the order of XML output
    # (RFC 7950 7.8.5) and of the key tuple.
    order = {k: i for i, k in enumerate(keys)}
    leaves = tuple(sorted(leaves, key=lambda s: order.get(s.name, len(keys))))
    stats = mod.search_one("container", STATS_NAME)
    stats_leaves = tuple(compile_leaf(ch, ()) for ch in stats.i_children) if stats is not None else ()
    ctl = mod.search_one("container", CONTROL_NAME)
    control_leaves = tuple(compile_leaf(ch, ()) for ch in ctl.i_children) if ctl is not None else ()
    rev = mod.search_one("revision")
    return Schema(
        module=mod.arg,
        namespace=mod.search_one("namespace").arg,
        prefix=mod.search_one("prefix").arg,
        revision=rev.arg if rev is not None else "",
        list_name=LIST_NAME,
        keys=keys,
        leaves=leaves,
        stats_name=STATS_NAME,
        stats_leaves=stats_leaves,
        control_name=CONTROL_NAME,
        control_leaves=control_leaves,
        source_path=src,
    )
