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
import json
import os
import selectors
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import ControllerError
from .trafficclient import client
from .trafficflow import MAX_DURATION, MAX_FLOWS
from .trafficresult import TrafficResult, merge
from .trafficserver import serve


class TrafficError(ControllerError):
    """The traffic programs could not be started, or their results read."""


# ============================================================ the programs


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
