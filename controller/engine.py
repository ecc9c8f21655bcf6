"""The migration engine: moves the state lists of any module between two state agents.

It knows no network function.  What to move comes from the agents
(:class:`~.statenode.StateNode`: yang-library, get-schema, the compiled
module); how to hold new entries, and how to check a copy, from the common
module natmig-state.  A migration is a sequence of :class:`Phase` objects,
each declaring the capabilities it needs from both agents (checked against
their hellos before anything changes, never probed), each with an undo;
the copy itself is a :class:`CopyStrategy`.

Crash safety is the NAT migration's (:mod:`.txn`): both nodes locked from
preflight to the end, and every change a dead controller must not leave
behind a persistent confirmed commit under the pair's token, rolled back
by the agents themselves when ``confirm_timeout`` passes.

The switch of traffic is :class:`OvsSwitch` (any :class:`~.steering.Steering`:
point it at the target, read it back) or :class:`NoSwitch` (state transfer
only; the report says that no traffic was moved).  With a live switch, new
entries are held on both sides, with natmig-state's admit-new only: on the
source from the freeze, on the target from just before the switch
(:class:`HoldTarget`) until finish.  An agent that holds what would create
an entry sends it back to the switch when admission opens, and the switch's
own flows hand it to the node that carries traffic at that instant (the
target after a switch, the source after one undone); nothing of that is
the engine's.
"""

from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ControllerError
from ..statemodel import Entry, Key, StateList
from . import phase as base, txn
from .enginereport import EngineReport, NodeReadback
from .report import PhaseTiming
from .statenode import StateNode, same_modules
from .steering import Steering

log = logging.getLogger(__name__)

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
    #: the session the source's state-change notifications are followed on (from before its lists were read), None when not.
    events: StateNode | None = None
    #: opens another session to the source for its events (None: they ride on the migration's own session).
    open_events: Callable[[], StateNode] | None = None
    locks: list[txn.Locks] = field(default_factory=list)
    #: the target's lists as it reported them in preflight (entries, digest), before anything was written.
    target_before: dict[str, tuple[int, str]] = field(default_factory=dict)
    #: nodes with this migration's confirmed commit pending, and when it was last (re)armed (time.monotonic()).
    pending: dict[str, tuple[StateNode, float]] = field(default_factory=dict)
    #: the target's admission is closed by this migration (:class:`HoldTarget`): finish reopens it with its confirm.
    target_held: bool = False
    #: the target's pending confirmed commit (copy and hold) was cancelled by an undo already.
    target_cancelled: bool = False

    def confirmed(self, node: StateNode) -> None:
        """``node`` committed with this migration's token: its timeout runs from now."""
        node.commit(confirmed=True, timeout=self.options.confirm_timeout, persist=self.token)
        self.pending[node.name] = (node, time.monotonic())

    def renew(self) -> None:
        """Re-arm the pending confirmed commits that have run a third of their timeout (RFC 6241 8.4: a follow-up
        confirmed commit with the persist-id).  The timeout bounds how long a node waits for a controller that died,
        not how long a migration may take: on a loaded machine a 100k-session copy can outlast it, and the source's
        freeze would roll back under a live migration."""
        now = time.monotonic()
        for name, (node, armed) in list(self.pending.items()):
            if now - armed >= self.options.confirm_timeout / 3:
                # The follow-up keeps the token (persist-id alone: ncclient refuses persist beside it).
                node.commit(confirmed=True, timeout=self.options.confirm_timeout, persist_id=self.token)
                self.pending[name] = (node, time.monotonic())


class Phase(base.Phase):
    """One step of a migration; ``needs``: capabilities both agents must announce for it (see :mod:`.phase`)."""

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
        """Read the (frozen) source, write the target's candidate; the entries copied per list."""


