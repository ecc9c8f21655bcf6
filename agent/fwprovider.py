"""The state provider of a firewall node: fw-state's lists over the node's live kernel state.

* ``session``: the untranslated entries of the namespace's conntrack table
  (the reply comes back to the original source), IPv4 TCP/UDP/ICMP echo,
  zone 0, leaving out the host's own connections (to or from an address of
  the node: the agent's management SSH is never a session).  Read with one
  ctnetlink dump, written with the NAT's ctnetlink code (:mod:`.ctnetlink`:
  creates packed by its encoder, in-place updates, deletes by key), looked
  up by GET (:mod:`.ctread`).
* ``blocked``: the elements of the node's nftables set ``blocked`` and their
  remaining timeouts, read as libnftables JSON, written by one nft
  transaction (in the agent's own process: :mod:`.nftables`).

:meth:`FirewallProvider.apply` is all or nothing over both lists: the
entries are checked first (and refused, named, before anything is written),
then the set's transaction, then the conntrack writes; should the kernel
refuse one of those (an entry that traffic created in between), what was
written is undone, the set's elements included, and the change is refused
with the offenders named.

Events (``on_change``): conntrack NEW and DESTROY of sessions, from the
kernel's event groups (the provider's own writes filtered out in the kernel
and reported by apply itself); the set's elements added or expired, from a
poll of the set every :data:`POLL_INTERVAL` seconds (the kernel sends no
event for an element the packet path adds, nor for one that expires: see
docs/firewall.md).
"""

from __future__ import annotations

import errno
import logging
import operator
import select
import socket
import threading
import time
from typing import Iterable, cast

from .. import netns as nsmod
from ..errors import ProviderError
from ..gcpause import gc_paused
from ..model import NatSession, SessionKey
from ..statemodel import Entry, Key, StateList, StateModule
from . import ctnetlink as nl
from .ctbulk import create_sessions, delete_tuples
from . import ctread, nftables
from .ctbatch import DEFAULT_TIMEOUT_SYSCTL, invalid_entries, timeout_key
from .ctevents import CTA_ZONE, NEW, EventSocket, EventsLost
from .fwnode import BLOCKED_SET, TABLE, FwNode
from .stateprovider import Change, OnChange, StateProvider, StateRefused, Tables

log = logging.getLogger(__name__)

#: Seconds between two reads of the blocked set for its events (a read of 1k elements: a few ms).
POLL_INTERVAL = 1.0
#: A lookup of K keys reads the whole table instead of a GET per key once K * this >= the table's size.
KEYS_PER_DUMP_ENTRY = 4
_SESSION_LEAVES = {
    "protocol": "protocol", "src-address": "src_address", "src-port": "src_port", "dst-address": "dst_address",
    "dst-port": "dst_port", "tcp-state": "tcp_state", "timeout": "timeout", "assured": "assured", "mark": "mark",
}


