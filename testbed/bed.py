"""The emulated network: hosts and NAT nodes in namespaces, joined by a private Open vSwitch.

A testbed with prefix ``P`` is made of, and only of:

- namespaces ``P-<host>`` and ``P-<nat>`` for the topology's nodes;
- ``P-ovs``, where the testbed's own ovsdb-server and ovs-vswitchd run a
  userspace-datapath bridge (one port per host, two per NAT node);
- ``P-mgmt``, the management network: a Linux bridge holding the
  controller's address, with a veth to each NAT node's management interface;
- the state directory ``/run/natmig/P/`` (OVS files, pidfiles, state.json).

Nothing is created in the root namespace, so nothing there gets an address
on the data or management networks, and no namespace has a route leaving
the machine (inside hosts get one route, to the public subnet via the NAT
gateway).  :meth:`Testbed.down` finds all of it again by prefix, even after
a crashed or killed run.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from .. import netns, pool
from ..agent.natnode import NatNode, NatNodeConfig
from ..errors import NatmigError, TestbedError
from ..ofctl import PortStats
from . import flows, mgmt, topology
from .ovs import Ovs

#: Where every testbed keeps its state directory (one per prefix).
STATE_ROOT = Path("/run/natmig")
#: The prefix used when none is given, so `natmig testbed up` and a later
#: `natmig migrate` or `natmig testbed down` find the same testbed.
DEFAULT_PREFIX = "natmig"
_PREFIX = re.compile(r"^[a-z][a-z0-9]{0,9}$")

#: Interface names inside the namespaces (the switch side is named by flows.port_names).
HOST_IF = "eth0"
NAT_INSIDE_IF = "inside0"
NAT_OUTSIDE_IF = "outside0"
NAT_MGMT_IF = "mgmt0"
MGMT_BRIDGE = "mgmtbr"


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can prefix namespace names, else raise :class:`TestbedError`."""
    if not isinstance(prefix, str) or not _PREFIX.match(prefix):
        raise TestbedError(f"prefix {prefix!r}: must be a-z then a-z 0-9, at most 10 characters (e.g. nm4711)")
    return prefix


def leftovers(prefix: str, state_root: Path = STATE_ROOT) -> dict[str, list]:
    """What of a testbed with this prefix still exists: namespaces, root-namespace links, daemons, state dir."""
    check_prefix(prefix)
    home = state_root / prefix
    links = netns.run(["ip", "-o", "link", "show"], check=False).stdout
    root_links = sorted({m.group(1) for m in re.finditer(r"^\d+:\s+([^:@\s]+)", links, re.M) if m.group(1).startswith(f"{prefix}-")})
    return {
        "namespaces": netns.list_netns(f"{prefix}-"),
        "root_links": root_links,
        "processes": sorted(Ovs(home / "ovs").pids().values()),
        "state_dir": [str(home)] if home.exists() else [],
        "lock_file": [str(lock)] if (lock := state_root / f".{prefix}.lock").exists() else [],
    }


def known_prefixes(state_root: Path = STATE_ROOT) -> list[str]:
    """Prefixes that look like testbeds here: a state dir, or a ``P-ovs``/``P-mgmt`` namespace.

    For finding the leftovers of crashed runs; it only lists, and the
    namespace rule may also match namespaces of another tool.
    """
    found = {p.name for p in state_root.iterdir() if p.is_dir() and _PREFIX.match(p.name)} if state_root.is_dir() else set()
    for ns in netns.list_netns():
        head, _, tail = ns.rpartition("-")
        if tail in ("ovs", "mgmt") and _PREFIX.match(head):
            found.add(head)
    return sorted(found)


