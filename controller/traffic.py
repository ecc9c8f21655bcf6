"""Live traffic for the demo, the tests and the bench: flows that keep sending, and what they saw.

Two small programs run inside namespaces (``python -m natmig.controller.traffic
server|client``): the server, on the public side, echoes every message and
records per flow the source address:port it sees (the NAT's public mapping)
and the arrival times; the client, behind the NAT, keeps N TCP connections
and N UDP flows sending a 16-byte message every ``interval``, optionally
opens new short TCP connections at a steady rate (``churn``), and records
the echoes.  Both write a JSON summary when stopped (SIGTERM) or when their
time bound runs out.  :class:`LiveTraffic` starts and stops them and merges
both sides into a :class:`TrafficResult`: per flow, whether it survived with
the same public port, and the largest gap it saw.

Times are CLOCK_MONOTONIC, which every namespace of the machine shares, so
the two sides and the controller can be compared directly.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from ..errors import ControllerError

MSG = struct.Struct("!IId")  # flow id, sequence number, client send time
MAX_FLOWS = 2000
#: new connections a client opens at most over its run: its records of them
#: are kept to the end.  Enough for 100 a second through a 1,000,000-session
#: move (~4 min), whose hold came after the 2,000th: none was held then.
MAX_CHURN = 100_000
MAX_DURATION = 900.0
UDP_BASE = 100_000
CHURN_BASE = 200_000
TOP_GAPS = 128
#: of those, how many per flow a JSON report keeps (100 flows: ~100 KB).
PLOTTED_GAPS = 32


class TrafficError(ControllerError):
    """The traffic programs could not be started, or their results read."""


# =========================================================== the programs


@dataclass
class _Rx:
    """Per-flow receive bookkeeping, shared by both sides."""

    proto: str
    kind: str
    received: int = 0
    first: float | None = None
    last: float | None = None
    max_gap: float = 0.0
    endpoints: list[str] = field(default_factory=list)
    ended: str | None = None
    gap_end: float | None = None
    # The TOP_GAPS largest gaps as (gap, end time): enough to tell which
    # phase of a migration each happened in.
    top: list[tuple[float, float]] = field(default_factory=list)

    def arrive(self, t: float, endpoint: str | None = None) -> None:
        if self.last is not None:
            gap = t - self.last
            if gap > self.max_gap:
                self.max_gap = gap
                self.gap_end = t
            if len(self.top) < TOP_GAPS:
                heapq.heappush(self.top, (gap, t))
            elif gap > self.top[0][0]:
                heapq.heapreplace(self.top, (gap, t))
        else:
            self.first = t
        self.last = t
        self.received += 1
        if endpoint is not None and endpoint not in self.endpoints:
            self.endpoints.append(endpoint)


class _Stopper:
    """Turns SIGTERM/SIGINT into a flag the event loops poll."""

    def __init__(self, duration: float) -> None:
        self.deadline = time.monotonic() + min(duration, MAX_DURATION)
        self.stop = False
        signal.signal(signal.SIGTERM, self._on)
        signal.signal(signal.SIGINT, self._on)

    def _on(self, *_: object) -> None:
        self.stop = True

    def done(self) -> bool:
        return self.stop or time.monotonic() >= self.deadline


def _errname(e: OSError) -> str:
    """``ECONNRESET``: the errno's name, or the error's own words when it has none."""
    return errno.errorcode.get(e.errno, str(e)) if e.errno is not None else str(e)


def _write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def serve(addr: str, port: int, out: str, duration: float) -> int:
    """The echo server: TCP and UDP on ``addr:port``; records every flow it sees."""
    stopper = _Stopper(duration)
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(1024)
    lsock.setblocking(False)
    usock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    usock.bind((addr, port))
    usock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, "listen")
    sel.register(usock, selectors.EVENT_READ, "udp")
    flows: dict[int, _Rx] = {}
    conns: dict[socket.socket, dict[str, Any]] = {}
    print("ready", flush=True)

    def close(s: socket.socket, why: str) -> None:
        c = conns.pop(s, None)
        if c is None:
            return
        for fid in c["ids"]:
            if flows[fid].ended is None:
                flows[fid].ended = why
        sel.unregister(s)
        s.close()

    while not stopper.done():
        for key, mask in sel.select(0.05):
            now = time.monotonic()
            if key.data == "listen":
                while True:
                    try:
                        s, peer = lsock.accept()
                    except BlockingIOError:
                        break
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s] = {"peer": f"{peer[0]}:{peer[1]}", "buf": b"", "out": b"", "ids": set()}
                    sel.register(s, selectors.EVENT_READ, "tcp")
            elif key.data == "udp":
                while True:
                    try:
                        data, peer = usock.recvfrom(2048)
                    except BlockingIOError:
                        break
                    if len(data) != MSG.size:
                        continue
                    fid = MSG.unpack(data)[0]
                    flows.setdefault(fid, _Rx("UDP", "live")).arrive(now, f"{peer[0]}:{peer[1]}")
                    try:
                        usock.sendto(data, peer)
                    except OSError:
                        pass  # an echo lost is a UDP echo lost; the client sees the gap
            else:
                s = cast(socket.socket, key.fileobj)  # only sockets are registered
                c = conns[s]
                if mask & selectors.EVENT_WRITE and c["out"]:
                    try:
                        n = s.send(c["out"])
                        c["out"] = c["out"][n:]
                    except BlockingIOError:
                        pass
                    except OSError as e:
                        close(s, f"send: {_errname(e)}")
                        continue
                if not mask & selectors.EVENT_READ:
                    if not c["out"]:
                        sel.modify(s, selectors.EVENT_READ, "tcp")
                    continue
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError as e:
                    close(s, "reset" if e.errno == errno.ECONNRESET else f"recv: {_errname(e)}")
                    continue
                if not data:
                    close(s, "eof")
                    continue
                buf = c["buf"] + data
                whole = len(buf) - len(buf) % MSG.size
                for off in range(0, whole, MSG.size):
                    fid = MSG.unpack_from(buf, off)[0]
                    if fid not in c["ids"]:
                        c["ids"].add(fid)
                    kind = "churn" if fid >= CHURN_BASE else "live"
                    flows.setdefault(fid, _Rx("TCP", kind)).arrive(now, c["peer"])
                c["buf"] = buf[whole:]
                c["out"] += buf[:whole]
                try:
                    n = s.send(c["out"])
                    c["out"] = c["out"][n:]
                except BlockingIOError:
                    pass
                except OSError as e:
                    close(s, f"send: {_errname(e)}")
                    continue
                if c["out"]:
                    sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, "tcp")
    _write_json(out, {"side": "server", "flows": {str(k): asdict(v) for k, v in flows.items()}})
    for s in list(conns):
        s.close()
    return 0


@dataclass
class _Flow:
    fid: int
    proto: str
    kind: str
    sock: socket.socket
    rx: _Rx
    connected: bool = True
    seq: int = 0
    sent: int = 0
    buf: bytes = b""
    error: str | None = None
    born: float = 0.0
    end_at: float | None = None
    closed: bool = False
    connect_time: float | None = None
    blocked: int = 0


def client(server: str, port: int, tcp: int, udp: int, interval: float, churn: float, churn_life: float, out: str, duration: float, linger: float) -> int:
    """The client: ``tcp`` + ``udp`` live flows, plus ``churn`` new TCP connections per second."""
    if tcp + udp > MAX_FLOWS:
        raise SystemExit(f"traffic client: at most {MAX_FLOWS} live flows, asked for {tcp + udp}")
    stopper = _Stopper(duration)
    sel = selectors.DefaultSelector()
    flows: dict[int, _Flow] = {}
    due: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def add(fid: int, proto: str, kind: str, blocking_connect: bool) -> _Flow:
        st = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, st)
        if proto == "TCP":
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = _Flow(fid, proto, kind, s, _Rx(proto, kind), born=time.monotonic())
        if blocking_connect:
            s.settimeout(10)
            s.connect((server, port))
            s.setblocking(False)
            f.connect_time = time.monotonic() - f.born
            sel.register(s, selectors.EVENT_READ, fid)
        else:
            s.setblocking(False)
            try:
                s.connect((server, port))
            except BlockingIOError:
                pass
            f.connected = False
            sel.register(s, selectors.EVENT_WRITE, fid)
        flows[fid] = f
        return f

    for i in range(tcp):
        add(i, "TCP", "live", True)
    for i in range(udp):
        add(UDP_BASE + i, "UDP", "live", True)
    n_live = tcp + udp
    for j, fid in enumerate(list(flows)):
        # Spread the first sends over one interval: no synchronised bursts.
        heapq.heappush(due, (time.monotonic() + interval * j / max(1, n_live), fid))
    next_churn = time.monotonic() + (1.0 / churn if churn > 0 else float("inf"))
    churn_n = 0
    print("ready", flush=True)

    def fail(f: _Flow, why: str) -> None:
        if f.error is None:
            f.error = why
        if not f.closed:
            f.closed = True
            try:
                sel.unregister(f.sock)
            except (KeyError, ValueError):
                pass
            f.sock.close()

    def send(f: _Flow, now: float) -> None:
        try:
            f.sock.send(MSG.pack(f.fid, f.seq, now))
        except BlockingIOError:
            f.blocked += 1  # TCP send buffer full: the path is stalled; not sent
            return
        except ConnectionRefusedError:
            if f.proto == "UDP":
                f.blocked += 1  # ICMP unreachable for an earlier datagram
                return
            fail(f, "refused")
            return
        except OSError as e:
            fail(f, "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else f"send: {_errname(e)}")
            return
        f.seq += 1
        f.sent += 1

    while not stopper.done():
        now = time.monotonic()
        while due and due[0][0] <= now:
            t, fid = heapq.heappop(due)
            f = flows[fid]
            if f.closed:
                continue
            if f.end_at is not None and now >= f.end_at:
                # A churn flow's life is over: stop sending, close once echoed.
                continue
            if f.connected:
                send(f, now)
            nxt = t + interval
            heapq.heappush(due, (nxt if nxt > now else now + interval, fid))
        if now >= next_churn:
            fid = CHURN_BASE + churn_n
            churn_n += 1
            if churn_n <= MAX_CHURN:
                f = add(fid, "TCP", "churn", False)
                heapq.heappush(due, (now, fid))
            next_churn += 1.0 / churn
        for f in list(flows.values()):
            if f.kind == "churn" and not f.closed and f.end_at is not None and now >= f.end_at and f.rx.received >= f.sent:
                f.closed = True
                sel.unregister(f.sock)
                f.sock.close()
            elif f.kind == "churn" and not f.connected and not f.closed and now - f.born > 15:
                fail(f, "connect timed out")
        timeout = max(0.0, min((due[0][0] - now) if due else 0.01, 0.01))
        for key, mask in sel.select(timeout):
            f = flows[key.data]
            now = time.monotonic()
            if not f.connected:
                err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(f, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                f.connected = True
                f.connect_time = now - f.born
                f.end_at = now + churn_life
                sel.modify(f.sock, selectors.EVENT_READ, f.fid)
                continue
            try:
                data = f.sock.recv(65536)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:
                if f.proto == "UDP":
                    continue
                fail(f, "refused")
                continue
            except OSError as e:
                fail(f, "reset" if e.errno == errno.ECONNRESET else f"recv: {_errname(e)}")
                continue
            if not data:
                fail(f, "closed by the server")
                continue
            if f.proto == "UDP":
                if len(data) == MSG.size:
                    f.rx.arrive(now)
                continue
            buf = f.buf + data
            whole = len(buf) - len(buf) % MSG.size
            for _ in range(0, whole, MSG.size):
                f.rx.arrive(now)
            f.buf = buf[whole:]
    stopped = time.monotonic()
    # Let echoes in flight arrive: a TCP flow that survived gets every one back.
    end = stopped + linger
    def pending() -> bool:
        return any(f.proto == "TCP" and not f.closed and (f.rx.received < f.sent or not f.connected) for f in flows.values())

    while time.monotonic() < end and pending():
        for key, _ in sel.select(0.01):
            f = flows[key.data]
            if not f.connected:
                # A new connection whose SYN was dropped is retried by the
                # kernel; let it finish, and send its one message.
                err = f.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(f, f"connect: {errno.errorcode.get(err, err)}")
                    continue
                f.connected = True
                f.connect_time = time.monotonic() - f.born
                sel.modify(f.sock, selectors.EVENT_READ, f.fid)
                send(f, time.monotonic())
                continue
            try:
                data = f.sock.recv(65536)
            except (BlockingIOError, ConnectionRefusedError):
                continue
            except OSError as e:
                fail(f, "reset" if e.errno == errno.ECONNRESET else f"recv: {_errname(e)}")
                continue
            if not data:
                fail(f, "closed by the server")
                continue
            if f.proto == "UDP":
                continue  # UDP echoes after the stop do not count
            buf = f.buf + data
            whole = len(buf) - len(buf) % MSG.size
            for _ in range(0, whole, MSG.size):
                f.rx.arrive(time.monotonic())
            f.buf = buf[whole:]
    result = {
        "side": "client", "started": t0, "stopped": stopped, "interval": interval,
        "flows": {
            str(f.fid): {**asdict(f.rx), "sent": f.sent, "error": f.error, "connect_time": f.connect_time, "born": f.born, "blocked": f.blocked, "open": not f.closed}
            for f in flows.values()
        },
    }
    _write_json(out, result)
    for f in flows.values():
        if not f.closed:
            f.sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m natmig.controller.traffic server|client ...`` (run inside a namespace)."""
    p = argparse.ArgumentParser(prog="natmig-traffic")
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--listen", required=True)
    s.add_argument("--port", type=int, default=5001)
    s.add_argument("--out", required=True)
    s.add_argument("--duration", type=float, default=300.0)
    c = sub.add_parser("client")
    c.add_argument("--server", required=True)
    c.add_argument("--port", type=int, default=5001)
    c.add_argument("--tcp", type=int, default=50)
    c.add_argument("--udp", type=int, default=50)
    c.add_argument("--interval", type=float, default=0.01)
    c.add_argument("--churn", type=float, default=0.0)
    c.add_argument("--churn-life", type=float, default=0.3)
    c.add_argument("--linger", type=float, default=1.0)
    c.add_argument("--out", required=True)
    c.add_argument("--duration", type=float, default=300.0)
    a = p.parse_args(argv)
    if a.role == "server":
        return serve(a.listen, a.port, a.out, a.duration)
    return client(a.server, a.port, a.tcp, a.udp, a.interval, a.churn, a.churn_life, a.out, a.duration, a.linger)