class WholeLists(CopyStrategy):
    """Each list read whole with get-config, written with one edit-config (merge of whole entries)."""

    name = "whole-lists"

    def copy(self, ctx: Context) -> dict[StateList, list[Entry]]:
        out = {}
        for lst in ctx.lists:
            entries = ctx.source.read(lst)
            ctx.renew()
            ctx.target.write(lst, entries)
            ctx.renew()
            out[lst] = entries
        return out


class Preflight(Phase):
    """Both agents discovered and compared, locked, the source open for new entries."""

    name = "preflight"
    needs = frozenset({txn.CANDIDATE, txn.CONFIRMED_COMMIT})

    def run(self, ctx: Context) -> str:
        for node in (ctx.source, ctx.target):
            node.discover()
        diff = same_modules(ctx.source, ctx.target)
        if diff:
            raise ControllerError("the two agents do not serve the same state modules: " + "; ".join(diff))
        ctx.lists = ctx.source.lists
        ctx.report.modules = [f"{m.name}@{m.revision}" for m in ctx.source.modules]
        # Both nodes, one after the other in name order: two migrations sharing a node meet at the same first lock.
        for node in sorted((ctx.source, ctx.target), key=lambda n: n.name):
            ctx.locks.append(txn.Locks.take(node, "source" if node is ctx.source else "target"))
        ctx.target_before = ctx.target.statistics()  # under the locks: nothing else writes it now
        if not ctx.source.admission():
            hint = f" ({ctx.options.recover_hint})" if ctx.options.recover_hint else ""
            raise ControllerError(f"{ctx.source.name} refuses new entries already (state-control/admit-new is false): "
                                  f"an interrupted migration or an operator closed it; nothing was changed{hint}")
        return f"modules {', '.join(ctx.report.modules)}; lists {', '.join(l.qname for l in ctx.lists)}"


class Freeze(Phase):
    """The source stops creating entries (persistent confirmed commit: a dead controller's freeze undoes itself)."""

    name = "freeze"

    def run(self, ctx: Context) -> str:
        ctx.source.set_admission(False, target="candidate")
        ctx.confirmed(ctx.source)
        return f"{ctx.source.name}: admit-new false, rolled back in {ctx.options.confirm_timeout:g} s unless confirmed"

    def undo(self, ctx: Context) -> str | None:
        return f"{ctx.source.name}: freeze cancelled" if txn.cancel_pending(ctx.source, ctx.token) else None


class Copy(Phase):
    """The source's lists into the target's candidate; its state-change notifications followed from before the read."""

    name = "copy"

    def __init__(self, strategy: CopyStrategy) -> None:
        self.strategy = strategy

    def run(self, ctx: Context) -> str:
        if ctx.source.notifies:
            # Before the read: a change the read misses is then one of these events.  On a
            # session of their own when one can be opened, closed once caught up: a session
            # subscribed stays so (RFC 5277 has no unsubscribe), and the migration's own
            # retire would stream every deleted entry back on it, ahead of the unlock's reply
            # (100,000 notifications: ~17 s at 100k).
            ctx.events = ctx.source
            if ctx.open_events is not None:
                ctx.events = ctx.open_events()
                ctx.events.adopt(ctx.source)
            ctx.events.subscribe()
        ctx.copied = self.strategy.copy(ctx)
        ctx.expected = {l: {l.key_of(e): e for e in es} for l, es in ctx.copied.items()}
        ctx.report.copied = {l.qname: len(e) for l, e in ctx.copied.items()}
        return f"{self.strategy.name}: " + ", ".join(f"{l.qname} {len(e)}" for l, e in ctx.copied.items())

    def undo(self, ctx: Context) -> str | None:
        # Also after a copy that failed half-way: what the candidate got must not outlive
        # the session (unlocking the candidate keeps its changes, RFC 6241 8.3.5.2).
        ctx.target.client.discard()
        return f"{ctx.target.name}: candidate discarded"