class Testbed:
    """One emulated network built from a :class:`~natmig.testbed.topology.Topology`.

    Use ``with Testbed.from_file(None, prefix) as tb:`` in tests: the network
    is brought up on entry and always torn down on exit.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, topo: topology.Topology, prefix: str | None = None, state_root: Path = STATE_ROOT) -> None:
        self.topology = topo
        self.prefix = check_prefix(prefix or DEFAULT_PREFIX)
        self.home = state_root / self.prefix
        self.ovs = Ovs(self.home / "ovs", netns=self.switch_netns)

    # -- construction ---------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path | None = None, prefix: str | None = None) -> "Testbed":
        """The testbed of a topology file (None: the default demo topology)."""
        return cls(topology.load(path), prefix)

    @classmethod
    def attach(cls, prefix: str | None = None, state_root: Path = STATE_ROOT) -> "Testbed":
        """The testbed that ``up`` built with this prefix, with the topology it was built from."""
        prefix = check_prefix(prefix or DEFAULT_PREFIX)
        state = _read_json(state_root / prefix / "state.json")
        if not state or "topology_text" not in state:
            raise TestbedError(f"no testbed with prefix {prefix} (no state in {state_root / prefix})")
        return cls(topology.load_text(state["topology_text"], state.get("topology_file", "<state>")), prefix, state_root)

    def __enter__(self) -> "Testbed":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # -- names ----------------------------------------------------------

    @property
    def switch_netns(self) -> str:
        """The namespace the OVS daemons and the switch-side veth ends live in."""
        return f"{self.prefix}-ovs"

    @property
    def mgmt_netns(self) -> str:
        """The namespace of the management network, where the controller's address is."""
        return f"{self.prefix}-mgmt"

    @property
    def bridge(self) -> str:
        """The OVS bridge of the data network."""
        return self.topology.bridge

    @property
    def rundir(self) -> Path:
        """OVS_RUNDIR of the testbed's daemons (``ovs-ofctl`` needs it, see :meth:`ovs_env`)."""
        return self.ovs.rundir

    def ovs_env(self) -> dict[str, str]:
        """Environment for running ovs-vsctl/ovs-ofctl against this testbed's switch."""
        return self.ovs.env

    @property
    def public_address(self) -> str:
        """The public address sessions are translated to (shared by every NAT node)."""
        return self.topology.public_address

    def public_addresses(self, nat: str) -> list[str]:
        """The addresses of NAT node ``nat``'s public pool (its agent's --public-address)."""
        self._nat(nat)
        return pool.addresses(self.topology.public_pool(nat))

    @property
    def controller_address(self) -> str:
        """The controller's address on the management network (in :attr:`mgmt_netns`)."""
        return str(self.topology.management.controller)

    def netns(self, node: str) -> str:
        """The namespace of a host or NAT node."""
        if node not in self.topology.hosts and node not in self.topology.nats:
            raise TestbedError(f"{node!r} is neither a host nor a NAT node of topology {self.topology.name}")
        return f"{self.prefix}-{node}"

    def address(self, host: str) -> str:
        """A host's data-network address."""
        return str(self._host(host).address)

    def mgmt_address(self, nat: str) -> str:
        """A NAT node's management address (its agent listens there)."""
        return str(self._nat(nat).mgmt_address)

    def nat_config(self, nat: str) -> NatNodeConfig:
        """The :class:`NatNodeConfig` the testbed gives NAT node ``nat``."""
        n = self._nat(nat)
        inside, public = self.topology.networks["inside"], self.topology.networks["public"]
        mprefix = self.topology.management.subnet.prefixlen
        return NatNodeConfig(
            name=self.netns(nat),
            inside_if=NAT_INSIDE_IF,
            outside_if=NAT_OUTSIDE_IF,
            inside_address=inside.gateway_interface,
            outside_address=public.gateway_interface,
            public_address=str(public.gateway),
            inside_subnet=str(inside.subnet),
            port_range=n.port_range,
            pool=n.pool,
            inside_mac=inside.gateway_mac,
            outside_mac=public.gateway_mac,
            mgmt_if=NAT_MGMT_IF,
            mgmt_address=f"{n.mgmt_address}/{mprefix}",
        )

    def nat_node(self, nat: str) -> NatNode:
        """The :class:`NatNode` of ``nat`` (for admission control, addresses, ...)."""
        return NatNode(self.nat_config(nat))

    def switch_ports(self) -> dict[str, int]:
        """Switch port name -> OpenFlow port number (hosts by name, NAT legs ``<nat>-in``/``<nat>-out``)."""
        return flows.port_names(self.topology)

    def flows_for(self, nat: str) -> str:
        """The flow table steering all traffic through ``nat`` (what :meth:`point_to` installs)."""
        return flows.plan(self.topology, nat)

    def _host(self, host: str) -> topology.Host:
        try:
            return self.topology.hosts[host]
        except KeyError:
            raise TestbedError(f"{host!r} is not a host of topology {self.topology.name} (one of: {', '.join(self.topology.hosts)})") from None

    def _nat(self, nat: str) -> topology.Nat:
        try:
            return self.topology.nats[nat]
        except KeyError:
            raise TestbedError(f"{nat!r} is not a NAT node of topology {self.topology.name} (one of: {', '.join(self.topology.nats)})") from None

    # -- up -------------------------------------------------------------

    def up(self) -> bool:
        """Build the network; a no-op when it is already up and whole (returns False then).

        A half-built or damaged testbed of the same prefix is removed first,
        so ``up`` always ends with the whole network or an exception.
        """
        with self._lock():
            if self.healthy():
                return False
            if any(v for k, v in leftovers(self.prefix, self.home.parent).items() if k != "lock_file"):
                self._teardown()
            self.home.mkdir(parents=True, exist_ok=True)
            self._write_state(phase="building")
            try:
                self._build()
            except BaseException as e:
                # Half a network helps nobody and would only collide with the
                # next run: remove it, then report why it failed.
                self._teardown()
                self._lockfile.unlink(missing_ok=True)
                if isinstance(e, NatmigError) and not isinstance(e, TestbedError):
                    raise TestbedError(f"testbed {self.prefix}: {e}") from e
                raise
            self._write_state(phase="up", active_nat=self.topology.active_nat)
            return True

    def _build(self) -> None:
        topo = self.topology
        sw, mg = self.switch_netns, self.mgmt_netns
        for ns in (sw, mg, *(self.netns(n) for n in (*topo.hosts, *topo.nats))):
            netns.add(ns)
        self.ovs.start()
        # The management network: a bridge holding the controller's address.
        msub = topo.management.subnet
        _ip_batch(mg, [
            f"link add {MGMT_BRIDGE} type bridge",
            f"addr add {topo.management.controller}/{msub.prefixlen} dev {MGMT_BRIDGE}",
            f"link set {MGMT_BRIDGE} up",
        ])
        # veths are made from the switch (or management) namespace with the
        # far end placed in the node, so no name is ever taken in the root namespace.
        for host in topo.hosts.values():
            ns = self.netns(host.name)
            netns.add_veth(host.name, HOST_IF, sw, ns)
            net = topo.networks[host.network]
            cmds = [f"addr add {host.address}/{net.subnet.prefixlen} dev {HOST_IF}"]
            if host.network == "inside":
                # One route, to the public subnet through the NAT gateway: no
                # default route, nothing that could leave the machine.
                cmds.append(f"route add {topo.networks['public'].subnet} via {net.gateway}")
            _ip_batch(ns, cmds)
        for nat in topo.nats:
            ns = self.netns(nat)
            netns.add_veth(flows.nat_port(nat, "inside"), NAT_INSIDE_IF, sw, ns)
            netns.add_veth(flows.nat_port(nat, "public"), NAT_OUTSIDE_IF, sw, ns)
            netns.add_veth(f"m-{nat}", NAT_MGMT_IF, mg, ns)
            _ip_batch(mg, [f"link set m-{nat} master {MGMT_BRIDGE}"])
            self.nat_node(nat).configure()
        self.ovs.add_bridge(self.bridge, self.switch_ports())
        self.ovs.replace_flows(self.bridge, self.flows_for(topo.active_nat))

    def healthy(self) -> bool:
        """Whether the testbed is up and whole: state says up, every namespace exists, daemons run, ports attached."""
        state = _read_json(self.home / "state.json")
        if not state or state.get("phase") != "up":
            return False
        wanted = {self.switch_netns, self.mgmt_netns, *(self.netns(n) for n in (*self.topology.hosts, *self.topology.nats))}
        if not wanted <= set(netns.list_netns(f"{self.prefix}-")) or not self.ovs.running():
            return False
        try:
            return self.ovs.ofports(self.bridge) == self.switch_ports()
        except TestbedError:
            return False

    # -- down -----------------------------------------------------------

    def down(self) -> dict[str, list]:
        """Remove everything of this prefix, including leftovers of a crashed run; returns what was removed."""
        with self._lock():
            found = self._teardown()
            # Removed while held: a waiter on the old file still gets its turn,
            # and nothing of this prefix stays behind.
            self._lockfile.unlink(missing_ok=True)
            return found

    def _teardown(self) -> dict[str, list]:
        found = leftovers(self.prefix, self.home.parent)
        found.pop("lock_file")  # ours, held right now; down() removes it
        # Daemons first, by pidfile, so they exit cleanly before their
        # namespace (and the ports they hold) disappears.
        self.ovs.stop()
        for ns in found["namespaces"]:
            netns.delete(ns)  # also kills anything else still running in it
        for link in found["root_links"]:
            netns.delete_link(link)
        shutil.rmtree(self.home, ignore_errors=True)
        return found

    @property
    def _lockfile(self) -> Path:
        return self.home.parent / f".{self.prefix}.lock"

    @contextmanager
    def _lock(self) -> Iterator[None]:
        # One up/down at a time per prefix, across processes.  The lock file
        # sits beside the state dir so that down can remove the dir itself.
        self.home.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with open(self._lockfile, "a") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                # down() unlinks the file while holding it; a waiter that got
                # the lock of an unlinked file must take the new one instead.
                try:
                    same = os.fstat(f.fileno()).st_ino == os.stat(self._lockfile).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    yield
                    return

    # -- steering -------------------------------------------------------

    def point_to(self, nat: str) -> float:
        """Move all traffic to NAT node ``nat`` in one atomic OpenFlow bundle; the seconds it took.

        Both directions change in the same bundle: there is no instant where
        one direction goes through the old node and the other through the new.
        """
        table = self.flows_for(self._nat(nat).name)
        t0 = time.perf_counter()
        self.ovs.replace_flows(self.bridge, table)
        elapsed = time.perf_counter() - t0
        self._write_state(phase="up", active_nat=nat)
        return elapsed

    def restart_switch(self, down: float = 0.0) -> None:
        """Restart the switch daemon (ovs-vswitchd) keeping its flows, as an operator's restart does."""
        self.ovs.restart_vswitchd(self.bridge, down)

    def active_nat(self) -> str | None:
        """The NAT node the switch's flows point at, read from the switch (None when none)."""
        nats = flows.nats_in_flows(self.topology, self.ovs.dump_flows(self.bridge))
        if len(nats) > 1:
            raise TestbedError(f"testbed {self.prefix}: flows point at several NAT nodes: {', '.join(sorted(nats))}")
        return next(iter(nats), None)

    def port_counters(self) -> dict[str, PortStats]:
        """OpenFlow counters by switch port name: proof of which NAT node carries traffic."""
        names = {n: name for name, n in self.switch_ports().items()}
        return {names[n]: s for n, s in self.ovs.port_stats(self.bridge).items() if n in names}

    def nat_counters(self) -> dict[str, int]:
        """Packets the switch has sent to each NAT node (both legs together)."""
        c = self.port_counters()
        return {nat: c[flows.nat_port(nat, "inside")].tx_packets + c[flows.nat_port(nat, "public")].tx_packets for nat in self.topology.nats}

    # -- using it -------------------------------------------------------

    def exec(self, node: str, cmd: Sequence[str], **kw: Any):
        """Run a command in a node's namespace (see :func:`natmig.netns.run`)."""
        return netns.run(cmd, self.netns(node), **kw)

    def mgmt_socket(self, nat: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP socket from the management network to ``nat``'s management address (see :mod:`.mgmt`)."""
        return mgmt.connect(self.mgmt_netns, self.mgmt_address(nat), port, timeout)

    def status(self) -> dict[str, Any]:
        """What exists now: nodes with namespaces and addresses, switch ports, daemons, the active NAT."""
        state = _read_json(self.home / "state.json") or {}
        existing = set(netns.list_netns(f"{self.prefix}-"))
        nodes: dict[str, Any] = {}
        for name in (*self.topology.hosts, *self.topology.nats):
            ns = self.netns(name)
            kind = "host" if name in self.topology.hosts else "nat"
            nodes[name] = {"kind": kind, "netns": ns, "exists": ns in existing, "addresses": _addresses(ns) if ns in existing else {}}
            if kind == "nat":
                nodes[name]["mgmt_address"] = self.mgmt_address(name)
        pids = self.ovs.pids()
        ports: dict[str, Any] = {}
        active = None
        if len(pids) == 2:
            try:
                counters = self.port_counters()
                ofports = self.ovs.ofports(self.bridge)
                ports = {name: {"ofport": ofports.get(name), **(vars(counters[name]) if name in counters else {})} for name in self.switch_ports()}
                active = self.active_nat()
            except TestbedError as e:
                ports = {"error": str(e)}
        return {
            "prefix": self.prefix,
            "topology": self.topology.source,
            "phase": state.get("phase", "down"),
            "healthy": self.healthy(),
            "active_nat": active,
            "public_address": self.public_address,
            "nodes": nodes,
            "switch": {"netns": self.switch_netns, "exists": self.switch_netns in existing, "bridge": self.bridge, "rundir": str(self.rundir), "daemons": pids, "ports": ports},
            "management": {"netns": self.mgmt_netns, "exists": self.mgmt_netns in existing, "subnet": str(self.topology.management.subnet), "controller": self.controller_address},
        }

    # -- state ----------------------------------------------------------

    def _write_state(self, **fields: Any) -> None:
        state = {
            "prefix": self.prefix,
            "topology_file": self.topology.source,
            "topology_text": self.topology.text,
            **fields,
        }
        tmp = self.home / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.home / "state.json")


def _ip_batch(ns: str, cmds: list[str]) -> None:
    """Run several `ip` commands in one process (``ip -n NS -batch -``): one fork instead of many."""
    netns.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n")


def _addresses(ns: str) -> dict[str, list[str]]:
    out = netns.run(["ip", "-o", "-4", "addr", "show"], ns, check=False).stdout
    addrs: dict[str, list[str]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[1] != "lo":
            addrs.setdefault(parts[1], []).append(parts[3])
    return addrs


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