# ============================================================ controller side


@dataclass
class TrafficSpec:
    """What traffic to run: live flows, their send interval, and new connections per second."""

    tcp: int = 50
    udp: int = 50
    interval: float = 0.01
    churn: float = 0.0
    churn_life: float = 0.3
    port: int = 5001
    duration: float = 300.0

    def __post_init__(self) -> None:
        if self.tcp < 0 or self.udp < 0 or self.tcp + self.udp > MAX_FLOWS:
            raise TrafficError(f"tcp={self.tcp}, udp={self.udp}: need 0..{MAX_FLOWS} live flows in all")
        if not 0.0005 <= self.interval <= 10:
            raise TrafficError(f"interval={self.interval}: need 0.0005..10 seconds")
        if not 0 <= self.churn <= 200:
            raise TrafficError(f"churn={self.churn}: need 0..200 new connections per second")
        if not 0 < self.duration <= MAX_DURATION:
            raise TrafficError(f"duration={self.duration}: need 0..{MAX_DURATION} seconds")


@dataclass
class FlowResult:
    """One flow as both ends saw it; ``survived`` with ``why`` when it did not."""

    fid: int
    proto: str
    kind: str
    endpoints: list[str]
    sent: int
    at_server: int
    echoed: int
    max_gap: float
    error: str | None
    survived: bool
    why: str = ""
    gap_end: float | None = None
    top_gaps: list[tuple[float, float]] = field(default_factory=list)
    #: when the client opened it (CLOCK_MONOTONIC) and how long its connect took (seconds; TCP only)
    born: float | None = None
    connect_time: float | None = None


