"""The three floors natmig's migration is measured against, each on the table nat1 holds, each ending switched to nat2.

- tool floor: ``conntrack -L -o save`` in nat1, ``conntrack -R`` in nat2, one bundle;
- kernel floor: natmig's own ctnetlink paths without NETCONF, SSH, XML or
  checks: a binary dump of nat1, batched creates in nat2, one bundle;
- peer: conntrackd in both nodes (FTFW over a sync veth): its sync of the
  table, then ``conntrackd -c`` in nat2 and one bundle.

Each returns seconds by step and what it moved; the caller points traffic
back to nat1 and empties nat2 between them.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from natmig.agent import ctevents  # noqa: F401 -- the dump's decoder imports it at its first call: not inside the timed dump
from natmig.agent.ctbulk import create_sessions
from natmig.agent.ctnetlink import untranslated
from natmig.agent.ctread import EntryReader
from natmig.errors import NatmigError
from natmig.testbed.bed import Testbed
from natmig.testbed.conntrackd import ConntrackdPair


def tool_floor(tb: Testbed) -> dict[str, float]:
    """Dump nat1, restore into nat2, move the flows: the same work with the bare tools."""
    t0 = time.perf_counter()
    dump = tb.exec("nat1", ["conntrack", "-L", "-o", "save"], timeout=600).stdout
    t1 = time.perf_counter()
    tb.exec("nat2", ["conntrack", "-R", "-"], input=dump, timeout=600)
    t2 = time.perf_counter()
    tb.point_to("nat2")
    t3 = time.perf_counter()
    entries = sum(1 for line in dump.splitlines() if line.startswith("-A"))
    return {"dump": t1 - t0, "restore": t2 - t1, "bundle": t3 - t2, "total": t3 - t0, "entries": entries}


def kernel_floor(tb: Testbed) -> dict[str, float | int]:
    """The same move at the kernel's speed: a ctnetlink dump of nat1, ctnetlink creates in nat2, one bundle.

    The dump is :meth:`EntryReader.flows` (binary, decoded straight into
    sessions; no text), the creates :func:`create_sessions` (batched, one
    precompiled struct per message), both what natmig's agent itself uses.
    Only translated entries move, as natmig's list holds only those (the
    agents' own management connections are not sessions).
    """
    reader = EntryReader(tb.netns("nat1"))
    t0 = time.perf_counter()
    try:
        sessions = [s for s in reader.flows() if not untranslated(s)]
    finally:
        reader.close()
    t1 = time.perf_counter()
    # What is left of each entry's life, as the dump read it (never 0: the kernel refuses that).
    refused = create_sessions(tb.netns("nat2"), [(s, max(1, s.timeout or 1)) for s in sessions])
    t2 = time.perf_counter()
    tb.point_to("nat2")
    t3 = time.perf_counter()
    return {"dump": t1 - t0, "create": t2 - t1, "bundle": t3 - t2, "total": t3 - t0, "entries": len(sessions), "refused": len(refused)}


def conntrackd_floor(tb: Testbed, entries: int) -> tuple[dict[str, Any] | None, str | None]:
    """conntrackd between nat1 and nat2: (figures, None), or (None, why it could not run).

    Started after the table is loaded, each daemon reads its own kernel's
    table (``startup``: the sync veth, both daemons, until nat1's daemon
    holds ``entries``; a running peer has done it long before); ``sync`` is
    a bulk from nat1's daemon (``conntrackd -B``) until nat2's external cache
    holds ``entries``: what its sync needs to bring the table over.  Then
    from "sync complete" to "committed and switched": ``commit``
    (``conntrackd -c`` in nat2, the command's wall time) and ``bundle``;
    ``total`` is those two, the figure to compare natmig's blackout with.
    Its daemons are stopped (by pid) before this returns, so they cost
    natmig's run nothing.  The management network is not synced.
    """
    if shutil.which("conntrackd") is None:
        return None, "conntrackd is not installed (make system installs it)"
    pair = ConntrackdPair(tb.netns("nat1"), tb.netns("nat2"), tb.home / "conntrackd", ignore=(str(tb.topology.management.subnet),))
    try:
        t0 = time.perf_counter()
        with pair:
            pair.wait_internal("a", entries, timeout=600)
            startup = time.perf_counter() - t0
            sync = pair.sync(entries, timeout=600)
            commit, committed, logged = pair.commit(timeout=600)
            t = time.perf_counter()
            tb.point_to("nat2")
            bundle = time.perf_counter() - t
    except NatmigError as e:
        return None, str(e)
    return {"startup": startup, "sync": sync, "commit": commit, "bundle": bundle, "total": commit + bundle,
            "commit_logged": logged, "entries": committed}, None
