"""How the generic engine's copy gets each state list from the source into the target's candidate, and back out of the
source when it retires.

Two strategies, each a class of its own:

- :class:`WholeLists`: each list read whole with get-config, decoded, and
  written with one edit-config (a merge of whole entries, every leaf sent);
- :class:`ForwardedLists` (the default): a list the target holds none of
  is forwarded as the text the source sent, slice by slice while it
  arrives (:mod:`natmig.wire.slices`); any other list goes as above.

Forwarding is exact only into an empty list: a merge of an entry in trim
mode (RFC 6243: leaves at their default left out) would leave a leaf of an
entry the target already holds as it was.  Whether the target's list is
empty is what it reported in preflight, under the migration's locks.  The
target's agent validates every entry either way; what the controller keeps
of a forwarded list is its count and its keys as removal text (what a
retire deletes), not its entries, so the catch-up and the verify of such a
list rest on the agents' own digests (:mod:`.enginecatchup`, :mod:`.engine`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable

from ..errors import ControllerError
from ..statemodel import Entry, StateList
from ..wire.slices import EntryStream, ListText
from .chunkfeed import SliceFeed, WriteWindow, feed_chunks
from .enginecontext import Context, CopyStrategy

#: Slices sent to the target and not yet answered: one it works on, one waiting (see ForwardedLists).
WRITES_AHEAD = 2


class WholeLists(CopyStrategy):
    """Each list read whole with get-config, written with one edit-config (merge of whole entries)."""

    name = "whole-lists"

    def copy(self, ctx: Context) -> dict[StateList, list[Entry]]:
        return {lst: copy_whole(ctx, lst) for lst in ctx.lists}


def copy_whole(ctx: Context, lst: StateList) -> list[Entry]:
    """One list read and decoded, then written whole into the target's candidate; its entries."""
    entries = ctx.source.read(lst)
    ctx.renew()
    ctx.target.write(lst, entries)
    ctx.renew()
    return entries


class ForwardedLists(CopyStrategy):
    """Into a target that holds none of a list, the list forwarded as the source's text, undecoded, while it arrives.

    The source's agent sends a large list in many chunks while it reads it;
    slices of whole entries go on to the target as they come (at most
    :data:`WRITES_AHEAD` unanswered), so the source's read, the transfer and
    the target's checks overlap.  The reply is not kept: at most
    :data:`~.chunkfeed.CHUNKS_QUEUED` chunks wait here, and when the target falls behind,
    the rest waits in the source's SSH window (:mod:`.chunkfeed`).  A list whose text is not
    plain (:class:`~natmig.wire.slices.ListText`), and a list the target
    already holds entries of, is copied whole and decoded instead; what was
    forwarded of it before is merged again, which changes nothing.
    """

    name = "forwarded"

    def __init__(self, first: int = 1000, most: int = 6_000) -> None:
        # The target is the copy's slowest stage: its checks (~8-9 us an
        # entry) share two cores with the source's read and the controller,
        # so it falls behind by what may wait for it, and what waits when the
        # source is done it works through alone, the other core idle.  Slices
        # of at most 6,000 with one waiting, instead of 25,000 with two: a
        # 100k move 2,555 ms against 2,671 (bench_migrate, 8 runs each,
        # alternating; docs/controller.md).  An edit-config costs the target
        # its slice only (the candidate's reply index), so more of them cost
        # little: 1M in 29.0 s against 28.2 (one run each).
        #: entries in the first slice (the target starts early) and in the largest
        self.first, self.most = first, most

    def copy(self, ctx: Context) -> dict[StateList, list[Entry]]:
        decoded: dict[StateList, list[Entry]] = {}
        for lst in ctx.lists:
            if ctx.target_before.get(lst.qname, (0, ""))[0] == 0 and ListText.forwardable(lst):
                sent = self._forward(ctx, lst)
                ctx.renew()
                if sent is not None:
                    ctx.forwarded[lst] = sent
                    continue
            decoded[lst] = copy_whole(ctx, lst)
        return decoded

    def _forward(self, ctx: Context, lst: StateList) -> ListText | None:
        """``lst`` forwarded slice by slice; None when its text is not plain (the caller copies it decoded)."""
        stream = EntryStream(lst.name, first=min(self.first, self.most), most=self.most)
        sent = ListText(lst)
        plain = True
        with ThreadPoolExecutor(2, thread_name_prefix="natmig-forward") as pool:
            window = WriteWindow(pool, WRITES_AHEAD)

            def send(parts: Iterable[str]) -> bool:
                """Check and send slices; False once nothing more may be sent (a refusal is raised below)."""
                nonlocal plain
                for part in parts:
                    if not sent.add(part):
                        plain = False
                        return False
                    if not window.submit(ctx.target.write_text, part):
                        return False
                return True

            feed = SliceFeed(stream, send)
            reply = feed_chunks(lambda put: ctx.source.read_text(lst, put, False), feed.take)
            if not reply.tapped:
                feed.going = feed.going and send(stream.feed(reply.raw.encode()))
            elif stream.fed != reply.received:
                raise ControllerError(f"{ctx.source.name}: its reply of {lst.qname} differs from the chunks it arrived in; nothing committed")
            if feed.going:
                rest = stream.finish()
                # None: the body was not cut (an empty <data/>, another spelling): the list goes decoded.
                plain = plain and rest is not None and send(rest)
            window.finish()
        return sent if plain else None
