"""The client of the live traffic (run inside a namespace by ``python -m natmig.controller.traffic client``).

Behind the NAT, it keeps N TCP connections and N UDP flows sending a 16-byte
message every ``interval``, optionally opens new short TCP connections at a
steady rate (``churn``), and records the echoes; it writes a JSON summary when
stopped (SIGTERM) or when its time bound runs out.
"""

from __future__ import annotations

import errno
import heapq
import selectors
import socket
import time
from dataclasses import asdict, dataclass

from .trafficflow import CHURN_BASE, MAX_CHURN, MAX_FLOWS, MSG, UDP_BASE, FlowRx, Stopper, errname, write_json


@dataclass
class _Flow:
    fid: int
    proto: str
    kind: str
    sock: socket.socket
    rx: FlowRx
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
    stopper = Stopper(duration)
    sel = selectors.DefaultSelector()
    flows: dict[int, _Flow] = {}
    due: list[tuple[float, int]] = []
    t0 = time.monotonic()

    def add(fid: int, proto: str, kind: str, blocking_connect: bool) -> _Flow:
        st = socket.SOCK_STREAM if proto == "TCP" else socket.SOCK_DGRAM
        s = socket.socket(socket.AF_INET, st)
        if proto == "TCP":
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = _Flow(fid, proto, kind, s, FlowRx(proto, kind), born=time.monotonic())
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
            fail(f, "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else f"send: {errname(e)}")
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
                fail(f, "reset" if e.errno == errno.ECONNRESET else f"recv: {errname(e)}")
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
                fail(f, "reset" if e.errno == errno.ECONNRESET else f"recv: {errname(e)}")
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
    write_json(out, result)
    for f in flows.values():
        if not f.closed:
            f.sock.close()
    return 0