class CatchUp(Phase):
    """The frozen source's changes since the read (its state-change events) onto the target's candidate, until its
    digests agree; then the target's persistent confirmed commit.

    A frozen source creates no entries, but entries still end (closed, expired) and a function
    may change what it holds by itself.  Its own digest says when the copy is complete; when
    the events do not explain a difference within ``settle_max`` (an agent that does not send
    state-change), the lists that differ are read again.
    """

    name = "catch-up"

    def __init__(self, settle: float = 0.02, settle_max: float = 0.5) -> None:
        self.settle, self.settle_max = settle, settle_max

    def run(self, ctx: Context) -> str:
        applied = reread = 0
        deadline = time.monotonic() + self.settle_max
        while True:
            events = ctx.events.changes(self.settle) if ctx.events is not None else []
            if events:
                applied += self._apply(ctx, events)
                continue  # until the source is quiet for `settle`
            stats = ctx.source.statistics()
            differ = [l for l, t in ctx.expected.items() if stats.get(l.qname) != (len(t), l.digest(t.values()))]
            if not differ:
                break
            if time.monotonic() >= deadline:
                for lst in differ:
                    reread += self._reread(ctx, lst)
                break
        close_events(ctx)  # the source is frozen and caught up: verify compares its digests, no event is needed
        ctx.confirmed(ctx.target)
        return f"{applied} changes from events, {reread} from a re-read; target committed (confirmed, {ctx.options.confirm_timeout:g} s)"

    @staticmethod
    def _apply(ctx: Context, events: list[tuple[StateList, str, Entry]]) -> int:
        # Folded per key (the last event wins), then one write and one remove per list: a burst of
        # events costs a few edit-configs, not one each (1,000 blocked sources at once: 30 s one by one).
        ups: dict[StateList, dict[Key, Entry]] = {}
        gone: dict[StateList, dict[Key, None]] = {}
        n = 0
        for lst, kind, entry in events:
            if lst not in ctx.expected:
                continue
            key = lst.key_of(entry)
            if kind == "created":
                ctx.expected[lst][key] = entry
                ups.setdefault(lst, {})[key] = entry
                gone.get(lst, {}).pop(key, None)
            else:
                ctx.expected[lst].pop(key, None)
                ups.get(lst, {}).pop(key, None)
                gone.setdefault(lst, {})[key] = None
            n += 1
        for lst, keys in gone.items():
            ctx.target.remove(lst, list(keys))
        for lst, entries in ups.items():
            ctx.target.write(lst, list(entries.values()))
        return n

    @staticmethod
    def _reread(ctx: Context, lst: StateList) -> int:
        now = {lst.key_of(e): e for e in ctx.source.read(lst)}
        old = ctx.expected[lst]
        upserts = [e for k, e in now.items() if old.get(k) != e]
        gone = [k for k in old if k not in now]
        ctx.target.remove(lst, gone)  # first, as in _apply: what a gone entry held (a unique value) is free for the writes
        ctx.target.write(lst, upserts)
        ctx.expected[lst] = now
        return len(upserts) + len(gone)

    def undo(self, ctx: Context) -> str | None:
        ctx.target.client.discard()
        if ctx.target_cancelled:
            return None  # with the hold (HoldTarget's undo): one series, one cancel
        return f"{ctx.target.name}: copy cancelled" if txn.cancel_pending(ctx.target, ctx.token) else None


def close_events(ctx: Context) -> None:
    """Close the source's event session if it is one of its own."""
    if ctx.events is not None and ctx.events is not ctx.source:
        ctx.events.close()
    ctx.events = None


