"""Small traffic endpoints for the NAT node tests, run inside namespaces as scripts.

Servers echo every message with the address and port they saw it come from,
so a client learns the public port the NAT gave it.  Clients send a numbered
message every ``interval`` seconds for ``duration`` seconds and print one
JSON summary: replies with their times, the ports the server saw, and the
error that ended the flow early (reset, timeout), if any.

    python flows_natnode.py tcp-server PORT
    python flows_natnode.py udp-server PORT
    python flows_natnode.py tcp-client DST PORT SPORT DURATION INTERVAL [SIZE WINDOW]
    python flows_natnode.py udp-client DST PORT SPORT DURATION INTERVAL
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time


def tcp_server(port: int) -> None:
    """Accept connections forever; echo each line as 'seq ip port'."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("0.0.0.0", port))
    ls.listen(16)
    print("ready", flush=True)

    def serve(c: socket.socket, peer: tuple[str, int]) -> None:
        """Echo one connection's lines until it closes."""
        buf = b""
        with c:
            while True:
                try:
                    data = c.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    c.sendall(line + f" {peer[0]} {peer[1]}\n".encode())

    while True:
        c, peer = ls.accept()
        threading.Thread(target=serve, args=(c, peer), daemon=True).start()


def udp_server(port: int) -> None:
    """Echo each datagram as 'seq ip port' to where it came from, forever."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(4096)
        s.sendto(data + f" {peer[0]} {peer[1]}".encode(), peer)


def tcp_client(dst: str, port: int, sport: int, duration: float, interval: float, size: int = 0, window: int = 1) -> dict:
    """One connection; requests padded to ``size`` bytes, up to ``window`` of them in flight.

    With window 1 it is a request/answer every interval; a large window and
    size keep the connection busy (data in flight both ways) for the move.
    Stops at the first error.
    """
    out: dict = {"replies": [], "ports": [], "error": None, "sent": 0}
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", sport))
    s.settimeout(3.0)
    ports: set[int] = set()
    end = time.time() + duration
    pad = "x" * max(0, size - 12)
    try:
        s.connect((dst, port))
        f = s.makefile("rb")
        seq = answered = 0
        while answered < seq or time.time() < end:
            while seq - answered < window and time.time() < end:
                seq += 1
                s.sendall(f"{seq}{' ' + pad if pad else ''}\n".encode())
                out["sent"] = seq
            line = f.readline()
            if not line:
                raise ConnectionError("connection closed by peer")
            fields = line.decode().split()
            answered += 1
            if int(fields[0]) != answered:
                raise ConnectionError(f"answer {fields[0]} where {answered} was due")
            ports.add(int(fields[-1]))
            out["replies"].append(time.time())
            if interval:
                time.sleep(interval)
    except (OSError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        s.close()
    out["ports"] = sorted(ports)
    out["replies_total"] = len(out["replies"])
    if len(out["replies"]) > 5000:  # keep the summary small: the tail is what tests look at
        out["replies"] = out["replies"][:: len(out["replies"]) // 2000]
    return out


def udp_client(dst: str, port: int, sport: int, duration: float, interval: float) -> dict:
    """A datagram every interval; answers are collected as they come."""
    out: dict = {"replies": [], "ports": [], "error": None, "sent": 0}
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport))
    s.settimeout(interval)
    ports: set[int] = set()
    end = time.time() + duration
    seq = 0
    while time.time() < end + 0.3:
        if time.time() < end:
            seq += 1
            s.sendto(f"{seq}".encode(), (dst, port))
            out["sent"] = seq
        deadline = time.time() + interval
        while time.time() < deadline:
            try:
                data, _ = s.recvfrom(4096)
            except socket.timeout:
                break
            except OSError as e:
                out["error"] = f"{type(e).__name__}: {e}"
                break
            _seq, _ip, pport = data.decode().split()
            ports.add(int(pport))
            out["replies"].append(time.time())
    out["ports"] = sorted(ports)
    return out


def main(argv: list[str]) -> int:
    """Dispatch on the mode word."""
    mode, *args = argv
    servers = {"tcp-server": tcp_server, "udp-server": udp_server}
    clients = {"tcp-client": tcp_client, "udp-client": udp_client}
    if mode in servers:
        servers[mode](int(args[0]))
        return 0
    dst, port, sport, duration, interval, *more = args
    print(json.dumps(clients[mode](dst, int(port), int(sport), float(duration), float(interval), *map(int, more))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
