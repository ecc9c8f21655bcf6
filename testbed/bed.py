"""The emulated network: hosts and NAT nodes in namespaces, joined by a private Open vSwitch.

A testbed with prefix ``P`` is made of, and only of:

- namespaces ``P-<host>`` and ``P-<nat>`` for the topology's nodes;
- ``P-ovs``, where the testbed's own ovsdb-server and ovs-vswitchd run a
  userspace-datapath bridge (one port per host, two per NAT node);
- ``P-mgmt``, the management network: a Linux bridge holding the
  controller's address, with a veth to each NAT node's management interface;
- the state directory ``/run/natmig/P/`` (OVS files, pidfiles, state.json).

A topology with machines (docs/multihost.md) has, instead of ``P-ovs``, a
namespace ``P-machine-<M>`` per machine running that machine's own OVS
daemons (files under ``/run/natmig/P/ovs-<M>/``): a bridge ``br-phy``
holding the machine's underlay address, and the data bridge with the
machine's hosts, NAT legs and tunnel ports; and ``P-underlay``, a Linux
bridge joining the machines' underlay veths (MTU 1600, so that a 1500-byte
frame fits in a tunnel).

Nothing is created in the root namespace, so nothing there gets an address
on the data or management networks, and no namespace has a route leaving
the machine (inside hosts get one route, to the public subnet via the NAT
gateway).  :meth:`Testbed.down` finds all of it again by prefix, even after
a crashed or killed run.
"""


import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import netns, pool
from ..agent.fwnode import FwNode, FwNodeConfig, Service
from ..controller.fabric import Step
from ..controller.steering import FabricSteering
from ..agent.natnode import NatNode, NatNodeConfig
from ..errors import NatmigError, TestbedError
from ..ofctl import PortStats
from . import flows, mgmt, topology
from .build import NAT_INSIDE_IF, NAT_MGMT_IF, NAT_OUTSIDE_IF, build
from .ovs import Ovs
from .prefix import DEFAULT_PREFIX, STATE_ROOT, check_prefix, held, leftovers, lock_file, read_json
from .status import read_status
from .topomodel import Host, Nat, Topology


