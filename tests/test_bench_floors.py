"""The migration benchmark's floors table, targets and merge of sizes, on made-up rows (no root, nothing run)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_migrate.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_migrate_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def row(n: int, natmig: float = 1.0, kernel: float = 0.4, blackout: float | None = 0.1, peer: dict | None = None, rss: float = 80.0) -> dict:
    """A row as measure() writes it, with only what the floors' table and targets read."""
    return {
        "sessions": n, "floor": {"dump": 0.1, "restore": 0.1, "bundle": 0.01, "total": natmig / 2.5, "entries": n},
        "kernel_floor": {"dump": kernel / 2, "create": kernel / 2 - 0.01, "bundle": 0.01, "total": kernel, "entries": n},
        "conntrackd": peer, "conntrackd_error": None if peer else "conntrackd is not installed (make system installs it)",
        "blackout": blackout, "blackout_ms": None, "ratio_kernel": natmig / kernel, "ratio": 2.5, "natmig_total": natmig,
        "natmig_ok": True, "natmig_error": None, "probe_survived": True, "probe_gap_ms": 5.0, "churn_run_ok": True,
        "connect_max_ms_in_hold": 0.0, "agent_peak_rss_mb": {"source": rss, "target": rss}, "controller_peak_rss_mb": 70.0,
    }


PEER = {"sync": 0.03, "commit": 0.05, "bundle": 0.012, "total": 0.062, "entries": 10000}


def test_floors_table_shows_each_floor_and_why_conntrackd_is_missing(bench, capsys) -> None:
    bench.print_floors([row(10_000, peer=PEER), row(1000)])
    out = capsys.readouterr().out
    assert "   62.0 " in out and "2.50" in out  # conntrackd's commit + bundle; natmig / kernel floor
    assert "conntrackd could not run: conntrackd is not installed" in out


def test_targets_against_the_kernel_floor_and_conntrackd(bench) -> None:
    assert bench.check_targets([row(100_000, natmig=0.8, kernel=0.4, blackout=0.05, peer=PEER)]) == []
    missed = bench.check_targets([row(100_000, natmig=1.0, kernel=0.4, blackout=0.1, peer=PEER)])
    assert any("2.50x the kernel floor" in m for m in missed)
    assert any("blackout 100.0 ms above conntrackd's commit + bundle 62.0 ms" in m for m in missed)
    # No conntrackd figure, no comparison with it (and no crash).
    assert not any("conntrackd" in m for m in bench.check_targets([row(100_000, natmig=0.8, peer=None)]))
    big = bench.check_targets([row(1_000_000, natmig=0.8, peer=None, rss=1600.0)])
    assert any("agent peak RSS 1600 MB" in m for m in big)


def test_ratio_targets_read_the_floors_measured_beside_the_probe_when_the_row_has_them(bench, capsys) -> None:
    # Quiet floors alone (a row of an older JSON): the targets read them.
    quiet = row(100_000, natmig=1.0, kernel=0.4, blackout=0.05, peer=PEER)
    assert any("2.50x the kernel floor 0.400 s, quiet" in m for m in bench.check_targets([quiet]))
    # The same move against floors measured as it ran: 1.0 / 0.55 and 1.0 / 0.5, both met.
    alike = dict(quiet, floor_alike={"dump": 0.2, "restore": 0.2, "bundle": 0.01, "total": 0.5, "entries": 100_000},
                 kernel_floor_alike={"dump": 0.3, "create": 0.24, "bundle": 0.01, "total": 0.55, "entries": 100_000},
                 ratio_alike=2.0, ratio_kernel_alike=1.0 / 0.55)
    assert bench.check_targets([alike]) == []
    # Above 2x of the alike floor is missed, named as that floor.
    worse = dict(alike, ratio_kernel_alike=2.2)
    assert any("2.20x the kernel floor 0.550 s, measured beside the probe" in m for m in bench.check_targets([worse]))
    # Both printed: the quiet ratio and the alike one.
    bench.print_floors([alike])
    out = capsys.readouterr().out
    assert "    2.50    1.82 " in out and "   550.0 " in out and "   500.0 " in out


def test_merge_keeps_other_sizes_and_drops_rows_without_the_floors(bench, tmp_path: Path) -> None:
    path = tmp_path / "bench_migrate.json"
    assert bench.merged(path, [row(1_000_000)]) == [row(1_000_000)]
    old = [row(1000), row(1_000_000, natmig=9.0), {"sessions": 10_000, "floor": {}}]
    path.write_text(json.dumps(old))
    got = bench.merged(path, [row(1_000_000)])
    assert [r["sessions"] for r in got] == [1000, 1_000_000] and got[1]["natmig_total"] == 1.0


def test_timeouts_scale_with_the_table_unless_given(bench) -> None:
    # 30 s was what a 1,000,000-session get-config outlasted; 600 / 900 s moved it.
    assert bench.Timeouts.for_table(1000) == bench.Timeouts(30.0, 10.0)
    assert bench.Timeouts.for_table(1_000_000) == bench.Timeouts(600.0, 900.0)
    assert bench.Timeouts.for_table(1_000_000, rpc=45.0, confirm=20.0) == bench.Timeouts(45.0, 20.0)


def test_the_benchmark_table_outlives_a_long_run(bench) -> None:
    # The 1,000,000 run spent ~15 min loading and on the floors, then its move
    # read both tables a minute apart: with 900 s the oldest entries timed out between.
    assert bench.SESSION_TIMEOUT >= 6 * 3600
    with pytest.raises(SystemExit):
        bench.main(["--confirm-timeout", "0"])
