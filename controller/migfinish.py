"""The NAT migration's last three phases: the switch, the target's admission, the source's retirement.

``switch``: one atomic OpenFlow bundle moves both directions to the target.
``admit``: open admission on the target; from here the move is never undone.
``retire``: remove the source's sessions and reopen its admission
(``delete``), only reopen it (``keep``), or stop the node (``stop``).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import ControllerError, NatmigError
from .migcontext import Context, MigrationPhase
from .txn import confirm_admission, nothing_pending


class Switch(MigrationPhase):
    """Traffic onto the target through the steering (checked alive first when state was copied)."""

    name = "switch"

    def run(self, ctx: Context, ph: Any) -> None:
        if ctx.opt.copy_state:
            # Checked again at the last moment: a node lost since the catch-up ended must not get traffic.
            ctx.check_alive()
        # Marked switched before the call: if the switch fails half-way (one
        # bundle cannot; across several switches the steering undoes its
        # steps) the rollback still points back.
        ctx.st.switched = True
        with ph.step("flows"):
            ctx.steering.point_to(ctx.target.name)


class Admit(MigrationPhase):
    """The target admits new sessions (its hold confirmed open); the source's thaw starts meanwhile."""

    name = "admit"

    def run(self, ctx: Context, ph: Any) -> None:
        tgt, src = ctx.tgt, ctx.src
        assert tgt is not None and src is not None
        # The source's freeze is undone meanwhile, on its own session, when
        # retirement will reopen it anyway (it carries no traffic now).  Its
        # outcome belongs to the retire phase, which waits for it: a failure
        # there never moves traffic back.
        if ctx.opt.retire != "stop" and ctx.st.source_frozen:
            pool = ThreadPoolExecutor(1)
            ctx.reopen = pool.submit(ctx.thaw, src)
            pool.shutdown(wait=False)
        if ctx.st.target_hold:
            try:
                confirm_admission(tgt, True, ctx.token)
            except NatmigError as e:
                if not nothing_pending(e):
                    raise
                # The hold outlived confirm_timeout and the agent rolled it
                # back (the target admits already): open it for good.
                ctx.report.notes.append(f"the target's hold had rolled back by itself before the admit (confirm_timeout {ctx.opt.confirm_timeout} s is short for this migration)")
                tgt.set_admission(True)
            ctx.st.target_hold = False
        else:
            tgt.set_admission(True)
        if ctx.report.hold_started is not None:
            ctx.report.hold_ended = time.perf_counter()
        # From here the target may create sessions the source never had:
        # pointing traffic back would lose them, so nothing below undoes the move.
        ctx.st.committed = True


class Retire(MigrationPhase):
    """The source's sessions deleted (or kept) and its admission reopened, or the source stopped."""

    name = "retire"

    def run(self, ctx: Context, ph: Any) -> None:
        src = ctx.src
        assert src is not None
        mode = ctx.opt.retire
        if mode == "stop":
            if ctx.source.stop is None:
                raise ControllerError(f"retire=stop: no way to stop {ctx.source.name} is configured")
            ctx.source.stop()
            return
        if ctx.reopen is not None:
            with ph.step("reopen"):
                ctx.reopen.result()  # started with admit; waited for before anything else on that session
        elif ctx.st.source_frozen:
            with ph.step("reopen"):
                ctx.thaw(src)
        if mode == "delete":
            with ph.step("delete"):
                ctx.delete(src, None)
                ctx.report.retired = ctx.report.verified if ctx.opt.copy_state else 0
