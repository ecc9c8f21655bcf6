"""What the NAT migration's report says at the end: what it did on each node, and each node and the switch as read back now."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from ..errors import NatmigError
from .migcontext import Context
from .readback import read_node
from .txn import describe_error


def describe_success(ctx: Context) -> None:
    """What a migration that succeeded did on each node, in words."""
    r = ctx.report
    retired = {"delete": "retired: its sessions removed, admission reopened", "keep": "retired: sessions kept, admission reopened", "stop": "stopped"}[ctx.opt.retire]
    ctx.actions[ctx.source.name].append(retired)
    ctx.actions[ctx.target.name].append(f"{r.verified} sessions verified, admission opened")


def read_back(ctx: Context) -> None:
    """What the report says of each node and of the switch, read from them now: never what the code assumes it did."""
    r = ctx.report
    try:
        active = ctx.steering.active()
    except NatmigError as e:
        active = None
        r.notes.append(f"the switch could not be read back: {describe_error(e)}")
    r.traffic_on = active or "unknown"

    with ThreadPoolExecutor(2) as pool:
        views = list(pool.map(lambda x: read_node(*x), (
            (ctx.source.name, "source", ctx.src), (ctx.target.name, "target", ctx.tgt))))
    for v in views:
        carries = active == v.name
        if v.reachable:
            r.readback[v.name] = {"admits": v.admits, "sessions": v.sessions, "carries_traffic": carries}
        done = ctx.actions[v.name] or (["unchanged"] if not r.ok else [])
        r.node_state[v.name] = "; ".join([v.words(carries)] + done)
    if not r.ok and any(v.get("admits") is False for v in r.readback.values()):
        r.notes.append(f"a node still refuses new sessions: `{ctx.opt.recover_hint}` reopens it (or wait {ctx.opt.confirm_timeout:g} s for its rollback)")
