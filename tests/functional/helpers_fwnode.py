"""A test network of firewall nodes built from namespaces.

    inside host (10.0.0.2 client,            outside host (203.0.113.2, and the
      10.0.0.10 service)                       attacker 198.51.100.7)
            |                                        |
          br-in ------ switch namespace ------ br-out       br-mg (192.0.2.100: the controller)
            |                                        |            |
    firewall a inside0 / b inside0      a outside0 / b outside0   a mgmt0 (192.0.2.1), b mgmt0 (192.0.2.2)

Both firewalls share their legs' addresses and MACs; only the attached one
has its ports up on the bridges.  A firewall's port does not learn and
hairpins (its MAC is a static entry on it): a packet the firewall held
while admission was closed and sends back to the switch comes back to
whichever firewall is attached, as the NAT's Open vSwitch hairpin rule does.
Everything is named with the run prefix and removed by :meth:`FwNet.destroy`.
"""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from natmig import netns
from natmig.agent.fwnode import FwNode, FwNodeConfig, Service

INSIDE_MAC = "02:66:77:00:00:01"
OUTSIDE_MAC = "02:66:77:00:00:02"
CLIENT = "10.0.0.2"
SERVICE = "10.0.0.10"
OUTSIDE = "203.0.113.2"
ATTACKER = "198.51.100.7"
MGMT = {"a": "192.0.2.1", "b": "192.0.2.2"}
CONTROLLER = "192.0.2.100"


