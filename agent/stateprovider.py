"""Where a state agent's running lists live: the provider interface, and the in-memory provider.

The split is the NAT agent's (and netopeer2/sysrepo's): the datastore
(:mod:`.statestore`) decides what an edit changes and keeps candidate,
locks and confirmed commits; a provider holds running, applies changes all
or nothing, holds or admits new entries, and reports entries created or
deleted by whatever else writes them (traffic, on a kernel provider).  A
provider never sees XML.

:class:`MemoryStateProvider` serves any state module from memory
(``natmig agent --provider memory --module FILE``).  A provider of a
network function's kernel state implements the same five methods.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from natmig.errors import ProviderError
from natmig.model import format_digest
from natmig.statemodel import Entry, Key, StateList, StateModule

#: list -> key -> entry
Tables = dict[StateList, dict[Key, Entry]]
#: called with (list, "created" | "deleted", entry) for every entry running gains or loses.
OnChange = Callable[[StateList, str, Entry], None]


@dataclass
class Change:
    """What to do to one list: entries to create or replace, keys to delete."""

    upserts: list[Entry] = field(default_factory=list)
    deletes: list[Key] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.upserts or self.deletes)


class StateRefused(ProviderError):
    """A change was refused whole; ``problems`` maps (list, key) to why (nothing was applied)."""

    def __init__(self, problems: dict[tuple[StateList, Key], str]) -> None:
        self.problems = dict(problems)
        shown = [f"{lst.describe(k)}: {why}" for (lst, k), why in list(self.problems.items())[:20]]
        super().__init__(f"change refused, nothing applied ({len(self.problems)} entries): " + "; ".join(shown))


class StateProvider(abc.ABC):
    """Running's lists of one state module."""

    module: StateModule
    #: set by the agent: where created/deleted entries are reported.
    on_change: OnChange = staticmethod(lambda lst, event, entry: None)

    @abc.abstractmethod
    def read(self) -> Tables:
        """Every list's entries, as they are now (a copy the caller may keep)."""

    def read_lists(self, lists: list[StateList]) -> Tables:
        """The entries of ``lists`` only (a provider whose lists live apart reads only those asked for)."""
        return {lst: t for lst, t in self.read().items() if lst in lists}

    def lookup(self, lst: StateList, keys: list[Key]) -> dict[Key, Entry]:
        """The entries of ``lst`` with these keys, those that exist.

        The datastore asks this of every edit, for the keys it names: a
        provider over a large table answers without reading all of it.
        """
        table = self.read_lists([lst]).get(lst, {})
        return {k: table[k] for k in keys if k in table}

    @abc.abstractmethod
    def apply(self, changes: dict[StateList, Change]) -> None:
        """Apply every change or none: raise :class:`StateRefused` naming the entries refused."""

    @abc.abstractmethod
    def admission(self) -> bool:
        """Whether new entries are created (natmig-state's state-control/admit-new)."""

    @abc.abstractmethod
    def set_admission(self, admit: bool) -> None:
        """Open or close admission of new entries."""

    def held(self) -> int | None:
        """What would create an entry, held now while admission is closed (natmig-state's state-control/held).

        None (the default): the provider carries no traffic, so it never holds anything.
        """
        return None

    def unique_clashes(self, lst: StateList, plan: dict[Key, Entry | None]) -> list[tuple[Key, str]]:
        """The entries of ``plan`` (key -> entry, None: deleted) that would break a ``unique`` of ``lst`` over running.

        This reads the whole list; a provider that indexes its unique values answers in O(len(plan)).
        """
        table = dict(self.read_lists([lst]).get(lst, {}))
        for k, e in plan.items():
            if e is None:
                table.pop(k, None)
            else:
                table[k] = e
        return lst.clashes(table.values())

    def statistics(self) -> list[tuple[str, int, str]]:
        """(module:list, entries, digest) per list; a provider that follows its table may answer without reading it."""
        return [(lst.qname, len(t), lst.digest(t.values())) for lst, t in self.read().items()]

    def close(self) -> None:
        """The agent stops."""


