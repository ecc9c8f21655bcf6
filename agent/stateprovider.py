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
from typing import Callable

from natmig.errors import ProviderError
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

    def statistics(self) -> list[tuple[str, int, str]]:
        """(module:list, entries, digest) per list; a provider that follows its table may answer without reading it."""
        return [(lst.qname, len(t), lst.digest(t.values())) for lst, t in self.read().items()]

    def close(self) -> None:
        """The agent stops."""


class MemoryStateProvider(StateProvider):
    """Running in this process's memory: nothing else writes it, so every change comes through :meth:`apply`."""

    def __init__(self, module: StateModule) -> None:
        self.module = module
        self._tables: Tables = {lst: {} for lst in module.lists}
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

    def apply(self, changes: dict[StateList, Change]) -> None:
        with self._mutex:
            # Checked before anything is written: unique over each list as it would be.
            after = {lst: dict(self._tables[lst]) for lst in changes}
            for lst, ch in changes.items():
                for k in ch.deletes:
                    after[lst].pop(k, None)
                for e in ch.upserts:
                    after[lst][lst.key_of(e)] = e
            problems = {(lst, k): why for lst, t in after.items() for k, why in lst.clashes(t.values())}
            if problems:
                raise StateRefused(problems)
            events: list[tuple[StateList, str, Entry]] = []
            for lst, t in after.items():
                old = self._tables[lst]
                events += [(lst, "deleted", e) for k, e in old.items() if t.get(k) != e]
                events += [(lst, "created", e) for k, e in t.items() if old.get(k) != e]
                self._tables[lst] = t
        for ev in events:
            self.on_change(*ev)

    def admission(self) -> bool:
        return self._admit

    def set_admission(self, admit: bool) -> None:
        self._admit = admit
