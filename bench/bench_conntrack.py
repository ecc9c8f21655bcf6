"""Benchmark: the conntrack session provider against the conntrack tool's own bulk floor.

For 10,000 and 100,000 sessions in real namespaces (two NAT nodes), measured
in one run (median of REPEAT):

* list:  ConntrackProvider.list() of the full table  vs  `conntrack -L -o save`
* statistics: ConntrackProvider.statistics() (the nat-statistics leaves: counts
  and digest straight from the text)  vs  the same floor, beside list() +
  model.table_digest (what the default SessionProvider.statistics() does)
* apply: ConntrackProvider.apply() into an empty table  vs  `conntrack -R` of the
  same table's `-o save` dump; beside it, what packing the create messages
  alone costs (ctlayout.CreateEncoder) and what the readable reference
  encoder (create_attrs, one message at a time) would cost
* lookup: ConntrackProvider.lookup() of one key in the full table (p50 of
  LOOKUPS)  vs  the tool's own `conntrack -G` of that key; its target is what
  the agent's small RPC leaves the provider (5 ms p50 - the agent's ~1.6 ms)

* running edit of K: the agent's datastore (in process, GC paused as in an
  RPC) writing 100 new sessions and deleting 50 in one edit-config of
  running -- a migration's catch-up --  vs  ctnetlink creates and deletes of
  the same entries, nothing read (the floor of any write of them)
* whole-list delete: the datastore's delete of the whole nat-session list
  (a migration's retire)  vs  `conntrack -D --reply-dst PUBLIC`, the tool's
  own delete of the translated entries (one dump, a delete per entry), and
  `conntrack -F` (the kernel flushing everything, the sessions' neighbours too)

* live digest (ctdigest): statistics() of a table of n, the first call (a
  full read) and a later one after 100 changes (50 sessions created and 50
  deleted through the provider), beside the full-dump floor `conntrack -L
  -o save` and the text path (`conntrack -L` counted by cttext, what each
  call cost before); the part of a later call that is the kernel's walk
  for expired entries (ctevents.expire) alone
* following a copy: apply() of n sessions into an empty table with no
  digest, and with the digest following it three ways -- own events dropped
  by the kernel and the digest fed from what the kernel confirmed (the
  provider's way), read and skipped after their 16-byte header, parsed like
  anyone's -- CPU of this process (its event thread and its share of the
  kernel's work included) for the apply and the next statistics()

Targets: list <= 2x, statistics <= 1.5x and apply <= 2x the raw floor at both sizes; a later
statistics() <= 100 ms at 10k and <= 300 ms at 100k (the hold window's whole budget); the K edit
<= 50 ms at both sizes (it must not grow with the table); the whole-list delete <= 1.5x the tool's
`-D`; peak RSS of this process <= 300 MB at 100,000.  Needs root.  Prints one line per figure
and a verdict; exits non-zero only when the benchmark itself cannot run.
``--sizes 10000`` and ``--only running`` run a part.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator

from natmig import netns
from natmig.agent import ctevents
from natmig.agent import ctnetlink as nl
from natmig.agent import ctbulk, ctlayout
from natmig.agent import cttext
from natmig.agent.conntrack import ConntrackProvider
from natmig.agent.ctdigest import LiveDigest
from natmig.agent.ctdigesttable import WriteLog
from natmig.agent.datastore import Datastore, EditRequest
from natmig.agent.natnode import NatNode, NatNodeConfig
from natmig.netns import ensure_conntrack_capacity
from natmig.codec import EditEntry, default_codec
from natmig.gcpause import gc_paused
from natmig.model import FIELD_NAMES, NatSession, table_digest

SIZES = (10_000, 100_000)
REPEAT = 5
PUBLIC = "203.0.113.1"
LIST_TARGET = APPLY_TARGET = 2.0
STATS_TARGET = 1.5
LOOKUPS = 200
LOOKUP_TARGET_MS = 3.0
RSS_TARGET_MB = 300
EDIT_NEW, EDIT_GONE = 100, 50
EDIT_TARGET_MS = 50.0
DELETE_ALL_TARGET = 1.5
STATS_CHANGED = 50  # created and as many deleted between two statistics() calls
LATER_TARGET_MS = {10_000: 100.0, 100_000: 300.0}


def sessions(n: int) -> list[NatSession]:
    """n established TCP and UDP sessions with distinct keys and public ports."""
    out = []
    for i in range(n):
        proto = "TCP" if i % 2 == 0 else "UDP"
        j = i // 2  # public ports are unique per protocol
        out.append(NatSession(
            proto, f"10.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}", 40000 + i % 1000,
            f"198.51.100.{1 + i % 200}", 80 + i % 3, PUBLIC, 1024 + j,
            "ESTABLISHED" if proto == "TCP" else None, 3600, True, i % 4,
        ))
    return out


def node(name: str) -> NatNode:
    """A configured NAT node whose inside and outside are the two ends of one veth."""
    n = NatNode(NatNodeConfig(name=name, inside_if="in0", outside_if="out0", public_address=PUBLIC))
    n.create()
    netns.add_veth("in0", "out0", name, name)
    n.configure()
    return n


def timed(fn) -> float:
    """Seconds ``fn()`` took."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu(fn) -> float:
    """CPU seconds this process (not the conntrack child) spent in ``fn()``: what the agent pays for a read."""
    t = time.process_time()
    fn()
    return time.process_time() - t


