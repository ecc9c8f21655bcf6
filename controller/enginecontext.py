"""What the generic engine's phases share: the options, the context, and the bases of a phase and a copy strategy.

The phases themselves are in :mod:`.engine` (and the catch-up in
:mod:`.enginecatchup`); nothing here knows a network function.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ..errors import ControllerError
from ..statemodel import Entry, Key, StateList
from ..wire.slices import ListText
from . import phase as base, txn
from .enginereport import EngineReport
from .statenode import StateNode

RETIRE_MODES = ("delete", "keep")


@dataclass(frozen=True)
class EngineOptions:
    """``retire``: delete the moved entries from the source, or keep them there (both with admission reopened)."""

    retire: str = "delete"
    confirm_timeout: float = 10.0
    recover_hint: str = ""

    def __post_init__(self) -> None:
        if self.retire not in RETIRE_MODES:
            raise ControllerError(f"retire: {self.retire!r} is not one of {', '.join(RETIRE_MODES)} for a state-only migration")
        txn.check_confirm_timeout(self.confirm_timeout)


@dataclass
class Context:
    """What the phases share."""

    source: StateNode
    target: StateNode
    options: EngineOptions
    token: str
    report: EngineReport
    lists: list[StateList] = field(default_factory=list)
    copied: dict[StateList, list[Entry]] = field(default_factory=dict)
    #: what the target must hold when the copy is committed: the copy, with the source's changes since its read.
    expected: dict[StateList, dict[Key, Entry]] = field(default_factory=dict)
    #: lists forwarded as text instead (:class:`~.enginecopy.ForwardedLists`): their count and removal, not their entries.
    forwarded: dict[StateList, ListText] = field(default_factory=dict)
    #: per forwarded list, the keys the source's events created since its read (what a retire removes beside the copy).
    created: dict[StateList, dict[Key, None]] = field(default_factory=dict)
    #: the session the source's state-change notifications are followed on (from before its lists were read), None when not.
    events: StateNode | None = None
    #: opens another session to the source for its events (None: they ride on the migration's own session).
    open_events: Callable[[], StateNode] | None = None
    locks: list[txn.Locks] = field(default_factory=list)
    #: the target's lists as it reported them in preflight (entries, digest), before anything was written.
    target_before: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: nodes with this migration's confirmed commit pending, and when it was last (re)armed (time.monotonic()).
    pending: dict[str, tuple[StateNode, float]] = field(default_factory=dict)
    #: the source's admission is closed by this migration (from the start of :class:`~.engine.Freeze`).
    frozen: bool = False
    #: changes from the source's events written into the target's candidate while the source still served.
    early: int = 0
    #: the target's admission is closed by this migration (:class:`HoldTarget`): finish reopens it with its confirm.
    target_held: bool = False
    #: the target's copy is confirmed (by :class:`HoldTarget`, before the switch): no rollback of the target removes it.
    target_confirmed: bool = False
    #: the copy is committed on the target (:class:`~.engine.Copy`): later changes go where :meth:`changes_to` says.
    copy_committed: bool = False
    #: keys this migration created straight in the target's running (in no confirmed commit): an undo removes them.
    direct: dict[StateList, dict[Key, None]] = field(default_factory=dict)
    #: the target's pending confirmed commit was cancelled, and a confirmed copy removed, by an undo already.
    target_cancelled: bool = False

    def confirmed(self, node: StateNode) -> None:
        """``node`` committed with this migration's token: its timeout runs from now."""
        node.commit(confirmed=True, timeout=self.options.confirm_timeout, persist=self.token)
        self.pending[node.name] = (node, time.monotonic())

    def follow_up(self, node: StateNode) -> None:
        """A follow-up confirmed commit of ``node``'s pending series (RFC 6241 8.4): what its candidate got since is
        running now, and a rollback still restores what was there before the series' first commit."""
        # persist-id alone: ncclient refuses persist beside it; the agent keeps the series' token.
        node.commit(confirmed=True, timeout=self.options.confirm_timeout, persist_id=self.token)
        self.pending[node.name] = (node, time.monotonic())

    def changes_to(self) -> str:
        """Where the source's changes go once the copy is committed: the target's running when it announces
        :writable-running, else its candidate (then committed as a follow-up of the copy's series).

        A candidate taken after a commit is a copy of the whole running table on
        the agent: at 100,000 NAT sessions a catch-up of a few changes into it, and
        its commit, took ~800 ms, all of it in the blackout of a move under new
        connections.  Written into running they cost what they change; they are in
        no confirmed commit, so an undo removes what they created (:meth:`cancel_target`)
        and a dead controller's are left for `natmig recover`, as the NAT engine's
        catch-up has always been.
        """
        return "running" if self.copy_committed and txn.WRITABLE_RUNNING in self.target.capabilities else "candidate"

    def cancel_target(self) -> bool:
        """The target's candidate discarded, its pending series cancelled (the copy and catch-up, or once the copy is
        confirmed the hold alone) and a confirmed copy removed, once; whether this call undid anything."""
        self.target.client.discard()
        if self.target_cancelled:
            return False
        cancelled = txn.cancel_pending(self.target, self.token)
        self.pending.pop(self.target.name, None)
        if self.direct and not self.target_confirmed:
            # Written straight into running after the copy's commit: no rollback of its series removes them.
            for lst, keys in self.direct.items():
                self.target.remove(lst, keys, target="running")
            cancelled = True
        if self.target_confirmed:
            # Confirmed before the switch, so that no rollback takes it from a target carrying traffic: removed here,
            # with traffic on the source again (the switch's undo ran first), as the source would retire it.
            self.remove_moved(self.target)
            self.target.commit()
            cancelled = True
        self.target_cancelled = cancelled
        return cancelled

    def remove_moved(self, node: StateNode) -> None:
        """Into ``node``'s candidate (the source when it retires, the target when a confirmed copy is undone): the
        removal of every entry this migration moved (absent ones are fine)."""
        for lst, table in self.expected.items():
            node.remove(lst, table)
        for lst, sent in self.forwarded.items():
            for body in sent.removals():
                node.write_text(body)
            node.remove(lst, self.created.get(lst, {}))

    def renew(self) -> None:
        """Re-arm the pending confirmed commits that have run a third of their timeout (RFC 6241 8.4: a follow-up
        confirmed commit with the persist-id).  The timeout bounds how long a node waits for a controller that died,
        not how long a migration may take: on a loaded machine a 100k-session copy can outlast it, and the source's
        freeze would roll back under a live migration."""
        now = time.monotonic()
        for name, (node, armed) in list(self.pending.items()):
            if now - armed >= self.options.confirm_timeout / 3:
                self.follow_up(node)


class Phase(base.Phase):
    """One step of a migration; ``needs``: capabilities both agents must announce for it (see :mod:`.phase`).

    ``changes``: whether it may change a node or the switch.  A migration that failed before any such phase began
    changed nothing, whatever the nodes read back then (another migration's, or an operator's, doing).
    """

    changes: ClassVar[bool] = True

    @abc.abstractmethod
    def run(self, ctx: Context) -> str:
        """Do the step; returns a line of detail for the report."""

    def undo(self, ctx: Context) -> str | None:
        """Take the step back after a later failure; what was undone, or None when nothing needs it."""
        return None

    def read_back(self, ctx: Context) -> None:
        """At the end, run or not: put what this phase governs, as read from where it lives, into the report."""


class CopyStrategy(base.CopyStrategy):
    """How the state lists get from the source into the target's candidate."""

    @abc.abstractmethod
    def copy(self, ctx: Context) -> dict[StateList, list[Entry]]:
        """Read the source (serving, or frozen), write the target's candidate; the entries copied per list."""


def close_events(ctx: Context) -> None:
    """Close the source's event session if it is one of its own."""
    if ctx.events is not None and ctx.events is not ctx.source:
        ctx.events.close()
    ctx.events = None
