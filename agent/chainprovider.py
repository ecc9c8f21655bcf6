"""The state provider of a chained node (:mod:`.chainnode`): fw-state and nat-session over one conntrack table.

One kernel entry is two entries of two modules: the firewall session (its
key, TCP state, lifetime, flag, mark) and, when the NAT translated it, the
NAT session (the same key, its translation, and the same per-connection
leaves).  The provider reads the table once for both lists, and writes each
kernel entry once for both: an :meth:`apply` gets the changes of every list
(the agent's datastore holds both modules and commits them in one change),
merges them per key, checks that they agree, and then writes one kernel
entry per key, with the firewall's code (:class:`.fwprovider.FirewallProvider`).

How the two lists' changes of one key become one kernel write:

=====================================  ==========================================================
session and nat-session upserted       one entry: the NAT session's translation, the firewall
                                       session's state, lifetime, flag and mark
session only                           the kernel's entry updated in place, its translation kept;
                                       without one, an untranslated entry made
nat-session only                       the kernel's entry with that translation updated from it;
                                       without one, refused: a translated connection passed the
                                       firewall, so its session comes in the same change
both deleted                           one delete
one deleted, the other kept            refused when the kernel's entry is translated: a kernel
                                       entry cannot lose or gain its translation in place
=====================================  ==========================================================

Entries of the host's own connections (the agent's management SSH) are
neither list's, and are never read, written or deleted.  Events: a kernel
entry created or destroyed is a session event, and a nat-session event too
when it is translated.
"""

from __future__ import annotations

import operator
from typing import cast

from ..errors import ProviderError
from ..model import NatSession, SessionKey
from ..statemodel import Entry, Key, StateList, StateModule
from . import ctnetlink as nl
from .ctbatch import invalid_entries
from .ctevents import CTA_ZONE
from . import ctread
from .fwnode import FwNode
from .fwprovider import FirewallProvider
from .stateprovider import Change, StateRefused, Tables

#: nat-session's leaves are NatSession's fields, in its order (yang/nat-session.yang is the model the record was made from).
_NAT_LEAVES = ("protocol", "src_address", "src_port", "dst_address", "dst_port", "translated_address", "translated_port",
               "tcp_state", "timeout", "assured", "mark")


