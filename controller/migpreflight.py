"""The NAT migration's first phase: both agents reached, compared and locked, and what the migration starts from read.

Nothing is changed here: a wrong host key, an unreachable agent, another
module revision, a missing capability, a node locked by another migration,
traffic not on the source or a closed admission stop the migration before
anything is written.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Sequence, cast

from ..errors import ControllerError, NatmigError
from .migcontext import Context, MigrationPhase
from .nodeproto import SESSIONS_AND_ADMISSION, BothReader, has
from .phase import Phase, missing_needs
from .txn import CANDIDATE, CONFIRMED_COMMIT, Locks


class Preflight(MigrationPhase):
    """Open the sessions (three at once), compare the modules, check every phase's needs, lock both nodes,
    then read at once the target's table and admission, the source's admission, the switch, and subscribe to the source's events."""

    name = "preflight"
    #: every migration, whatever it copies: what it leaves pending must roll back by itself (persistent
    #: confirmed commits), and it locks both nodes' running and candidate datastores.
    needs = frozenset({CANDIDATE, CONFIRMED_COMMIT})

    def __init__(self, later: Sequence[Phase] = ()) -> None:
        #: the phases that follow this one: both agents must announce what this one and each of them needs
        self.later = later

    def run(self, ctx: Context, ph: Any) -> None:
        with ph.step("connect"):
            # Both in parallel: each is an SSH handshake of ~50-100 ms.
            # The source's second session carries the notifications.
            with ThreadPoolExecutor(3) as pool:
                futures = [
                    ("src", ctx.source, pool.submit(ctx.source.open)),
                    ("tgt", ctx.target, pool.submit(ctx.target.open)),
                ]
                if ctx.opt.copy_state:
                    futures.append(("events_node", ctx.source, pool.submit(ctx.source.open)))
                errors = []
                for attr, ep, f in futures:
                    try:
                        setattr(ctx, attr, f.result())
                    except NatmigError as e:
                        role = "source" if ep is ctx.source else "target"
                        msg = f"{role} {ep.name}: {e}"
                        if msg not in errors:
                            errors.append(msg)
                if errors:
                    raise ControllerError("agent not reachable: " + "; ".join(errors))
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        with ph.step("modules"):
            rs, rt = src.module_revision(), tgt.module_revision()
            if rs is None or rt is None:
                missing = [n.name for n, r in ((ctx.source, rs), (ctx.target, rt)) if r is None]
                raise ControllerError(f"agent(s) {', '.join(missing)} do not announce the nat-session module")
            if rs != rt:
                raise ControllerError(f"nat-session revisions differ: {ctx.source.name} has {rs}, {ctx.target.name} has {rt}")
            for role, ep, node in (("source", ctx.source, src), ("target", ctx.target, tgt)):
                missing = missing_needs([self, *self.later], node.capabilities)
                if missing:
                    raise ControllerError(
                        f"{role} {ep.name} does not announce {', '.join(':' + m for m in missing)}: a migration needs them "
                        "so that the agent undoes by itself what an interrupted migration left")
        with ph.step("lock"):
            # One node after the other, in the order of their names: two
            # migrations that share a node meet at the same first lock, and
            # one of them goes on (locking both at once, each could take one
            # node and both be refused).  A refusal names the holder.
            for role, ep, node in sorted((("source", ctx.source, src), ("target", ctx.target, tgt)), key=lambda x: x[1].name):
                ctx.locks.append(Locks.take(node, role))
        with ph.step("target+source+switch"):
            # Four independent reads at once, each on its own session: the
            # target's table and admission, the source's admission (what the
            # freeze must restore), the switch's active NAT, and the
            # subscription to the source's events (before the snapshot, so no
            # change after it is missed; an older event is harmless to re-apply).
            with ThreadPoolExecutor(3) as pool:
                fs = pool.submit(src.get_admission)
                fw = pool.submit(ctx.steering.active)
                fe = pool.submit(ctx.events_node.subscribe) if ctx.opt.copy_state and ctx.events_node is not None else None
                try:
                    if has(tgt, SESSIONS_AND_ADMISSION):
                        ctx.target_before, ctx.st.target_admission = cast(BothReader, tgt).get_sessions_and_admission("running")
                    else:
                        ctx.target_before = tgt.get_sessions("running")
                        ctx.st.target_admission = tgt.get_admission()
                    # What the exit status compares the read-back count with (report.outcome).
                    ctx.report.target_sessions_before = len(ctx.target_before)
                finally:
                    # Waited for even when the target failed: nothing runs on after the phase.
                    ctx.source_admits = fs.result()
                    active = fw.result()
                    if fe is not None:
                        ctx.sub = fe.result()
        if ctx.source.public is not None and ctx.target.public is not None and not ctx.source.public <= ctx.target.public:
            raise ControllerError(
                f"{ctx.target.name} does not own the public address(es) {', '.join(sorted(ctx.source.public - ctx.target.public))} of {ctx.source.name}"
            )
        fix = ctx.opt.recover_hint
        if active is not None and active != ctx.source.name:
            raise ControllerError(f"traffic goes through {active}, not through the source {ctx.source.name}: "
                                  f"migrate from {active}, or run `{fix}` if an earlier migration was interrupted. Nothing was changed")
        closed = [f"{role} {ep.name}" for role, ep, admits in (("source", ctx.source, ctx.source_admits), ("target", ctx.target, ctx.st.target_admission))
                  if admits is False]
        if closed:
            raise ControllerError(f"{' and '.join(closed)} does not admit new sessions (admission closed): an earlier migration may have been "
                                  f"interrupted, or its rollback is still pending. Nothing was changed; `{fix}` reopens it")
        ph.note(f"revision {rs}; target holds {len(ctx.target_before)} sessions")