class Testbed:
    """One emulated network built from a :class:`~natmig.testbed.topomodel.Topology`.

    Use ``with Testbed.from_file(None, prefix) as tb:`` in tests: the network
    is brought up on entry and always torn down on exit.
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, topo: Topology, prefix: str | None = None, state_root: Path = STATE_ROOT) -> None:
        self.topology = topo
        self.prefix = check_prefix(prefix or DEFAULT_PREFIX)
        self.home = state_root / self.prefix
        #: Each machine's switch daemons (one machine, named "", without [machines]).
        self.switches: dict[str, Ovs] = (
            {m: Ovs(self.home / f"ovs-{m}", netns=self.machine_netns(m)) for m in topo.machines}
            if topo.multi_machine else {"": Ovs(self.home / "ovs", netns=self.switch_netns)})
        self.ovs = next(iter(self.switches.values()))
        #: The steps of the last point_to across machines: (machine, stage, seconds).
        self.last_steps: list[tuple[str, str, float]] = []

    # -- construction ---------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path | None = None, prefix: str | None = None) -> "Testbed":
        """The testbed of a topology file (None: the default demo topology)."""
        return cls(topology.load(path), prefix)

    @classmethod
    def attach(cls, prefix: str | None = None, state_root: Path = STATE_ROOT) -> "Testbed":
        """The testbed that ``up`` built with this prefix, with the topology it was built from."""
        prefix = check_prefix(prefix or DEFAULT_PREFIX)
        state = read_json(state_root / prefix / "state.json")
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
        """The namespace the OVS daemons and the switch-side veth ends live in (the first machine's, with machines)."""
        if self.topology.multi_machine:
            return self.machine_netns(next(iter(self.topology.machines)))
        return f"{self.prefix}-ovs"

    def machine_netns(self, machine: str) -> str:
        """The namespace of an emulated machine: its OVS daemons and its nodes' switch-side veth ends."""
        if machine not in self.topology.machines:
            raise TestbedError(f"{machine!r} is not a machine of topology {self.topology.name} (one of: {', '.join(self.topology.machines) or 'none'})")
        return f"{self.prefix}-machine-{machine}"

    @property
    def underlay_netns(self) -> str:
        """The namespace of the underlay network between machines."""
        return f"{self.prefix}-underlay"

    def node_switch(self, node: str) -> str:
        """The namespace holding the switch side of ``node``'s links."""
        topo = self.topology
        if not topo.multi_machine:
            return self.switch_netns
        placed = topo.hosts[node].machine if node in topo.hosts else topo.nats[node].machine
        return self.machine_netns(placed)

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
        inside, public = self.topology.networks[n.inside], self.topology.networks[n.public]
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

    def fw_config(self, nat: str) -> FwNodeConfig:
        """The :class:`FwNodeConfig` the testbed gives node ``nat`` of a firewall topology (its legs as a NAT's)."""
        c = self.nat_config(nat)
        policy = self.topology.firewall
        if policy is None:
            raise TestbedError(f"topology {self.topology.name}: its nodes are {self.topology.function} nodes, not firewalls")
        return FwNodeConfig(
            name=c.name, inside_if=c.inside_if, outside_if=c.outside_if,
            inside_address=c.inside_address, outside_address=c.outside_address,
            services=tuple(Service(*s) for s in policy.services),
            new_rate=policy.new_rate, new_burst=policy.new_burst, block_timeout=policy.block_timeout,
            inside_mac=c.inside_mac, outside_mac=c.outside_mac, mgmt_if=c.mgmt_if, mgmt_address=c.mgmt_address,
        )

    def fw_node(self, nat: str) -> FwNode:
        """The :class:`FwNode` of node ``nat`` of a firewall topology."""
        return FwNode(self.fw_config(nat))

    def switch_ports(self, machine: str = "") -> dict[str, int]:
        """Switch port name -> OpenFlow port number (hosts by name, NAT legs ``<nat>-in``/``<nat>-out``); with machines, of ``machine``'s switch."""
        if self.topology.multi_machine:
            return flows.machine_ports(self.topology, machine)
        return flows.port_names(self.topology)

    @property
    def per_instance(self) -> bool:
        """Whether the switches are steered by the fabric planner, instance by instance: with machines, or several NAT instances on one switch."""
        return self.topology.multi_machine or len(self.topology.pairs()) > 1

    def steering(self, on_step: Callable[[Step], None] | None = None, instance: str | None = None) -> FabricSteering:
        """The steering of a testbed with machines or NAT instances: every switch (see :class:`FabricSteering`); ``instance``: a NAT of the instance it moves."""
        if not self.per_instance:
            raise TestbedError(f"topology {self.topology.name} has one switch and one NAT instance; use point_to")
        if instance is not None:
            self._nat(instance)
        ofctls = {m: ovs.openflow(self.bridge) for m, ovs in self.switches.items()}
        settle = {m: ovs.revalidated for m, ovs in self.switches.items()}
        return FabricSteering(flows.fabric(self.topology), ofctls, on_step, settle, instance)

    def flows_for(self, nat: str) -> str:
        """The flow table steering all traffic through ``nat`` (what :meth:`point_to` installs)."""
        return flows.plan(self.topology, nat)

    def _host(self, host: str) -> Host:
        try:
            return self.topology.hosts[host]
        except KeyError:
            raise TestbedError(f"{host!r} is not a host of topology {self.topology.name} (one of: {', '.join(self.topology.hosts)})") from None

    def _nat(self, nat: str) -> Nat:
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
        with held(self.home.parent, self.prefix):
            if self.healthy():
                return False
            if any(v for k, v in leftovers(self.prefix, self.home.parent).items() if k != "lock_file"):
                self._teardown()
            self.home.mkdir(parents=True, exist_ok=True)
            self._write_state(phase="building")
            try:
                build(self)
            except BaseException as e:
                # Half a network helps nobody and would only collide with the
                # next run: remove it, then report why it failed.
                self._teardown()
                lock_file(self.home.parent, self.prefix).unlink(missing_ok=True)
                if isinstance(e, NatmigError) and not isinstance(e, TestbedError):
                    raise TestbedError(f"testbed {self.prefix}: {e}") from e
                raise
            self._write_state(phase="up", active_nat=self.topology.active_nat)
            return True

    def namespaces(self) -> list[str]:
        """Every namespace the topology needs."""
        topo = self.topology
        own = [self.machine_netns(m) for m in topo.machines] + [self.underlay_netns] if topo.multi_machine else [self.switch_netns]
        return [*own, self.mgmt_netns, *(self.netns(n) for n in (*topo.hosts, *topo.nats))]

    def healthy(self) -> bool:
        """Whether the testbed is up and whole: state says up, every namespace exists, daemons run, ports attached."""
        state = read_json(self.home / "state.json")
        if not state or state.get("phase") != "up":
            return False
        if not set(self.namespaces()) <= set(netns.list_netns(f"{self.prefix}-")):
            return False
        if not all(ovs.running() for ovs in self.switches.values()):
            return False
        try:
            return all(ovs.ofports(self.bridge) == self.switch_ports(m) for m, ovs in self.switches.items())
        except TestbedError:
            return False

    # -- down -----------------------------------------------------------

    def down(self) -> dict[str, list]:
        """Remove everything of this prefix, including leftovers of a crashed run; returns what was removed."""
        with held(self.home.parent, self.prefix):
            found = self._teardown()
            # Removed while held: a waiter on the old file still gets its turn,
            # and nothing of this prefix stays behind.
            lock_file(self.home.parent, self.prefix).unlink(missing_ok=True)
            return found

    def _teardown(self) -> dict[str, list]:
        found = leftovers(self.prefix, self.home.parent)
        found.pop("lock_file")  # ours, held right now; down() removes it
        # Daemons first, by pidfile, so they exit cleanly before their
        # namespace (and the ports they hold) disappears; every machine's,
        # also those of a topology other than the one given now.
        for home in sorted(self.home.glob("ovs*")):
            Ovs(home).stop()
        for ns in found["namespaces"]:
            netns.delete(ns)  # also kills anything else still running in it
        for link in found["root_links"]:
            netns.delete_link(link)
        shutil.rmtree(self.home, ignore_errors=True)
        return found

    # -- steering -------------------------------------------------------

    def point_to(self, nat: str) -> float:
        """Move all traffic to NAT node ``nat`` in one atomic OpenFlow bundle; the seconds it took.

        Both directions change in the same bundle: there is no instant where
        one direction goes through the old node and the other through the new.
        With machines, one bundle per switch, make-before-break
        (:class:`FabricSteering`); :attr:`last_steps` then says which, with
        seconds each.
        """
        t0 = time.perf_counter()
        if self.per_instance:
            # Only nat's instance is moved: other instances' moves may be in flight on the same switches.
            steering = self.steering(instance=self._nat(nat).name)
            try:
                steering.point_to(nat)
            except NatmigError as e:
                raise TestbedError(f"testbed {self.prefix}: {e}") from e
            self.last_steps = [(step.switch, step.stage, secs) for step, secs in steering.steps]
        else:
            self.ovs.replace_flows(self.bridge, self.flows_for(self._nat(nat).name))
        elapsed = time.perf_counter() - t0
        self._write_state(phase="up", active_nat=nat)
        return elapsed

    def restart_switch(self, down: float = 0.0, machine: str | None = None) -> None:
        """Restart a switch daemon (ovs-vswitchd) keeping its flows, as an operator's restart does (with machines: ``machine``'s, default the first)."""
        ovs = self.ovs if machine is None else self.switches.get(machine)
        if ovs is None:
            raise TestbedError(f"{machine!r} is not a machine of topology {self.topology.name} (one of: {', '.join(self.topology.machines) or 'none'})")
        ovs.restart_vswitchd(self.bridge, down)

    def active_nat(self, of: str | None = None) -> str | None:
        """The NAT node the switch's flows point at, read from the switch (None when none); with machines, from every switch.

        With several NAT instances, ``of`` names a NAT of the instance asked about.
        """
        if self.per_instance:
            try:
                return self.steering(instance=of).active()
            except NatmigError as e:
                raise TestbedError(f"testbed {self.prefix}: {e}") from e
        nats = flows.nats_in_flows(self.topology, self.ovs.dump_flows(self.bridge))
        if len(nats) > 1:
            raise TestbedError(f"testbed {self.prefix}: flows point at several NAT nodes: {', '.join(sorted(nats))}")
        return next(iter(nats), None)

    def port_counters(self) -> dict[str, PortStats]:
        """OpenFlow counters by switch port name: proof of which NAT node carries traffic."""
        if self.topology.multi_machine:
            # Host and NAT-leg names are unique across machines; tunnel ports get their machine's name first.
            out = {}
            for m, ovs in self.switches.items():
                names = {n: (name if name in self.topology.hosts or name.rsplit("-", 1)[0] in self.topology.nats else f"{m}/{name}")
                         for name, n in self.switch_ports(m).items()}
                out.update({names[n]: s for n, s in ovs.port_stats(self.bridge).items() if n in names})
            return out
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
        """What exists now: nodes with namespaces and addresses, switch ports, daemons, the active NAT (see :mod:`.status`)."""
        return read_status(self)

    # -- state ----------------------------------------------------------

    def _write_state(self, **fields: Any) -> None:
        state = {
            "prefix": self.prefix,
            "topology_file": self.topology.source,
            "topology_text": self.topology.text,
            **fields,
        }
        # Moves of several instances may write at once: each its own temporary file.
        tmp = self.home / f"state.json.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.home / "state.json")
