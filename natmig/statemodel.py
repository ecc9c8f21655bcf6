"""Any state module, compiled: its state lists, their keys, leaves and `unique` constraints.

This is what makes the migration engine generic.  A *state module* is a
YANG module whose top-level, configuration, keyed lists hold a network
function's state; nothing else about it is known in advance.  The engine
learns from the compiled module which lists to move, how an entry is keyed
(``key``), which entries may not coexist (``unique``: a load balancer's
source port per backend, a NAT's public mapping), and how to fingerprint a
list (natmig-state's digest: the key and the other mandatory leaves).

An entry is a plain tuple of its leaf values in :attr:`StateList.leaves`
order (keys first, in key order): small, hashable, comparable, and the same
on every side of the wire.  Values are checked and rendered by the per-leaf
validators of :mod:`natmig.schema`, so a module's ranges, patterns and enums
are enforced with no code of its own.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import SchemaError
from .model import digest_xor, format_digest
from .schema import COMPILE_LOCK, YANG_DIR, LeafSpec, compile_leaf, compile_texts

#: The common module every state agent implements (yang/natmig-state.yang).
COMMON_MODULE = "natmig-state"
COMMON_NS = "urn:natmig:yang:natmig-state"

Entry = tuple[Any, ...]
Key = tuple[Any, ...]


@dataclass(frozen=True)
class StateList:
    """One state list of a module: what an entry holds and what makes two entries clash."""

    module: str
    namespace: str
    prefix: str
    name: str
    keys: tuple[str, ...]
    #: every leaf, keys first in key order, then the others in schema order.
    leaves: tuple[LeafSpec, ...]
    #: each `unique` constraint: leaf names that no two entries may share values of.
    uniques: tuple[tuple[str, ...], ...]

    @property
    def qname(self) -> str:
        """``module:list``, how natmig-state and reports name the list."""
        return f"{self.module}:{self.name}"

    @cached_property
    def index(self) -> dict[str, int]:
        """Position of each leaf in an entry tuple."""
        return {s.name: i for i, s in enumerate(self.leaves)}

    @cached_property
    def _hash(self) -> int:
        return hash((self.module, self.namespace, self.name, self.keys, self.leaves, self.uniques))

    def __hash__(self) -> int:
        # Lists key every table and change: the generated hash walked every leaf's spec on each lookup
        # (10k edits: 0.9 s of 1.9 s in one edit-config); the fields are frozen, so once is enough.
        return self._hash

    @cached_property
    def _key_idx(self) -> tuple[int, ...]:
        return tuple(range(len(self.keys)))

    @cached_property
    def unique_idx(self) -> tuple[tuple[int, ...], ...]:
        """Each `unique` constraint as entry positions."""
        return tuple(tuple(self.index[n] for n in u) for u in self.uniques)

    @cached_property
    def _digest_idx(self) -> tuple[int, ...]:
        return tuple(i for i, s in enumerate(self.leaves) if s.mandatory)

    def key_of(self, entry: Entry) -> Key:
        """The entry's key tuple."""
        return entry[: len(self.keys)]

    def describe(self, key: Iterable[Any]) -> str:
        """``binding[192.0.2.7 40001]``: how errors and logs name an entry."""
        return f"{self.name}[{' '.join(str(v) for v in key)}]"

    def digest(self, entries: Iterable[Entry]) -> str:
        """natmig-state's digest of the list (see state-statistics/table/digest)."""
        return format_digest(self.digest_acc(entries))

    def digest_acc(self, entries: Iterable[Entry]) -> int:
        """The digest's accumulator: XOR of each entry's value, so an entry is XORed in when it comes and out when it goes."""
        idx = self._digest_idx
        specs = [self.leaves[i].text for i in idx]
        return digest_xor(" ".join(t(e[i]) for t, i in zip(specs, idx)).encode() for e in entries)

    def clash(self, names: tuple[str, ...], idx: tuple[int, ...], values: tuple[Any, ...], other: Key) -> str:
        """Why an entry with ``values`` of unique ``names`` is refused: ``other`` holds them already."""
        shown = " ".join(f"{n}={self.leaves[i].text(v)}" for n, i, v in zip(names, idx, values))
        return f"unique \"{' '.join(names)}\" violated: {shown} is already used by {self.describe(other)}"

    def clashes(self, entries: Iterable[Entry]) -> list[tuple[Key, str]]:
        """Every violation of the list's `unique` constraints among ``entries`` (RFC 7950 7.8.3): (key of the entry, why)."""
        out: list[tuple[Key, str]] = []
        for names, idx in zip(self.uniques, self.unique_idx):
            seen: dict[tuple[Any, ...], Key] = {}
            for e in entries:
                values = tuple(e[i] for i in idx)
                if any(v is None for v in values):
                    continue  # a constraint binds only entries that have all its leaves
                other = seen.setdefault(values, self.key_of(e))
                if other != self.key_of(e):
                    out.append((self.key_of(e), self.clash(names, idx, values, other)))
        return out


@dataclass(frozen=True)
class StateModule:
    """A compiled state module and the text it was compiled from."""

    name: str
    revision: str
    namespace: str
    prefix: str
    lists: tuple[StateList, ...]
    #: YANG text of this module and of every module it imports (name -> text): what get-schema serves.
    texts: Mapping[str, str] = field(default_factory=dict)

    def list(self, name: str) -> StateList:
        """A state list by name."""
        for lst in self.lists:
            if lst.name == name:
                return lst
        raise SchemaError(f"module {self.name} has no state list {name!r} (it has {', '.join(l.name for l in self.lists) or 'none'})")


