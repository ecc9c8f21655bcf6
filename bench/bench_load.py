"""Benchmark: load a large table into a pooled NAT node through its agent, and what it costs; optionally move it.

On the pool testbed (testbed/topologies/pool.toml: two public addresses per
NAT node), N synthetic sessions spread over the pool and several made-up
servers are written into nat1's kernel table with natmig's own apply path
(edit-config into running, 50,000 a request), then the table is counted
per pool address.  Prints and writes (JSON) the load time, the entries the
kernel holds, the agent's peak RSS (VmHWM of its process) and the kernel's
conntrack limits.  With ``--migrate``, natmig then moves the table to nat2
(retire=keep) with a 1 ms TCP probe running and reports every phase, the
blackout, the probe's largest gap and both agents' peak RSS; RPCs may take
``--rpc-timeout`` seconds (a get-config of 1,000,000 takes minutes here).

Run as root: ``.venv/bin/python bench/bench_load.py [--sessions 1000000] [--migrate] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from natmig import netns
from natmig.controller.agentfleet import AgentFleet
from natmig.controller.demorun import control_plane_priority
from natmig.controller.demosessions import load_sessions, synthetic_sessions
from natmig.controller.migrate import MigrateOptions, Migration
from natmig.controller.steering import TestbedSteering
from natmig.controller.traffic import LiveTraffic, TrafficSpec
from natmig.errors import NatmigError
from natmig.netns import ensure_conntrack_capacity
from natmig.testbed import topology
from natmig.testbed.bed import Testbed

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SESSION_TIMEOUT  # noqa: E402

POOL_FILE = topology.DEFAULT_TOPOLOGY.with_name("pool.toml")


def status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` figure in kB (VmHWM: peak resident set; VmRSS: now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise NatmigError(f"/proc/{pid}/status has no {field}")


def sysctl_value(key: str) -> int:
    """A sysctl of the root namespace."""
    return int(Path("/proc/sys/" + key.replace(".", "/")).read_text())


def measure(n: int, out: Path, migrate: bool = False, rpc_timeout: float = 600.0, confirm_timeout: float = 900.0) -> dict:
    """Bring up the pool testbed and nat1's agent, load ``n`` sessions, read back, maybe move them; always torn down."""
    # nf_conntrack_max is one machine-wide value (read-only in a namespace on
    # this kernel), compared with each namespace's own count.
    ensure_conntrack_capacity(n + 65536)
    tb = Testbed.from_file(POOL_FILE, prefix=netns.run_prefix("bl"))
    work = Path(tempfile.mkdtemp(prefix="natmig-bench-load-"))
    fleet = None
    try:
        tb.up()
        fleet = AgentFleet(tb, work / "agents")
        pid = fleet.start("nat1")
        idle_kb = status_kb(pid, "VmHWM")
        t = time.perf_counter()
        table = synthetic_sessions(n, tb.topology.public_pool("nat1"), servers=tb.topology.spare_addresses("public", 16),
                                    timeout=SESSION_TIMEOUT)
        made = time.perf_counter() - t
        servers = len({s.dst_address for s in table})
        t = time.perf_counter()
        load_sessions(fleet.endpoint("nat1", timeout=rpc_timeout), table)
        loaded = time.perf_counter() - t
        del table
        count = int(tb.exec("nat1", ["conntrack", "-C"]).stdout.strip() or 0)
        per_address = {}
        for a in tb.public_addresses("nat1"):
            # Counted by wc: the listing of half a million entries is ~100 MB of text.
            cp = tb.exec("nat1", ["sh", "-c", f"conntrack -L --reply-dst {a} 2>/dev/null | wc -l"], timeout=600)
            per_address[a] = int(cp.stdout.strip() or 0)
        moved = _migrate(tb, fleet, work, pid, rpc_timeout, confirm_timeout) if migrate else {}
        return {
            "sessions": n,
            "servers": servers,
            "generate_seconds": made,
            "load_seconds": loaded,
            "kernel_entries": count,
            "kernel_entries_per_address": per_address,
            "agent_idle_rss_mb": idle_kb / 1024,
            "agent_peak_rss_mb": status_kb(pid, "VmHWM") / 1024,
            "agent_rss_after_mb": status_kb(pid, "VmRSS") / 1024,
            "nf_conntrack_max": sysctl_value("net.netfilter.nf_conntrack_max"),
            "nf_conntrack_buckets": sysctl_value("net.netfilter.nf_conntrack_buckets"),
            **moved,
        }
    finally:
        if fleet is not None:
            fleet.close()
        tb.down()
        shutil.rmtree(work, ignore_errors=True)


