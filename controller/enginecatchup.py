"""The generic engine's catch-up: the source's changes since its read, from its state-change events, onto the target.

The events are followed from before the read (:class:`~.engine.Copy`
subscribes first), so every change the read missed is one of them; one the
read already holds is written again, which changes nothing.  While the source
still serves, the copy writes what its events said so far
(:func:`apply_changes`); once it is frozen, :class:`CatchUp` writes the rest,
until the source's own digests equal what the target will hold.
"""

from __future__ import annotations

import time

from ..errors import ControllerError
from ..statemodel import Entry, Key, StateList
from .enginecontext import Context, Phase, close_events


def apply_changes(ctx: Context, events: list[tuple[StateList, str, Entry]]) -> int:
    """Write ``events`` (created, deleted; an entry that changed is deleted then created) into the target's candidate
    and into what it must hold; how many were applied."""
    # Folded per key (the last event wins), then one write and one remove per list: a burst of
    # events costs a few edit-configs, not one each (1,000 blocked sources at once: 30 s one by one).
    ups: dict[StateList, dict[Key, Entry]] = {}
    gone: dict[StateList, dict[Key, None]] = {}
    n = 0
    for lst, kind, entry in events:
        # A forwarded list's entries are not kept here: only the keys a retire must remove beside the copy.
        table = ctx.expected.get(lst)
        if table is None and lst not in ctx.forwarded:
            continue
        key = lst.key_of(entry)
        if kind == "created":
            if table is not None:
                table[key] = entry
            else:
                ctx.created.setdefault(lst, {})[key] = None
            ups.setdefault(lst, {})[key] = entry
            gone.get(lst, {}).pop(key, None)
        else:
            if table is not None:
                table.pop(key, None)
            else:
                ctx.created.setdefault(lst, {}).pop(key, None)
            ups.get(lst, {}).pop(key, None)
            gone.setdefault(lst, {})[key] = None
        n += 1
    write(ctx, ups, gone)
    return n


def write(ctx: Context, ups: dict[StateList, dict[Key, Entry]], gone: dict[StateList, dict[Key, None]]) -> None:
    """Removals, then writes, into the target where :meth:`~.enginecontext.Context.changes_to` says (what is created
    straight in running is recorded for an undo)."""
    where = ctx.changes_to()
    # Removals first: what a gone entry held (a unique value) is then free for the writes.
    for lst, keys in gone.items():
        ctx.target.remove(lst, list(keys), target=where)
        if where == "running":
            for k in keys:
                ctx.direct.get(lst, {}).pop(k, None)
    for lst, entries in ups.items():
        ctx.target.write(lst, list(entries.values()), target=where)
        if where == "running":
            ctx.direct.setdefault(lst, {}).update(dict.fromkeys(entries))


def commit_changes(ctx: Context) -> str:
    """What :func:`write` left in the target's candidate committed, as a follow-up of the copy's series; how, for the
    report."""
    if ctx.changes_to() == "running":
        return f"written into {ctx.target.name}'s running (no commit)"
    started = time.monotonic()
    ctx.follow_up(ctx.target)
    return f"target committed in {(time.monotonic() - started) * 1000:.0f} ms (a follow-up of the copy's confirmed commit)"


def reread(ctx: Context, lst: StateList) -> int:
    """Read ``lst`` from the source again and write into the target's candidate how it differs; how many entries."""
    now = {lst.key_of(e): e for e in ctx.source.read(lst)}
    old = ctx.expected[lst]
    upserts = {k: e for k, e in now.items() if old.get(k) != e}
    gone = dict.fromkeys(k for k in old if k not in now)
    write(ctx, {lst: upserts}, {lst: gone})
    ctx.expected[lst] = now
    return len(upserts) + len(gone)


def reconcile(ctx: Context, lst: StateList, want: tuple[int, str] | None) -> int:
    """A forwarded list whose digest on the target is not the frozen source's (``want``): both read, and what the target
    lacks or holds beyond the source written into its candidate and committed, a follow-up of the copy's series (an
    event the catch-up never got, an entry that ended by itself while the source was frozen); how many entries.  Raises
    when the digests still differ."""
    src = {lst.key_of(e): e for e in ctx.source.read(lst)}
    ctx.renew()
    tgt = {lst.key_of(e): e for e in ctx.target.read(lst)}
    # The key and mandatory leaves (the digest's): others may change on a live node by themselves.
    idx = [i for i, s in enumerate(lst.leaves) if s.mandatory]
    gone = dict.fromkeys(k for k in tgt if k not in src)
    ups = {k: e for k, e in src.items() if k not in tgt or any(e[i] != tgt[k][i] for i in idx)}
    write(ctx, {lst: ups}, {lst: gone})
    ctx.created.setdefault(lst, {}).update(dict.fromkeys(ups))
    if gone or ups:
        commit_changes(ctx)
    got = ctx.target.statistics().get(lst.qname)
    if got != want:
        raise ControllerError(f"{ctx.target.name}: {lst.qname} is not the frozen source's after writing {len(ups)} and removing "
                              f"{len(gone)} entries: the source reports {want[0] if want else 'no'} entries, digest {want[1] if want else '-'}; "
                              f"the target {got[0] if got else 'no'}, digest {got[1] if got else '-'}")
    return len(gone) + len(ups)


class CatchUp(Phase):
    """The frozen source's changes since the read (its state-change events) onto the target's candidate, until its
    digests agree; then a follow-up of the copy's persistent confirmed commit (the last changes only).

    A frozen source creates no entries, but entries still end (closed, expired) and a function
    may change what it holds by itself; after a copy while it served, the events of its last
    moments before the freeze arrive here too.  Its own digest says when the copy is complete;
    when the events do not explain a difference within ``settle_max`` (an agent that does not
    send state-change), the lists that differ are read again.
    """

    name = "catch-up"

    def __init__(self, settle: float = 0.02, settle_max: float = 0.5) -> None:
        self.settle, self.settle_max = settle, settle_max

    def run(self, ctx: Context) -> str:
        applied = again = 0
        deadline = time.monotonic() + self.settle_max
        while True:
            events = ctx.events.changes(self.settle) if ctx.events is not None else []
            if events:
                applied += apply_changes(ctx, events)
                continue  # until the source is quiet for `settle`
            stats = ctx.source.statistics()
            differ = [l for l, t in ctx.expected.items() if stats.get(l.qname) != (len(t), l.digest(t.values()))]
            if not differ:
                break
            if time.monotonic() >= deadline:
                for lst in differ:
                    again += reread(ctx, lst)
                break
        close_events(ctx)  # the source is frozen and caught up: verify compares its digests, no event is needed
        early = f" (and {ctx.early} before the freeze, in copy)" if ctx.early else ""
        done = f"{applied} changes from events{early}, {again} from a re-read"
        if not applied and not again:
            return f"{done}; nothing left to commit (the copy was committed in copy)"
        # The last changes only: the copy itself was committed by Copy (while the source served, by default).
        return f"{done}; {commit_changes(ctx)}"

    def undo(self, ctx: Context) -> str | None:
        return f"{ctx.target.name}: copy and catch-up cancelled" if ctx.cancel_target() else None
