"""Benchmark: the firewall provider's read and apply, and whole firewall migrations beside the NAT's (root).

1. The provider: two firewall nodes (namespaces with veth legs to nowhere;
   no traffic): the entries are applied into node a (the sessions as
   ctnetlink creates, the sources as one nft transaction), read back, and
   applied into an empty node b, as a migration's copy does.  Beside them,
   the tools' own floor: `conntrack -L` of the same table and `nft -j list
   set` of the same set.  Median of REPEAT, at --sessions.
2. Migrations, at each of --migrate sizes (default 10,000 and 100,000): on
   the firewall testbed (testbed/topologies/firewall.toml: two firewalls and
   their agents on the private Open vSwitch), N sessions + --blocked sources
   loaded into fw1 and moved to fw2 by the generic engine (every phase,
   the switch included, retire delete); then, in the same run, on the NAT
   testbed, N sessions loaded into nat1 and moved to nat2 by the NAT's own
   migration (retire delete).  One run each; the controller and the agents
   niced as in bench_migrate.

    python bench/bench_fwprovider.py [--sessions N] [--blocked M] [--migrate 10000,100000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from natmig import netns
from natmig.agent.fwnode import FwNode, FwNodeConfig
from natmig.netns import ensure_conntrack_capacity
from natmig.agent.fwprovider import FirewallProvider
from natmig.agent.stateprovider import Change
from natmig.schema import YANG_DIR
from natmig.statemodel import load_module

from common import agents_on  # noqa: E402 -- bench/ is the script's directory

REPEAT = 3
#: The firewall migrations' confirm-timeout: a move of 100k on a loaded 2-core machine takes longer than the default 10 s.
CONFIRM_TIMEOUT = 120.0
#: Seconds an RPC may take, both kinds of migration: at load average 20, a get-config of 100k took more than the default 30 s.
RPC_TIMEOUT = 300.0


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


def synthetic(n: int, blocked: int) -> tuple[list[tuple], list[tuple]]:
    """n sessions (half TCP ESTABLISHED, half UDP) of made-up inside hosts, and ``blocked`` sources, as fw-state entries."""
    entries = []
    for i in range(n):
        proto = ("TCP", "UDP")[i % 2]
        entries.append((proto, f"10.0.{i // 60000}.{2 + i % 250}", 1024 + i % 60000, f"203.0.113.{2 + (i // 250) % 250}", 80,
                        "ESTABLISHED" if proto == "TCP" else None, 3600, True, 0))
    return entries, [(f"198.51.{100 + i // 250}.{1 + i % 250}", 3000) for i in range(blocked)]


def firewall_migrations(sizes: list[int], blocked: int, work: Path) -> dict[int, dict]:
    """The generic engine moving fw-state fw1 -> fw2 on the firewall testbed, once per size."""
    from natmig.controller.demorun import control_plane_priority
    from natmig.controller.engine import EngineMigration, EngineOptions, default_phases
    from natmig.controller.fwdemo import FIREWALL_TOPOLOGY
    from natmig.controller.migrate import endpoint_from_spec
    from natmig.controller.statenode import StateNode
    from natmig.controller.steering import TestbedSteering
    from natmig.testbed.bed import Testbed

    module = load_module(YANG_DIR / "fw-state.yang")
    sess, blk = module.list("session"), module.list("blocked")
    tb = Testbed.from_file(FIREWALL_TOPOLOGY, netns.run_prefix("fwm"))
    out: dict[int, dict] = {}
    with agents_on(tb, work / "fw-agents", ["fw1", "fw2"], provider="firewall") as fleet:
        loader = FirewallProvider(module, FwNode(tb.fw_config("fw1"), hold=False))
        try:
            for n in sizes:
                print(f"== firewall, {n} sessions + {blocked} blocked", flush=True)
                entries, sources = synthetic(n, blocked)
                # Loaded with fw1's agent stopped: 100k kernel events of a load just before the move would
                # still be queued for its subscriber when the copy starts (not what a live node sees).
                fleet.stop("fw1")
                t = time.perf_counter()
                loader.apply({sess: Change(entries), blk: Change(sources)})
                load = time.perf_counter() - t
                fleet.start("fw1")
                src, dst = (endpoint_from_spec(fleet.spec(n), RPC_TIMEOUT) for n in ("fw1", "fw2"))
                mig = EngineMigration(lambda: StateNode(src.open()), lambda: StateNode(dst.open()),  # type: ignore[arg-type]
                                      "fw1", "fw2", EngineOptions(retire="delete", confirm_timeout=CONFIRM_TIMEOUT),
                                      default_phases(TestbedSteering(tb)))
                with control_plane_priority():
                    report = mig.run()
                moved = report.readback["fw2"].tables if "fw2" in report.readback else {}
                out[n] = {"ok": report.ok, "error": report.error, "load": load, "total": report.total_seconds,
                          "phases": {p.name: p.seconds for p in report.phases},
                          "moved": {k: v[0] for k, v in moved.items()}}
                # Back to the start: traffic on fw1, fw2 empty.
                tb.point_to("fw1")
                tb.exec("fw2", ["conntrack", "-F"], check=False)
                tb.exec("fw2", ["nft", "flush", "set", "ip", "natmig_fw", "blocked"], check=False)
        finally:
            loader.close()
    return out


def nat_migrations(sizes: list[int], work: Path) -> dict[int, dict]:
    """The NAT's own migration nat1 -> nat2 on the NAT testbed, once per size (bench_migrate's setting, retire delete)."""
    from natmig.controller.demorun import control_plane_priority
    from natmig.controller.demosessions import load_sessions, synthetic_sessions
    from natmig.controller.migrate import MigrateOptions, Migration, endpoint_from_spec
    from natmig.controller.steering import TestbedSteering
    from natmig.testbed.bed import Testbed

    tb = Testbed.from_file(None, netns.run_prefix("ntm"))
    out: dict[int, dict] = {}
    with agents_on(tb, work / "nat-agents", ["nat1", "nat2"]) as fleet:
        for n in sizes:
            print(f"== NAT, {n} sessions", flush=True)
            t = time.perf_counter()
            load_sessions(fleet.endpoint("nat1"), synthetic_sessions(n, tb.public_address, tb.topology.nats["nat1"].port_range))
            load = time.perf_counter() - t
            with control_plane_priority():
                report = Migration(endpoint_from_spec(fleet.spec("nat1"), RPC_TIMEOUT), endpoint_from_spec(fleet.spec("nat2"), RPC_TIMEOUT),
                                   TestbedSteering(tb), MigrateOptions(retire="delete")).run()
            out[n] = {"ok": report.ok, "error": report.error, "load": load, "total": report.total_seconds,
                      "phases": {p.name: p.seconds for p in report.phases}, "moved": {"nat-session": report.copied + report.caught_up}}
            tb.point_to("nat1")
            for nat in ("nat1", "nat2"):
                tb.exec(nat, ["conntrack", "-F"], check=False)
                tb.nat_node(nat).set_admission(True)
    return out


def print_migrations(fw: dict[int, dict], nat: dict[int, dict], blocked: int) -> None:
    """Each size: the firewall's migration beside the NAT's, totals and phases, in ms."""
    print(f"\nmigrations, one run each (ms): firewall = generic engine, fw-state sessions + {blocked} blocked; NAT = its own migration")
    for n in sorted(fw.keys() | nat.keys()):
        for name, r in (("firewall", fw.get(n)), ("NAT", nat.get(n))):
            if r is None:
                continue
            phases = "  ".join(f"{p} {s * 1000:.0f}" for p, s in r["phases"].items())
            state = "ok" if r["ok"] else f"FAILED: {r['error']}"
            moved = ", ".join(f"{k} {v}" for k, v in r["moved"].items())
            print(f"  {n:>7} {name:<8} total {r['total'] * 1000:8.0f}  {state}  (moved: {moved}; load {r['load'] * 1000:.0f})")
            print(f"          {'':<8} {phases}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=10_000)
    ap.add_argument("--blocked", type=int, default=1_000)
    ap.add_argument("--migrate", default="10000,100000", help="table sizes of the migrations, comma-separated ('' for none)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.migrate.split(",") if x.strip()]
    ensure_conntrack_capacity(4 * max([args.sessions, *sizes]) + 65536)
    module = load_module(YANG_DIR / "fw-state.yang")
    sess, blk = module.list("session"), module.list("blocked")
    entries, sources = synthetic(args.sessions, args.blocked)
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
    if sizes:
        work = Path(tempfile.mkdtemp(prefix="natmig-bench-fw-"))
        try:
            fw = firewall_migrations(sizes, args.blocked, work)
            nat = nat_migrations(sizes, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print_migrations(fw, nat, args.blocked)


if __name__ == "__main__":
    main()
