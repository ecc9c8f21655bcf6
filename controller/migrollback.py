"""The NAT migration's rollback: what has changed so far (:class:`State`), and how a failure undoes it (:func:`recover`).

What is undone before and after the switch: the module docstring of
:mod:`.migrate` ("Failure handling").  What the agents hold pending (the
copy, the freeze, the hold) is cancelled here; what cannot be reached rolls
back by itself within ``confirm_timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import NatmigError
from ..model import SessionKey
from ..wire.nattext import ForwardedEntries
from .txn import cancel_pending, describe_error

if TYPE_CHECKING:
    from .migcontext import Context


@dataclass
class State:
    """What has been changed so far: what a rollback must undo."""

    target_candidate_dirty: bool = False
    added: list[SessionKey] = field(default_factory=list)
    #: a copy forwarded as text adds every entry of this table (its keys are read from the text only if a rollback needs them)
    added_table: ForwardedEntries | None = None
    target_admission: bool | None = None  # the value before we changed it
    source_admission: bool | None = None
    switched: bool = False
    committed: bool = False  # the target admits: the move is done, never undone
    #: confirmed commits pending on each node (rolled back by the agent unless confirmed)
    copy_pending: bool = False  # the target's copy
    target_hold: bool = False  # the target's closed admission
    source_frozen: bool = False  # the source's closed admission


def recover(ctx: Context) -> None:
    """Put traffic where it works and undo what this migration changed (best effort, every step reported).

    What the agents hold pending (the copy, the freeze, the hold) is
    cancelled now; what cannot be reached rolls back by itself within
    ``confirm_timeout``.
    """
    st = ctx.st
    for f in (ctx.source_digest, ctx.target_digest, ctx.reopen):
        # Requests still in flight on the sessions recovery is about to use: let them finish.
        if f is not None:
            try:
                f.result()
            except Exception:  # noqa: BLE001 - only waited for; its outcome is read back below
                pass
    ctx.source_digest = ctx.target_digest = None
    if ctx.digest_pool is not None:
        ctx.digest_pool.shutdown(wait=False)
    src, tgt = ctx.src, ctx.tgt
    later = f"the agent rolls it back by itself within {ctx.opt.confirm_timeout:g} s"
    if st.committed:
        # Only the retirement failed: the move stands.
        if src is not None and st.source_frozen:
            try:
                ctx.thaw(src)
                ctx.actions[ctx.source.name].append("freeze cancelled, admission restored")
            except NatmigError as e:
                ctx.actions[ctx.source.name].append(f"freeze not cancelled ({describe_error(e)}); {later}")
        ctx.actions[ctx.source.name].append("retirement failed")
        return
    src_do, tgt_do = ctx.actions[ctx.source.name], ctx.actions[ctx.target.name]
    back = True
    if st.switched:
        try:
            ctx.steering.point_to(ctx.source.name)
            src_do.append("traffic pointed back to it")
        except NatmigError as e:
            back = False
            src_do.append(f"could NOT point traffic back ({describe_error(e)})")
    if st.source_frozen:
        if src is None:
            src_do.append(f"unreachable: its freeze is pending, {later}")
        else:
            try:
                cancel_pending(src, ctx.token)
                st.source_frozen = False
                src_do.append("freeze cancelled, admission restored")
            except NatmigError as e:
                src_do.append(f"freeze could NOT be cancelled now ({describe_error(e)}); {later}")
    if tgt is None:
        if ctx.report.failed_phase != "preflight":
            tgt_do.append(f"unreachable: anything pending there, {later}")
        return
    if st.target_candidate_dirty:
        try:
            tgt.discard()
            tgt_do.append("candidate discarded")
        except NatmigError as e:
            tgt_do.append(f"candidate could not be discarded ({describe_error(e)})")
    if st.copy_pending or st.target_hold:
        what = "copy rolled back" if st.copy_pending else "hold cancelled"
        try:
            cancel_pending(tgt, ctx.token)
            st.target_hold = False
            tgt_do.append(what)
        except NatmigError as e:
            tgt_do.append(f"{what.split()[0]} NOT cancelled now ({describe_error(e)}); {later}")
    # Sessions the copy wrote for good (confirmed before the switch),
    # caught up from events or reconciled: removed while traffic is on the source.
    added = list(st.added)
    if not st.copy_pending and st.added_table is not None:
        # Keys caught up from events may also be in the forwarded table: each once.
        added = list(dict.fromkeys(added + st.added_table.keys()))
    if st.copy_pending:
        st.copy_pending = False  # cancelled above, or rolling back by itself
    if added and back:
        try:
            ctx.delete(tgt, added)
            tgt_do.append(f"the {len(added)} sessions copied to it removed")
        except NatmigError as e:
            tgt_do.append(f"the {len(added)} sessions copied to it may remain ({describe_error(e)})")
