"""What a validated testbed topology is: its networks, hosts, NAT nodes, machines, and the error that refuses one.

Built by :func:`natmig.testbed.topology.load` (the file) or ``parse`` (a
decoded document), which check every field in :mod:`.topocheck`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Mapping

from .. import pool as public_pool
from ..errors import EXIT_USAGE, TestbedError
from ..pool import PublicRange

#: The two data networks every topology has: a NAT's inside leg faces the
#: first, its public leg the second.
NETWORKS = ("inside", "public")
#: Namespace names the testbed itself uses (``<prefix>-ovs``, ``<prefix>-mgmt``, ``<prefix>-underlay``).
RESERVED = ("ovs", "mgmt", "underlay")
#: Tunnel types Open vSwitch's userspace datapath carries (GRE: the original deployment's).
TUNNELS = ("gre", "vxlan", "geneve")
#: What the nodes between the two networks run: a NAT (the default), or a stateful firewall (agent/fwnode.py).
FUNCTIONS = ("nat", "firewall")


class TopologyError(TestbedError):
    """A topology file was refused; ``problems`` lists every "field: why" found."""

    exit_code = EXIT_USAGE  # the file given is wrong: fix it, nothing was built

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in topology:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True)
class Network:
    """A data network: its subnet, and the gateway address and MAC every NAT node shares on it."""

    name: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    gateway_mac: str

    @property
    def gateway_interface(self) -> str:
        """The gateway as an address with prefix length, e.g. ``10.0.0.1/24``."""
        return f"{self.gateway}/{self.subnet.prefixlen}"


@dataclass(frozen=True)
class Host:
    """An end host: a namespace with one interface on one data network (on ``machine``, when machines are declared)."""

    name: str
    network: str
    address: ipaddress.IPv4Address
    machine: str = ""


@dataclass(frozen=True)
class Nat:
    """A NAT node: inside and public legs on the data networks, a management address, a port range.

    ``pool`` is its public address pool when the file declares one (each
    address on the public network, ports defaulting to ``port_range``);
    empty, the node translates to the public gateway with ``port_range``.
    """

    name: str
    mgmt_address: ipaddress.IPv4Address
    port_range: tuple[int, int]
    pool: tuple[PublicRange, ...] = ()
    machine: str = ""
    #: The networks it joins: its client network and its public network (the NAT *instance* it is a node of).
    inside: str = "inside"
    public: str = "public"

    @property
    def pair(self) -> tuple[str, str]:
        """The (inside, public) networks it serves: NAT nodes serving the same pair are twins, one of them active."""
        return (self.inside, self.public)


@dataclass(frozen=True)
class FirewallPolicy:
    """What a firewall node admits: inbound ``services`` (protocol, inside address, port), and its flood limit."""

    services: tuple[tuple[str, str, int], ...] = ()
    new_rate: int = 20
    new_burst: int = 40
    block_timeout: int = 60


@dataclass(frozen=True)
class Management:
    """The management network: its subnet and the address of the place the controller runs."""

    subnet: ipaddress.IPv4Network
    controller: ipaddress.IPv4Address


@dataclass(frozen=True)
class Machine:
    """An emulated machine: its own switch, reached by the others at ``underlay`` (its tunnel endpoint)."""

    name: str
    underlay: ipaddress.IPv4Address


@dataclass(frozen=True)
class Underlay:
    """The network between machines, and the tunnel type their switches are joined by."""

    subnet: ipaddress.IPv4Network
    tunnel: str = "gre"


@dataclass(frozen=True)
class Topology:
    """A validated topology; build it with :func:`load` or :func:`parse`."""

    name: str
    bridge: str
    networks: dict[str, Network]
    hosts: dict[str, Host]
    nats: dict[str, Nat]
    management: Management
    active_nat: str
    source: str = "<memory>"
    #: The TOML text it was read from (kept so a running testbed can be re-attached).
    text: str = ""
    #: What the nodes run (one of FUNCTIONS); a firewall's policy in ``firewall``.
    function: str = "nat"
    firewall: FirewallPolicy | None = None
    #: Declared machines, in file order; empty: everything on one machine.
    machines: dict[str, Machine] = field(default_factory=dict)
    underlay: Underlay | None = None
    #: The active NAT node of each network pair (``active_nat`` is the first).
    active_nats: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.active_nats:
            object.__setattr__(self, "active_nats", (self.active_nat,))

    def pairs(self) -> dict[tuple[str, str], list[str]]:
        """Each (inside, public) network pair, in file order, with the NAT nodes that serve it (twins)."""
        out: dict[tuple[str, str], list[str]] = {}
        for n in self.nats.values():
            out.setdefault(n.pair, []).append(n.name)
        return out

    def twins(self, nat: str) -> list[str]:
        """The other NAT nodes serving ``nat``'s networks."""
        return [n for n in self.pairs()[self.nats[nat].pair] if n != nat]

    def active_of(self, nat: str) -> str:
        """The active NAT node of ``nat``'s network pair, as the file declares it."""
        return next(a for a in self.active_nats if self.nats[a].pair == self.nats[nat].pair)

    def public_addresses_of(self, nat: str) -> list[str]:
        """The addresses ``nat`` translates to (its pool's, or its public network's gateway)."""
        return public_pool.addresses(self.public_pool(nat))

    @property
    def multi_machine(self) -> bool:
        """Whether the topology places its nodes on several machines joined by tunnels."""
        return bool(self.machines)

    def on_machine(self, machine: str) -> list[str]:
        """Names of the hosts and NAT nodes placed on ``machine``, hosts first, in file order."""
        return [h.name for h in self.hosts.values() if h.machine == machine] + [n.name for n in self.nats.values() if n.machine == machine]

    @property
    def public_address(self) -> str:
        """The address sessions are translated to (the public gateway of the active NAT's public network)."""
        return str(self.networks[self.nats[self.active_nat].public].gateway)

    def public_pool(self, nat: str) -> tuple[PublicRange, ...]:
        """The public address pool of NAT node ``nat``: its declared pool, or its public network's gateway with its ports."""
        return pool_of(self.nats[nat], self.networks)

    def spare_addresses(self, network: str, count: int, start: int = 200) -> list[str]:
        """Up to ``count`` addresses of ``network`` that no host, gateway or pool uses, from host number ``start`` up.

        For made-up peers (the synthetic sessions' servers): nothing answers
        there, and nothing of the testbed is mistaken for them.
        """
        net = self.networks[network].subnet
        taken = {str(self.networks[network].gateway), *(str(h.address) for h in self.hosts.values())}
        taken |= {e.address for n in self.nats.values() for e in n.pool}
        hosts = list(net.hosts())
        order = hosts[start - 1:] + hosts[:start - 1]
        return [str(a) for a in order if str(a) not in taken][:count]

    def hosts_on(self, network: str) -> list[Host]:
        """The hosts linked to a data network, in file order."""
        return [h for h in self.hosts.values() if h.network == network]


def pool_of(n: Nat, networks: Mapping[str, Network]) -> tuple[PublicRange, ...]:
    """A NAT node's public address pool: its declared pool, or its public network's gateway with its ports."""
    return n.pool or (PublicRange(str(networks[n.public].gateway), n.port_range),)
