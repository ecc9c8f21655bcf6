"""The copy strategies that decode the source's sessions, their common base, and the copy's confirmed commit.

- :class:`Planned`: the snapshot read whole, planned against what the target
  holds (it may hold sessions: compatible ones are kept), then written in
  chunks into its candidate;
- :class:`Streamed`: into an idle target, the source's reply decoded slice
  by slice while the target writes the previous one (a client that declares
  ``CHUNKS``).

The forwarded-text copy is :mod:`.migcopytext`; which one runs,
:func:`~.migcopy.choose_copy`.
"""

from __future__ import annotations

import abc
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ClassVar, Iterator, cast

from ..errors import ControllerError
from ..model import NatSession
from .migcontext import Context
from .nodeproto import CHUNKS, ChunkSource, Node, has
from .phase import CopyStrategy
from .plan import plan_copy


class SessionCopy(CopyStrategy):
    """One way of copying the source's snapshot into the target's candidate and committing it (confirmed).

    ``source_features``/``target_features``: what the two clients must declare
    (:mod:`.nodeproto`); ``idle_only``: only into a target that holds no session.
    """

    source_features: ClassVar[frozenset[str]] = frozenset()
    target_features: ClassVar[frozenset[str]] = frozenset()
    idle_only: ClassVar[bool] = False

    @classmethod
    def fits(cls, src: Node, tgt: Node, target_idle: bool) -> bool:
        """Whether this copy can run between these two clients into a target that is idle or not."""
        return ((target_idle or not cls.idle_only) and all(has(src, f) for f in cls.source_features)
                and all(has(tgt, f) for f in cls.target_features))

    @abc.abstractmethod
    def copy(self, ctx: Context, ph: Any) -> None:
        """Copy and commit; ``ctx.plan``, ``ctx.st`` (what a rollback removes) and ``report.copied`` set."""


class Planned(SessionCopy):
    """The snapshot decoded whole, planned against the target's sessions, written in chunks: any target, any client."""

    name = "planned"

    def copy(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        with ph.step("get-config"):
            ctx.snapshot = src.get_sessions("running")
        ctx.snapshot_at = time.perf_counter()
        with ph.step("plan"):
            ctx.plan = plan_copy(ctx.snapshot, ctx.target_before, ctx.target.public)
            ctx.st.added = ctx.plan.added_keys
        with ph.step("edit-config"):
            ctx.st.target_candidate_dirty = True
            # Several edit-configs into the candidate, one commit: still all or
            # nothing on running.  Since the client sends in linear time the
            # chunk size barely matters for speed (100k entries: 2.1 s as one
            # request or as four of 25k); chunks bound the text held at once.
            ss, n = ctx.plan.sessions, ctx.opt.copy_chunk
            for i in range(0, len(ss), n):
                tgt.edit_sessions(ss[i:i + n], target="candidate", operation="merge")
        with ph.step("commit"):
            commit_copy(ctx, tgt)
        ctx.report.copied = len(ctx.plan.sessions)


class Streamed(SessionCopy):
    """Into an idle target, each slice of the source's reply decoded while the target writes the previous one."""

    name = "streamed"
    source_features = frozenset({CHUNKS})
    idle_only = True

    def copy(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        copy_streamed(ctx, ph, cast(ChunkSource, src).session_chunks, tgt)


def copy_streamed(ctx: Context, ph: Any, chunks: Callable[..., Iterator[list[NatSession]]], tgt: Node) -> None:
    """The copy into an idle target, the snapshot decoded while the target writes it.

    The controller decodes one slice of the source's reply while the
    target's agent (another process) decodes and checks the previous one
    into its candidate (100k sessions: get-config and edit-config
    3.7 s -> 3.1 s).  Nothing reaches running before the plan of the
    whole snapshot has passed and the commit is sent; when the plan
    fails, recovery discards the candidate.
    """
    with ph.step("get-config"):
        # A table smaller than four chunks is still cut in four: the
        # overlap then pays at 10k too (copy ~590 -> ~535 ms).
        parts = chunks("running", ctx.opt.copy_chunk, pieces=4)
    ctx.snapshot_at = time.perf_counter()
    sent: list[NatSession] = []
    with ph.step("decode+edit-config"):
        ctx.st.target_candidate_dirty = True
        with ThreadPoolExecutor(1) as pool:
            writes = []
            for part in parts:
                ctx.snapshot += part
                sent += part
                # Recorded before the write: a write whose reply is lost may still have happened.
                ctx.st.added += [s.key for s in part]
                writes.append(pool.submit(tgt.edit_sessions, part, target="candidate", operation="merge"))
                if any(w.done() and w.exception() is not None for w in writes):
                    break  # the target refused a slice: no use decoding on
            for w in writes:
                w.result()
    with ph.step("plan"):
        ctx.plan = plan_copy(ctx.snapshot, ctx.target_before, ctx.target.public)
        if ctx.plan.sessions != sent:
            raise ControllerError("the sessions written to the candidate differ from the copy plan; nothing committed")
        ctx.st.added = ctx.plan.added_keys
    with ph.step("commit"):
        commit_copy(ctx, tgt)
    ctx.report.copied = len(ctx.plan.sessions)


def copy_decoded(ctx: Context, ph: Any, reply: Any, tgt: Any) -> None:
    """The streamed copy of a reply decoded whole by the codec (a form the text copy does not forward)."""
    sessions = reply.sessions()
    copy_streamed(ctx, ph, lambda _src, size, pieces=1: (sessions[i:i + size] for i in range(0, len(sessions), size)), tgt)


def commit_copy(ctx: Context, tgt: Node) -> None:
    """Commit the copy as a persistent confirmed commit: the target's agent removes it by itself unless confirmed.

    It is confirmed just before the switch (:func:`~.migcatchup.confirm_and_hold`),
    when the target holds every session of the frozen source; a
    controller that dies before leaves no copy behind.
    """
    # Marked before the call: a commit whose reply is lost may have happened.
    ctx.st.copy_pending = True
    tgt.commit(confirmed=True, timeout=ctx.opt.confirm_timeout, persist=ctx.token)
    ctx.st.target_candidate_dirty = False