def median(xs: list[float]) -> float:
    """The median of the repeats."""
    return statistics.median(xs)


def flush(ns: str) -> None:
    """Empty a namespace's conntrack table (only namespaces this benchmark made)."""
    netns.run(["conntrack", "-F"], ns, timeout=120)


def count(ns: str) -> int:
    """Entries in a namespace's conntrack table."""
    return int(netns.run(["conntrack", "-C"], ns).stdout)


def bench_size(n: int, src: str, dst: str) -> dict[str, float]:
    """Medians of list, dump, apply and restore for a table of n sessions."""
    ss = sessions(n)
    a = ConntrackProvider(src, {PUBLIC})
    b = ConntrackProvider(dst, {PUBLIC})
    flush(src)
    a.apply(ss)
    assert count(src) == n, f"source holds {count(src)} entries, not {n}"
    saved = netns.run(["conntrack", "-L", "-o", "save"], src, timeout=120).stdout
    argv_dump = netns.ns_cmd(["conntrack", "-L", "-o", "save"], src)
    argv_restore = netns.ns_cmd(["conntrack", "-R", "-"], dst)
    r: dict[str, list[float]] = {"list": [], "dump": [], "apply": [], "restore": [], "statistics": [], "list_digest": [],
                               "list_cpu": [], "statistics_cpu": []}
    for _ in range(REPEAT):
        r["dump"].append(timed(lambda: subprocess.run(argv_dump, capture_output=True, check=True)))
        got: list = []
        r["list"].append(timed(lambda: got.append(a.list())))
        assert len(got[0].sessions) == n, f"list read {len(got[0].sessions)} of {n}"
        stats: list = []
        r["statistics"].append(timed(lambda: stats.append(a.statistics())))
        r["list_digest"].append(timed(lambda: stats.append(table_digest(a.list().sessions))))
        r["list_cpu"].append(cpu(a.list))
        r["statistics_cpu"].append(cpu(a.statistics))
        assert stats[0] == {"sessions": n, "untranslated": 0, "digest": stats[1]}, f"statistics {stats[0]} differ from list's {stats[1]}"
        flush(dst)
        r["restore"].append(timed(lambda: subprocess.run(argv_restore, input=saved, text=True, capture_output=True, check=True)))
        assert count(dst) == n
        flush(dst)
        r["apply"].append(timed(lambda: b.apply(ss)))
        assert count(dst) == n
    items = [(s, s.timeout) for s in ss]
    r["encode"] = [timed(lambda: ctlayout.create_messages(items)) for _ in range(REPEAT)]
    r["encode_ref"] = [timed(lambda: [nl.frame(nl.create_op(s, t), i + 1) for i, (s, t) in enumerate(items)])]
    k = ss[n // 2]
    assert [x.public for x in a.lookup([k.key])] == [k.public], "lookup did not find the session"
    r["lookup"] = [timed(lambda: a.lookup([k.key])) for _ in range(LOOKUPS)]
    argv_get = netns.ns_cmd(["conntrack", "-G", "-p", k.protocol.lower(), "-s", k.src_address, "-d", k.dst_address,
                             "--sport", str(k.src_port), "--dport", str(k.dst_port)], src)
    r["get"] = [timed(lambda: subprocess.run(argv_get, capture_output=True, check=True)) for _ in range(30)]
    a.close()
    flush(dst)
    flush(src)
    return {k: median(v) for k, v in r.items()}


def entry(s: NatSession, op: str) -> EditEntry:
    """One decoded edit-config entry, as the agent's RPC layer hands it to the datastore."""
    if op == "delete":
        return EditEntry(op, s.key, dict(zip(("protocol", "src_address", "src_port", "dst_address", "dst_port"), s.key)))
    return EditEntry(op, s.key, {f: v for f in FIELD_NAMES if (v := getattr(s, f)) is not None})


def in_rpc(fn) -> float:
    """Seconds ``fn()`` took with cyclic GC paused, as the agent runs an RPC."""
    with gc_paused():
        return timed(fn)


def bench_running(n: int, ns: str) -> dict[str, float]:
    """Medians of a K edit and a whole-list delete of running on a table of n, and their floors."""
    ss = sessions(n + EDIT_NEW)
    table, new = ss[:n], ss[n:]
    p = ConntrackProvider(ns, {PUBLIC})
    ds = Datastore(p, default_codec())
    flush(ns)
    p.apply(table)
    r: dict[str, list[float]] = {"edit": [], "edit_floor": [], "delete_all": [], "delete_all_tool": [], "flush": []}
    for i in range(REPEAT):
        gone = table[i * EDIT_GONE:(i + 1) * EDIT_GONE]
        req = EditRequest([entry(s, "create") for s in new] + [entry(s, "delete") for s in gone])
        r["edit"].append(in_rpc(lambda: ds.edit("running", req, sid=1)))
        assert count(ns) == n + EDIT_NEW - EDIT_GONE
        p.delete([s.key for s in new])
        p.apply(gone)
        items = [(s, s.timeout) for s in new]
        r["edit_floor"].append(timed(lambda: (ctbulk.create_sessions(ns, items), ctbulk.delete_keys(ns, [s.key for s in gone]))))
        p.delete([s.key for s in new])
        p.apply(gone)
        assert count(ns) == n
    for _ in range(REPEAT):
        r["delete_all"].append(in_rpc(lambda: ds.edit("running", EditRequest(list_operation="remove"), sid=1)))
        assert count(ns) == 0
        p.apply(table)
        r["delete_all_tool"].append(timed(lambda: netns.run(["conntrack", "-D", "--reply-dst", PUBLIC], ns, check=False, timeout=300)))
        assert count(ns) == 0
        p.apply(table)
        r["flush"].append(timed(lambda: flush(ns)))
        p.apply(table)
    p.close()
    flush(ns)
    return {k: median(v) for k, v in r.items()}


def bench_digest(n: int, ns: str) -> dict[str, float]:
    """Medians of statistics() on a table of n: the first call, a later one after 100 changes, and their floors."""
    ss = sessions(n + STATS_CHANGED * REPEAT)
    table, spare = ss[:n], ss[n:]
    flush(ns)
    ConntrackProvider(ns, {PUBLIC}).apply(table)  # a provider that never starts a digest
    p = ConntrackProvider(ns, {PUBLIC})
    argv_dump = netns.ns_cmd(["conntrack", "-L", "-o", "save"], ns)
    sweep = ctevents.request_socket(ns)
    r: dict[str, list[float]] = {"floor": [], "text": [], "first": [], "later": [], "later_cpu": [], "expire": []}
    for i in range(REPEAT):
        r["floor"].append(timed(lambda: subprocess.run(argv_dump, capture_output=True, check=True)))
        r["text"].append(timed(p._counted))
        if p._digest is not None:
            p._digest.close()  # the next call reads the table whole again
        r["first"].append(timed(p.statistics))
        new, gone = spare[i * STATS_CHANGED:(i + 1) * STATS_CHANGED], table[i * STATS_CHANGED:(i + 1) * STATS_CHANGED]
        p.apply(new)
        p.delete([s.key for s in gone])
        got: list = []
        r["later_cpu"].append(cpu(lambda: r["later"].append(timed(lambda: got.append(p.statistics())))))
        r["expire"].append(timed(lambda: ctevents.expire(sweep)))
        text = cttext.summarize_table(netns.run(["conntrack", "-L"], ns, timeout=120).stdout.encode())
        assert got[0]["sessions"] == text.sessions == n and got[0]["digest"] == f"{text.digest:016x}", (got, text)
        p.delete([s.key for s in new])
        p.apply(gone)
    assert p._digest is not None and p._digest.full_reads == REPEAT
    sweep.close()
    p.close()
    flush(ns)
    return {k: median(v) for k, v in r.items()}


def bench_follow(n: int, ns: str) -> dict[str, tuple[float, float, float]]:
    """(apply wall, CPU of apply + the next statistics(), that statistics() wall), medians, per way of following a copy of n."""
    ss = sessions(n)
    out: dict[str, tuple[float, float, float]] = {}
    for way in ("none", "kernel", "header", "parse"):
        runs: list[tuple[float, float, float]] = []
        for _ in range(REPEAT):
            flush(ns)
            p = ConntrackProvider(ns, {PUBLIC})
            if way != "none":
                LiveDigest.DROP_OWN_IN_KERNEL = way != "header"
                p.statistics()  # follows from now on (an empty table)
                if way == "parse":
                    # Own writes reach the digest as anyone's: no feed, no filter.
                    p._digest.own = lambda: None  # type: ignore[union-attr]
                    p._digest.close()  # type: ignore[union-attr]
                    p.statistics()
                    p._writing = _unfed  # type: ignore[method-assign]
            wall, stats = 0.0, 0.0
            c = time.process_time()
            wall = timed(lambda: p.apply(ss))
            if way != "none":
                got: list = []
                stats = timed(lambda: got.append(p.statistics()))
                assert got[0]["sessions"] == n and p._digest is not None and p._digest.full_reads == (2 if way == "parse" else 1)
            runs.append((wall, time.process_time() - c, stats))
            p.close()
        LiveDigest.DROP_OWN_IN_KERNEL = True
        out[way] = tuple(median([r[i] for r in runs]) for i in range(3))  # type: ignore[assignment]
    flush(ns)
    return out


@contextmanager
def _unfed() -> Iterator[WriteLog]:
    yield WriteLog()


def report_digest(n: int, m: dict[str, float], f: dict[str, tuple[float, float, float]]) -> bool:
    """Print the live digest's figures of one size; whether its target is met."""
    target = LATER_TARGET_MS.get(n, 300.0)
    print(f"n={n:>7}  statistics() first call (full read) {m['first'] * 1000:7.1f} ms   later, after {2 * STATS_CHANGED} changes "
          f"{m['later'] * 1000:6.1f} ms (CPU {m['later_cpu'] * 1000:5.1f} ms; target <= {target:.0f} ms)")
    print(f"n={n:>7}    beside: raw `conntrack -L -o save` {m['floor'] * 1000:7.1f} ms   the text path (conntrack -L + cttext) "
          f"{m['text'] * 1000:7.1f} ms   the kernel's expiry walk alone {m['expire'] * 1000:5.1f} ms")
    base = f["none"]
    print(f"n={n:>7}  following a copy of {n}: apply with no digest {base[0] * 1000:7.1f} ms wall, {base[1] * 1000:7.1f} ms CPU")
    names = {"kernel": "own events dropped by the kernel, fed from the ACKs", "header": "own events read, skipped by header, fed from the ACKs",
             "parse": "own events parsed like anyone's"}
    for way, name in names.items():
        wall, c, stats = f[way]
        print(f"n={n:>7}    {name:<55} apply {wall * 1000:7.1f} ms  CPU {c * 1000:7.1f} ms (+{(c - base[1]) * 1000:6.1f})  "
              f"next statistics() {stats * 1000:6.1f} ms")
    return m["later"] * 1000 <= target


def main() -> int:
    """Run both sizes and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--only", choices=["provider", "running", "digest"], help="run one part (default: all)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    prefix = netns.run_prefix("nmbc")
    src, dst = prefix + "a", prefix + "b"
    ensure_conntrack_capacity(int(max(sizes) * 2.5))
    ok = True
    try:
        node(src)
        node(dst)
        for n in sizes:
            if args.only in (None, "digest"):
                ok &= report_digest(n, bench_digest(n, src), bench_follow(n, dst))
            if args.only == "digest":
                continue
            if args.only != "provider":
                w = bench_running(n, src)
                dr = w["delete_all"] / w["delete_all_tool"]
                ok &= w["edit"] * 1000 <= EDIT_TARGET_MS and dr <= DELETE_ALL_TARGET
                print(f"n={n:>7}  running edit of {EDIT_NEW} new + {EDIT_GONE} deleted {w['edit'] * 1000:6.1f} ms (target <= {EDIT_TARGET_MS:.0f} ms)  "
                      f"raw ctnetlink of the same entries {w['edit_floor'] * 1000:5.2f} ms")
                print(f"n={n:>7}  running delete of the whole list {w['delete_all'] * 1000:7.1f} ms  raw `conntrack -D --reply-dst` "
                      f"{w['delete_all_tool'] * 1000:7.1f} ms  ratio {dr:4.2f} (target <= {DELETE_ALL_TARGET})  `conntrack -F` {w['flush'] * 1000:6.1f} ms")
            if args.only == "running":
                continue
            m = bench_size(n, src, dst)
            lr, ar, sr = m["list"] / m["dump"], m["apply"] / m["restore"], m["statistics"] / m["dump"]
            ok &= lr <= LIST_TARGET and ar <= APPLY_TARGET and sr <= STATS_TARGET and m["lookup"] * 1000 <= LOOKUP_TARGET_MS
            print(f"n={n:>7}  list {m['list'] * 1000:8.1f} ms  raw `conntrack -L -o save` {m['dump'] * 1000:8.1f} ms  ratio {lr:4.2f} (target <= {LIST_TARGET})")
            print(f"n={n:>7}  statistics {m['statistics'] * 1000:6.1f} ms  (list + table_digest {m['list_digest'] * 1000:6.1f} ms)  "
                  f"ratio {sr:4.2f} to the same floor (target <= {STATS_TARGET})")
            print(f"n={n:>7}  CPU of this process: list {m['list_cpu'] * 1000:6.1f} ms  statistics {m['statistics_cpu'] * 1000:6.1f} ms")
            print(f"n={n:>7}  apply {m['apply'] * 1000:7.1f} ms  raw `conntrack -R`         {m['restore'] * 1000:8.1f} ms  ratio {ar:4.2f} (target <= {APPLY_TARGET})")
            print(f"n={n:>7}  encode the creates (no kernel): CreateEncoder {m['encode'] * 1000:6.1f} ms  "
                  f"create_attrs reference {m['encode_ref'] * 1000:7.1f} ms")
            print(f"n={n:>7}  lookup of 1 key, p50 {m['lookup'] * 1000:.3f} ms (target <= {LOOKUP_TARGET_MS} ms)  raw `conntrack -G` {m['get'] * 1000:.1f} ms")
    finally:
        netns.delete(src)
        netns.delete(dst)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ok &= rss <= RSS_TARGET_MB
    print(f"peak RSS of the benchmark process (after {max(sizes)}): {rss:.0f} MB (target <= {RSS_TARGET_MB})")
    print(f"targets met: {'yes' if ok else 'NO'}  (median of {REPEAT})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