@dataclass
class TrafficResult:
    """Every flow's outcome, and the figures the demo reports."""

    flows: list[FlowResult]
    interval: float

    def of(self, kind: str) -> list[FlowResult]:
        """Flows of a kind ("live" or "churn")."""
        return [f for f in self.flows if f.kind == kind]

    @property
    def live_total(self) -> int:
        """Number of live (long-running) flows."""
        return len(self.of("live"))

    @property
    def live_survived(self) -> int:
        """Live flows that survived with the same public address and port."""
        return sum(f.survived for f in self.of("live"))

    @property
    def largest_gap(self) -> float:
        """The largest silence (seconds) any live flow saw, at either end."""
        return max((f.max_gap for f in self.of("live")), default=0.0)

    @property
    def largest_gap_end(self) -> float | None:
        """When (CLOCK_MONOTONIC) the largest gap of a live flow ended."""
        live = self.of("live")
        return max(live, key=lambda f: f.max_gap).gap_end if live else None

    def largest_gap_during(self, start: float, end: float) -> tuple[float, bool]:
        """The largest gap of a live flow that overlapped [start, end] (CLOCK_MONOTONIC seconds), and whether it is exact.

        Only each flow's TOP_GAPS largest gaps are kept.  When none of them
        overlapped the window, every gap there was smaller than the smallest
        kept one, which is returned as an upper bound (exact False).
        """
        best, bound = 0.0, 0.0
        found = False
        for f in self.of("live"):
            if f.top_gaps:
                bound = max(bound, min(g for g, _ in f.top_gaps))
            for gap, t in f.top_gaps:
                if t >= start and t - gap <= end:
                    best = max(best, gap)
                    found = True
        return (best, True) if found else (bound, False)

    def connects_during(self, start: float, end: float) -> list[float]:
        """Connect times (seconds) of the new connections opened between ``start`` and ``end`` (CLOCK_MONOTONIC)."""
        return [f.connect_time for f in self.of("churn")
                if f.born is not None and f.connect_time is not None and start <= f.born <= end]

    @property
    def all_survived(self) -> bool:
        """Every flow, live or churn, survived."""
        return all(f.survived for f in self.flows)

    def broken(self) -> list[FlowResult]:
        """The flows that did not survive."""
        return [f for f in self.flows if not f.survived]

    def summary(self) -> dict[str, Any]:
        """The figures, JSON-ready."""
        live = self.of("live")
        churn = self.of("churn")
        return {
            "live_flows": len(live),
            "live_survived": sum(f.survived for f in live),
            "tcp": {"total": sum(f.proto == "TCP" for f in live), "survived": sum(f.survived for f in live if f.proto == "TCP")},
            "udp": {"total": sum(f.proto == "UDP" for f in live), "survived": sum(f.survived for f in live if f.proto == "UDP")},
            "largest_gap_ms": round(self.largest_gap * 1000, 2),
            "new_connections": len(churn),
            "new_connections_survived": sum(f.survived for f in churn),
            "broken": [asdict(f) for f in self.broken()[:20]],
            "interval_ms": round(self.interval * 1000, 3),
            # Each live flow's largest silences (seconds, and when each ended on
            # CLOCK_MONOTONIC, the phases' clock): what `natmig plot` draws.
            "flows": [{"fid": f.fid, "proto": f.proto, "survived": f.survived,
                       "top_gaps": [[round(g, 6), round(t, 6)] for g, t in sorted(f.top_gaps, reverse=True)[:PLOTTED_GAPS]]}
                      for f in live],
        }


