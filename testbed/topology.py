"""The testbed's topology file: its format, its validation, and the default demo.

A topology is a TOML file (stdlib :mod:`tomllib`; no dependency) naming two
data networks, the hosts linked to them, the NAT nodes that join them, the
management network, and which NAT is active.  ``testbed/topologies/demo.toml``
is the original demo and the default.  Every problem found is reported at
once, each naming the field at fault, e.g.
``hosts.client.address: 10.0.1.10 is not in networks.inside.subnet 10.0.0.0/24``.

Links are given by each host's ``network`` (one switch port per host) and by
the NAT nodes (an inside and a public switch port each); see docs/testbed.md.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
#: Namespace names the testbed itself uses (``<prefix>-ovs``, ``<prefix>-mgmt``).
RESERVED = ("ovs", "mgmt")


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
    """An end host: a namespace with one interface on one data network."""

    name: str
    network: str
    address: ipaddress.IPv4Address


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


@dataclass(frozen=True)
class Management:
    """The management network: its subnet and the address of the place the controller runs."""

    subnet: ipaddress.IPv4Network
    controller: ipaddress.IPv4Address


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

    @property
    def public_address(self) -> str:
        """The address sessions are translated to (the shared public gateway)."""
        return str(self.networks["public"].gateway)

    def public_pool(self, nat: str) -> tuple[PublicRange, ...]:
        """The public address pool of NAT node ``nat``: its declared pool, or the public gateway with its ports."""
        n = self.nats[nat]
        return n.pool or (PublicRange(self.public_address, n.port_range),)

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
            _check_in(ck, where, a, public.subnet, "networks.public.subnet")
        if a in taken and a != (public.gateway if public else None):
            ck.bad(where, f"{a} is already used by {taken[a]}")
    return pool


def parse(doc: dict[str, Any], source: str = "<memory>", text: str = "") -> Topology:
    """Validate a decoded topology document; :class:`TopologyError` lists every problem."""
    ck = _Checker()
    ck.keys(doc, {"name", "bridge", "active_nat", "networks", "hosts", "nats", "management"}, "")
    name = ck.field(doc, "name", "name", _str, "a string", default="testbed")
    bridge = ck.field(doc, "bridge", "bridge", lambda v: _name(_BRIDGE, v), "a bridge name (a-z, then a-z 0-9 _ -, at most 15)", default="br0")

    networks: dict[str, Network] = {}
    raw_nets = ck.table(doc, "networks", "networks")
    ck.keys(raw_nets, set(NETWORKS), "networks")
    for net_name in NETWORKS:
        where = f"networks.{net_name}"
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
    if len(networks) == 2 and networks["inside"].subnet.overlaps(networks["public"].subnet):
        ck.bad("networks.public.subnet", f"{networks['public'].subnet} overlaps networks.inside.subnet {networks['inside'].subnet}")
    macs = [n.gateway_mac for n in networks.values()]
    if len(set(macs)) != len(macs):
        ck.bad("networks.public.gateway_mac", "is the same as networks.inside.gateway_mac; each network needs its own")

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
        ck.keys(raw, {"network", "address"}, where)
        net = ck.field(raw, "network", f"{where}.network", _str, "a network name")
        if net is not None and net not in NETWORKS:
            ck.bad(f"{where}.network", f"{net!r} is not a network (one of: {', '.join(NETWORKS)})")
            net = None
        addr = ck.field(raw, "address", f"{where}.address", _address, "an IPv4 address")
        if net in networks:
            _check_in(ck, f"{where}.address", addr, networks[net].subnet, f"networks.{net}.subnet")
        if addr is not None and addr in taken:
            ck.bad(f"{where}.address", f"{addr} is already used by {taken[addr]}")
        elif addr is not None:
            taken[addr] = f"{where}.address"
        if net is not None and addr is not None:
            hosts[host_name] = Host(host_name, net, addr)
    # Judged on what the file declares, so one bad address does not also
    # report its network as empty.
    declared = {raw.get("network") for raw in raw_hosts.values() if isinstance(raw, dict)}
    for net_name, role in (("inside", "a client"), ("public", "a server")):
        if raw_hosts and net_name not in declared:
            ck.bad("hosts", f"no host on the {net_name} network ({role} is needed)")

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
        ck.keys(raw, {"management", "ports", "pool"}, where)
        maddr = ck.field(raw, "management", f"{where}.management", _address, "an IPv4 address")
        ports = ck.field(raw, "ports", f"{where}.ports", _port_range, "a port range like \"20000-29999\"")
        pool = _pool(ck, raw, f"{where}.pool", ports, networks.get("public"), taken)
        if mgmt is not None:
            _check_in(ck, f"{where}.management", maddr, mgmt.subnet, "management.subnet")
        if maddr is not None and maddr in mgmt_taken:
            ck.bad(f"{where}.management", f"{maddr} is already used by {mgmt_taken[maddr]}")
        elif maddr is not None:
            mgmt_taken[maddr] = f"{where}.management"
        if maddr is not None and ports is not None:
            nats[nat_name] = Nat(nat_name, maddr, ports, pool)
    if not raw_nats and "nats" in doc:
        ck.bad("nats", "no NAT node (at least one is needed)")

    active = ck.field(doc, "active_nat", "active_nat", _str, "a NAT node name")
    if active is not None and raw_nats and active not in raw_nats:
        ck.bad("active_nat", f"{active!r} is not a NAT node (one of: {', '.join(raw_nats)})")

    if ck.problems:
        raise TopologyError(source, ck.problems)
    assert mgmt is not None and active is not None  # guaranteed when no problem was found
    return Topology(name, bridge, networks, hosts, nats, mgmt, active, source, text)


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
