"""The controller's agents: who called home, what each serves, whether it is alive.

Agents dial the controller (RFC 8071 call home, :mod:`.callhome`); each
session is kept open and entered here under the agent's name (known by
its host key).  On arrival the registry reads what the agent serves (its
yang-library, state modules, lists' sizes and digests, admission) and then
keeps reading it every ``keepalive`` seconds: a read that fails, or a
session that closed, marks the agent down.  A migration takes the
registered sessions (:meth:`Registry.take`), so it connects to nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from ..errors import ControllerError
from .netconf import NodeClient
from .statenode import StateNode

log = logging.getLogger(__name__)

#: (agent name, "up" | "down", its entry)
OnEvent = Callable[[str, str, "AgentEntry"], None]


@dataclass
class AgentEntry:
    """One agent as last read: everything here was read from it."""

    name: str
    peer: str = ""
    up: bool = False
    since: float = 0.0
    last_seen: float = 0.0
    modules: list[str] = field(default_factory=list)
    tables: dict[str, tuple[int, str]] = field(default_factory=dict)
    admission: bool | None = None
    error: str = ""
    busy: bool = False
    node: StateNode | None = field(default=None, repr=False)


class Registry:
    """Agents by name, kept alive; thread-safe."""

    def __init__(self, keepalive: float = 5.0, on_event: OnEvent | None = None) -> None:
        self.keepalive = keepalive
        self.on_event: OnEvent = on_event or (lambda name, event, entry: None)
        self._agents: dict[str, AgentEntry] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="natmig-registry", daemon=True)
        self._thread.start()

    def attach(self, client: NodeClient, peer: str = "") -> AgentEntry:
        """An agent called home: read what it serves and enter it (a session it had before is closed)."""
        node = StateNode(client)
        try:
            node.discover()
            tables, admission = node.statistics(), node.admission()
        except Exception as e:  # noqa: BLE001 - an agent that cannot be read is refused, not the controller
            node.close()
            raise ControllerError(f"agent {client.name} called home but cannot be read: {e}") from e
        now = time.time()
        with self._mutex:
            old = self._agents.get(node.name)
            entry = AgentEntry(node.name, peer, True, now, now, [f"{m.name}@{m.revision}" for m in node.modules], tables, admission, node=node)
            self._agents[node.name] = entry
        if old is not None and old.node is not None and old.node is not node:
            old.node.close()
        log.info("agent %s is up (from %s): %s", node.name, peer or "?", ", ".join(entry.modules))
        self.on_event(node.name, "up", entry)
        return entry

    def entries(self) -> list[AgentEntry]:
        """Every agent ever registered, as last read (copies)."""
        with self._mutex:
            return [replace(e) for e in sorted(self._agents.values(), key=lambda e: e.name)]

    def take(self, name: str) -> StateNode:
        """The session of an agent that is up, for a migration (refused when down, unknown or already taken)."""
        with self._mutex:
            e = self._agents.get(name)
            if e is None:
                raise ControllerError(f"agent {name} has never called home (agents: {', '.join(sorted(self._agents)) or 'none'})")
            if not e.up or e.node is None or not e.node.connected:
                raise ControllerError(f"agent {name} is down (last seen {time.strftime('%H:%M:%S', time.gmtime(e.last_seen))} UTC{': ' + e.error if e.error else ''})")
            if e.busy:
                raise ControllerError(f"agent {name} is in a migration already")
            e.busy = True
            return e.node

    def give_back(self, name: str) -> None:
        """A migration is done with the agent's session; it is read again at once."""
        with self._mutex:
            e = self._agents.get(name)
            if e is not None:
                e.busy = False
        if e is not None:
            self._check(e)

    def close(self) -> None:
        """Stop watching and close every session."""
        self._stop.set()
        self._thread.join(self.keepalive + 5)
        with self._mutex:
            nodes = [e.node for e in self._agents.values() if e.node is not None]
        for n in nodes:
            n.close()

    def _watch(self) -> None:
        while not self._stop.wait(self.keepalive):
            with self._mutex:
                live = [e for e in self._agents.values() if e.up and not e.busy]
            for e in live:
                self._check(e)

    def _check(self, e: AgentEntry) -> None:
        node = e.node
        if node is None:
            return
        try:
            if not node.connected:
                raise ControllerError("its session closed")
            tables, admission = node.statistics(), node.admission()
            with self._mutex:
                # A session a migration subscribed stays so (RFC 5277 has no unsubscribe): between
                # migrations nobody reads its events, and a busy function's would pile up here.
                # Under the mutex, so never once a migration has taken the session (take()).
                if not e.busy:
                    node.forget_changes()
        except Exception as ex:  # noqa: BLE001 - any failure to read means down
            with self._mutex:
                was_up, e.up, e.error = e.up, False, str(ex).splitlines()[0] if str(ex) else type(ex).__name__
            if was_up:
                log.warning("agent %s is down: %s", e.name, e.error)
                node.close()
                self.on_event(e.name, "down", replace(e))
            return
        with self._mutex:
            e.tables, e.admission, e.last_seen, e.error = tables, admission, time.time(), ""
