"""The testbed's topology file: its format, its validation, and the default demo.

A topology is a TOML file (stdlib :mod:`tomllib`; no dependency) naming two
data networks, the hosts linked to them, the NAT nodes that join them, the
management network, and which NAT is active.  ``testbed/topologies/demo.toml``
is the original demo and the default.  Every problem found is reported at
once, each naming the field at fault, e.g.
``hosts.client.address: 10.0.1.10 is not in networks.inside.subnet 10.0.0.0/24``.

Links are given by each host's ``network`` (one switch port per host) and by
the NAT nodes (an inside and a public switch port each); see docs/testbed.md.

A topology may also declare machines (``[machines.A]``, each with its
underlay address) and an ``[underlay]`` (subnet and tunnel type): each end
host and NAT node then names the ``machine`` it runs on, every machine has
its own switch, and the switches are joined by tunnels over the underlay
(docs/multihost.md).  Without ``[machines]`` everything is on one machine,
as in the demo.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from .. import pool as public_pool
from ..errors import EXIT_USAGE, TestbedError
from ..pool import PublicRange

DEFAULT_TOPOLOGY = Path(__file__).parent / "topologies" / "demo.toml"

#: The two data networks every topology has: a NAT's inside leg faces the
#: first, its public leg the second.
NETWORKS = ("inside", "public")

# Node names become parts of namespace and switch-port names ("<name>-out"),
# which Linux limits to 15 characters.
_NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_BRIDGE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
#: Namespace names the testbed itself uses (``<prefix>-ovs``, ``<prefix>-mgmt``, ``<prefix>-underlay``).
RESERVED = ("ovs", "mgmt", "underlay")
# Machine names are parts of tunnel-port names ("t<machine>-<n>", at most 15).
_MACHINE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,7}$")
#: Tunnel types Open vSwitch's userspace datapath carries (GRE: the original deployment's).
TUNNELS = ("gre", "vxlan", "geneve")
#: What the nodes between the two networks run: a NAT (the default), or a stateful firewall (agent/fwnode.py).
FUNCTIONS = ("nat", "firewall")
_SERVICE = re.compile(r"^(tcp|udp) ([0-9.]+):([0-9]+)$")


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
        return _pool_of(self.nats[nat], self.networks)

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


class _Checker:
    """Collects problems while reading a raw TOML document, so all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def table(self, doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        value = doc.get(key)
        if value is None:
            self.bad(where, "missing (a table is required)")
            return {}
        if not isinstance(value, dict):
            self.bad(where, f"must be a table, not {type(value).__name__}")
            return {}
        return value

    def keys(self, doc: dict[str, Any], allowed: set[str], where: str) -> None:
        for key in sorted(set(doc) - allowed):
            self.bad(f"{where}.{key}" if where else key, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def field(self, doc: dict[str, Any], key: str, where: str, conv: Callable[[Any], Any], what: str, default: Any = ...) -> Any:
        if key not in doc:
            if default is ...:
                self.bad(where, f"missing ({what} required)")
            return None if default is ... else default
        try:
            return conv(doc[key])
        except (ValueError, TypeError) as e:
            detail = f" ({e})" if str(e) and str(e) not in repr(doc[key]) else ""
            self.bad(where, f"{doc[key]!r} is not {what}{detail}")
            return None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"got {type(value).__name__}")
    return value


def _address(value: Any) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(_str(value))


def _subnet(value: Any) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(_str(value), strict=True)


def _mac(value: Any) -> str:
    mac = _str(value).lower()
    if not _MAC.match(mac):
        raise ValueError("")
    if int(mac[:2], 16) & 1:
        raise ValueError("multicast; an interface needs a unicast MAC")
    return mac


def _name(pattern: re.Pattern[str], value: Any) -> str:
    if not pattern.match(_str(value)):
        raise ValueError("")
    return value


def _port_range(value: Any) -> tuple[int, int]:
    lo, sep, hi = _str(value).partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError("")
    low, high = int(lo), int(hi)
    if not 1 <= low <= high <= 65535:
        raise ValueError("need 1 <= low <= high <= 65535")
    return (low, high)


def _service(value: Any) -> tuple[str, str, int]:
    m = _SERVICE.match(_str(value))
    if not m:
        raise ValueError("")
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise ValueError("port not in 1..65535")
    return (m.group(1), str(ipaddress.IPv4Address(m.group(2))), port)


def _positive(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("")
    return value


def _firewall(ck: _Checker, doc: dict[str, Any], function: str | None, inside: Network | None) -> FirewallPolicy | None:
    """The ``[firewall]`` table: only with ``function = "firewall"``, its services on the inside network."""
    raw = doc.get("firewall")
    if function != "firewall":
        if raw is not None:
            ck.bad("firewall", 'only with function = "firewall"')
        return None
    if raw is None:
        return FirewallPolicy()
    if not isinstance(raw, dict):
        ck.bad("firewall", f"must be a table, not {type(raw).__name__}")
        return None
    ck.keys(raw, {"services", "new_rate", "new_burst", "block_timeout"}, "firewall")
    services = []
    listed = raw.get("services", [])
    if not isinstance(listed, list):
        ck.bad("firewall.services", "must be a list of strings like \"tcp 10.0.0.20:5001\"")
        listed = []
    for i, v in enumerate(listed):
        svc = ck.field({"s": v}, "s", f"firewall.services[{i}]", _service, 'a service like "tcp 10.0.0.20:5001"')
        if svc is not None and inside is not None and ipaddress.IPv4Address(svc[1]) not in inside.subnet:
            ck.bad(f"firewall.services[{i}]", f"{svc[1]} is not in networks.inside.subnet {inside.subnet}")
        elif svc is not None:
            services.append(svc)
    limits = {k: ck.field(raw, k, f"firewall.{k}", _positive, "a positive integer", default=d)
              for k, d in (("new_rate", 20), ("new_burst", 40), ("block_timeout", 60))}
    if any(v is None for v in limits.values()):
        return None
    return FirewallPolicy(tuple(services), **limits)


def _check_in(ck: _Checker, where: str, addr: ipaddress.IPv4Address | None, net: ipaddress.IPv4Network | None, net_where: str) -> None:
    """A host address must be a usable address of its subnet."""
    if addr is None or net is None:
        return
    if addr not in net:
        ck.bad(where, f"{addr} is not in {net_where} {net}")
    elif net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
        ck.bad(where, f"{addr} is the network or broadcast address of {net}")


def _pool(
    ck: _Checker, raw: dict[str, Any], where: str, ports: tuple[int, int] | None,
    public: Network | None, taken: dict[ipaddress.IPv4Address, str],
) -> tuple[PublicRange, ...]:
    """A NAT's ``pool`` (a list of ``ADDRESS[-LAST][:LOW-HIGH]``, natmig.pool), each address usable on the public network."""
    if "pool" not in raw:
        return ()
    value = raw["pool"]
    if not isinstance(value, list) or not value:
        ck.bad(where, f"{value!r} is not a non-empty list of entries like \"203.0.113.2:20000-29999\"")
        return ()
    try:
        pool = public_pool.parse(where, value, ports)
    except public_pool.PoolError as err:
        ck.problems.append(str(err))
        return ()
    for e in pool:
        a = ipaddress.IPv4Address(e.address)
        if public is not None:
            # Servers reach a pool address on their own link: it must be on it.
            _check_in(ck, where, a, public.subnet, f"networks.{public.name}.subnet")
        if a in taken and a != (public.gateway if public else None):
            ck.bad(where, f"{a} is already used by {taken[a]}")
    return pool


def parse(doc: dict[str, Any], source: str = "<memory>", text: str = "") -> Topology:
    """Validate a decoded topology document; :class:`TopologyError` lists every problem."""
    ck = _Checker()
    ck.keys(doc, {"name", "bridge", "active_nat", "networks", "hosts", "nats", "management", "function", "firewall", "machines", "underlay"}, "")
    name = ck.field(doc, "name", "name", _str, "a string", default="testbed")
    function = ck.field(doc, "function", "function", _str, "a string", default="nat")
    if function is not None and function not in FUNCTIONS:
        ck.bad("function", f"{function!r} is not one of {', '.join(FUNCTIONS)}")
        function = None
    bridge = ck.field(doc, "bridge", "bridge", lambda v: _name(_BRIDGE, v), "a bridge name (a-z, then a-z 0-9 _ -, at most 15)", default="br0")

    raw_nats_doc: dict[str, Any] = doc["nats"] if isinstance(doc.get("nats"), dict) else {}
    networks = _networks(ck, doc, raw_nats_doc)

    machines, underlay = _machines(ck, doc, networks)

    hosts: dict[str, Host] = {}
    raw_hosts = ck.table(doc, "hosts", "hosts")
    taken: dict[ipaddress.IPv4Address, str] = {n.gateway: f"networks.{n.name}.gateway" for n in networks.values()}
    for host_name, raw in raw_hosts.items():
        where = f"hosts.{host_name}"
        if not _NODE_NAME.match(host_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters (it names a namespace and a switch port)")
        if host_name in RESERVED:
            ck.bad(where, f"{host_name!r} is reserved for the testbed's own namespace")
        if not isinstance(raw, dict):
            ck.bad(where, f"must be a table, not {type(raw).__name__}")
            continue
        ck.keys(raw, {"network", "address", "machine"}, where)
        machine = _placed(ck, raw, where, machines, "machines" in doc)
        net = ck.field(raw, "network", f"{where}.network", _str, "a network name")
        known = [n for n in _declared_networks(doc) if n in networks] or list(NETWORKS)
        if net is not None and net not in _declared_networks(doc):
            ck.bad(f"{where}.network", f"{net!r} is not a network (one of: {', '.join(known)})")
            net = None
        addr = ck.field(raw, "address", f"{where}.address", _address, "an IPv4 address")
        if net in networks:
            _check_in(ck, f"{where}.address", addr, networks[net].subnet, f"networks.{net}.subnet")
        if addr is not None and addr in taken:
            ck.bad(f"{where}.address", f"{addr} is already used by {taken[addr]}")
        elif addr is not None:
            taken[addr] = f"{where}.address"
        if net is not None and addr is not None:
            hosts[host_name] = Host(host_name, net, addr, machine)
    # Judged on what the file declares, so one bad address does not also
    # report its network as empty.
    declared = {raw.get("network") for raw in raw_hosts.values() if isinstance(raw, dict)}
    for net_name, role in _roles(raw_nats_doc, networks).items():
        if raw_hosts and net_name not in declared:
            ck.bad("hosts", f"no host on the {net_name} network ({'a client' if role == 'inside' else 'a server'} is needed)")

    mgmt = None
    raw_mgmt = ck.table(doc, "management", "management")
    if raw_mgmt:
        ck.keys(raw_mgmt, {"subnet", "controller"}, "management")
        msub = ck.field(raw_mgmt, "subnet", "management.subnet", _subnet, "an IPv4 network like 192.0.2.0/24")
        mctl = ck.field(raw_mgmt, "controller", "management.controller", _address, "an IPv4 address")
        _check_in(ck, "management.controller", mctl, msub, "management.subnet")
        for n in networks.values():
            if msub is not None and msub.overlaps(n.subnet):
                ck.bad("management.subnet", f"{msub} overlaps networks.{n.name}.subnet {n.subnet}; the management network is separate")
        if msub is not None and underlay is not None and msub.overlaps(underlay.subnet):
            ck.bad("management.subnet", f"{msub} overlaps underlay.subnet {underlay.subnet}; the management network is separate")
        if msub is not None and mctl is not None:
            mgmt = Management(msub, mctl)

    nats: dict[str, Nat] = {}
    raw_nats = ck.table(doc, "nats", "nats")
    mgmt_taken: dict[ipaddress.IPv4Address, str] = {mgmt.controller: "management.controller"} if mgmt else {}
    for nat_name, raw in raw_nats.items():
        where = f"nats.{nat_name}"
        if not _NODE_NAME.match(nat_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters (it names a namespace and switch ports)")
        if nat_name in RESERVED:
            ck.bad(where, f"{nat_name!r} is reserved for the testbed's own namespace")
        if nat_name in raw_hosts:
            ck.bad(where, f"{nat_name!r} is also the name of a host")
        if not isinstance(raw, dict):
            ck.bad(where, f"must be a table, not {type(raw).__name__}")
            continue
        ck.keys(raw, {"management", "ports", "pool", "machine", "inside", "public"}, where)
        machine = _placed(ck, raw, where, machines, "machines" in doc)
        legs = {side: ck.field(raw, side, f"{where}.{side}", _str, "a network name", default=side) for side in NETWORKS}
        for side, net in legs.items():
            if net is not None and net not in _declared_networks(doc):
                ck.bad(f"{where}.{side}", f"{net!r} is not a network (one of: {', '.join(networks) or 'none'})")
        maddr = ck.field(raw, "management", f"{where}.management", _address, "an IPv4 address")
        ports = ck.field(raw, "ports", f"{where}.ports", _port_range, "a port range like \"20000-29999\"")
        pool = _pool(ck, raw, f"{where}.pool", ports, networks.get(legs["public"] or ""), taken)
        if mgmt is not None:
            _check_in(ck, f"{where}.management", maddr, mgmt.subnet, "management.subnet")
        if maddr is not None and maddr in mgmt_taken:
            ck.bad(f"{where}.management", f"{maddr} is already used by {mgmt_taken[maddr]}")
        elif maddr is not None:
            mgmt_taken[maddr] = f"{where}.management"
        if maddr is not None and ports is not None and legs["inside"] in networks and legs["public"] in networks:
            nats[nat_name] = Nat(nat_name, maddr, ports, pool, machine, legs["inside"], legs["public"])
    if not raw_nats and "nats" in doc:
        ck.bad("nats", "no NAT node (at least one is needed)")
    _check_pairs(ck, nats, networks, function)

    actives = ck.field(doc, "active_nat", "active_nat", _names, "a NAT node name, or a list of them (one per network pair)")
    active = actives[0] if actives else None
    for name in actives or []:
        if raw_nats and name not in raw_nats:
            ck.bad("active_nat", f"{name!r} is not a NAT node (one of: {', '.join(raw_nats)})")
    if actives and all(a in nats for a in actives) and not ck.problems:
        _check_actives(ck, nats, actives)

    policy = _firewall(ck, doc, function, networks.get("inside"))

    if ck.problems:
        raise TopologyError(source, ck.problems)
    assert mgmt is not None and active is not None and function is not None  # guaranteed when no problem was found
    return Topology(name, bridge, networks, hosts, nats, mgmt, active, source, text, function, policy, machines, underlay, tuple(actives))


def _names(value: Any) -> list[str]:
    """``active_nat``: one NAT node's name, or a non-empty list of names."""
    if isinstance(value, list) and value:
        return [_str(v) for v in value]
    return [_str(value)]


def _declared_networks(doc: dict[str, Any]) -> list[str]:
    raw = doc.get("networks")
    return list(raw) if isinstance(raw, dict) else []


def _networks(ck: _Checker, doc: dict[str, Any], raw_nats: dict[str, Any]) -> dict[str, Network]:
    """The ``[networks]``: ``inside`` and ``public`` (required while a NAT node joins them by default), and any others NATs name."""
    networks: dict[str, Network] = {}
    raw_nets = ck.table(doc, "networks", "networks")
    # A NAT node that names no network joins the default one of that side: those must exist.
    implied = {side for side in NETWORKS if not raw_nats or any(not isinstance(r, dict) or side not in r for r in raw_nats.values())}
    names = [n for n in NETWORKS if n in implied or n in raw_nets] + [n for n in raw_nets if n not in NETWORKS]
    for net_name in names:
        where = f"networks.{net_name}"
        if not _NODE_NAME.match(net_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters")
        raw = ck.table(raw_nets, net_name, where) if raw_nets else {}
        if not raw:
            continue
        ck.keys(raw, {"subnet", "gateway", "gateway_mac"}, where)
        subnet = ck.field(raw, "subnet", f"{where}.subnet", _subnet, "an IPv4 network like 10.0.0.0/24")
        gw = ck.field(raw, "gateway", f"{where}.gateway", _address, "an IPv4 address")
        mac = ck.field(raw, "gateway_mac", f"{where}.gateway_mac", _mac, "a unicast MAC like 02:00:00:00:00:01")
        _check_in(ck, f"{where}.gateway", gw, subnet, f"{where}.subnet")
        if subnet is not None and gw is not None and mac is not None:
            networks[net_name] = Network(net_name, subnet, gw, mac)
    seen: list[Network] = []
    for n in networks.values():
        for a in seen:
            if n.subnet.overlaps(a.subnet):
                ck.bad(f"networks.{n.name}.subnet", f"{n.subnet} overlaps networks.{a.name}.subnet {a.subnet}")
            if n.gateway_mac == a.gateway_mac:
                ck.bad(f"networks.{n.name}.gateway_mac", f"is the same as networks.{a.name}.gateway_mac; each network needs its own")
        seen.append(n)
    return networks


def _roles(raw_nats: dict[str, Any], networks: dict[str, Network]) -> dict[str, str]:
    """Each network some NAT node joins (by default or by name) -> "inside" or "public", in network order."""
    used: dict[str, str] = {}
    for raw in raw_nats.values():
        if isinstance(raw, dict):
            for side in NETWORKS:
                used.setdefault(str(raw.get(side, side)), side)
    if not raw_nats:
        used = {side: side for side in NETWORKS}
    return {n: used[n] for n in networks if n in used}


def _pool_of(n: Nat, networks: Mapping[str, Network]) -> tuple[PublicRange, ...]:
    """A NAT node's public address pool: its declared pool, or its public network's gateway with its ports."""
    return n.pool or (PublicRange(str(networks[n.public].gateway), n.port_range),)


def _check_pairs(ck: _Checker, nats: dict[str, Nat], networks: dict[str, Network], function: str | None) -> None:
    """Network pairs: each network on one side only; twins share both networks; instances sharing a public network own distinct addresses."""
    side_of: dict[str, tuple[str, str]] = {}
    public_of: dict[str, str] = {}
    for n in nats.values():
        for side, net in (("inside", n.inside), ("public", n.public)):
            other = side_of.setdefault(net, (side, n.name))
            if other[0] != side:
                ck.bad(f"nats.{n.name}.{side}", f"{net!r} is the {other[0]} network of nats.{other[1]}; a network is on one side only")
        first = public_of.setdefault(n.inside, n.public)
        if first != n.public:
            ck.bad(f"nats.{n.name}.public", f"{n.public!r}, but the other NAT nodes on inside network {n.inside!r} join {first!r}: "
                                            "the NAT nodes of one client network are twins and share its public network too")
    pairs: dict[tuple[str, str], list[str]] = {}
    for n in nats.values():
        pairs.setdefault(n.pair, []).append(n.name)
    if len(pairs) > 1 and function == "firewall":
        ck.bad("nats", f"{len(pairs)} network pairs; a firewall topology has one")
    owner: dict[tuple[str, str], str] = {}
    for pair, names in pairs.items():
        for name in names:
            n = nats[name]
            for e in _pool_of(n, networks):
                for a in public_pool.addresses((e,)):
                    had = owner.setdefault((n.public, a), name)
                    if nats[had].pair != pair:
                        ck.bad(f"nats.{name}.pool", f"{a} is also translated to by nats.{had} (inside network {nats[had].inside}): NAT instances "
                                                   f"sharing public network {n.public} each need their own public addresses (a pool)")


def _check_actives(ck: _Checker, nats: dict[str, Nat], actives: list[str]) -> None:
    """One active NAT node per network pair, no more."""
    by_pair: dict[tuple[str, str], str] = {}
    for a in actives:
        had = by_pair.setdefault(nats[a].pair, a)
        if had != a:
            ck.bad("active_nat", f"{had} and {a} both serve networks {'/'.join(nats[a].pair)}: name one active NAT node per network pair")
    for n in nats.values():
        if n.pair not in by_pair:
            twins = [m.name for m in nats.values() if m.pair == n.pair]
            ck.bad("active_nat", f"no active NAT node for networks {'/'.join(n.pair)} (one of: {', '.join(twins)})")
            by_pair[n.pair] = n.name


def _machines(ck: _Checker, doc: dict[str, Any], networks: dict[str, Network]) -> tuple[dict[str, Machine], Underlay | None]:
    """The ``[machines]`` and the ``[underlay]`` joining them: both or neither."""
    if "machines" not in doc and "underlay" not in doc:
        return {}, None
    raw_under = ck.table(doc, "underlay", "underlay")
    underlay = None
    if raw_under:
        ck.keys(raw_under, {"subnet", "tunnel"}, "underlay")
        usub = ck.field(raw_under, "subnet", "underlay.subnet", _subnet, "an IPv4 network like 198.51.100.0/24")
        tunnel = ck.field(raw_under, "tunnel", "underlay.tunnel", _str, "a tunnel type", default="gre")
        if tunnel is not None and tunnel not in TUNNELS:
            ck.bad("underlay.tunnel", f"{tunnel!r} is not a tunnel type (one of: {', '.join(TUNNELS)})")
            tunnel = None
        for n in networks.values():
            if usub is not None and usub.overlaps(n.subnet):
                ck.bad("underlay.subnet", f"{usub} overlaps networks.{n.name}.subnet {n.subnet}; the underlay is separate from the data networks")
        if usub is not None and tunnel is not None:
            underlay = Underlay(usub, tunnel)
    machines: dict[str, Machine] = {}
    raw_machines = ck.table(doc, "machines", "machines")
    taken: dict[ipaddress.IPv4Address, str] = {}
    for name, raw in raw_machines.items():
        where = f"machines.{name}"
        if not _MACHINE_NAME.match(name):
            ck.bad(where, "name must be a letter then letters or digits, at most 8 characters (it names tunnel ports)")
        if not isinstance(raw, dict):
            ck.bad(where, f"must be a table, not {type(raw).__name__}")
            continue
        ck.keys(raw, {"underlay"}, where)
        addr = ck.field(raw, "underlay", f"{where}.underlay", _address, "an IPv4 address")
        if underlay is not None:
            _check_in(ck, f"{where}.underlay", addr, underlay.subnet, "underlay.subnet")
        if addr is not None and addr in taken:
            ck.bad(f"{where}.underlay", f"{addr} is already used by {taken[addr]}")
        elif addr is not None:
            taken[addr] = f"{where}.underlay"
            machines[name] = Machine(name, addr)
    if "machines" in doc and not raw_machines:
        ck.bad("machines", "no machine (declare at least one, or leave [machines] out for one machine)")
    return machines, underlay


def _placed(ck: _Checker, raw: dict[str, Any], where: str, machines: dict[str, Machine], declared: bool) -> str:
    """The machine a node is placed on: required when machines are declared, refused otherwise."""
    if not declared:
        if "machine" in raw:
            ck.bad(f"{where}.machine", "no [machines] are declared (declare them, or leave machine out)")
        return ""
    machine = ck.field(raw, "machine", f"{where}.machine", _str, "a machine name")
    if machine is None:
        return ""
    if machine not in machines:
        ck.bad(f"{where}.machine", f"{machine!r} is not a machine (one of: {', '.join(machines) or 'none'})")
        return ""
    return machine


def loads(text: str, source: str = "<string>") -> Topology:
    """Parse and validate topology TOML text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TopologyError(source, [f"not valid TOML: {e}"]) from None
    return parse(doc, source, text)


def loads_yaml(text: str, source: str = "<string>") -> Topology:
    """Parse and validate topology YAML text (the same fields as the TOML form)."""
    import yaml  # only YAML topologies need it

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(source, [f"not valid YAML: {e}"]) from None
    if not isinstance(doc, dict):
        raise TopologyError(source, [f"the document must be a mapping, not {type(doc).__name__}"])
    return parse(doc, source, text)


#: Reader by file suffix; anything else is read as TOML.
_READERS: dict[str, Callable[[str, str], Topology]] = {".yaml": loads_yaml, ".yml": loads_yaml}


def load(path: str | Path | None = None) -> Topology:
    """Read and validate a topology file (TOML, or YAML by its .yaml/.yml suffix); None is the default demo."""
    p = Path(path) if path is not None else DEFAULT_TOPOLOGY
    try:
        text = p.read_text()
    except OSError as e:
        raise TopologyError(str(p), [f"cannot read the file: {e.strerror or e}"]) from None
    return _READERS.get(p.suffix.lower(), loads)(text, str(p))


def load_text(text: str, source: str) -> Topology:
    """Parse topology text saved from a file named ``source`` (format chosen by its suffix)."""
    return _READERS.get(Path(source).suffix.lower(), loads)(text, source)
