"""The NAT migration's copy phase, and the one choice of how it copies.

The copy strategy follows what the two clients declare (``features``, see
:mod:`.nodeproto`) and whether the target holds sessions, never a probe for
methods: the first of :data:`STRATEGIES` that fits runs.
"""

from __future__ import annotations

from typing import Any

from .migcontext import Context, MigrationPhase
from .migcopytext import ForwardedText
from .migstrategy import Planned, SessionCopy, Streamed
from .nodeproto import Node
from .txn import CANDIDATE, CONFIRMED_COMMIT

#: In order of preference: forwarded undecoded, streamed while decoded, decoded whole and planned (any target).
STRATEGIES: tuple[type[SessionCopy], ...] = (ForwardedText, Streamed, Planned)


def choose_copy(src: Node, tgt: Node, target_idle: bool) -> SessionCopy:
    """The copy for these two clients into a target that holds no session (``target_idle``) or some."""
    return next(s for s in STRATEGIES if s.fits(src, tgt, target_idle))()


class Copy(MigrationPhase):
    """get-config the source, plan (the target must be idle or compatible), edit-config the snapshot into the
    target's candidate and commit it (a persistent confirmed commit, confirmed at the catch-up)."""

    name = "copy"
    needs = frozenset({CANDIDATE, CONFIRMED_COMMIT})

    def run(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        assert ctx.sub is not None  # subscribed in preflight, before the snapshot
        choose_copy(src, tgt, not ctx.target_before).copy(ctx, ph)
