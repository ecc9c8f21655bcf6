"""The migration engine: moves the state lists of any module between two state agents.

It knows no network function.  What to move comes from the agents
(:class:`~.statenode.StateNode`: yang-library, get-schema, the compiled
module); how to hold new entries, and how to check a copy, from the common
module natmig-state.  A migration is a sequence of :class:`Phase` objects,
each declaring the capabilities it needs from both agents (checked against
their hellos before anything changes, never probed), each with an undo;
the copy itself is a :class:`CopyStrategy`.

The default order copies while the source still serves: preflight,
(traffic,) copy, freeze, catch-up, verify, (hold,) switch, finish.  The
copy subscribes to the source's state-change first, then reads it, writes
the target's candidate with what the events said meanwhile, and commits it
(a persistent confirmed commit); only then is the source frozen, and the
catch-up writes and commits the last changes (:mod:`.enginecatchup`), a
follow-up of the same series.  What would create an entry waits for those
last changes only, not for the copy of the whole table nor its commit.  A source whose hello
announces no notifications cannot be followed while it serves: for it the
freeze comes before the copy (:func:`arranged`, from the hello, never
probed), and the catch-up re-reads what its digests show changed.

Crash safety is the NAT migration's (:mod:`.txn`): both nodes locked from
preflight to the end, and every change a dead controller must not leave
behind a persistent confirmed commit under the pair's token, rolled back
by the agents themselves when ``confirm_timeout`` passes: the source's
freeze, and the target's copy (and its catch-up when written through the
candidate), whose undo is a cancel-commit.  A controller dying while the
source serves leaves it serving, and the target's copy rolling back by
itself.  With a switch, :class:`HoldTarget` confirms the copy before
traffic can reach the target, and holds in a series of its own: no
rollback ever empties a target that may carry traffic.  Changes written
straight into the target's running after the copy's commit
(:meth:`~.enginecontext.Context.changes_to`) are in no series: an undo
removes what they created, and after a dead controller `natmig recover`
does.

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

import logging
import time
from typing import Callable

from ..errors import ControllerError
from ..statemodel import Entry, StateList
from . import phase as base, txn
from .enginecatchup import CatchUp, apply_changes, commit_changes, reconcile
from .enginecontext import RETIRE_MODES, Context, CopyStrategy, EngineOptions, Phase, close_events
from .enginecopy import ForwardedLists, WholeLists
from .enginereport import EngineReport, NodeReadback
from .netconf import NOTIFICATION_CAPABILITY
from .report import PhaseTiming
from .statenode import StateNode, same_modules
from .steering import Steering

__all__ = ["RETIRE_MODES", "CatchUp", "Context", "Copy", "CopyStrategy", "EngineMigration", "EngineOptions", "Finish", "ForwardedLists", "Freeze",
           "HoldTarget", "NoSwitch", "OvsSwitch", "Phase", "Preflight", "TrafficOnSource", "Verify", "WholeLists", "arranged",
           "close_events", "default_phases", "missing_needs", "read_back", "switch_only_phases"]

log = logging.getLogger(__name__)


class Preflight(Phase):
    """Both agents discovered and compared, locked, the source open for new entries."""

    name = "preflight"
    needs = frozenset({txn.CANDIDATE, txn.CONFIRMED_COMMIT})
    changes = False  # it reads, and takes locks that end with its sessions

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
        ctx.frozen = True
        ctx.source.set_admission(False, target="candidate")
        ctx.confirmed(ctx.source)
        return f"{ctx.source.name}: admit-new false, rolled back in {ctx.options.confirm_timeout:g} s unless confirmed"

    def undo(self, ctx: Context) -> str | None:
        return f"{ctx.source.name}: freeze cancelled" if txn.cancel_pending(ctx.source, ctx.token) else None


class Copy(Phase):
    """The source's lists into the target's candidate; its state-change notifications followed from before the read.

    Before :class:`Freeze` (the default), the source still serves while it is
    read: what its events said meanwhile is written into the candidate at the
    end, so that the catch-up under the freeze writes only the last changes.
    After it, the source is frozen and the events are the catch-up's.  Either
    way the copy ends committed on the target, a persistent confirmed commit
    under the migration's token (its undo: cancel-commit).
    """

    name = "copy"
    #: what the source must announce for a copy while it serves: its changes are followed (RFC 5277), or they are lost.
    serving_needs = frozenset({NOTIFICATION_CAPABILITY})

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
        serving = not ctx.frozen
        ctx.copied = self.strategy.copy(ctx)
        ctx.expected = {l: {l.key_of(e): e for e in es} for l, es in ctx.copied.items()}
        counts = {l: len(ctx.copied[l]) if l in ctx.copied else ctx.forwarded[l].count
                  for l in ctx.lists if l in ctx.copied or l in ctx.forwarded}
        ctx.report.copied = {l.qname: n for l, n in counts.items()}
        lists = ", ".join(f"{l.qname} {n}{' (forwarded)' if l in ctx.forwarded else ''}" for l, n in counts.items())
        if serving and ctx.events is not None:
            # What changed during the read and write, into the candidate before its commit.
            ctx.early = apply_changes(ctx, ctx.events.changes(0))
        # Committed here, while the source serves (unless frozen first): the catch-up under the freeze then commits
        # only the last changes, and a connection held there does not wait for the whole copy to reach running
        # (~720 ms at 50k NAT sessions).  Persistent and confirmed: a controller that dies from here on leaves the
        # target rolling its copy back by itself after confirm-timeout, and the source never stopped serving.
        started = time.monotonic()
        ctx.confirmed(ctx.target)
        ctx.copy_committed = True
        commit = f"committed in {(time.monotonic() - started) * 1000:.0f} ms (confirmed, {ctx.options.confirm_timeout:g} s)"
        if not serving:
            return f"{self.strategy.name}, {ctx.source.name} frozen: {lists}; {commit}"
        if ctx.events is None:
            return (f"{self.strategy.name}, while {ctx.source.name} serves (its changes not followed: it announces no notifications): "
                    f"{lists}; {commit}")
        # What changed during the commit: written now too, still outside the freeze.
        later = apply_changes(ctx, ctx.events.changes(0))
        if later:
            commit_changes(ctx)
        ctx.early += later
        return (f"{self.strategy.name}, while {ctx.source.name} serves: {lists}; {commit}; "
                f"{ctx.early} changes since the read written from its events")

    def undo(self, ctx: Context) -> str | None:
        # Also after a copy that failed half-way: what the candidate got must not outlive the session (unlocking
        # the candidate keeps its changes, RFC 6241 8.3.5.2), and what was committed is cancelled.
        if ctx.cancel_target():
            return f"{ctx.target.name}: candidate discarded, copy cancelled"
        return f"{ctx.target.name}: candidate discarded"


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
        reconciled = {lst.qname: reconcile(ctx, lst, stats.get(lst.qname)) for lst in ctx.forwarded if stats.get(lst.qname) != target_now.get(lst.qname)}
        by_digest += [lst.qname for lst in ctx.forwarded if lst.qname not in reconciled]
        checked = len(ctx.expected) + len(ctx.forwarded)
        how = (f"by the target's own digest ({', '.join(by_digest)})" if len(by_digest) == checked
               else "read back from the target" if not by_digest else f"by the target's digest ({', '.join(by_digest)}) or read back")
        fixed = "".join(f"; {q}: {n} entries the events did not bring written, then the digests matched" for q, n in reconciled.items())
        return f"source digests match the copy; every entry on the target, {how}{fixed}"


class TrafficOnSource(Phase):
    """Before anything changes: the switch sends the traffic through the source (read from the switch)."""

    name = "traffic"
    changes = False

    def __init__(self, steering: Steering) -> None:
        self.steering = steering

    def run(self, ctx: Context) -> str:
        active = self.steering.active()
        if active != ctx.source.name:
            hint = f" ({ctx.options.recover_hint})" if ctx.options.recover_hint else ""
            raise ControllerError(f"the switch sends traffic through {active or 'no node'}, not through the source {ctx.source.name}; nothing was changed{hint}")
        return f"traffic on {active} (read from the switch)"


class HoldTarget(Phase):
    """Just before the switch: the target's copy confirmed for good, and the target holding new entries until finish.

    From the switch on, traffic may run through the target, and no rollback
    may then take its entries away: a controller that died there would
    leave connections on a target whose copy had rolled back by itself.  So
    the copy's series (copy, catch-up) is confirmed here, and the hold is a
    series of its own, whose rollback only reopens the target's admission.
    Held there, what would create an entry waits for the outcome: finish
    confirms the hold with admission open and the target sends what it held
    back to the switch, which hands it to the target itself; an undo (after
    traffic was pointed back) cancels the hold, so it goes to the source,
    and removes the copy.  Admitted at once instead, a connection would be
    made on the target and broken by an undone switch (the source knows
    nothing of it).  A controller dead after this phase leaves, once the
    agents' timeouts pass, both nodes admitting and the copy on the target:
    `natmig recover` then removes the copy from the node that carries no
    traffic.
    """

    name = "hold"

    def run(self, ctx: Context) -> str:
        ctx.target.commit(persist_id=ctx.token)
        ctx.pending.pop(ctx.target.name, None)
        ctx.target_confirmed = True
        txn.confirmed_admission(ctx.target, False, ctx.token, ctx.options.confirm_timeout)
        ctx.pending[ctx.target.name] = (ctx.target, time.monotonic())
        ctx.target_held = True
        return (f"{ctx.target.name}: copy confirmed; admit-new false (holds new entries until finish), reopened in "
                f"{ctx.options.confirm_timeout:g} s unless confirmed")

    def undo(self, ctx: Context) -> str | None:
        # After the switch's undo (reverse order): what the target held goes where traffic is again.
        if not ctx.cancel_target():
            return None
        return f"{ctx.target.name}: hold cancelled (admission reopened: what it held went back to the switch) and copy removed"


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
                ctx.remove_moved(ctx.source)
                ctx.source.commit()
            return (f"{ctx.target.name}: copy confirmed and admission reopened; {ctx.source.name}: admission reopened, "
                    f"then entries {'deleted' if ctx.options.retire == 'delete' else 'kept'}")
        if ctx.options.retire == "delete":
            ctx.remove_moved(ctx.source)
        txn.confirm_admission(ctx.source, True, ctx.token)
        ctx.pending.pop(ctx.source.name, None)
        return f"{ctx.target.name}: copy confirmed; {ctx.source.name}: entries {'deleted' if ctx.options.retire == 'delete' else 'kept'}, admission reopened"


def default_phases(steering: Steering | None = None, settle: float = 0.02) -> list[Phase]:
    """preflight, (traffic on the source,) copy (forwarded lists, while the source serves), freeze, catch-up (until the
    source's events are quiet for ``settle`` seconds), verify, (hold on the target,) switch (Open vSwitch, or none),
    finish.  For a source that announces no notifications the engine runs the freeze before the copy (:func:`arranged`)."""
    if steering is None:
        return [Preflight(), Copy(ForwardedLists()), Freeze(), CatchUp(settle), Verify(), NoSwitch(), Finish()]
    return [Preflight(), TrafficOnSource(steering), Copy(ForwardedLists()), Freeze(), CatchUp(settle), Verify(), HoldTarget(),
            OvsSwitch(steering), Finish()]


def arranged(phases: list[Phase], source: StateNode) -> list[Phase]:
    """``phases`` in the order ``source`` allows: a copy before the freeze runs while the source serves, which needs what
    :attr:`Copy.serving_needs` declares; a source whose hello does not announce it is frozen first (the freeze moved
    to just before the copy, everything else in place)."""
    copy = next((i for i, p in enumerate(phases) if isinstance(p, Copy)), None)
    freeze = next((i for i, p in enumerate(phases) if isinstance(p, Freeze)), None)
    if copy is None or freeze is None or freeze < copy or not base.missing(Copy.serving_needs, source.capabilities):
        return list(phases)
    return [*phases[:copy], phases[freeze], *phases[copy:freeze], *phases[freeze + 1:]]


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
        phases = self.phases
        done: list[Phase] = []
        try:
            t0 = time.perf_counter()
            src, tgt = self.open_source(), self.open_target()
            nodes = [src, tgt]
            for node in nodes:
                if missing := missing_needs(self.phases, node):
                    raise ControllerError(f"{node.name}: the agent does not announce {', '.join(missing)}, which this migration needs")
            # The order is the source's declared capabilities' (its hello), decided before anything changes.
            phases = arranged(self.phases, src)
            ctx = Context(src, tgt, self.options, txn.persist_token(r.source, r.target), r, open_events=self.open_events)
            r.connect_seconds = time.perf_counter() - t0
            for phase in phases:
                r.changing = r.changing or phase.changes
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
                failed = [p for p in phases if p.name == r.failed_phase and p not in done][:1]
                for phase in [*failed, *reversed(done)]:
                    try:
                        if (what := phase.undo(ctx)) is not None:
                            r.undone.append(what)
                    except Exception as ue:  # noqa: BLE001 - the agents' own timeout undoes what this could not
                        r.undone.append(f"{phase.name}: undo failed ({txn.describe_error(ue)}); the agent rolls it back within {self.options.confirm_timeout:g} s")
        finally:
            if ctx is not None:
                close_events(ctx)
                for phase in phases:
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