def merge(client_doc: dict[str, Any], server_doc: dict[str, Any]) -> TrafficResult:
    """Judge every flow from both ends' records.

    A TCP flow survived when it saw no error, the server saw it from one
    public address:port only, and every message it sent came back.  A UDP
    flow survived when the server saw one public address:port and echoes
    kept arriving until the end (losses during the move are allowed).
    """
    interval = float(client_doc.get("interval", 0.01))
    stopped = float(client_doc.get("stopped", 0.0))
    sflows = server_doc.get("flows", {})
    out = []
    for fid_s, c in sorted(client_doc.get("flows", {}).items(), key=lambda kv: int(kv[0])):
        s = sflows.get(fid_s, {})
        endpoints = list(s.get("endpoints", []))
        gap, gap_end = max((float(c.get("max_gap") or 0.0), c.get("gap_end")), (float(s.get("max_gap") or 0.0), s.get("gap_end")), key=lambda g: g[0])
        if c.get("kind") == "live" and c.get("last") is not None and stopped and stopped - float(c["last"]) > gap:
            # A flow that went silent for good has a gap that lasts until the stop.
            gap, gap_end = stopped - float(c["last"]), stopped
        why = []
        if c.get("error"):
            why.append(f"client error: {c['error']}")
        if len(endpoints) > 1:
            why.append(f"public endpoint changed: {' -> '.join(endpoints)}")
        if not endpoints and c.get("sent", 0):
            why.append("never reached the server")
        if c.get("kind") == "churn" and c.get("connect_time") is None and not c.get("error"):
            why.append("connection never completed")
        if c["proto"] == "TCP":
            if s.get("ended") not in (None, "eof"):
                why.append(f"server side: {s['ended']}")
            if c.get("received", 0) < c.get("sent", 0):
                why.append(f"{c['sent'] - c['received']} of {c['sent']} messages not echoed")
        else:
            last = c.get("last")
            if last is None or stopped - float(last) > max(0.5, 20 * interval):
                why.append("echoes stopped before the end")
        out.append(FlowResult(
            int(fid_s), c["proto"], c["kind"], endpoints, int(c.get("sent", 0)), int(s.get("received", 0)),
            int(c.get("received", 0)), gap, c.get("error"), not why, "; ".join(why), gap_end,
            [tuple(g) for g in (c.get("top") or []) + (s.get("top") or [])],
            c.get("born"), c.get("connect_time"),
        ))
    return TrafficResult(out, interval)


