"""NETCONF agent figures: get-config / edit-config of 10k and 100k sessions, small RPC latency, RSS.

Real set-up: a NAT namespace with the agent over the conntrack provider
(``--provider memory`` to see the protocol alone), a management namespace,
SSH over the management veth, the controller's NodeClient (ncclient with
its TICK fixed) as the client.  Targets (issue 4): get-config 10k <= 0.3 s,
100k <= 3 s; edit-config 10k <= 0.4 s, 100k <= 4 s; small RPC (get-config
filtered to one session) p50 <= 5 ms; agent RSS at 100k <= 300 MB.

Raw floors measured in the same run: ``conntrack -L`` (dump) and
``conntrack -R`` (restore) of the same table in the same namespace, and a
tiny RPC that touches no session table (SSH + framing + XML).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, verdict  # noqa: E402

from natmig import netns  # noqa: E402
from natmig.agent.lab import AgentLab  # noqa: E402
from natmig.netns import ensure_conntrack_capacity  # noqa: E402
from natmig.model import NatSession  # noqa: E402

TARGETS = {("get-config", 10_000): 0.3, ("get-config", 100_000): 3.0, ("edit-config", 10_000): 0.4, ("edit-config", 100_000): 4.0}
SMALL_P50_MS = 5.0
CATCH_UP_NEW, CATCH_UP_GONE = 100, 50
#: A catch-up must not grow with the table: the same bound at every size.
CATCH_UP_TARGET = 0.05
RSS_MB = 300
MONITORING_NS = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"


def table(n: int, public: str = "203.0.113.1", offset: int = 0) -> list[NatSession]:
    """n sessions with distinct keys and distinct public (protocol, port): TCP first, then UDP; ``offset`` numbers them on."""
    out = []
    for i in range(offset, offset + n):
        proto, j = ("TCP", i) if i < 64000 else ("UDP", i - 64000)
        out.append(NatSession(
            proto, f"10.0.{(i >> 8) & 255}.{i & 255}", 1024 + i % 50000, f"198.51.100.{1 + i // 50000}", 443 if proto == "TCP" else 53,
            public, 1024 + j, "ESTABLISHED" if proto == "TCP" else None, 600 + i % 1000, bool(i % 2),
        ))
    return out


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident set size of a process, MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def p50_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--provider", default="conntrack", choices=["conntrack", "memory"])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--runs", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--small", type=int, default=200, help="small RPCs for the p50")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    if args.provider == "conntrack":
        ensure_conntrack_capacity(max(sizes) * 2 + 10_000)
    rows = []
    ok = True
    with tempfile.TemporaryDirectory(prefix="natmig-bench-agent-") as tmp, AgentLab(tmp, provider=args.provider, tag="ba") as lab:
        c = lab.client()
        tiny = lambda: c._mgr.get(filter=("subtree", f'<netconf-state xmlns="{MONITORING_NS}"><datastores/></netconf-state>'))  # noqa: E731
        floor_rpc = p50_ms(tiny, args.small)
        few = table(10)
        c.edit_sessions(few, target="running", operation=None)
        small_few = p50_ms(lambda: c.get_sessions(key=few[3].key), args.small)
        # What any read of the provider costs here: one `conntrack -L` of this small table.
        floor_read = p50_ms(lambda: lab.conntrack("-L"), 30) if args.provider == "conntrack" else None
        # Timeouts tick down in the kernel: compare what must survive exactly.
        assert [(x.key, x.public) for x in c.get_sessions(key=few[3].key)] == [(few[3].key, few[3].public)]
        c.delete_sessions(None, target="running")
        small_big = None
        for n in sizes:
            sessions = table(n)
            edits, gets = [], []
            for _ in range(args.runs):
                c.delete_sessions(None, target="running")
                edits.append(timed(lambda: c.edit_sessions(sessions, target="running", operation=None)))
            got: list[NatSession] = []
            for _ in range(args.runs):
                gets.append(timed(lambda: got.__setitem__(slice(None), c.get_sessions())))
            assert len(got) == n and {(s.key, s.public) for s in got} == {(s.key, s.public) for s in sessions}, "the agent did not hold the table it was given"
            if n == max(sizes):
                small_big = p50_ms(lambda: c.get_sessions(key=sessions[n // 2].key), max(10, args.small // 10))
                rss, hwm = rss_mb(lab.pid)
            # A migration's catch-up (100 created, 50 closed) and its retire (the whole list), into this table.
            catch_ups, deletes_all = [], []
            extra = table(CATCH_UP_NEW, offset=n)
            for r in range(args.runs):
                gone = sessions[r * CATCH_UP_GONE:(r + 1) * CATCH_UP_GONE]
                changes = [("create", s) for s in extra] + [("delete", s.key) for s in gone]
                catch_ups.append(timed(lambda: c.edit_mixed(changes, target="running")))
                c.edit_mixed([("delete", s.key) for s in extra] + [("create", s) for s in gone], target="running")
            for r in range(args.runs):
                deletes_all.append(timed(lambda: c.delete_sessions(None, target="running")))
                if r + 1 < args.runs:
                    c.edit_sessions(sessions, target="running", operation=None)
            floor_dump = floor_restore = floor_delete = None
            c.edit_sessions(sessions, target="running", operation=None)
            if args.provider == "conntrack":
                floor_dump = statistics.median(timed(lambda: lab.conntrack("-L")) for _ in range(args.runs))
                saved = lab.conntrack("-L", "-o", "save").stdout
                floor_delete = timed(lambda: lab.conntrack("-D", "--reply-dst", lab.public_address, check=False))
                floor_restore = timed(lambda: netns.run(["conntrack", "-R", "-"], lab.nat_ns, input=saved, timeout=300))
            rows.append((n, f"catch-up edit ({CATCH_UP_NEW} new + {CATCH_UP_GONE} deleted)", f"{statistics.median(catch_ups):.3f}",
                         f"{floor_rpc / 1000:.3f}", f"{CATCH_UP_TARGET:.2f}", verdict(statistics.median(catch_ups), CATCH_UP_TARGET)))
            ok &= statistics.median(catch_ups) <= CATCH_UP_TARGET
            rows.append((n, "delete of the whole list", f"{statistics.median(deletes_all):.3f}",
                         f"{floor_delete:.3f}" if floor_delete is not None else "-", "-", "-"))
            for op, t, floor in (("edit-config", statistics.median(edits), floor_restore), ("get-config", statistics.median(gets), floor_dump)):
                target = TARGETS.get((op, n))
                rows.append((n, op, f"{t:.3f}", f"{floor:.3f}" if floor is not None else "-", f"{target:.1f}" if target else "-", verdict(t, target) if target else "-"))
                ok &= target is None or t <= target
            c.delete_sessions(None, target="running")
        c.close()
    print_table(f"NETCONF agent over SSH, provider {args.provider}, median of {args.runs} (seconds)", ["sessions", "operation", "time", "raw floor", "target", ""], rows)
    print("  raw floor: conntrack -R (edit) / conntrack -L (get) / conntrack -D --reply-dst (delete of the whole list) of the same table"
          " in the same namespace; for the catch-up, an RPC that reads no table")
    print(f"\nsmall RPC (get-config filtered to one session), p50 of {args.small}:")
    print(f"  table of 10 sessions:        {small_few:.2f} ms (target {SMALL_P50_MS} ms: {verdict(small_few, SMALL_P50_MS)})")
    if small_big is not None:
        print(f"  table of {max(sizes):,} sessions: {small_big:.2f} ms (a per-key lookup: one ctnetlink GET, whatever the table size)")
    print(f"  raw floor, an RPC that reads no table (SSH + framing + XML): {floor_rpc:.2f} ms")
    if floor_read is not None:
        print(f"  raw floor, one `conntrack -L` of the 10-session table (how the provider reads): {floor_read:.2f} ms")
    print(f"\nagent RSS holding {max(sizes):,} sessions: {rss:.0f} MB (target {RSS_MB} MB: {verdict(rss, RSS_MB)})")
    print(f"  peak RSS over the run ({args.runs} edit-configs and get-configs of {max(sizes):,}, deletes between): {hwm:.0f} MB ({verdict(hwm, RSS_MB)} against the same figure)")
    ok &= small_few <= SMALL_P50_MS and rss <= RSS_MB
    print("agent targets:", "met" if ok else "NOT met")
    # Missed targets are reported, not fatal: `make bench` runs every benchmark
    # after this one (a wrong result still fails, by assertion).
    return 0


if __name__ == "__main__":
    sys.exit(main())