class ChainProvider(FirewallProvider):
    """fw-state's ``session`` and ``blocked`` and nat-session's ``nat-session`` of the chained node ``node``."""

    def __init__(self, fw_module: StateModule, nat_module: StateModule, node: FwNode) -> None:
        super().__init__(fw_module, node)
        self.nat_module = nat_module
        self.nat = nat_module.list("nat-session")
        if tuple(s.name for s in self.nat.leaves) != _NAT_LEAVES:
            raise ProviderError(f"ChainProvider: {nat_module.name}'s nat-session has leaves {', '.join(s.name for s in self.nat.leaves)}; "
                                f"this provider knows {', '.join(_NAT_LEAVES)}")
        self._nat_fields = operator.attrgetter(*_NAT_LEAVES)

    # -- reading: one dump, two lists ----------------------------------------

    def _nat_entry(self, s: NatSession) -> Entry:
        return self._nat_fields(s)

    def _is_session(self, attrs: dict[int, bytes]) -> NatSession | None:
        if (z := attrs.get(CTA_ZONE)) is not None and z != b"\0\0":
            return None
        s = ctread.entry_flow(attrs)
        return None if s is None or self._host_own(s) else s

    def _flows(self) -> list[NatSession]:
        """Every connection of one dump, translated or not, the host's own left out."""
        own = self._host_own
        return [s for s in self._reader.flows() if not own(s)]

    def read(self) -> Tables:
        entry, nat_entry, untranslated = self._entry, self._nat_entry, nl.untranslated
        sessions: dict[Key, Entry] = {}
        nats: dict[Key, Entry] = {}
        for s in self._flows():
            sessions[s.key] = entry(s)
            if not untranslated(s):
                nats[s.key] = nat_entry(s)
        return {self.sessions: sessions, self.nat: nats, self.blocked: self._read_blocked()}

    def read_lists(self, lists: list[StateList]) -> Tables:
        if self.sessions in lists or self.nat in lists:
            out = self.read()  # one dump serves both views
            return {lst: t for lst, t in out.items() if lst in lists}
        return {self.blocked: self._read_blocked()} if self.blocked in lists else {}

    def lookup(self, lst: StateList, keys: list[Key]) -> dict[Key, Entry]:
        if lst is self.nat:
            found = self.lookup_sessions(cast(list[SessionKey], [tuple(k) for k in keys]))
            return {k: self._nat_entry(s) for k, s in found.items() if not nl.untranslated(s) and not self._host_own(s)}
        return super().lookup(lst, keys)

    def _is_flow_of(self, s: NatSession) -> bool:
        return not self._host_own(s)

    def _session_events(self, event: str, s: NatSession) -> list[tuple[StateList, str, Entry]]:
        out = [(self.sessions, event, self._entry(s))]
        if not nl.untranslated(s):
            out.append((self.nat, event, self._nat_entry(s)))
        return out

    # -- writing: each kernel entry once ---------------------------------------

    def apply(self, changes: dict[StateList, Change]) -> None:
        from ..gcpause import gc_paused

        with self._lock, gc_paused():
            self._apply_chain(changes.get(self.sessions, Change()), changes.get(self.nat, Change()), changes.get(self.blocked, Change()))

    def _merge(self, fw: Change, nat: Change, existing: dict[SessionKey, NatSession]
               ) -> tuple[dict[SessionKey, NatSession], list[SessionKey], dict[tuple[StateList, Key], str]]:
        """Both lists' changes as one write per kernel entry: (upserts by key, deletes, problems)."""
        problems: dict[tuple[StateList, Key], str] = {}
        fw_up = {cast(SessionKey, e[:5]): e for e in fw.upserts}
        nat_up = {cast(SessionKey, e[:5]): e for e in nat.upserts}
        fw_del = {cast(SessionKey, tuple(k)) for k in fw.deletes}
        nat_del = {cast(SessionKey, tuple(k)) for k in nat.deletes}
        upserts: dict[SessionKey, NatSession] = {}
        for k in fw_up.keys() | nat_up.keys():
            f, n, old = fw_up.get(k), nat_up.get(k), existing.get(k)
            if k in fw_del or k in nat_del:
                problems[(self.sessions if k in fw_del else self.nat, k)] = "deleted from one list and written to the other in the same change"
                continue
            if n is not None:
                s = NatSession(*self._nat_values(n))
                if old is not None and (old.translated_address, old.translated_port) != (s.translated_address, s.translated_port):
                    problems[(self.nat, k)] = (f"the kernel's entry translates it to {old.translated_address}:{old.translated_port}: "
                                               "a translation is not changed in place")
                    continue
                if f is None and old is None:
                    problems[(self.nat, k)] = "a translated connection is a firewall session too: the change carries no fw-state session for it"
                    continue
            else:
                s = old if old is not None else self._session(cast(Entry, f))
            if f is not None:
                # The firewall session carries the connection's own leaves; the NAT session, the translation.
                fs = self._session(f)
                s = NatSession(s.protocol, s.src_address, s.src_port, s.dst_address, s.dst_port, s.translated_address, s.translated_port,
                               fs.tcp_state, fs.timeout, fs.assured, fs.mark)
            upserts[k] = s
        deletes: list[SessionKey] = []
        for k in fw_del | nat_del:
            old = existing.get(k)
            if old is None:
                continue  # absent: nothing to delete in either list
            translated = not nl.untranslated(old)
            if translated and (k in fw_del) != (k in nat_del):
                lst = self.sessions if k in fw_del else self.nat
                problems[(lst, k)] = ("its kernel entry is both a firewall session and a NAT session: delete both or neither "
                                      "(an entry cannot lose its translation in place)")
                continue
            if not translated and k in nat_del:
                continue  # no NAT session there: the firewall's delete (if any) decides
            deletes.append(k)
        return upserts, deletes, problems

    @staticmethod
    def _nat_values(e: Entry) -> tuple:
        p, src, sport, dst, dport, taddr, tport, state, timeout, assured, mark = e
        if p == "TCP" and state is None:
            state = "ESTABLISHED"
        return (p, src, sport, dst, dport, taddr, tport, state, timeout, bool(assured), mark or 0)

    def _apply_chain(self, fw: Change, nat: Change, blk: Change) -> None:
        keys = [cast(SessionKey, e[:5]) for e in (*fw.upserts, *nat.upserts)] + [cast(SessionKey, tuple(k)) for k in (*fw.deletes, *nat.deletes)]
        existing = self.lookup_sessions(keys) if keys else {}
        merged, deletes, problems = self._merge(fw, nat, existing)
        ukeys = list(merged)
        upserts = [merged[k] for k in ukeys]
        invalid = invalid_entries(upserts)
        keyset = set(ukeys)
        nat_keys = {e[:5] for e in nat.upserts}
        for s, k in zip(upserts, ukeys):
            why = invalid.get(k)
            if why is None and self._host_own(s):
                why = "it names an address of the node itself: the host's own connections are not sessions"
            if why is None and nl.untranslated(s) and s.protocol != "ICMP" and (s.protocol, s.dst_address, s.dst_port, s.src_address, s.src_port) in keyset:
                why = "its reply tuple is the key of another session of the change"
            if why is not None:
                problems[(self.nat if k in nat_keys and not nl.untranslated(s) else self.sessions, k)] = why
        for k in deletes:
            if self._host_own(existing[k]):
                problems[(self.sessions, k)] = "it names an address of the node itself: the host's own connections are not sessions"
        if problems:
            raise StateRefused(problems)
        blocked_before = self._read_blocked() if blk else {}
        self._write_blocked(blk, blocked_before)
        try:
            created, deleted = self._write_sessions(upserts, ukeys, deletes, existing)
        except StateRefused:
            self._restore_blocked(blk, blocked_before)
            raise
        events: list[tuple[StateList, str, Entry]] = []
        for k in deleted:
            events += self._session_events("deleted", existing[k])
        for s, k in zip(upserts, ukeys):
            if k in created:
                events += self._session_events("created", s)
        self._report(events, blk, blocked_before)