class LiveTraffic:
    """Starts the echo server and the client in their namespaces; :meth:`stop` returns the result.

    Use as a context manager: both processes are always killed on exit.
    """

    def __init__(self, client_netns: str | None, server_netns: str | None, server_addr: str, spec: TrafficSpec | None = None, workdir: str | None = None) -> None:
        self.client_netns = client_netns
        self.server_netns = server_netns
        self.server_addr = server_addr
        self.spec = spec or TrafficSpec()
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="natmig-traffic-"))
        self.server: subprocess.Popen | None = None
        self.client: subprocess.Popen | None = None
        self.result: TrafficResult | None = None

    def _spawn(self, netns: str | None, args: list[str]) -> subprocess.Popen:
        argv = [sys.executable, "-m", "natmig.controller.traffic", *args]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        # The hosts run at normal priority even when the controller that
        # starts them is niced: they stand in for other machines.
        return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))

    @staticmethod
    def _ready(p: subprocess.Popen, what: str, timeout: float) -> None:
        sel = selectors.DefaultSelector()
        assert p.stdout is not None
        sel.register(p.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            p.kill()
            raise TrafficError(f"traffic {what} not ready within {timeout} s")
        line = p.stdout.readline().strip()
        if line != "ready":
            p.wait(5)
            err = p.stderr.read() if p.stderr else ""
            raise TrafficError(f"traffic {what} failed to start: {err.strip()[-800:] or line}")

    def start(self, timeout: float = 20.0) -> "LiveTraffic":
        """Start the server, then the client; returns when every live flow is connected."""
        sp = self.spec
        self.server = self._spawn(self.server_netns, ["server", "--listen", self.server_addr, "--port", str(sp.port), "--out", str(self.dir / "server.json"), "--duration", str(sp.duration + 30)])
        self._ready(self.server, "server", timeout)
        self.client = self._spawn(self.client_netns, [
            "client", "--server", self.server_addr, "--port", str(sp.port), "--tcp", str(sp.tcp), "--udp", str(sp.udp),
            "--interval", str(sp.interval), "--churn", str(sp.churn), "--churn-life", str(sp.churn_life),
            "--out", str(self.dir / "client.json"), "--duration", str(sp.duration),
            "--linger", "2.5" if sp.churn else "1.0",
        ])
        self._ready(self.client, "client", timeout)
        return self

    def stop(self, timeout: float = 30.0) -> TrafficResult:
        """Stop the client (it waits for echoes in flight), then the server; merge their records."""
        docs = {}
        for name, p in (("client", self.client), ("server", self.server)):
            if p is None:
                raise TrafficError("traffic was not started")
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                raise TrafficError(f"traffic {name} did not stop within {timeout} s") from None
            path = self.dir / f"{name}.json"
            try:
                docs[name] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                err = p.stderr.read() if p.stderr else ""
                raise TrafficError(f"traffic {name} left no result ({e}): {err.strip()[-800:]}") from e
        self.result = merge(docs["client"], docs["server"])
        return self.result

    def close(self) -> None:
        """Kill whatever still runs (by our own process handles) and remove the work directory."""
        for p in (self.client, self.server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(5)
            if p is not None:
                for stream in (p.stdout, p.stderr):
                    if stream:
                        stream.close()
        if self._own_dir:
            for f in self.dir.glob("*"):
                f.unlink(missing_ok=True)
            self.dir.rmdir()

    def __enter__(self) -> "LiveTraffic":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(main())
