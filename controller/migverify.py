"""The NAT migration's verify phase: the target holds every session of the frozen source, with the same mapping.

How (digests first, then by key range or the tables, a missing session written before the
target admits): the module docstring of :mod:`.migrate` (``verify``).
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ..errors import ControllerError
from ..model import NatSession, SessionKey, key_range, table_digest
from .migcontext import Context, MigrationPhase
from .nodeproto import RANGES, STATISTICS, TABLE_TEXT, Counter, Node, RangeReader, TableReader, has
from .plan import Verdict, compare, expected_table
from .rangecheck import MAX_SHARE, RangeCheck, both_digests, check_ranges, served

log = logging.getLogger(__name__)


class Verify(MigrationPhase):
    """By digests when both nodes give them, else by reading the tables; a session found missing is written now."""

    name = "verify"

    def run(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        count = cast(Counter, src).get_statistics if ctx.opt.verify_source == "digest" and has(src, STATISTICS) else None
        read_table = cast(TableReader, tgt).read_table if has(tgt, TABLE_TEXT) else None
        target_stats = cast(Counter, tgt).get_statistics if count is not None and has(tgt, STATISTICS) else None
        with ph.step("digests" if target_stats is not None else "read"):
            # Of the frozen source only its digest (nat-statistics): its table
            # is the snapshot folded with the events, and an equal digest
            # proves it (see source_final).  Of the target, its digest too
            # when it can give one: equal to the source's final table's, it
            # proves the target holds exactly those sessions and mappings
            # without shipping the table.  Both at once: two agents.
            if ctx.source_digest is not None and ctx.target_digest is not None and target_stats is not None:
                fs, ft = ctx.source_digest, ctx.target_digest
                ctx.source_digest = ctx.target_digest = None
                got, stats = ft.result(), fs.result()
            else:
                with ThreadPoolExecutor(2) as pool:
                    if target_stats is not None:
                        ft = pool.submit(target_stats)
                    else:
                        ft = pool.submit(read_table, "running") if read_table is not None else pool.submit(tgt.get_sessions, "running")
                    fs = pool.submit(count) if count is not None else None
                    got = ft.result()
                    stats = fs.result() if fs is not None else None
        if target_stats is not None and stats is not None and stats.get("digest") is not None and stats.get("digest") == got.get("digest"):
            # Both agents fingerprinted their own kernel tables: equal digests
            # mean the target holds exactly the frozen source's sessions, every
            # key and mapping.  No table crosses the network, and the snapshot
            # forwarded as text is never decoded here.
            late = ctx.sub.drain() if ctx.sub is not None else []
            ctx.events += late
            ctx.report.events += len(late)
            ctx.report.verified = int(stats.get("sessions", 0))
            ctx.report.source_check = ctx.report.target_check = "digest"
            ph.note(f"all {ctx.report.verified} source sessions on the target with the same mapping (the two nodes' digests are equal)")
            return
        if target_stats is not None and has(src, RANGES) and has(tgt, RANGES) and served(src) and served(tgt):
            # Only the key ranges whose digests differ are read (see .rangecheck).
            ranged = by_ranges(ctx, ph, src, tgt)
            if ranged is not None:
                ph.note(ranged.describe())
                settle_verdict(ctx, ph, src, tgt, ranged.verdict, False, ranged.read_at)
                return
        at_switch = source_final(ctx, stats)
        # Folded: the timeouts in at_switch are the snapshot's and the events' (traffic before the switch may have renewed them since).
        folded = at_switch is not None
        if at_switch is None:
            with ph.step("read-source"):
                at_switch = src.get_sessions("running")
        # Every timeout in at_switch was read before this moment.  Folded, most
        # came with the snapshot: its time picks which ones to ask the source
        # about again (a session an event renewed is among them at worst).
        known_at = ctx.snapshot_at if folded and ctx.snapshot_at is not None else time.perf_counter()
        if target_stats is not None:
            if got.get("digest") == table_digest(at_switch):
                ctx.report.verified = len(at_switch)
                ctx.report.target_check = "digest"
                ph.note(f"all {len(at_switch)} source sessions on the target with the same mapping "
                        f"(target and source digests equal the snapshot and events)")
                return
            # Not equal (a target that held sessions before, a missing or
            # re-mapped one): read the target's table and say what differs.
            with ph.step("read"):
                got = read_table("running") if read_table is not None else tgt.get_sessions("running")
        ctx.report.target_check = "read"
        with ph.step("compare"):
            if read_table is None:
                verdict = compare(at_switch, got)
            elif got.holds(at_switch):
                # Proven from the reply's text: every source session, same key and mapping.
                verdict = Verdict([], [], max(0, got.size - len(at_switch)), len(at_switch))
            else:
                # Not a plain yes: decode the whole reply (the codec's checks) and say exactly what differs.
                verdict = compare(at_switch, got.sessions())
        settle_verdict(ctx, ph, src, tgt, verdict, folded, known_at)


def by_ranges(ctx: Context, ph: Any, src: Node, tgt: Node) -> RangeCheck | None:
    """verify by key range (:mod:`.rangecheck`); None when too much differs (the tables are read whole then)."""
    # Late notifications are counted as the other paths count them; the source is read after the switch, so they are not needed.
    late = ctx.sub.drain() if ctx.sub is not None else []
    ctx.events += late
    ctx.report.events += len(late)
    s, t = cast(RangeReader, src), cast(RangeReader, tgt)
    with ph.step("range-digests"):
        digests = both_digests(s, t)
    with ph.step("range-sessions"):
        ranged = check_ranges(s, t, *digests)
    if ranged is None:
        log.info("more than %d%% of the two tables differ by key range: reading them whole", int(MAX_SHARE * 100))
        return None
    ctx.report.source_check = ctx.report.target_check = "ranges"
    ctx.report.range_sessions_read = ranged.read_source + ranged.read_target
    return ranged


def settle_verdict(ctx: Context, ph: Any, src: Node, tgt: Node, verdict: Verdict, folded: bool, known_at: float) -> None:
    """Write what the target misses (unless a session is re-mapped, or has ended), and fail unless all is then there."""
    if verdict.missing and not verdict.remapped:
        missing, ended = not_ended(ph, src, verdict.missing, folded, known_at)
        # The target still drops unknown sessions' packets, so a missing
        # session has not been re-mapped yet: write it now.
        with ph.step("reconcile"):
            written_at = time.perf_counter()
            ctx.write(tgt, missing, [])
            ctx.st.added += [s.key for s in missing]
            ctx.report.reconciled = len(missing)
            reread_at = time.perf_counter()
            if not missing:
                on_target = []
            elif ctx.report.target_check == "ranges":
                # Only the ranges of what was written: at 1,000,000 a whole read here is what verify by range avoids.
                on_target = cast(RangeReader, tgt).get_range_sessions({key_range(s.key) for s in missing})
                ctx.report.range_sessions_read = (ctx.report.range_sessions_read or 0) + len(on_target)
            else:
                on_target = tgt.get_sessions("running")
        after = compare(missing, on_target)
        # Written with the few seconds they had left, some may have run
        # out by their own timer before the target was read again.
        lapsed = [s for s in after.missing if ran_out(s, written_at, reread_at)]
        ended += len(lapsed)
        verdict = Verdict([s for s in after.missing if not ran_out(s, written_at, reread_at)], after.remapped,
                          verdict.extra, verdict.checked - ended)
        if ended:
            ctx.report.expired = ended
            ph.note(f"{ended} source session(s) ended on the source (timed out) before the target was read: nothing to move")
    if not verdict.ok:
        raise ControllerError(f"verification failed: {verdict.describe()}")
    ctx.report.verified = verdict.checked
    how = {"digest": " (source: its digest matched the snapshot and events)", "ranges": " (by key range: source and target read in the ranges that differ)"}
    ph.note(verdict.describe() + how.get(ctx.report.source_check or "", " (source: re-read)"))


def not_ended(ph: Any, src: Node, missing: list[NatSession], folded: bool, known_at: float) -> tuple[list[NatSession], int]:
    """Of the sessions the target was found without, those still to write (fresh when re-read), and how many have ended.

    A session whose remaining timeout, as the source last gave it, has run
    out by now has ended on the source, and so would its copy on the
    target, made with the same remaining lifetime: nothing to move,
    whether the target lost it before or after its table was read.  That
    is exact when the source was read after the switch (it is frozen and
    carries no traffic since); when its table is the snapshot folded with
    the events, traffic before the switch may have renewed those timers,
    so the source is asked again and only those gone from it count.
    At 1,000,000 sessions a table read takes a minute, and a benchmark
    table loaded 900 s earlier lost ~300,000 entries to their timers
    between the source's read and the target's: every one was reported
    missing, and the reconcile wrote them back with the second they had left.
    """
    now = time.perf_counter()
    lapsed = {s.key for s in missing if ran_out(s, known_at, now)}
    if not lapsed:
        return missing, 0
    fresh: dict[SessionKey, NatSession] = {}
    if folded:
        with ph.step("re-read-source"):
            fresh = {s.key: s for s in src.get_sessions("running") if s.key in lapsed}
        lapsed -= fresh.keys()
    return [fresh.get(s.key, s) for s in missing if s.key not in lapsed], len(lapsed)


def source_final(ctx: Context, stats: dict[str, Any] | None) -> list[NatSession] | None:
    """The frozen source's table as the snapshot and every event imply it, when its digest proves it; else None.

    The source computes the digest of its real table (nat-statistics);
    the controller computes it over the snapshot folded with every event
    received.  Equal digests mean equal tables: every key and mapping.
    Any difference (a notification still on its way, in either
    direction) is answered by a full re-read of the source.
    """
    # Late notifications after the settle are folded in too.
    late = ctx.sub.drain() if ctx.sub is not None else []
    ctx.events += late
    ctx.report.events += len(late)
    snapshot = source_snapshot(ctx)
    if stats is None or "sessions" not in stats or snapshot is None:
        ctx.report.source_check = "read"
        return None
    implied = expected_table(snapshot, ctx.events)
    # The count alone would miss a created and a destroyed notification
    # both still on their way (they cancel out); the digest covers every
    # key and mapping, so only an equal table passes.
    if stats.get("digest") != table_digest(implied.values()):
        log.info("source holds %d sessions (digest %s), snapshot and events imply %d: re-reading it",
                 stats["sessions"], stats.get("digest"), len(implied))
        ctx.report.source_check = "read"
        return None
    ctx.report.source_check = "digest"
    return list(implied.values())


def source_snapshot(ctx: Context) -> list[NatSession] | None:
    """The snapshot, decoded (once) when the copy forwarded it as text; None when it was forwarded and not kept."""
    if ctx.snapshot_lost:
        return None
    if ctx.snapshot_text is not None:
        ctx.snapshot, ctx.snapshot_text = ctx.snapshot_text.sessions(), None
    return ctx.snapshot


def ran_out(s: NatSession, read_at: float, checked_at: float) -> bool:
    """Whether ``s``, read with its remaining ``timeout`` before ``read_at``, had certainly timed out by ``checked_at`` (perf_counter times).

    One second of slack: the kernel counts timeouts in whole seconds.
    """
    return s.timeout is not None and read_at + s.timeout + 1 <= checked_at
