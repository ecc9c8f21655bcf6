"""Benchmark: the generic engine moving a module that is not a NAT, 10,000 and 100,000 entries.

Two `natmig agent --provider memory --module examples/lb-binding.yang`
processes listen on 192.0.2.1 and 192.0.2.2 inside a namespace of this
benchmark (nothing leaves it); the source is loaded with N bindings, then
`natmig migrate` (switch "none", retire delete) moves them, and the
benchmark prints the wall time of the command and its report's phases.
Every figure is what the command printed in its JSON report.  No time
target: the figures say where the generic path spends its time
(docs/engine.md).  Exit status 1 when a migration failed.

Run as root: ``.venv/bin/python bench/bench_engine.py [--sizes 10000,100000]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from natmig import children, netns
from natmig.controller.netconf import NodeClient

ROOT = Path(__file__).resolve().parent.parent
NATMIG = [sys.executable, "-m", "natmig.cli"]
NS = "urn:natmig:yang:example:lb-binding"
ADDRS = {"lb1": "192.0.2.1", "lb2": "192.0.2.2"}
PHASES = ("preflight", "copy", "freeze", "catch-up", "verify", "switch", "finish")


def binding(i: int) -> str:
    """Binding ``i``: a client flow of its own, a backend and snat-port unique together."""
    return (f'<binding xmlns="{NS}"><client-address>10.0.{i // 60000}.{i % 250 + 1}</client-address><client-port>{1024 + i % 60000}</client-port>'
            f"<backend-address>198.51.100.{10 + i // 60000}</backend-address><backend-port>80</backend-port>"
            f"<snat-port>{1024 + i % 60000}</snat-port></binding>")


def removal(i: int) -> str:
    """Binding ``i`` named by its key, to be removed."""
    return (f'<binding xmlns="{NS}" xmlns:nc="urn:ietf:params:xml:ns:netconf:base:1.0" nc:operation="remove">'
            f"<client-address>10.0.{i // 60000}.{i % 250 + 1}</client-address><client-port>{1024 + i % 60000}</client-port></binding>")


def run(sizes: list[int], work: Path) -> list[dict]:
    ns = f"nmbe{os.getpid() % 100000}"
    procs: list[subprocess.Popen[bytes]] = []
    rows = []
    try:
        netns.add(ns)
        netns.run(["ip", "link", "set", "lo", "up"], ns)
        for a in ADDRS.values():
            netns.run(["ip", "addr", "add", f"{a}/32", "dev", "lo"], ns)
        subprocess.run([*NATMIG, "agent", "passwd", str(work / "passwords"), "natmig", "--password-stdin"], input=b"secret\n", check=True, capture_output=True)
        (work / "secret").write_text("secret\n")
        known = []
        for name, addr in ADDRS.items():
            ready, log = work / f"{name}.ready", work / f"{name}.log"
            procs.append(subprocess.Popen(
                [*NATMIG, "agent", "--provider", "memory", "--module", str(ROOT / "examples" / "lb-binding.yang"), "--netns", ns,
                 "--listen", f"{addr}:830", "--passwords", str(work / "passwords"), "--host-key", str(work / f"{name}.key"), "--ready-file", str(ready)],
                stdout=subprocess.DEVNULL, stderr=open(log, "wb")))
            children.wait_ready(procs[-1], ready, 30, f"agent {name}", lambda: log.read_text()[-2000:])
            pub = (work / f"{name}.key.pub").read_text().split()
            known.append(f"[{addr}]:830 {pub[0]} {pub[1]}")
        (work / "known_hosts").write_text("\n".join(known) + "\n")
        agents = "".join(f'[agents.{n}]\nhost = "{a}"\npassword_file = "{work / "secret"}"\nknown_hosts = "{work / "known_hosts"}"\nnetns = "{ns}"\n\n'
                         for n, a in ADDRS.items())
        (work / "inventory.toml").write_text(f'switch = "none"\n\n{agents}[migration]\nsource = "lb1"\ntarget = "lb2"\nretire = "delete"\n')

        def client(name: str) -> NodeClient:
            return netns.call_in(ns, lambda: NodeClient.connect(ADDRS[name], 830, "natmig", password="secret",
                                                                known_hosts=str(work / "known_hosts"), timeout=60))

        for n in sizes:
            print(f"== {n} bindings", flush=True)
            with client("lb1") as c:
                c.reply_timeout = 600
                for start in range(0, n, 20000):
                    c.edit_config("".join(binding(i) for i in range(start, min(n, start + 20000))), target="running")
            out = work / f"report-{n}.json"
            t = time.perf_counter()
            cp = subprocess.run([*NATMIG, "migrate", "-i", str(work / "inventory.toml"), "--json", str(out), "-q"], capture_output=True, text=True)
            wall = time.perf_counter() - t
            report = json.loads(out.read_text()) if out.exists() else {}
            rows.append({"entries": n, "ok": cp.returncode == 0, "wall": wall, "total": report.get("total_seconds"),
                         "phases": {p["name"]: p["seconds"] for p in report.get("phases", [])}, "error": report.get("error") or cp.stderr[-500:]})
            # Back to the start: lb2 emptied (the next size loads lb1 afresh).
            with client("lb2") as c:
                c.reply_timeout = 600
                for start in range(0, n, 20000):
                    c.edit_config("".join(removal(i) for i in range(start, min(n, start + 20000))), target="running")
    finally:
        for p in procs:
            children.stop(p)
        netns.delete(ns)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="numbers of bindings, comma-separated")
    a = ap.parse_args()
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--sizes {a.sizes!r}: numbers, comma-separated")
    with tempfile.TemporaryDirectory(prefix="natmig-bench-engine-") as d:
        rows = run(sizes, Path(d))
    print(f"\n {'entries':>8} | {'wall':>8} {'total':>8} | " + " ".join(f"{p:>9}" for p in PHASES) + "   (ms; natmig migrate, generic engine, lb-binding)")
    for r in rows:
        ph = " ".join(f"{1000 * r['phases'].get(p, 0):9.1f}" for p in PHASES)
        total = f"{1000 * r['total']:8.1f}" if r["total"] is not None else "       -"
        print(f" {r['entries']:>8} | {1000 * r['wall']:8.1f} {total} | {ph}   {'ok' if r['ok'] else 'FAILED: ' + r['error']}")
    Path("bench_engine.json").write_text(json.dumps(rows, indent=2))
    print("wrote bench_engine.json")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