def _migrate(tb: Testbed, fleet: AgentFleet, work: Path, src_pid: int, rpc_timeout: float, confirm_timeout: float) -> dict:
    """Move nat1's table to nat2 (retire=keep) under a 1 ms TCP probe; what the report and the probe say."""
    dst_pid = fleet.start("nat2")
    probe = LiveTraffic(tb.netns("client"), tb.netns("server"), tb.address("server"), TrafficSpec(tcp=1, udp=0, interval=0.001), str(work))
    with probe:
        time.sleep(0.5)
        with control_plane_priority():
            r = Migration(fleet.endpoint("nat1", timeout=rpc_timeout), fleet.endpoint("nat2", timeout=rpc_timeout), TestbedSteering(tb),
                          MigrateOptions(retire="keep", confirm_timeout=confirm_timeout)).run()
        time.sleep(0.5)
        seen = probe.stop()
    return {
        "migrate_ok": r.ok,
        "migrate_error": r.error,
        "migrate_total_seconds": r.total_seconds,
        "migrate_phases": {p.name: round(p.seconds, 3) for p in r.phases},
        "migrate_blackout_seconds": r.blackout_seconds,
        "migrate_moved": r.copied + r.caught_up + r.reconciled,
        "migrate_verified": r.verified,
        "probe_survived": seen.all_survived,
        "probe_gap_ms": seen.largest_gap * 1000,
        "target_entries": int(tb.exec("nat2", ["conntrack", "-C"]).stdout.strip() or 0),
        "agent_peak_rss_mb_source": status_kb(src_pid, "VmHWM") / 1024,
        "agent_peak_rss_mb_target": status_kb(dst_pid, "VmHWM") / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the measurement, print it, write bench_load.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", type=int, default=1_000_000, help="sessions to load (default %(default)s)")
    ap.add_argument("--out", default=".", help="directory for bench_load.json")
    ap.add_argument("--migrate", action="store_true", help="then move the table to nat2 with natmig, a probe flow running")
    ap.add_argument("--rpc-timeout", type=float, default=600.0, help="seconds an RPC may take (default %(default)s)")
    ap.add_argument("--confirm-timeout", type=float, default=900.0, help="the migration's confirm timeout (default %(default)s)")
    args = ap.parse_args(argv)
    try:
        r = measure(args.sessions, Path(args.out), args.migrate, args.rpc_timeout, args.confirm_timeout)
    except NatmigError as e:
        print(f"bench_load: {e}", file=sys.stderr)
        return 1
    for k, v in r.items():
        print(f"{k:28} {v:.2f}" if isinstance(v, float) else f"{k:28} {v}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_load.json").write_text(json.dumps(r, indent=2) + "\n")
    ok = r["kernel_entries"] >= args.sessions
    print(f"{'OK' if ok else 'FAILED'}: {r['kernel_entries']} entries in the kernel for {args.sessions} loaded")
    if args.migrate:
        moved = bool(r["migrate_ok"]) and r["probe_survived"] and r["target_entries"] >= args.sessions
        print(f"{'OK' if moved else 'FAILED'}: migration ok={r['migrate_ok']}, {r['target_entries']} entries on nat2, probe survived={r['probe_survived']}")
        ok = ok and moved
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
