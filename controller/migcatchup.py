"""The NAT migration's catch-up phase: the source frozen and its events written into the target, the copy confirmed and the target held.

What it does and why the source is frozen before the switch: the module
docstring of :mod:`.migrate` (``catch-up``).  Both digests verify compares
are asked for at its end (:func:`start_digests`).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ..errors import ControllerError, NatmigError
from .migcontext import Context, MigrationPhase
from .nodeproto import STATISTICS, Counter, Node, has
from .txn import CONFIRMED_COMMIT, confirmed_admission, nothing_pending


class CatchUp(MigrationPhase):
    """Freeze the source and settle its events (on this thread) while the target's copy is confirmed and its admission held (on another)."""

    name = "catch-up"
    needs = frozenset({CONFIRMED_COMMIT})

    def run(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        # The target's copy is confirmed and its admission held on its own
        # session while the source freezes and settles: both must be done
        # before the switch, and neither needs the other (the target carries
        # no traffic yet; catch-up writes go to its running datastore for
        # good either way).  Off the hold window: ~15 ms at 10k.
        pool = ThreadPoolExecutor(1)
        holding = pool.submit(confirm_and_hold, ctx, tgt)
        pool.shutdown(wait=False)
        try:
            settle_and_apply(ctx, ph, src, tgt)
        finally:
            with ph.step("confirm+hold"):
                # Waited for even when the source failed: recovery must know what is pending.
                holding.result()
        ctx.check_alive()
        start_digests(ctx)


def settle_and_apply(ctx: Context, ph: Any, src: Node, tgt: Node) -> None:
    """Write what the source's events changed during the copy, freeze it, wait for its events to settle, write the rest."""
    # What changed while the copy ran is written before the freeze, while
    # the source still serves: under the hold only the last delta is.  With
    # 100 new connections a second beside a 100k move, the copy (~13 s
    # there) left ~2,500 events, whose write (~190 ms) and the settle
    # after it stretched the hold window to ~380 ms.
    early = ctx.sub.drain()
    if early:
        ctx.events += early
        ctx.catch.extend(early)
        with ph.step("pre-apply"):
            apply_caught_up(ctx, tgt)
    if ctx.opt.freeze_source:
        with ph.step("freeze"):
            freeze(ctx, src)
    with ph.step("settle"):
        early = ctx.sub.drain()
        ctx.events += early
        ctx.catch.extend(early)
        deadline = time.perf_counter() + ctx.opt.settle_max
        while time.perf_counter() < deadline:
            ev = ctx.sub.get(timeout=ctx.opt.settle)
            if ev is None:
                break
            ctx.events.append(ev)
            ctx.catch.add(*ev)
        else:
            ctx.report.notes.append(f"source events did not settle within {ctx.opt.settle_max} s; verify will reconcile")
    with ph.step("apply"):
        apply_caught_up(ctx, tgt)
    ctx.report.events = ctx.catch.events


def apply_caught_up(ctx: Context, tgt: Node) -> None:
    """Write into the target what the events folded so far changed, and count it."""
    ups, dels = ctx.catch.take()
    # Recorded before the write: a write whose reply is lost may still have happened.
    added = set(ctx.st.added)
    ctx.st.added += [s.key for s in ups if s.key not in added and ctx.plan is not None and s.key not in ctx.plan.already]
    ctx.write(tgt, ups, dels)
    ctx.report.caught_up += len(ups)
    ctx.report.caught_up_deleted += len(dels)


def confirm_and_hold(ctx: Context, tgt: Node) -> None:
    """The target keeps its copy for good, and holds new sessions until the admit, undone by itself if the controller dies.

    Confirmed at the catch-up, before the switch: from the switch on
    traffic may run through the target, and a rollback must then never
    take its sessions away.  The hold is a new
    confirmed commit, so a dead controller leaves the node that carries
    traffic admitting new sessions again after ``confirm_timeout``.
    """
    if ctx.st.copy_pending:
        try:
            tgt.commit(persist_id=ctx.token)
        except NatmigError as e:
            if nothing_pending(e):
                ctx.st.copy_pending = False  # the agent already removed it
                raise ControllerError(
                    f"the target's copy rolled back by itself before it was confirmed: the copy and catch-up took longer "
                    f"than --confirm-timeout ({ctx.opt.confirm_timeout:g} s); raise it for a table this size") from e
            raise
        ctx.st.copy_pending = False
    ctx.st.target_hold = True
    confirmed_admission(tgt, False, ctx.token, ctx.opt.confirm_timeout)


def start_digests(ctx: Context) -> None:
    """Ask both nodes for their digests now, for verify to use: they are computed while the switch happens.

    Both tables are already the ones verify must see: the source is
    frozen and its events have settled; the target holds the copy and
    the catch-up, carries no traffic yet, and from the switch on can
    only lose a session (a close, a timeout: new ones are held), never
    gain or re-map one.  Both reads are inside the hold window (the
    source's freeze to the target's admit), which is what new
    connections wait for: asked here rather than the target's after
    the switch, the window shrank by ~250 ms at 10k on a loaded
    two-core machine (1,257-1,380 -> 1,032-1,070 ms, with the O(table)
    catch-up of then), for a switch that two table reads beside it can
    slow (an earlier measurement: 17 -> 28 ms at 10k).
    """
    src, tgt = ctx.src, ctx.tgt
    if ctx.opt.verify_source != "digest" or src is None or tgt is None or not has(src, STATISTICS) or not has(tgt, STATISTICS):
        return
    ctx.digest_pool = ThreadPoolExecutor(2)
    ctx.source_digest = ctx.digest_pool.submit(cast(Counter, src).get_statistics)
    ctx.target_digest = ctx.digest_pool.submit(cast(Counter, tgt).get_statistics)
    ctx.digest_pool.shutdown(wait=False)


def freeze(ctx: Context, src: Node) -> None:
    """Close the source's admission (a persistent confirmed commit): from here its table cannot grow."""
    # Recorded before the change, so that a failure half-way still undoes it.
    ctx.st.source_admission = ctx.source_admits
    ctx.st.source_frozen = True
    ctx.report.hold_started = time.perf_counter()
    confirmed_admission(src, False, ctx.token, ctx.opt.confirm_timeout)
