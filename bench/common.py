"""Helpers shared by the benchmarks: synthetic tables, medians, peak RSS, tables of figures."""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

from natmig.model import NatSession


#: Seconds each synthetic session has left when loaded.  A run at 1,000,000
#: spends ~15 minutes loading and measuring the floors before natmig's move
#: starts; with the generator's 900 s the first entries loaded timed out
#: during the move's verify (~300,000 of them between the two nodes' reads,
#: every one reported missing).  A day outlives any run here.
SESSION_TIMEOUT = 86_400

T = TypeVar("T")


def synthetic_table(n: int, public: str = "203.0.113.1") -> list[NatSession]:
    """n distinct sessions shaped like a busy NAT: 250 clients, many servers, one public address.

    Public ports cycle through 1024..65535; with the remote endpoint they form
    a unique reply tuple, as on a real NAT.
    """
    out = []
    for i in range(n):
        proto = "UDP" if i % 3 == 0 else "TCP"
        out.append(
            NatSession(
                protocol=proto,
                src_address=f"10.0.0.{2 + i % 250}",
                src_port=1024 + (i // 250) % 64000,
                dst_address=f"198.51.100.{1 + (i // 16000) % 254}",
                dst_port=80 + i % 7,
                translated_address=public,
                translated_port=1024 + i % 64512,
                tcp_state="ESTABLISHED" if proto == "TCP" else None,
                timeout=100 + i % 3000,
                assured=bool(i % 2),
            )
        )
    return out


def median_time(fn: Callable[[], object], runs: int = 3) -> float:
    """Median wall time of ``runs`` calls, in seconds."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, header: Iterable[str], rows: Iterable[Iterable[object]]) -> None:
    """Print a fixed-width table."""
    header = list(header)
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def verdict(value: float, target: float) -> str:
    """'ok' when value <= target, else 'OVER'."""
    return "ok" if value <= target else "OVER"


def reset_peak_rss(pid: int) -> None:
    """Start ``pid``'s peak RSS (VmHWM) afresh from its RSS now (clear_refs 5), so a later read is the peak of what ran since."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def vm_hwm_mb(pid: int) -> float:
    """``pid``'s peak resident set size (VmHWM of /proc/PID/status), in MB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"/proc/{pid}/status has no VmHWM")


def in_child(fn: Callable[[], T]) -> T:
    """``fn()`` run in a forked child; its result (pickled back) or a RuntimeError with the child's error.

    For work whose memory must not count in this process's peak RSS: Python
    keeps freed memory in its arenas, so a table of a million sessions built
    here would still be resident when the controller's peak is read.
    """
    ctx = multiprocessing.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)

    def run() -> None:
        try:
            send.send((True, fn()))
        except BaseException as e:  # noqa: BLE001 -- handed to the parent as text
            send.send((False, f"{type(e).__name__}: {e}"))

    p = ctx.Process(target=run)
    p.start()
    send.close()
    try:
        ok, value = recv.recv()
    except EOFError:
        ok, value = False, "the child exited without an answer"
    p.join()
    if not ok:
        raise RuntimeError(value)
    return value


@contextmanager
def agents_on(tb: Any, work: Path, nodes: Iterable[str], **fleet_options: Any) -> Iterator[Any]:
    """The testbed ``tb`` up with an agent on each of ``nodes`` (an AgentFleet in ``work``); both taken down after, whatever happens."""
    from natmig.controller.agentfleet import AgentFleet

    fleet = None
    try:
        tb.up()
        fleet = AgentFleet(tb, work, **fleet_options)
        fleet.start_all(list(nodes))
        yield fleet
    finally:
        if fleet is not None:
            fleet.close()
        tb.down()