class Verify(Phase):
    """What the target got is what the frozen source holds (its own digest), and the target holds all of it (read back)."""

    name = "verify"

    def run(self, ctx: Context) -> str:
        stats = ctx.source.statistics()
        for lst, table in ctx.expected.items():
            got = stats.get(lst.qname)
            want = (len(table), lst.digest(table.values()))
            if got != want:
                raise ControllerError(f"{ctx.source.name}: {lst.qname} changed while frozen: the target got {want[0]} entries, digest {want[1]}; "
                                      f"the source now reports {got[0] if got else 'no'} entries, digest {got[1] if got else '-'}")
        ctx.renew()
        target_now = ctx.target.statistics()
        by_digest = []
        for lst, table in ctx.expected.items():
            entries = list(table.values())
            if ctx.target_before.get(lst.qname, (0, ""))[0] == 0 and target_now.get(lst.qname) == (len(table), lst.digest(entries)):
                # The target held none of this list and now reports exactly these entries' count and
                # digest (its own, from its table): the read-back below would find each one.
                by_digest.append(lst.qname)
                continue
            # The key and mandatory leaves (the digest's): others may change on a live node by themselves.
            idx = [i for i, s in enumerate(lst.leaves) if s.mandatory]
            have = {tuple(e[i] for i in idx) for e in ctx.target.read(lst)}
            missing = [e for e in entries if tuple(e[i] for i in idx) not in have]
            if missing:
                shown = ", ".join(lst.describe(lst.key_of(e)) for e in missing[:5])
                raise ControllerError(f"{ctx.target.name}: {len(missing)} of {len(entries)} entries of {lst.qname} are not there as copied after the commit: {shown}")
        how = (f"by the target's own digest ({', '.join(by_digest)})" if len(by_digest) == len(ctx.expected)
               else "read back from the target" if not by_digest else f"by the target's digest ({', '.join(by_digest)}) or read back")
        return f"source digests match the copy; every entry on the target, {how}"


class TrafficOnSource(Phase):
    """Before anything changes: the switch sends the traffic through the source (read from the switch)."""

    name = "traffic"

    def __init__(self, steering: Steering) -> None:
        self.steering = steering

    def run(self, ctx: Context) -> str:
        active = self.steering.active()
        if active != ctx.source.name:
            hint = f" ({ctx.options.recover_hint})" if ctx.options.recover_hint else ""
            raise ControllerError(f"the switch sends traffic through {active or 'no node'}, not through the source {ctx.source.name}; nothing was changed{hint}")
        return f"traffic on {active} (read from the switch)"


class HoldTarget(Phase):
    """Just before the switch: the target holds new entries too, until finish (a follow-up of its copy's confirmed commit).

    From the switch on, what would create an entry reaches the target.  Held
    there, it waits for the outcome: finish opens the target's admission and
    the target sends it back to the switch, which hands it to the target
    itself; an undo cancels the target's series (copy and hold) after
    traffic was pointed back, and it goes to the source.  Admitted at once
    instead, a connection would be made on the target and broken by an
    undone switch (the source knows nothing of it).  The follow-up keeps the
    series' rollback point: a dead controller's target reopens by itself
    with its copy removed.
    """

    name = "hold"

    def run(self, ctx: Context) -> str:
        ctx.target.set_admission(False, target="candidate")
        # A follow-up confirmed commit (RFC 6241 8.4): the copy's and the hold's undo are one series.
        ctx.target.commit(confirmed=True, timeout=ctx.options.confirm_timeout, persist_id=ctx.token)
        ctx.pending[ctx.target.name] = (ctx.target, time.monotonic())
        ctx.target_held = True
        return f"{ctx.target.name}: admit-new false (holds new entries until finish), with its copy rolled back in {ctx.options.confirm_timeout:g} s unless confirmed"

    def undo(self, ctx: Context) -> str | None:
        # After the switch's undo (reverse order): what the target held goes where traffic is again.
        ctx.target.client.discard()
        if not txn.cancel_pending(ctx.target, ctx.token):
            return None
        ctx.target_cancelled = True
        ctx.pending.pop(ctx.target.name, None)
        return f"{ctx.target.name}: hold and copy cancelled (admission reopened: what it held went back to the switch)"