def _state_list(mod: Any, lst: Any) -> StateList:
    keys = tuple(lst.search_one("key").arg.split())
    leaves = []
    for ch in lst.i_children:
        if ch.keyword != "leaf":
            raise SchemaError(f"{mod.arg}: list {lst.arg}: {ch.keyword} {ch.arg}: a state list may hold leaves only")
        leaves.append(compile_leaf(ch, keys))
    order = {k: i for i, k in enumerate(keys)}
    # Keys first, in key order: the order of XML output (RFC 7950 7.8.5) and of the key tuple.
    leaves.sort(key=lambda s: order.get(s.name, len(keys)))
    uniques = []
    for u in lst.search("unique"):
        names = tuple(u.arg.split())
        bad = [n for n in names if "/" in n or n not in {s.name for s in leaves}]
        if bad:
            raise SchemaError(f"{mod.arg}: list {lst.arg}: unique {u.arg!r}: {', '.join(bad)} is not a leaf of the list (descendant paths are not supported)")
        uniques.append(names)
    return StateList(mod.arg, mod.search_one("namespace").arg, mod.search_one("prefix").arg, lst.arg, keys, tuple(leaves), tuple(uniques))


def _imports(mod: Any) -> list[Any]:
    return [mod.i_ctx.get_module(i.arg) for i in mod.search("import")]


def _compile(texts: dict[str, str], name: str, search: list[str], where: str) -> StateModule:
    with COMPILE_LOCK:
        mods = compile_texts(texts, search, where)
    mod = mods[name]
    lists = tuple(
        _state_list(mod, ch) for ch in mod.i_children
        if ch.keyword == "list" and getattr(ch, "i_config", True) is not False and ch.search_one("key") is not None
    )
    served: dict[str, str] = {name: texts[name]}
    todo = [mod]
    while todo:  # every module it imports, transitively: a client compiles it with them
        for imp in _imports(todo.pop()):
            if imp is not None and imp.arg not in served:
                served[imp.arg] = texts.get(imp.arg) or Path(imp.pos.ref).read_text()
                todo.append(imp)
    rev = mod.search_one("revision")
    return StateModule(mod.arg, rev.arg if rev is not None else "", mod.search_one("namespace").arg,
                       mod.search_one("prefix").arg, lists, served)


_cache: dict[str, StateModule] = {}
_cache_lock = threading.Lock()


def load_module(path: str | Path) -> StateModule:
    """Compile the state module in the file ``path`` (imports from its directory, yang/, pyang's IETF set)."""
    src = Path(path)
    try:
        text = src.read_text()
    except OSError as e:
        raise SchemaError(f"cannot read YANG module {src}: {e}") from e
    with _cache_lock:
        if (hit := _cache.get(str(src.resolve()))) is not None and hit.texts.get(hit.name) == text:
            return hit
    name = _module_name(text, str(src))
    sm = _compile({name: text}, name, [str(src.parent), str(YANG_DIR)], str(src))
    if not sm.lists:
        raise SchemaError(f"{src}: module {sm.name} has no state list (a top-level keyed list of configuration)")
    with _cache_lock:
        _cache[str(src.resolve())] = sm
    return sm


#: modules compiled from fetched texts, by name and the texts' hash: both agents of a move serve the same module, and a
#: compile of nat-session took ~25 ms, once per agent and move (the controller service's kept sessions skip it anyway).
_fetched: dict[tuple[str, str], StateModule] = {}
FETCHED_KEPT = 32


def compile_fetched(texts: Mapping[str, str], name: str, where: str) -> StateModule:
    """Compile module ``name`` from texts fetched with get-schema (name -> text), imports among them.

    The same texts compile to the same module (nothing else is searched), so a compile is kept by their hash.
    """
    if name not in texts:
        raise SchemaError(f"{where}: module {name} was not fetched")
    key = (name, hashlib.sha256("\0".join(f"{n}\0{t}" for n, t in sorted(texts.items())).encode()).hexdigest())
    with _cache_lock:
        if (hit := _fetched.get(key)) is not None:
            return hit
    sm = _compile(dict(texts), name, [], where)
    with _cache_lock:
        if len(_fetched) >= FETCHED_KEPT:
            _fetched.pop(next(iter(_fetched)))
        _fetched[key] = sm
    return sm


def _module_name(text: str, where: str) -> str:
    words = text.split(None, 2)
    if len(words) < 2 or words[0] not in ("module", "submodule"):
        raise SchemaError(f"{where}: not a YANG module (it does not start with 'module NAME')")
    if words[0] == "submodule":
        raise SchemaError(f"{where}: a submodule cannot be served on its own; give its module")
    return words[1].strip("{\"'")


def common_module() -> StateModule:
    """natmig-state itself (it has no state list: what it defines are containers and a notification)."""
    src = YANG_DIR / f"{COMMON_MODULE}.yang"
    try:
        text = src.read_text()
    except OSError as e:
        raise SchemaError(f"cannot read YANG module {src}: {e}") from e
    return _compile({COMMON_MODULE: text}, COMMON_MODULE, [str(YANG_DIR)], str(src))
