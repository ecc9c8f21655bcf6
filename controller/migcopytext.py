"""The copy into an idle target that forwards the source's entries as the text it sent (see :mod:`natmig.wire.nattext`)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

from ..errors import ControllerError
from .chunkfeed import SliceFeed, WriteWindow, feed_chunks
from .migcontext import Context
from .migstrategy import SessionCopy, commit_copy, copy_decoded
from .nodeproto import TABLE_TEXT, TEXT_EDIT, TableReader, TextTarget
from .plan import CopyPlan, PlanError, foreign_addresses
from ..wire.nattext import EntryStream, ForwardedEntries, TextTable

#: Slices sent to the target and not yet answered (each up to copy_chunk entries, ~9 MB at 25,000).
WRITES_AHEAD = 3


class ForwardedText(SessionCopy):
    """Into an idle target, the source's entries forwarded undecoded while they arrive (see :func:`copy_text`)."""

    name = "forwarded-text"
    source_features = frozenset({TABLE_TEXT})
    target_features = frozenset({TEXT_EDIT})
    idle_only = True

    def copy(self, ctx: Context, ph: Any) -> None:
        src, tgt = ctx.src, ctx.tgt
        assert src is not None and tgt is not None
        copy_text(ctx, ph, cast(TableReader, src), cast(TextTarget, tgt))


def copy_text(ctx: Context, ph: Any, src: Any, tgt: Any) -> None:
    """The copy into an idle target, the source's entries forwarded as the text it sent (see :mod:`natmig.wire.nattext`).

    The source's agent sends its table while it reads it from the kernel
    (a reply in many chunks); slices of whole entries go on to the target
    as they arrive, so the source's read, the transfer and the target's
    checks overlap (:class:`natmig.wire.nattext.EntryStream`).  The target's agent
    validates every entry, and nothing reaches its running datastore
    before the commit.  A reply in another form than the codec's own is
    decoded in full instead, as the streamed copy does.

    The reply is not kept here (only its count, public addresses and
    keys: :class:`natmig.wire.nattext.ForwardedEntries`), and at most
    :data:`~.chunkfeed.CHUNKS_QUEUED` chunks and :data:`WRITES_AHEAD` slices wait at
    once: when the target falls behind, the rest of the reply waits in
    the source's SSH window, not in this process.  At 1,000,000 sessions
    the controller held the reply as bytes, as text and as queued
    slices: 1.5 GB.
    """
    codec = src.codec
    stream = EntryStream(codec.schema.list_name, first=min(1000, ctx.opt.copy_chunk), most=ctx.opt.copy_chunk)
    sent = ForwardedEntries(codec)
    plain = True
    # Set before any write: a failure from here on discards the candidate.
    ctx.st.target_candidate_dirty = True
    with ThreadPoolExecutor(2) as pool:
        window = WriteWindow(pool, WRITES_AHEAD)

        def send(parts: list[str]) -> bool:
            """Check and send slices; False once nothing more may be sent."""
            nonlocal plain
            for part in parts:
                if not TextTable.plain_in(codec, part) or not sent.add(part):
                    plain = False
                    return False
                if foreign_addresses(sent.addresses, ctx.target.public):
                    return False  # refused below, before this slice is sent
                if not window.submit(tgt.edit_text, part, "candidate"):
                    return False  # the target refused a slice: no use sending on
            return True

        feed = SliceFeed(stream, send)
        with ph.step("get-config"):
            reply = feed_chunks(lambda put: src.read_table("running", put, keep=False), feed.take)
            ctx.snapshot_at = time.perf_counter()
            if not reply.tapped:
                feed.going = send(stream.feed(reply.raw.encode()))
            elif stream.fed != reply.received:
                raise ControllerError("the source's reply differs from the chunks it arrived in; nothing committed")
        # Recorded before the commit: what a failure after it removes.
        ctx.st.added_table = sent
        whole = None if reply.elided else reply
        with ph.step("edit-config"):
            if feed.going:
                rest = stream.finish()
                if rest is None:
                    # The body was not cut while it arrived (an empty <data/>, another spelling): from the whole reply.
                    whole = whole or src.read_table("running")
                    table = TextTable.of(whole.raw, codec)
                    if table is None:
                        plain = False
                    else:
                        send(table.slices(4, ctx.opt.copy_chunk))
                else:
                    send(rest)
            window.finish()
    if not plain:
        # Another spelling than the codec's: decode the whole reply (read
        # again when it was not kept) and write it all again (a merge of
        # what is already in the candidate changes nothing); its keys are
        # then known decoded.
        ctx.st.added_table = None
        copy_decoded(ctx, ph, whole or src.read_table("running"), tgt)
        return
    # The snapshot as text, for verify when the digests differ; not kept when it was only forwarded.
    ctx.snapshot_text = whole
    ctx.snapshot_lost = whole is None
    with ph.step("plan"):
        # The whole snapshot's plan, before anything is committed.
        conflicts = foreign_addresses(sent.addresses, ctx.target.public)
        if conflicts:
            raise PlanError(conflicts)
        ctx.plan = CopyPlan([], frozenset(), 0)
    with ph.step("commit"):
        commit_copy(ctx, tgt)
    ctx.report.copied = sent.count
