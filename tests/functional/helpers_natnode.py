"""A two-NAT test network built from namespaces, for the NAT node and provider tests.

    client (10.0.0.2) --+                      +-- server (203.0.113.100)
                        |    switch namespace  |
                     br-in                  br-out
                      |  |                   |  |
               NAT a inside, NAT b inside   NAT a outside, NAT b outside

Both NATs have the same gateway IP+MAC and the same public IP+MAC, so moving
traffic from a to b only re-attaches their switch ports (one ``ip -batch``);
no ARP cache goes stale.  Everything is named with the run prefix and
removed by :meth:`TwoNatNet.destroy`, which the fixtures call in ``finally``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from natmig import netns
from natmig.agent.natnode import NatNode, NatNodeConfig
from natmig.pool import PublicRange

FLOWS = Path(__file__).with_name("flows_natnode.py")
CLIENT_IP = "10.0.0.2"
SERVER_IP = "203.0.113.100"
PUBLIC_IP = "203.0.113.1"
GATEWAY_MAC = "02:4e:4d:00:00:01"
PUBLIC_MAC = "02:4e:4d:00:00:02"


@dataclass
class TwoNatNet:
    """Client, server, switch and NAT nodes ``a`` and ``b``; ``a`` carries traffic at first."""

    prefix: str
    nats: dict[str, NatNode] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    attached: str | None = None
    #: the NAT nodes' public address pool (empty: PUBLIC_IP with ports 20000-29999)
    pool: tuple[PublicRange, ...] = ()

    @property
    def client(self) -> str:
        """The client's namespace."""
        return self.prefix + "cl"

    @property
    def server(self) -> str:
        """The server's namespace."""
        return self.prefix + "sv"

    @property
    def switch(self) -> str:
        """The switch namespace (two Linux bridges)."""
        return self.prefix + "sw"

    def namespaces(self) -> list[str]:
        """Every namespace this network made (for teardown and its check)."""
        return [self.client, self.server, self.switch, *(n.name for n in self.nats.values())]

    def build(self, nat_names: tuple[str, ...] = ("a", "b")) -> None:
        """Create everything and attach NAT ``nat_names[0]``."""
        for ns in (self.client, self.server, self.switch):
            netns.add(ns)
        sw = self.switch
        netns.run(["ip", "link", "add", "brin", "type", "bridge"], sw)
        netns.run(["ip", "link", "add", "brout", "type", "bridge"], sw)
        netns.run(["ip", "link", "set", "brin", "up"], sw)
        netns.run(["ip", "link", "set", "brout", "up"], sw)
        netns.add_veth("eth0", "cl", self.client, sw)
        netns.add_veth("eth0", "sv", self.server, sw)
        netns.run(["ip", "link", "set", "cl", "master", "brin"], sw)
        netns.run(["ip", "link", "set", "sv", "master", "brout"], sw)
        netns.run(["ip", "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0"], self.client)
        netns.run(["ip", "route", "add", "203.0.113.0/24", "via", "10.0.0.1"], self.client)
        netns.run(["ip", "addr", "add", f"{SERVER_IP}/24", "dev", "eth0"], self.server)
        for n in nat_names:
            cfg = NatNodeConfig(
                name=self.prefix + "nat" + n, inside_if="inside0", outside_if="outside0",
                inside_address="10.0.0.1/24", outside_address=f"{PUBLIC_IP}/24", public_address=PUBLIC_IP,
                inside_subnet="10.0.0.0/24", port_range=(20000, 29999),
                inside_mac=GATEWAY_MAC, outside_mac=PUBLIC_MAC, pool=self.pool,
            )
            node = NatNode(cfg)
            self.nats[n] = node
            node.create()
            netns.add_veth("inside0", f"{n}in", cfg.name, sw)
            netns.add_veth("outside0", f"{n}out", cfg.name, sw)
            node.configure()
        self.attach(nat_names[0])

    def attach(self, name: str) -> None:
        """Steer client and server traffic to NAT ``name`` (its ports join the bridges, others leave)."""
        cmds = []
        for other in self.nats:
            if other != name:
                cmds += [f"link set {other}in nomaster", f"link set {other}out nomaster"]
        cmds += [f"link set {name}in master brin", f"link set {name}out master brout"]
        netns.run(["ip", "-batch", "-"], self.switch, input="\n".join(cmds) + "\n")
        self.attached = name

    def start(self, mode: str, ns: str, *args: object) -> subprocess.Popen:
        """Run a flows_natnode.py endpoint in a namespace; it is killed by :meth:`destroy`."""
        return self.popen([sys.executable, str(FLOWS), mode, *map(str, args)], ns)

    def popen(self, argv: list[str], ns: str) -> subprocess.Popen:
        """Run a command in a namespace in the background; it is killed by :meth:`destroy`."""
        p = subprocess.Popen(netns.ns_cmd(argv, ns), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(p)
        return p

    def start_servers(self, tcp_port: int, udp_port: int) -> None:
        """Echo servers on the server namespace; returns once both listen."""
        for mode, port in (("tcp-server", tcp_port), ("udp-server", udp_port)):
            p = self.start(mode, self.server, port)
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == "ready", f"{mode} did not start: {line!r} {p.stderr.read() if p.poll() is not None else ''}"

    def destroy(self) -> None:
        """Kill our processes (by pid) and delete our namespaces; safe to call twice."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        self.procs.clear()
        for ns in self.namespaces():
            netns.delete(ns)


def finish(p: subprocess.Popen, timeout: float = 30) -> dict:
    """Wait for a client and return its JSON summary."""
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"client failed: {err}"
    return json.loads(out.strip().splitlines()[-1])


def replies_after(summary: dict, t: float) -> int:
    """How many answers a client got after time ``t``."""
    return sum(1 for r in summary["replies"] if r > t)


def wait_replies(p: subprocess.Popen, seconds: float) -> None:
    """Let a flow run a while (and fail early if its process died)."""
    time.sleep(seconds)
    assert p.poll() is None, f"flow ended early: {p.communicate()}"


@contextmanager
def built(tag: str, nats: tuple[str, ...] | None = None, pool: tuple[PublicRange, ...] = ()) -> Iterator[TwoNatNet]:
    """A TwoNatNet with the given NAT nodes (all when None), always torn down; the teardown must leave no namespace."""
    n = TwoNatNet(netns.run_prefix(tag), pool=pool)
    try:
        if nats is None:
            n.build()
        else:
            n.build(nats)
        yield n
    finally:
        n.destroy()
        left = [ns for ns in n.namespaces() if netns.exists(ns)]
        assert not left, f"teardown left namespaces behind: {left}"
