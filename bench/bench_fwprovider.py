"""Benchmark: the firewall provider's read and apply at 10,000 sessions and 1,000 blocked sources (root).

Two firewall nodes (namespaces with veth legs to nowhere; no traffic): the entries
are applied into node a (the sessions as ctnetlink creates, the sources
as one nft transaction), read back, and applied into an empty node b, as
a migration's copy does.  Beside them, the tools' own floor: `conntrack -L`
of the same table and `nft -j list set` of the same set.  Median of REPEAT.

    python bench/bench_fwprovider.py [--sessions N] [--blocked M]
"""

from __future__ import annotations

import argparse
import statistics
import time

from natmig import netns
from natmig.agent.fwnode import FwNode, FwNodeConfig
from natmig.agent.natnode import ensure_conntrack_capacity
from natmig.agent.fwprovider import FirewallProvider
from natmig.agent.stateprovider import Change
from natmig.schema import YANG_DIR
from natmig.statemodel import load_module

REPEAT = 3


def node(name: str) -> FwNode:
    netns.add(name)
    for ifname in ("inside0", "outside0"):
        netns.run(["ip", "link", "add", ifname, "type", "veth", "peer", "name", ifname + "p"], name)
    n = FwNode(FwNodeConfig(name), hold=False)
    n.configure()
    return n


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--blocked", type=int, default=1_000)
    args = ap.parse_args()
    ensure_conntrack_capacity(4 * args.sessions)
    module = load_module(YANG_DIR / "fw-state.yang")
    sess, blk = module.list("session"), module.list("blocked")
    entries = []
    for i in range(args.sessions):
        proto = ("TCP", "UDP")[i % 2]
        entries.append((proto, f"10.0.{i // 60000}.{2 + i % 250}", 1024 + i % 60000, f"203.0.113.{2 + (i // 250) % 250}", 80,
                        "ESTABLISHED" if proto == "TCP" else None, 3600, True, 0))
    sources = [(f"198.51.{100 + i // 250}.{1 + i % 250}", 3000) for i in range(args.blocked)]
    prefix = netns.run_prefix("fwb")
    a_name, b_name = prefix + "a", prefix + "b"
    rows: dict[str, list[float]] = {}
    try:
        a, b = node(a_name), node(b_name)
        pa, pb = FirewallProvider(module, a), FirewallProvider(module, b)
        pa.apply({sess: Change(entries), blk: Change(sources)})
        for _ in range(REPEAT):
            rows.setdefault("read sessions", []).append(timed(pa._read_sessions))
            rows.setdefault("  floor: conntrack -L", []).append(timed(lambda: netns.run(["conntrack", "-L"], a_name)))
            rows.setdefault("read blocked", []).append(timed(pa._read_blocked))
            rows.setdefault("  floor: nft -j list set", []).append(timed(lambda: netns.run(["nft", "-j", "list", "set", "ip", "natmig_fw", "blocked"], a_name)))
            t = pa.read()
            rows.setdefault("apply both into an empty node", []).append(
                timed(lambda: pb.apply({sess: Change(list(t[sess].values())), blk: Change(list(t[blk].values()))})))
            got = pb.read()
            assert len(got[sess]) == args.sessions and len(got[blk]) == args.blocked, (len(got[sess]), len(got[blk]))
            rows.setdefault("delete both (retire)", []).append(
                timed(lambda: pb.apply({sess: Change([], list(got[sess])), blk: Change([], list(got[blk]))})))
        pa.close()
        pb.close()
    finally:
        netns.delete(a_name)
        netns.delete(b_name)
    print(f"firewall provider, {args.sessions} sessions + {args.blocked} blocked sources (median of {REPEAT}, ms)")
    for k, v in rows.items():
        print(f"  {k:34s} {statistics.median(v):9.1f}")


if __name__ == "__main__":
    main()
