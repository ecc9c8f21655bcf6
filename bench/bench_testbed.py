"""Benchmark: how long the emulated network takes to come up, go down, and move its traffic.

Prints, for the demo topology, the median/min/max of ``Testbed.up()`` (the
target is under 3 s), ``down()`` and ``point_to()`` (one OpenFlow bundle),
and beside them the raw floors measured in the same run: starting the two
OVS daemons alone, and one bare ``ovs-ofctl`` process start.  Needs root.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from natmig import netns
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import leftovers
from natmig.testbed.ovs import Ovs

RUNS = 5
UP_TARGET_S = 3.0


def _fmt(samples: list[float], unit: float = 1.0, suffix: str = "s") -> str:
    return (
        f"median {statistics.median(samples) * unit:.3f} {suffix} "
        f"(min {min(samples) * unit:.3f}, max {max(samples) * unit:.3f}, n={len(samples)})"
    )


def _ovs_floor() -> list[float]:
    """Starting and stopping a private ovsdb-server + ovs-vswitchd, nothing else."""
    samples = []
    for _ in range(3):
        home = Path(tempfile.mkdtemp(prefix="natmig-bench-ovs-"))
        ovs = Ovs(home)
        try:
            t0 = time.perf_counter()
            ovs.start()
            samples.append(time.perf_counter() - t0)
        finally:
            ovs.stop()
            shutil.rmtree(home, ignore_errors=True)
    return samples


def _process_floor() -> list[float]:
    samples = []
    for _ in range(10):
        t0 = time.perf_counter()
        subprocess.run(["ovs-ofctl", "--version"], capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return samples


def main() -> int:
    """Run the benchmark and print its figures; non-zero when ``up`` misses its target."""
    if os.geteuid() != 0:
        print("bench_testbed: needs root (namespaces, Open vSwitch)")
        return 1
    prefix = netns.run_prefix("bt")
    ups, downs, moves = [], [], []
    tb = Testbed.from_file(None, prefix=prefix)
    try:
        for _ in range(RUNS):
            t0 = time.perf_counter()
            tb.up()
            ups.append(time.perf_counter() - t0)
            tb.exec("client", ["ping", "-c", "1", "-W", "2", "203.0.113.100"])  # it works, not just exists
            for nat in ("nat2", "nat1"):
                moves.append(tb.point_to(nat))
            t0 = time.perf_counter()
            tb.down()
            downs.append(time.perf_counter() - t0)
    finally:
        tb.down()
    left = {k: v for k, v in leftovers(prefix).items() if v}
    ovs_floor, proc_floor = _ovs_floor(), _process_floor()
    up_median = statistics.median(ups)
    print(f"testbed up (demo: 4 nodes, 6 namespaces, 8 veths, private OVS): {_fmt(ups)}")
    print(f"testbed down:                                                 {_fmt(downs)}")
    print(f"point_to (one OpenFlow bundle, both directions):              {_fmt(moves, 1000, 'ms')}")
    print(f"floor: private ovsdb-server + ovs-vswitchd start alone:       {_fmt(ovs_floor)}")
    print(f"floor: one ovs-ofctl process start:                           {_fmt(proc_floor, 1000, 'ms')}")
    print(f"target: testbed up < {UP_TARGET_S:.0f} s: {'met' if up_median < UP_TARGET_S else 'MISSED'} ({up_median:.2f} s)")
    if left:
        print(f"leftovers after down: {left}")
    return 0 if up_median < UP_TARGET_S and not left else 1


if __name__ == "__main__":
    sys.exit(main())
