"""The echo server of the live traffic (run inside a namespace by ``python -m natmig.controller.traffic server``).

It echoes every message and records per flow the source address:port it sees
(the NAT's public mapping) and the arrival times; it writes a JSON summary
when stopped (SIGTERM) or when its time bound runs out.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time
from dataclasses import asdict
from typing import Any, cast

from .trafficflow import CHURN_BASE, MSG, FlowRx, Stopper, errname, write_json


def serve(addr: str, port: int, out: str, duration: float) -> int:
    """The echo server: TCP and UDP on ``addr:port``; records every flow it sees."""
    stopper = Stopper(duration)
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
    flows: dict[int, FlowRx] = {}
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
                    flows.setdefault(fid, FlowRx("UDP", "live")).arrive(now, f"{peer[0]}:{peer[1]}")
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
                        close(s, f"send: {errname(e)}")
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
                    close(s, "reset" if e.errno == errno.ECONNRESET else f"recv: {errname(e)}")
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
                    flows.setdefault(fid, FlowRx("TCP", kind)).arrive(now, c["peer"])
                c["buf"] = buf[whole:]
                c["out"] += buf[:whole]
                try:
                    n = s.send(c["out"])
                    c["out"] = c["out"][n:]
                except BlockingIOError:
                    pass
                except OSError as e:
                    close(s, f"send: {errname(e)}")
                    continue
                if c["out"]:
                    sel.modify(s, selectors.EVENT_READ | selectors.EVENT_WRITE, "tcp")
    write_json(out, {"side": "server", "flows": {str(k): asdict(v) for k, v in flows.items()}})
    for s in list(conns):
        s.close()
    return 0
