"""A state agent as the migration engine sees it: what it serves, its lists, admission and digests.

Everything here comes from the agent itself: the modules it implements from
its ietf-yang-library (RFC 8525), their text from get-schema (RFC 6022),
compiled on the spot (:mod:`natmig.statemodel`); entries with get-config and
edit-config; hold/admit and digests from natmig-state.  No module is known
in advance, and no network function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..errors import CodecError, ControllerError, SchemaError
from ..statemodel import COMMON_MODULE, COMMON_NS, Entry, Key, StateList, StateModule, compile_fetched
from ..wire.state import CHANGE, CONTROL, STATISTICS, Wire, read_admission, read_held, read_statistics
from .ncsession import RawText
from .netconf import NOTIFICATION_CAPABILITY, NodeClient

YANG_LIBRARY_NS = "urn:ietf:params:xml:ns:yang:ietf-yang-library"
_YL = f"{{{YANG_LIBRARY_NS}}}"
#: Modules of the protocol itself: served by every agent, never state.
_PROTOCOL_PREFIXES = ("ietf-", "iana-")


@dataclass(frozen=True)
class Announced:
    """A module of the agent's yang-library."""

    name: str
    revision: str
    implemented: bool

    def __str__(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


class StateNode:
    """A connected state agent (implements :class:`~.txn.Writer`, so the locks and confirmed commits of :mod:`.txn` apply)."""

    def __init__(self, client: NodeClient) -> None:
        self.client = client
        self.name = client.name
        self.announced: list[Announced] = []
        self.modules: list[StateModule] = []
        #: the yang-library content-id the modules were compiled for (RFC 8525: it changes whenever the library does).
        self.content_id: str | None = None

    # --------------------------------------------------------- txn.Writer

    @property
    def capabilities(self) -> list[str]:
        return self.client.capabilities

    @property
    def connected(self) -> bool:
        return self.client.connected

    def lock(self, target: str = "running") -> None:
        self.client.lock(target)

    def unlock(self, target: str = "running") -> None:
        self.client.unlock(target)

    def commit(self, confirmed: bool = False, timeout: float | None = None, persist: str | None = None, persist_id: str | None = None) -> None:
        self.client.commit(confirmed=confirmed, timeout=timeout, persist=persist, persist_id=persist_id)

    def cancel_commit(self, persist_id: str | None = None) -> None:
        self.client.cancel_commit(persist_id=persist_id)

    def set_admission(self, admit: bool, target: str = "running") -> None:
        """natmig-state's state-control/admit-new."""
        self.client.edit_config(Wire.control_xml(admit, report_all=True), target)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "StateNode":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- discovery

    def discover(self) -> list[StateModule]:
        """Read the yang-library, fetch and compile every state module; refuse an agent without natmig-state."""
        data = self.client.get_filtered(f'<yang-library xmlns="{YANG_LIBRARY_NS}"/>')
        content_id = data.findtext(f".//{_YL}content-id")
        if self.modules and content_id is not None and content_id == self.content_id:
            # A session kept by a controller service: the library is the one already compiled, so the
            # preflight costs one small get instead of get-schema and a compile of every module.
            return self.modules
        self.announced = [
            Announced(m.findtext(_YL + "name") or "", m.findtext(_YL + "revision") or "", m.tag == _YL + "module")
            for m in data.iter(_YL + "module", _YL + "import-only-module")
        ]
        if not self.announced:
            raise ControllerError(f"{self.name}: the agent publishes no ietf-yang-library (RFC 8525): it cannot say which state it serves")
        implemented = [a for a in self.announced if a.implemented]
        if not any(a.name == COMMON_MODULE for a in implemented):
            raise ControllerError(f"{self.name}: the agent does not implement {COMMON_MODULE} (hold/admit, digests), so its state cannot be moved; "
                                  f"it implements {', '.join(map(str, implemented))}")
        wanted = [a for a in implemented if a.name != COMMON_MODULE and not a.name.startswith(_PROTOCOL_PREFIXES)]
        texts = {a.name: self.client.get_schema(a.name, a.revision or None)
                 for a in self.announced if not a.implemented or a in wanted}
        modules = []
        for a in wanted:
            try:
                m = compile_fetched(texts, a.name, f"{self.name}:{a.name}")
            except SchemaError as e:
                raise ControllerError(f"{self.name}: module {a} as served by get-schema does not compile: {e}") from e
            if m.lists:
                modules.append(m)
        if not modules:
            raise ControllerError(f"{self.name}: none of the modules the agent implements ({', '.join(map(str, wanted)) or 'none'}) has a state list")
        self.modules, self.content_id = modules, content_id
        return modules

    def adopt(self, other: "StateNode") -> None:
        """Take what ``other`` discovered (another session to the same agent: no second get-schema and compile)."""
        self.announced, self.modules, self.content_id = other.announced, other.modules, other.content_id

    @property
    def lists(self) -> list[StateList]:
        """Every state list of every state module, in module then schema order."""
        return [l for m in self.modules for l in m.lists]

    # ------------------------------------------------------------- reads

    def read(self, lst: StateList, source: str = "running") -> list[Entry]:
        """The entries of one list."""
        data = self.client.get_config_filtered(source, f'<{lst.name} xmlns="{lst.namespace}"/>')
        try:
            return Wire([lst]).entries(data, lst)
        except CodecError as e:
            raise ControllerError(f"{self.name}: its {lst.qname} does not decode: {e}") from e

    def read_text(self, lst: StateList, on_chunk: Callable[[bytes], None] | None = None, keep: bool = True) -> RawText:
        """One list of running as the text the agent sent, its chunks handed to ``on_chunk`` as they arrive (see
        :meth:`~.ncsession.NetconfSession.get_config_text`)."""
        return self.client.get_config_text("running", f'<{lst.name} xmlns="{lst.namespace}"/>', on_chunk, keep)

    def admission(self, source: str = "running") -> bool:
        """state-control/admit-new of ``source``."""
        return read_admission(self.client.get_config_filtered(source, f'<{CONTROL} xmlns="{COMMON_NS}"/>'))

    def held(self) -> int | None:
        """state-control/held: packets of new entries the agent holds now; None when it reports none (an agent
        that carries no traffic, or one of natmig-state's first revision)."""
        try:
            return read_held(self.client.get_filtered(f'<{CONTROL} xmlns="{COMMON_NS}"/>'))
        except CodecError as e:
            raise ControllerError(f"{self.name}: its state-control does not decode: {e}") from e

    def statistics(self) -> dict[str, tuple[int, str]]:
        """state-statistics: module:list -> (entries, digest), as the agent reports them."""
        try:
            return read_statistics(self.client.get_filtered(f'<{STATISTICS} xmlns="{COMMON_NS}"/>'))
        except CodecError as e:
            raise ControllerError(f"{self.name}: its state-statistics do not decode: {e}") from e

    # ------------------------------------------------------------ changes

    @property
    def notifies(self) -> bool:
        """Whether the agent announces notifications (RFC 5277), so that state-change can be followed."""
        return any(c.startswith(NOTIFICATION_CAPABILITY) for c in self.capabilities)

    def subscribe(self) -> None:
        """Follow state-change notifications on this session from now on (a filter selects only those).

        A session kept open (a controller service's) stays subscribed after a
        migration, and what arrived since is dropped here: every such change
        happened before this call, so the read that follows it contains it.
        """
        self.client.create_subscription((COMMON_NS, CHANGE))
        self.client.drop_notifications()

    def forget_changes(self) -> int:
        """Drop the state-change notifications queued on an idle session (a kept session must not grow); how many."""
        return self.client.drop_notifications()

    def changes(self, timeout: float = 0) -> list[tuple[StateList, str, Entry]]:
        """state-change notifications received so far, oldest first (waiting up to ``timeout`` for the first):
        (list, "created" | "deleted", entry; for deleted, the key leaves are what counts)."""
        out: list[tuple[StateList, str, Entry]] = []
        wire = Wire(self.lists)
        n = self.client.take_notification(timeout)
        while n is not None:
            ev = n.find(f"{{{COMMON_NS}}}{CHANGE}")
            if ev is not None:
                lst = wire.list_by_qname((ev.findtext(f"{{{COMMON_NS}}}table") or "").strip())
                kind = (ev.findtext(f"{{{COMMON_NS}}}event") or "").strip()
                body = ev.find(f"{{{COMMON_NS}}}entry")
                if lst is not None and kind in ("created", "deleted") and body is not None:
                    try:
                        edits = Wire([lst]).decode(body, with_operations=False).edits
                    except CodecError as e:
                        raise ControllerError(f"{self.name}: a state-change of {lst.qname} does not decode: {e}") from e
                    for ed in edits:
                        entry = Wire.complete(lst, ed.values) if kind == "created" else ed.key + (None,) * (len(lst.leaves) - len(ed.key))
                        out.append((lst, kind, entry))  # type: ignore[arg-type]
            n = self.client.take_notification(0)
        return out

    # ------------------------------------------------------------ writes

    def write(self, lst: StateList, entries: Iterable[Entry], target: str = "candidate") -> None:
        """Create or replace entries (merge of whole entries: every leaf is sent)."""
        body = Wire.entries_xml(lst, entries, report_all=True)
        if body:
            self.client.edit_config(body, target)

    def write_text(self, body: str, target: str = "candidate") -> None:
        """An edit-config of list entries given as XML text, each declaring its namespace (:mod:`natmig.wire.slices`);
        the agent validates every one, nothing is decoded here."""
        self.client.edit_config(body, target)

    def remove(self, lst: StateList, keys: Iterable[Key], target: str = "candidate") -> None:
        """Remove entries by key (absent ones are fine)."""
        body = "".join(Wire.key_xml(lst, k, "remove") for k in keys)
        if body:
            self.client.edit_config(body, target)


def same_modules(a: StateNode, b: StateNode) -> list[str]:
    """How the state modules of two nodes differ (empty: the same names and revisions)."""
    ma = {m.name: m.revision for m in a.modules}
    mb = {m.name: m.revision for m in b.modules}
    out = []
    for name in sorted(ma.keys() | mb.keys()):
        if ma.get(name) != mb.get(name):
            out.append(f"{name}: {a.name} has {ma.get(name) or 'none'}, {b.name} has {mb.get(name) or 'none'}")
    return out