@dataclass
class FwNet:
    """Inside host, outside host, switch and firewall nodes; the first one attached."""

    prefix: str
    nodes: dict[str, FwNode] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)
    sockets: list[socket.socket] = field(default_factory=list)

    @property
    def inside(self) -> str:
        return self.prefix + "in"

    @property
    def outside(self) -> str:
        return self.prefix + "out"

    @property
    def switch(self) -> str:
        return self.prefix + "sw"

    def namespaces(self) -> list[str]:
        return [self.inside, self.outside, self.switch, *(n.name for n in self.nodes.values())]

    def build(self, names: tuple[str, ...] = ("a",), **cfg: object) -> None:
        for ns in (self.inside, self.outside, self.switch):
            netns.add(ns)
        sw = self.switch
        for br in ("brin", "brout", "brmg"):
            netns.run(["ip", "link", "add", br, "type", "bridge"], sw)
            netns.run(["ip", "link", "set", br, "up"], sw)
        netns.run(["ip", "addr", "add", f"{CONTROLLER}/24", "dev", "brmg"], sw)
        netns.add_veth("eth0", "hin", self.inside, sw)
        netns.add_veth("eth0", "hout", self.outside, sw)
        netns.run(["ip", "link", "set", "hin", "master", "brin"], sw)
        netns.run(["ip", "link", "set", "hout", "master", "brout"], sw)
        for a in (CLIENT, SERVICE):
            netns.run(["ip", "addr", "add", f"{a}/24", "dev", "eth0"], self.inside)
        netns.run(["ip", "route", "add", "default", "via", "10.0.0.1"], self.inside)
        netns.run(["ip", "addr", "add", f"{OUTSIDE}/24", "dev", "eth0"], self.outside)
        netns.run(["ip", "addr", "add", f"{ATTACKER}/32", "dev", "eth0"], self.outside)
        netns.run(["ip", "route", "add", "10.0.0.0/24", "via", "203.0.113.1", "src", OUTSIDE], self.outside)
        for n in names:
            c = FwNodeConfig(
                name=self.prefix + "fw" + n, services=(Service("tcp", SERVICE, 80), Service("udp", SERVICE, 53)),
                routes=(("198.51.100.0/24", OUTSIDE),), inside_mac=INSIDE_MAC, outside_mac=OUTSIDE_MAC,
                mgmt_if="mgmt0", mgmt_address=f"{MGMT[n]}/24", **cfg,  # type: ignore[arg-type]
            )
            node = FwNode(c)
            self.nodes[n] = node
            node.create()
            netns.add_veth("inside0", f"{n}in", c.name, sw)
            netns.add_veth("outside0", f"{n}out", c.name, sw)
            netns.add_veth("mgmt0", f"{n}mg", c.name, sw)
            netns.run(["ip", "link", "set", f"{n}mg", "master", "brmg"], sw)
            for port in (f"{n}in", f"{n}out"):
                netns.run(["ip", "link", "set", port, "down"], sw)
                netns.run(["ip", "link", "set", port, "master", "brin" if port.endswith("in") else "brout"], sw)
                netns.run(["bridge", "link", "set", "dev", port, "learning", "off", "hairpin", "on"], sw)
            node.configure()
        self.attach(names[0])

    def attach(self, name: str) -> None:
        """Traffic to firewall ``name``: its ports up with the firewalls' MACs on them, the others' down."""
        cmds = []
        for other in self.nodes:
            if other != name:
                cmds += [f"link set {other}in down", f"link set {other}out down"]
        netns.run(["ip", "-batch", "-"], self.switch, input="\n".join(cmds) + "\n" if cmds else "\n")
        for port, mac in ((f"{name}in", INSIDE_MAC), (f"{name}out", OUTSIDE_MAC)):
            netns.run(["bridge", "fdb", "replace", mac, "dev", port, "master", "static"], self.switch)
            netns.run(["ip", "link", "set", port, "up"], self.switch)

    def in_ns(self, ns: str, fn: Callable[[], object]) -> object:
        return netns.call_in(ns, fn)

    def tcp_server(self, ns: str, addr: str, port: int) -> socket.socket:
        """A listening socket in ``ns`` whose connections echo what they get (threads; closed by destroy)."""
        ls = netns.call_in(ns, lambda: socket.create_server((addr, port), reuse_port=False))
        self.sockets.append(ls)

        def serve() -> None:
            while True:
                try:
                    c, _ = ls.accept()
                except OSError:
                    return
                self.sockets.append(c)
                threading.Thread(target=_echo, args=(c,), daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()
        return ls

    def connect(self, ns: str, src: str, dst: str, port: int, timeout: float = 3.0) -> socket.socket:
        """A TCP connection from ``src`` in ``ns`` (closed by destroy)."""
        def make() -> socket.socket:
            s = socket.socket()
            s.settimeout(timeout)
            s.bind((src, 0))
            s.connect((dst, port))
            return s
        s = netns.call_in(ns, make)
        self.sockets.append(s)
        return s

    def udp_burst(self, ns: str, src: str, dst: str, port: int, count: int) -> None:
        """``count`` datagrams from ``src``, each from a new source port: as many new connections."""
        def send() -> None:
            for _ in range(count):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((src, 0))
                    s.sendto(b"x", (dst, port))
        netns.call_in(ns, send)

    def destroy(self) -> None:
        for s in self.sockets:
            try:
                s.close()
            except OSError:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for node in self.nodes.values():
            node.close()
        for ns in self.namespaces():
            netns.delete(ns)


def _echo(c: socket.socket) -> None:
    with c:
        while True:
            try:
                data = c.recv(4096)
            except OSError:
                return
            if not data:
                return
            try:
                c.sendall(data)
            except OSError:
                return


def exchange(s: socket.socket, msg: bytes = b"ping") -> bool:
    """Whether a message sent on ``s`` comes back (within the socket's timeout)."""
    try:
        s.sendall(msg)
        got = b""
        while len(got) < len(msg):
            part = s.recv(4096)
            if not part:
                return False
            got += part
        return got == msg
    except OSError:
        return False


def wait_for(cond: Callable[[], object], timeout: float = 5.0, every: float = 0.05) -> object:
    """Poll ``cond`` until it is true (its value) or ``timeout`` passes (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v or time.monotonic() > deadline:
            return v
        time.sleep(every)


@contextmanager
def built(tag: str, names: tuple[str, ...] = ("a",), **cfg: object) -> Iterator[FwNet]:
    """A FwNet with firewalls ``names``, always torn down; the teardown must leave no namespace."""
    n = FwNet(netns.run_prefix(tag))
    try:
        n.build(names, **cfg)
        yield n
    finally:
        n.destroy()
        left = [ns for ns in n.namespaces() if netns.exists(ns)]
        assert not left, f"teardown left namespaces behind: {left}"