class OvsSwitch(Phase):
    """Traffic onto the target (one atomic change of the switch), read back; undone by pointing it back."""

    name = "switch"

    def __init__(self, steering: Steering) -> None:
        self.steering = steering

    def run(self, ctx: Context) -> str:
        self.steering.point_to(ctx.target.name)
        active = self.steering.active()
        if active != ctx.target.name:
            raise ControllerError(f"the switch was told to send traffic through {ctx.target.name} but reads {active or 'no node'}")
        ctx.report.switch = f"moved to {active} (read back from the switch)"
        return ctx.report.switch

    def undo(self, ctx: Context) -> str | None:
        self.steering.point_to(ctx.source.name)
        return f"traffic back on {self.steering.active()} (read back from the switch)"

    def read_back(self, ctx: Context) -> None:
        try:
            ctx.report.traffic_on = self.steering.active() or "no node"
        except Exception as e:  # noqa: BLE001 - a report must still be made
            ctx.report.traffic_on = f"unknown: the switch cannot be read ({txn.describe_error(e)})"


class NoSwitch(Phase):
    """State transfer only: no traffic is moved (an inventory whose switch is `none`)."""

    name = "switch"

    def run(self, ctx: Context) -> str:
        ctx.report.switch = "none: state transfer only, no traffic was moved"
        return ctx.report.switch


class Finish(Phase):
    """The target's copy confirmed; the source retired (entries deleted or kept) and open again, confirming its freeze."""

    name = "finish"

    def run(self, ctx: Context) -> str:
        if ctx.target_held:
            # Confirmed with admission open in one commit: what it held goes back to the switch, and on to itself.
            txn.confirm_admission(ctx.target, True, ctx.token)
        else:
            ctx.target.commit(persist_id=ctx.token)
        ctx.pending.pop(ctx.target.name, None)
        ctx.report.committed = True
        ctx.renew()  # the source's freeze, before its candidate takes the deletions
        if ctx.target_held:
            # Live traffic: the source reopens first, so that what it held since the freeze goes to the switch (and on
            # to the target) now, not after the retire (500 deletions took 2.4 s on a loaded machine, and the held
            # connections got through on their SYN's retransmission instead).  Traffic is on the target: nothing new
            # reaches the source in between.  A controller dying there leaves the source open with its entries kept.
            txn.confirm_admission(ctx.source, True, ctx.token)
            ctx.pending.pop(ctx.source.name, None)
            if ctx.options.retire == "delete":
                for lst, table in ctx.expected.items():
                    ctx.source.remove(lst, table)
                ctx.source.commit()
            return (f"{ctx.target.name}: copy confirmed and admission reopened; {ctx.source.name}: admission reopened, "
                    f"then entries {'deleted' if ctx.options.retire == 'delete' else 'kept'}")
        if ctx.options.retire == "delete":
            for lst, table in ctx.expected.items():
                ctx.source.remove(lst, table)
        txn.confirm_admission(ctx.source, True, ctx.token)
        ctx.pending.pop(ctx.source.name, None)
        return f"{ctx.target.name}: copy confirmed; {ctx.source.name}: entries {'deleted' if ctx.options.retire == 'delete' else 'kept'}, admission reopened"


def default_phases(steering: Steering | None = None) -> list[Phase]:
    """preflight, (traffic on the source,) freeze, copy (whole lists), catch-up, verify, (hold on the target,) switch (Open vSwitch, or none), finish."""
    if steering is None:
        return [Preflight(), Freeze(), Copy(WholeLists()), CatchUp(), Verify(), NoSwitch(), Finish()]
    return [Preflight(), TrafficOnSource(steering), Freeze(), Copy(WholeLists()), CatchUp(), Verify(), HoldTarget(),
            OvsSwitch(steering), Finish()]


def switch_only_phases(steering: Steering) -> list[Phase]:
    """preflight, traffic on the source, switch: traffic moved and no state copied (the negative control of a demo)."""
    return [Preflight(), TrafficOnSource(steering), OvsSwitch(steering)]


def missing_needs(phases: list[Phase], node: StateNode) -> list[str]:
    """Capabilities the phases declare that ``node`` does not announce."""
    return base.missing_needs(phases, node.capabilities)