class FirewallProvider(StateProvider):
    """fw-state's ``session`` and ``blocked`` lists of the firewall node ``node`` (see the module docstring)."""

    def __init__(self, module: StateModule, node: FwNode) -> None:
        self.module = module
        self.node = node
        self.netns = node.name
        self.sessions = module.list("session")
        self.blocked = module.list("blocked")
        unknown = [n for n in self.sessions.index if n not in _SESSION_LEAVES] + [n for n in self.blocked.index if n not in ("address", "timeout")]
        if unknown:
            raise ProviderError(f"FirewallProvider: module {module.name} has leaves this provider does not know: {', '.join(unknown)}")
        self._own = node.addresses()
        #: an entry of the session list from a NatSession, in the module's leaf order (one C call).
        self._fields = operator.attrgetter(*(_SESSION_LEAVES[leaf.name] for leaf in self.sessions.leaves))
        #: where each NatSession field is in an entry of the session list (the module's leaf order).
        self._positions = operator.itemgetter(*(self.sessions.index[leaf] for leaf in
                                                ("protocol", "src-address", "src-port", "dst-address", "dst-port", "tcp-state", "timeout", "assured", "mark")))
        self._reader = ctread.EntryReader(self.netns)
        self._wsock: socket.socket | None = None
        self._lock = threading.RLock()
        self._defaults: dict[tuple[str, object], int] | None = None
        self._on_change: OnChange = lambda lst, event, entry: None
        self._known_blocked: dict[Key, Entry] | None = None
        self._events: EventSocket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- entries <-> kernel records -----------------------------------------

    def _entry(self, s: NatSession) -> Entry:
        return self._fields(s)

    def _session(self, e: Entry) -> NatSession:
        p, src, sport, dst, dport, state, timeout, assured, mark = self._positions(e)
        if p == "TCP" and state is None:
            state = "ESTABLISHED"
        # Untranslated: the translated endpoint is the source itself (ctnetlink.untranslated).
        return NatSession(p, src, sport, dst, dport, src, sport, state, timeout, bool(assured), mark or 0)

    def _is_session(self, attrs: dict[int, bytes]) -> NatSession | None:
        if (z := attrs.get(CTA_ZONE)) is not None and z != b"\0\0":
            return None  # a GET looks in zone 0 only; natmig makes no zones
        s = ctread.entry_flow(attrs)
        if s is None or not nl.untranslated(s) or self._host_own(s):
            return None
        return s

    def _host_own(self, s: NatSession) -> bool:
        own = self._own
        return s.src_address in own or s.dst_address in own or s.src_address.startswith("127.") or s.dst_address.startswith("127.")

    # -- reading ------------------------------------------------------------

    def read(self) -> Tables:
        return {self.sessions: self._read_sessions(), self.blocked: self._read_blocked()}

    def read_lists(self, lists: list[StateList]) -> Tables:
        out: Tables = {}
        if self.sessions in lists:
            out[self.sessions] = self._read_sessions()
        if self.blocked in lists:
            out[self.blocked] = self._read_blocked()
        return out

    def lookup(self, lst: StateList, keys: list[Key]) -> dict[Key, Entry]:
        if lst is self.blocked:
            have = self._read_blocked()  # the set is small (its size is bounded): one read
            return {k: have[k] for k in keys if k in have}
        found = self.lookup_sessions(cast(list[SessionKey], [tuple(k) for k in keys]))
        return {k: self._entry(s) for k, s in found.items() if self._is_flow_of(s)}

    def _is_flow_of(self, s: NatSession) -> bool:
        """Whether a kernel entry found by key is a session of this module: untranslated, not the host's own."""
        return nl.untranslated(s) and not self._host_own(s)

    def _read_sessions(self) -> dict[Key, Entry]:
        entry = self._entry
        with gc_paused():
            return {s.key: entry(s) for s in self._flows()}

    def _flows(self) -> list[NatSession]:
        """The sessions of one dump (:meth:`.ctread.EntryReader.flows`): untranslated, not the host's own."""
        untranslated, own = nl.untranslated, self._host_own
        with gc_paused():  # a 100k dump makes some hundred thousand records and nothing cyclic (see conntrackbase._pieces)
            return [s for s in self._reader.flows() if untranslated(s) and not own(s)]

    def _read_blocked(self) -> dict[Key, Entry]:
        try:
            got = nftables.run_json(self.netns, f"list set ip {TABLE} {BLOCKED_SET}")
        except nftables.NftablesError as e:
            raise ProviderError(f"cannot read the set {BLOCKED_SET} of {self.netns}: {e}") from e
        out: dict[Key, Entry] = {}
        for item in got.get("nftables", []):
            for elem in item.get("set", {}).get("elem", []):
                if isinstance(elem, dict):
                    inner = elem.get("elem", {})
                    addr, expires = inner.get("val"), inner.get("expires")
                    timeout = max(1, int(expires)) if expires is not None else None
                else:
                    addr, timeout = elem, None
                if isinstance(addr, str):
                    out[(addr,)] = (addr, timeout)
        return out

    def lookup_sessions(self, keys: Iterable[SessionKey]) -> dict[SessionKey, NatSession]:
        """The sessions with these keys now (a GET each; missing keys, and entries that are no session, absent)."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) * KEYS_PER_DUMP_ENTRY >= max(1, self._reader.count()):
            # As many keys as a quarter of the table: one dump costs less than a GET each (10k: ~0.25 s vs ~1 s).
            have = {s.key: s for s in self._reader.flows()}
            return {k: have[k] for k in wanted if k in have}
        found: dict[SessionKey, NatSession] = {}
        for i, attrs in self._reader.read(wanted):
            s = ctread.entry_flow(attrs)
            # The kernel finds a tuple in either direction: only an entry whose original tuple is the key is its own.
            if s is not None and s.key == wanted[i]:
                found[s.key] = s
        return found

    # -- writing ------------------------------------------------------------

    def apply(self, changes: dict[StateList, Change]) -> None:
        with self._lock, gc_paused():
            self._apply(changes.get(self.sessions, Change()), changes.get(self.blocked, Change()))

    def _apply(self, sess: Change, blk: Change) -> None:
        problems: dict[tuple[StateList, Key], str] = {}
        upserts = [self._session(e) for e in sess.upserts]
        # An entry's key is its first five leaves, in NatSession.key's order: sliced once, not rebuilt per use.
        ukeys: list[SessionKey] = [e[:5] for e in sess.upserts]
        keys = set(ukeys)
        invalid = invalid_entries(upserts)
        own = self._host_own
        for s, k in zip(upserts, ukeys):
            why = invalid.get(k)
            if why is None and own(s):
                why = "it names an address of the node itself: the host's own connections are not sessions"
            if why is None and s.protocol != "ICMP" and (s.protocol, s.dst_address, s.dst_port, s.src_address, s.src_port) in keys:
                why = "its reply tuple is the key of another session of the change"
            if why is not None:
                problems[(self.sessions, k)] = why
        if problems:
            raise StateRefused(problems)
        existing = self.lookup_sessions([*ukeys, *(tuple(k) for k in sess.deletes)])
        for k in ukeys if existing else ():
            old = existing.get(k)
            if old is not None and not nl.untranslated(old):
                problems[(self.sessions, k)] = f"a translated entry holds the key (-> {old.translated_address}:{old.translated_port})"
        for k in sess.deletes:
            old = existing.get(cast(SessionKey, tuple(k)))
            if old is not None and self._host_own(old):
                problems[(self.sessions, k)] = "it names an address of the node itself: the host's own connections are not sessions"
            elif old is not None and not nl.untranslated(old):
                problems[(self.sessions, k)] = "a translated entry holds the key: not a session of this firewall"
        if problems:
            raise StateRefused(problems)
        blocked_before = self._read_blocked() if blk else {}
        self._write_blocked(blk, blocked_before)
        try:
            created, deleted = self._write_sessions(upserts, ukeys, [tuple(k) for k in sess.deletes], existing)
        except StateRefused:
            self._restore_blocked(blk, blocked_before)
            raise
        # Own changes are reported here (the kernel's events of them are filtered out): entries gained or lost.
        events: list[tuple[StateList, str, Entry]] = [(self.sessions, "deleted", self._entry(existing[k])) for k in deleted]
        events += [(self.sessions, "created", e) for e, k in zip(sess.upserts, ukeys) if k in created]
        self._report(events, blk, blocked_before)

    def _report(self, events: list[tuple[StateList, str, Entry]], blk: Change, blocked_before: dict[Key, Entry]) -> None:
        """Emit a write's own changes: ``events`` of the sessions, then the blocked sources gained or lost by ``blk``."""
        after = dict(blocked_before)
        for k in blk.deletes:
            if (gone := after.pop(tuple(k), None)) is not None:
                events.append((self.blocked, "deleted", gone))
        for e in blk.upserts:
            if tuple(e[:1]) not in after:
                events.append((self.blocked, "created", e))
            after[tuple(e[:1])] = e
        if self._known_blocked is not None and blk:
            self._known_blocked = self._read_blocked()
        for ev in events:
            self._emit(*ev)

    def _write_blocked(self, blk: Change, before: dict[Key, Entry]) -> None:
        """One nft transaction: each upsert (re)added with its timeout, each delete removed; refused whole or done whole."""
        if not blk:
            return
        lines = []
        for k in blk.deletes:
            if tuple(k) in before:
                lines.append(self._element_delete(k[0]))
        for e in blk.upserts:
            # add (a no-op when present), delete, add with the timeout: in one
            # transaction, whatever the element's state (it may expire meanwhile).
            lines.append(f"add element ip {TABLE} {BLOCKED_SET} {{ {e[0]} }}")
            lines.append(self._element_delete(e[0]))
            lines.append(self._element_add(e[0], e[1]))
        try:
            self.node.nft("\n".join(lines) + "\n")
        except Exception as err:
            raise StateRefused({(self.blocked, tuple(e[:1])): f"nft refused the set's transaction: {err}" for e in blk.upserts}
                               | {(self.blocked, tuple(k)): f"nft refused the set's transaction: {err}" for k in blk.deletes}) from None

    def _restore_blocked(self, blk: Change, before: dict[Key, Entry]) -> None:
        """Put every element the change touched back as it was read before it (best effort: the change is being refused)."""
        lines = []
        for k in [*(tuple(e[:1]) for e in blk.upserts), *(tuple(k) for k in blk.deletes)]:
            lines += [f"add element ip {TABLE} {BLOCKED_SET} {{ {k[0]} }}", self._element_delete(k[0])]
            if k in before:
                lines.append(self._element_add(k[0], before[k][1]))
        try:
            self.node.nft("\n".join(lines) + "\n")
        except Exception as err:  # noqa: BLE001 - logged; the refusal is what the caller hears
            log.error("firewall %s: could not put the blocked set back: %s", self.netns, err)

    @staticmethod
    def _element_add(addr: str, timeout: int | None) -> str:
        return f"add element ip {TABLE} {BLOCKED_SET} {{ {addr}{f' timeout {timeout}s' if timeout else ''} }}"

    @staticmethod
    def _element_delete(addr: str) -> str:
        return f"delete element ip {TABLE} {BLOCKED_SET} {{ {addr} }}"

    def _write_sessions(self, upserts: list[NatSession], ukeys: list[SessionKey], deletes: list[SessionKey],
                        existing: dict[SessionKey, NatSession]) -> tuple[set[SessionKey], list[SessionKey]]:
        """Deletes, in-place updates, creates; all or none (the kernel's refusals undone, then raised). (keys created, keys deleted)."""
        timeouts = self._timeouts(upserts)
        if existing:
            creates = [(s, t) for s, t, k in zip(upserts, timeouts, ukeys) if k not in existing]
            updates = [(s, t) for s, t, k in zip(upserts, timeouts, ukeys) if k in existing]
        else:  # an idle target: every upsert is a create
            creates, updates = list(zip(upserts, timeouts)), []
        gone = [k for k in deletes if k in existing]
        sock = self._writer()
        done_deletes: list[SessionKey] = []
        done_updates: list[NatSession] = []
        done_creates: list[NatSession] = []
        try:
            failed = delete_tuples(self.netns, gone, sock)
            done_deletes = [k for i, k in enumerate(gone) if i not in failed]
            bad = {i: e for i, e in failed.items() if e != errno.ENOENT}
            if bad:
                raise StateRefused({(self.sessions, gone[i]): f"kernel refused to delete it: {nl.describe(e)}" for i, e in bad.items()})
            failed = nl.run_ops(self.netns, [nl.update_op(s, t) for s, t in updates], sock)
            done_updates = [s for i, (s, _) in enumerate(updates) if i not in failed]
            if failed:
                raise StateRefused({(self.sessions, updates[i][0].key): f"kernel refused to update it: {nl.describe(e)}" for i, e in failed.items()})
            sent: list[tuple[int, int]] = []
            failed = create_sessions(self.netns, creates, sock, sent)
            done_creates = [creates[i][0] for a, b in sent for i in range(a, b) if i not in failed]
            if errno.ENOBUFS in failed.values():
                done_creates = [s for s, _ in creates]  # which ones exist is unknown: the undo deletes all of them
            if failed:
                why = {errno.EEXIST: "the kernel holds an entry with its key or its reply tuple"}
                raise StateRefused({(self.sessions, creates[i][0].key): f"kernel refused to create it: {nl.describe(e)}"
                                    + (f" ({why[e]})" if e in why else "") for i, e in failed.items()})
        except (StateRefused, nl.NetlinkError) as e:
            self._undo_sessions(done_creates, done_updates, done_deletes, existing)
            if isinstance(e, StateRefused):
                raise
            raise StateRefused({(self.sessions, s.key): f"netlink failed part way: {e}" for s in upserts}) from e
        return {k for k in ukeys if k not in existing}, done_deletes

    def _undo_sessions(self, created: list[NatSession], updated: list[NatSession], deleted: list[SessionKey],
                       existing: dict[SessionKey, NatSession]) -> None:
        sock = self._writer()
        delete_tuples(self.netns, [s.key for s in created], sock)
        olds = [existing[s.key] for s in updated]
        nl.run_ops(self.netns, [nl.update_op(o, o.timeout or 1) for o in olds], sock)
        back = [existing[k] for k in deleted]
        create_sessions(self.netns, [(o, o.timeout or 1) for o in back], sock)

    def _timeouts(self, batch: list[NatSession]) -> list[int]:
        if all(s.timeout is not None for s in batch):
            return [s.timeout for s in batch]  # type: ignore[misc]
        if self._defaults is None:
            names = sorted(set(DEFAULT_TIMEOUT_SYSCTL.values()))
            out = nsmod.run(["sysctl", "-n", *(f"net.netfilter.{n}" for n in names)], self.netns).stdout.split()
            by_name = dict(zip(names, (int(v) for v in out)))
            self._defaults = {k: by_name[n] for k, n in DEFAULT_TIMEOUT_SYSCTL.items()}
        return [s.timeout if s.timeout is not None else self._defaults[timeout_key(s)] for s in batch]

    def _writer(self) -> socket.socket:
        """The one socket this provider writes with: the event socket drops its events in the kernel."""
        with self._lock:
            if self._wsock is None:
                self._wsock = nl.open_socket(self.netns)
            return self._wsock

    # -- admission ----------------------------------------------------------

    def admission(self) -> bool:
        return self.node.admission()

    def set_admission(self, admit: bool) -> None:
        self.node.set_admission(admit)

    def held(self) -> int | None:
        return sum(s.held for s in self.node.hold_stats())

    # -- events -------------------------------------------------------------

    @property
    def on_change(self) -> OnChange:
        return self._on_change

    @on_change.setter
    def on_change(self, fn: OnChange) -> None:
        """Set by the agent: events start being followed from then on."""
        self._on_change = fn
        self.follow()

    def follow(self) -> None:
        """Subscribe to the table's events and start polling the set (idempotent)."""
        with self._lock:
            if self._thread is not None:
                return
            self._events = EventSocket(self.netns, own=self._writer().getsockname()[0])
            self._known_blocked = self._read_blocked()
            self._stop.clear()
            self._thread = threading.Thread(target=self._follow, name=f"fw-events-{self.netns}", daemon=True)
            self._thread.start()

    def _session_events(self, event: str, s: NatSession) -> list[tuple[StateList, str, Entry]]:
        """What one kernel entry created or destroyed is to the module's lists: one session."""
        return [(self.sessions, event, self._entry(s))]

    def _emit(self, lst: StateList, event: str, entry: Entry) -> None:
        try:
            self._on_change(lst, event, entry)
        except Exception:  # a subscriber's failure must not stop the provider
            log.exception("firewall %s: state-change not delivered", self.netns)

    def _follow(self) -> None:
        ev = self._events
        assert ev is not None
        next_poll = time.monotonic() + POLL_INTERVAL
        while not self._stop.is_set():
            try:
                ready = select.select([ev.sock], [], [], max(0.0, next_poll - time.monotonic()))[0]
                if ready:
                    got: list[tuple[int, dict[int, bytes]]] = []
                    ev.read_entries(got)
                    for kind, attrs in got:
                        s = self._is_session(attrs)
                        if s is not None:
                            for change in self._session_events("created" if kind == NEW else "deleted", s):
                                self._emit(*change)
                if time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + POLL_INTERVAL
                    self._poll_blocked()
            except EventsLost as e:
                log.warning("firewall %s: %s; sessions created or ended meanwhile were not reported", self.netns, e)
            except OSError as e:
                if self._stop.is_set():
                    return
                log.error("firewall %s: events: %s", self.netns, e)
                time.sleep(POLL_INTERVAL)
            except Exception as e:  # noqa: BLE001 - keep following; a failed poll is tried again
                log.warning("firewall %s: events: %s", self.netns, e)
                time.sleep(POLL_INTERVAL)

    def _poll_blocked(self) -> None:
        with self._lock:
            now = self._read_blocked()
            old, self._known_blocked = self._known_blocked or {}, now
        for k, e in old.items():
            if k not in now:
                self._emit(self.blocked, "deleted", e)
        for k, e in now.items():
            if k not in old:
                self._emit(self.blocked, "created", e)

    def close(self) -> None:
        """Stop following events and release the sockets (and whatever the node holds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(POLL_INTERVAL + 2)
            self._thread = None
        if self._events is not None:
            self._events.close()
            self._events = None
        self._reader.close()
        with self._lock:
            if self._wsock is not None:
                self._wsock.close()
                self._wsock = None
        self.node.close()
