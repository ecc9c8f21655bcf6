"""What the NAT migration's phases share: its endpoints and options, the state of one run, and the phase base.

:class:`Context` is one migration's state: the sessions to both nodes, the
snapshot, the plan, the events, what has changed so far (a
:class:`~.migrollback.State`, what a rollback undoes).  Each phase
(:mod:`.migpreflight`, :mod:`.migcopy`, :mod:`.migcatchup`,
:mod:`.migverify`, :mod:`.migfinish`) is a :class:`MigrationPhase` that
reads and writes it; :class:`~.migrate.Migration` runs them in order.
"""

from __future__ import annotations

import abc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from ..errors import ControllerError
from ..model import NatSession, SessionKey
from .migrollback import State
from .nodeproto import Node
from .phase import Phase
from .plan import CatchUp, CopyPlan
from .report import MigrationReport
from .steering import Steering
from .txn import Locks, cancel_pending, check_confirm_timeout

WRITABLE_RUNNING = "urn:ietf:params:netconf:capability:writable-running:1.0"
RETIRE_MODES = ("delete", "keep", "stop")
VERIFY_SOURCE = ("digest", "read")


@dataclass
class Endpoint:
    """A named NAT node and how to open a NETCONF session to it.

    ``open`` returns a new :class:`Node` session each call (the migration opens
    two to the source: one for RPCs, one for notifications).  ``public``: the
    addresses the node owns, when known (checked against the source's
    translated addresses).  ``stop``: how to stop the node (retire=stop).
    """

    name: str
    open: Callable[[], Node]
    public: set[str] | None = None
    stop: Callable[[], None] | None = None


@dataclass
class MigrateOptions:
    """Knobs of a migration.

    ``copy_state`` False skips copy, catch-up and verify: the negative
    control, in which live flows must break.  ``settle``: how long the
    source's event stream must stay quiet after the freeze (seconds);
    ``settle_max`` bounds that wait.  ``retire``: one of :data:`RETIRE_MODES`.
    """

    copy_state: bool = True
    retire: str = "delete"
    settle: float = 0.01
    settle_max: float = 1.0
    freeze_source: bool = True
    copy_chunk: int = 25_000
    #: how verify knows the frozen source's table: "digest" (its nat-statistics
    #: digest against the snapshot folded with the events; a re-read when they
    #: differ) or "read" (always re-read it whole: slower, needs no notification).
    verify_source: str = "digest"
    #: seconds after which an agent rolls back by itself what an interrupted
    #: migration left pending (the target's unconfirmed copy, the source's
    #: freeze, the target's hold): the bound on how long a dead controller
    #: can keep a node refusing new sessions.
    confirm_timeout: float = 10.0
    #: the command a report names to repair what an interrupted migration left
    recover_hint: str = "natmig recover --inventory INVENTORY"

    def __post_init__(self) -> None:
        if self.retire not in RETIRE_MODES:
            raise ControllerError(f"retire: {self.retire!r} is not one of {', '.join(RETIRE_MODES)}")
        if not 0 <= self.settle <= self.settle_max:
            raise ControllerError(f"settle: need 0 <= settle ({self.settle}) <= settle_max ({self.settle_max})")
        if self.copy_chunk < 1:
            raise ControllerError(f"copy_chunk: {self.copy_chunk} must be at least 1")
        if self.verify_source not in VERIFY_SOURCE:
            raise ControllerError(f"verify_source: {self.verify_source!r} is not one of {', '.join(VERIFY_SOURCE)}")
        check_confirm_timeout(self.confirm_timeout)


@dataclass
class Context:
    """One migration of ``source`` to ``target`` through ``steering``: what its phases share."""

    source: Endpoint
    target: Endpoint
    steering: Steering
    opt: MigrateOptions
    report: MigrationReport
    #: the persist token of this migration's confirmed commits (see .txn)
    token: str
    src: Node | None = None
    events_node: Node | None = None
    tgt: Node | None = None
    sub: Any = None
    st: State = field(default_factory=State)
    snapshot: list[NatSession] = field(default_factory=list)
    #: when the source's snapshot had been read (perf_counter): its timeouts were read before
    snapshot_at: float | None = None
    #: the snapshot as the source's text, when the copy forwarded it undecoded (snapshot then stays empty until needed)
    snapshot_text: Any = None
    #: the copy forwarded the snapshot without keeping it: verify re-reads the source when it needs its table
    snapshot_lost: bool = False
    target_before: list[NatSession] = field(default_factory=list)
    plan: CopyPlan | None = None
    catch: CatchUp = field(default_factory=CatchUp)
    #: every event received, in order (the source's final table is the snapshot folded with them).
    events: list[tuple[str, NatSession]] = field(default_factory=list)
    source_admits: bool = True
    #: the source's admission reopening, started during admit (see migfinish.Admit)
    reopen: Any = None
    #: the source's and the target's nat-statistics requests (Futures): the source's
    #: both started after the catch-up, before the switch (see migcatchup.start_digests)
    source_digest: Any = None
    target_digest: Any = None
    digest_pool: ThreadPoolExecutor | None = None
    locks: list[Locks] = field(default_factory=list)
    #: what recovery or success did on each node, in words (the report adds what is read back)
    actions: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.actions = self.actions or {self.source.name: [], self.target.name: []}

    @staticmethod
    def write(node: Node, ups: Sequence[NatSession], dels: Sequence[SessionKey]) -> None:
        """Write and delete on the running datastore (candidate + commit when running is not writable)."""
        if not ups and not dels:
            return
        direct = WRITABLE_RUNNING in node.capabilities
        where = "running" if direct else "candidate"
        # Deletions first, as the source made them: a connection closed and
        # its public port given to a new one (DESTROY then NEW) would else
        # have the new one refused for the port the old one still held.
        if dels:
            node.delete_sessions(dels, target=where)
        if ups:
            node.edit_sessions(ups, target=where, operation="merge")
        if not direct:
            node.commit()

    @staticmethod
    def delete(node: Node, keys: Sequence[SessionKey] | None) -> None:
        """Delete ``keys`` (None: every session) from the running datastore."""
        direct = WRITABLE_RUNNING in node.capabilities
        node.delete_sessions(keys, target="running" if direct else "candidate")
        if not direct:
            node.commit()

    def thaw(self, src: Node) -> None:
        """Undo the source's freeze: cancel its confirmed commit (its admission returns to what it was before)."""
        cancel_pending(src, self.token)  # False: it had already rolled back by itself
        self.st.source_frozen = False
        self.st.source_admission = None

    def check_alive(self) -> None:
        """Abort before the switch when a session to a node (or the source's event stream) is gone."""
        lost = [f"{what} {ep.name}" for what, ep, node in (
            ("source", self.source, self.src), ("the event stream of source", self.source, self.events_node), ("target", self.target, self.tgt))
            if node is not None and not node.connected]
        if lost:
            raise ControllerError(f"NETCONF session lost before the switch: {', '.join(lost)}; traffic not moved")


class MigrationPhase(Phase):
    """One phase of the NAT migration (see :mod:`.migrate`): timed under its ``name``, its steps under ``ph``."""

    @abc.abstractmethod
    def run(self, ctx: Context, ph: Any) -> None:
        """Do the phase; a failure raises, and the driver rolls back (:func:`~.migrollback.recover`)."""