class EngineMigration:
    """Run the phases in order; on failure undo the finished ones in reverse, then read both nodes back."""

    def __init__(self, source: Callable[[], StateNode], target: Callable[[], StateNode], source_name: str, target_name: str,
                 options: EngineOptions | None = None, phases: list[Phase] | None = None,
                 on_phase: Callable[[PhaseTiming], None] | None = None, close_nodes: bool = True,
                 source_events: Callable[[], StateNode] | None = None) -> None:
        self.open_source, self.open_target = source, target
        #: opens a second session to the source for its event stream (see :class:`Copy`); None: the migration's own.
        self.open_events = source_events
        self.options = options or EngineOptions()
        self.phases = phases if phases is not None else default_phases()
        self.on_phase = on_phase or (lambda p: None)
        #: False: the sessions belong to the caller (a controller's registry) and stay open.
        self.close_nodes = close_nodes
        self.report = EngineReport(source_name, target_name, retire=self.options.retire)

    def run(self) -> EngineReport:
        r = self.report
        nodes: list[StateNode] = []
        ctx: Context | None = None
        done: list[Phase] = []
        try:
            t0 = time.perf_counter()
            src, tgt = self.open_source(), self.open_target()
            nodes = [src, tgt]
            for node in nodes:
                if missing := missing_needs(self.phases, node):
                    raise ControllerError(f"{node.name}: the agent does not announce {', '.join(missing)}, which this migration needs")
            ctx = Context(src, tgt, self.options, txn.persist_token(r.source, r.target), r, open_events=self.open_events)
            r.connect_seconds = time.perf_counter() - t0
            for phase in self.phases:
                timing = PhaseTiming(phase.name, started=time.perf_counter())
                r.phases.append(timing)
                ctx.renew()
                timing.detail = phase.run(ctx)
                timing.seconds = time.perf_counter() - timing.started
                timing.ok = True
                done.append(phase)
                self.on_phase(timing)
            r.ok = True
        except Exception as e:  # noqa: BLE001 - any failure is reported, after the undo
            r.error = txn.describe_error(e) if not isinstance(e, ControllerError) else str(e)
            r.failed_phase = r.phases[-1].name if r.phases and not r.phases[-1].ok else "connect"
            if r.phases and not r.phases[-1].ok:
                r.phases[-1].seconds = time.perf_counter() - r.phases[-1].started
                self.on_phase(r.phases[-1])
            if not isinstance(e, ControllerError):
                log.exception("migration failed")
            if ctx is not None and not r.committed:
                # The phase that failed may have done part of its work: its undo runs too.
                failed = [p for p in self.phases if p.name == r.failed_phase and p not in done][:1]
                for phase in [*failed, *reversed(done)]:
                    try:
                        if (what := phase.undo(ctx)) is not None:
                            r.undone.append(what)
                    except Exception as ue:  # noqa: BLE001 - the agents' own timeout undoes what this could not
                        r.undone.append(f"{phase.name}: undo failed ({txn.describe_error(ue)}); the agent rolls it back within {self.options.confirm_timeout:g} s")
        finally:
            if ctx is not None:
                close_events(ctx)
                for phase in self.phases:
                    phase.read_back(ctx)
                for lock in ctx.locks:
                    if lock.node.connected:
                        lock.release()
            for node in nodes:
                r.readback[node.name] = read_back(node)
                if self.close_nodes:
                    node.close()
        return r


def read_back(node: StateNode) -> NodeReadback:
    """What the node says now: admission and each list's size and digest."""
    if not node.connected:
        return NodeReadback(node.name, error="the NETCONF session is gone")
    try:
        return NodeReadback(node.name, admission=node.admission(), tables=node.statistics(), held=node.held())
    except Exception as e:  # noqa: BLE001 - a report must still be made
        return NodeReadback(node.name, error=txn.describe_error(e))