class MemoryStateProvider(StateProvider):
    """Running in this process's memory: nothing else writes it, so every change comes through :meth:`apply`.

    A change of K entries costs O(K) at any table size: each list keeps an
    index per ``unique`` constraint (values -> key) and its digest's
    accumulator, each entry XORed in when it comes and out when it goes, so
    state-statistics is answered without reading the table.
    """

    def __init__(self, module: StateModule) -> None:
        self.module = module
        self._tables: Tables = {lst: {} for lst in module.lists}
        #: list -> one index per unique constraint: the constraint's values -> the key holding them
        self._unique: dict[StateList, list[dict[tuple[Any, ...], Key]]] = {lst: [{} for _ in lst.uniques] for lst in module.lists}
        self._acc: dict[StateList, int] = {lst: 0 for lst in module.lists}
        self._admit = True
        self._mutex = threading.Lock()

    def read(self) -> Tables:
        with self._mutex:
            return {lst: dict(t) for lst, t in self._tables.items()}

    def read_lists(self, lists: list[StateList]) -> Tables:
        with self._mutex:
            return {lst: dict(t) for lst, t in self._tables.items() if lst in lists}

    def lookup(self, lst: StateList, keys: list[Key]) -> dict[Key, Entry]:
        with self._mutex:
            t = self._tables[lst]
            return {k: t[k] for k in keys if k in t}

    def statistics(self) -> list[tuple[str, int, str]]:
        with self._mutex:
            return [(lst.qname, len(t), format_digest(self._acc[lst])) for lst, t in self._tables.items()]

    def apply(self, changes: dict[StateList, Change]) -> None:
        with self._mutex:
            # Each list's outcome for the keys it names (the last word on a key wins), checked
            # before anything is written: unique over the list as it would be.
            plans: dict[StateList, dict[Key, Entry | None]] = {}
            problems: dict[tuple[StateList, Key], str] = {}
            for lst, ch in changes.items():
                plan: dict[Key, Entry | None] = {k: None for k in ch.deletes}
                for e in ch.upserts:
                    plan[lst.key_of(e)] = e
                plans[lst] = plan
                problems.update(self._clashes(lst, plan))
            if problems:
                raise StateRefused(problems)
            events: list[tuple[StateList, str, Entry]] = []
            for lst, plan in plans.items():
                table, indexes = self._tables[lst], self._unique[lst]
                gone = [old for k, e in plan.items() if (old := table.get(k)) is not None and old != e]
                came = [e for k, e in plan.items() if e is not None and table.get(k) != e]
                for old in gone:
                    del table[lst.key_of(old)]
                    for index, idx in zip(indexes, lst.unique_idx):
                        index.pop(tuple(old[i] for i in idx), None)
                for e in came:
                    k = lst.key_of(e)
                    table[k] = e
                    for index, idx in zip(indexes, lst.unique_idx):
                        values = tuple(e[i] for i in idx)
                        if None not in values:
                            index[values] = k
                self._acc[lst] ^= lst.digest_acc(gone) ^ lst.digest_acc(came)
                events += [(lst, "deleted", e) for e in gone] + [(lst, "created", e) for e in came]
        for ev in events:
            self.on_change(*ev)

    def unique_clashes(self, lst: StateList, plan: dict[Key, Entry | None]) -> list[tuple[Key, str]]:
        with self._mutex:
            return [(k, why) for (_, k), why in self._clashes(lst, plan).items()]

    def _clashes(self, lst: StateList, plan: dict[Key, Entry | None]) -> dict[tuple[StateList, Key], str]:
        """The entries of ``plan`` that would break a unique constraint of ``lst`` (plan: key -> entry, None to delete)."""
        out: dict[tuple[StateList, Key], str] = {}
        for names, idx, index in zip(lst.uniques, lst.unique_idx, self._unique[lst]):
            taken: dict[tuple[Any, ...], Key] = {}  # values the plan's own entries hold
            for k, e in plan.items():
                if e is None:
                    continue
                values = tuple(e[i] for i in idx)
                if None in values:
                    continue  # a constraint binds only entries that have all its leaves
                holder = taken.setdefault(values, k)
                if holder == k:
                    holder = index.get(values, k)
                    if holder != k and holder in plan:
                        # The holder is changed by this plan too: free unless its new entry keeps the values.
                        new = plan[holder]
                        holder = holder if new is not None and tuple(new[i] for i in idx) == values else k
                if holder != k:
                    out[(lst, k)] = lst.clash(names, idx, values, holder)
        return out

    def admission(self) -> bool:
        return self._admit

    def set_admission(self, admit: bool) -> None:
        self._admit = admit
