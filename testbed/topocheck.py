"""The checks of a topology document: every problem collected, each naming the field at fault.

:class:`Checker` gathers the problems, the ``as_*`` converters read one field
each, and the ``read_*``/``check_*`` functions one table or rule of the file;
:func:`natmig.testbed.topology.parse` puts them together.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Callable

from .. import pool as public_pool
from ..pool import PublicRange
from .topomodel import NETWORKS, TUNNELS, FirewallPolicy, Machine, Nat, Network, Underlay, pool_of

# Node names become parts of namespace and switch-port names ("<name>-out"),
# which Linux limits to 15 characters.
NODE_NAME = re.compile(r"^[a-z][a-z0-9]{0,9}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
BRIDGE = re.compile(r"^[a-z][a-z0-9_-]{0,14}$")
# Machine names are parts of tunnel-port names ("t<machine>-<n>", at most 15).
_MACHINE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]{0,7}$")
_SERVICE = re.compile(r"^(tcp|udp) ([0-9.]+):([0-9]+)$")


class Checker:
    """Collects problems while reading a raw TOML document, so all are reported at once."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def bad(self, where: str, message: str) -> None:
        """One problem: ``where`` is the field at fault."""
        self.problems.append(f"{where}: {message}")

    def table(self, doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
        """``doc[key]``, a table; a problem (and an empty table) when it is missing or not one."""
        value = doc.get(key)
        if value is None:
            self.bad(where, "missing (a table is required)")
            return {}
        if not isinstance(value, dict):
            self.bad(where, f"must be a table, not {type(value).__name__}")
            return {}
        return value

    def keys(self, doc: dict[str, Any], allowed: set[str], where: str) -> None:
        """A problem for each key of ``doc`` that is not ``allowed``."""
        for key in sorted(set(doc) - allowed):
            self.bad(f"{where}.{key}" if where else key, f"unknown field (allowed: {', '.join(sorted(allowed))})")

    def field(self, doc: dict[str, Any], key: str, where: str, conv: Callable[[Any], Any], what: str, default: Any = ...) -> Any:
        """``doc[key]`` read by ``conv``; None and a problem ("is not ``what``") when it fails, ``default`` when missing (required without one)."""
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


def as_str(value: Any) -> str:
    """A string, as it is."""
    if not isinstance(value, str):
        raise TypeError(f"got {type(value).__name__}")
    return value


def as_address(value: Any) -> ipaddress.IPv4Address:
    """An IPv4 address."""
    return ipaddress.IPv4Address(as_str(value))


def as_subnet(value: Any) -> ipaddress.IPv4Network:
    """An IPv4 network, no host bits set."""
    return ipaddress.IPv4Network(as_str(value), strict=True)


def as_mac(value: Any) -> str:
    """A unicast MAC address, lower case."""
    mac = as_str(value).lower()
    if not _MAC.match(mac):
        raise ValueError("")
    if int(mac[:2], 16) & 1:
        raise ValueError("multicast; an interface needs a unicast MAC")
    return mac


def as_name(pattern: re.Pattern[str], value: Any) -> str:
    """A name that ``pattern`` accepts."""
    if not pattern.match(as_str(value)):
        raise ValueError("")
    return value


def as_port_range(value: Any) -> tuple[int, int]:
    """``LOW-HIGH``: a port range."""
    lo, sep, hi = as_str(value).partition("-")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise ValueError("")
    low, high = int(lo), int(hi)
    if not 1 <= low <= high <= 65535:
        raise ValueError("need 1 <= low <= high <= 65535")
    return (low, high)


def as_service(value: Any) -> tuple[str, str, int]:
    """``tcp|udp ADDRESS:PORT``: a firewall's inbound service."""
    m = _SERVICE.match(as_str(value))
    if not m:
        raise ValueError("")
    port = int(m.group(3))
    if not 1 <= port <= 65535:
        raise ValueError("port not in 1..65535")
    return (m.group(1), str(ipaddress.IPv4Address(m.group(2))), port)


def as_positive(value: Any) -> int:
    """A positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError("")
    return value


def read_firewall(ck: Checker, doc: dict[str, Any], function: str | None, inside: Network | None) -> FirewallPolicy | None:
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
        svc = ck.field({"s": v}, "s", f"firewall.services[{i}]", as_service, 'a service like "tcp 10.0.0.20:5001"')
        if svc is not None and inside is not None and ipaddress.IPv4Address(svc[1]) not in inside.subnet:
            ck.bad(f"firewall.services[{i}]", f"{svc[1]} is not in networks.inside.subnet {inside.subnet}")
        elif svc is not None:
            services.append(svc)
    limits = {k: ck.field(raw, k, f"firewall.{k}", as_positive, "a positive integer", default=d)
              for k, d in (("new_rate", 20), ("new_burst", 40), ("block_timeout", 60))}
    if any(v is None for v in limits.values()):
        return None
    return FirewallPolicy(tuple(services), **limits)


def check_in(ck: Checker, where: str, addr: ipaddress.IPv4Address | None, net: ipaddress.IPv4Network | None, net_where: str) -> None:
    """A host address must be a usable address of its subnet."""
    if addr is None or net is None:
        return
    if addr not in net:
        ck.bad(where, f"{addr} is not in {net_where} {net}")
    elif net.prefixlen < 31 and addr in (net.network_address, net.broadcast_address):
        ck.bad(where, f"{addr} is the network or broadcast address of {net}")


def read_pool(
    ck: Checker, raw: dict[str, Any], where: str, ports: tuple[int, int] | None,
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
            check_in(ck, where, a, public.subnet, f"networks.{public.name}.subnet")
        if a in taken and a != (public.gateway if public else None):
            ck.bad(where, f"{a} is already used by {taken[a]}")
    return pool


def as_names(value: Any) -> list[str]:
    """``active_nat``: one NAT node's name, or a non-empty list of names."""
    if isinstance(value, list) and value:
        return [as_str(v) for v in value]
    return [as_str(value)]


def declared_networks(doc: dict[str, Any]) -> list[str]:
    """The names under ``[networks]``, in file order."""
    raw = doc.get("networks")
    return list(raw) if isinstance(raw, dict) else []


def read_networks(ck: Checker, doc: dict[str, Any], raw_nats: dict[str, Any]) -> dict[str, Network]:
    """The ``[networks]``: ``inside`` and ``public`` (required while a NAT node joins them by default), and any others NATs name."""
    networks: dict[str, Network] = {}
    raw_nets = ck.table(doc, "networks", "networks")
    # A NAT node that names no network joins the default one of that side: those must exist.
    implied = {side for side in NETWORKS if not raw_nats or any(not isinstance(r, dict) or side not in r for r in raw_nats.values())}
    names = [n for n in NETWORKS if n in implied or n in raw_nets] + [n for n in raw_nets if n not in NETWORKS]
    for net_name in names:
        where = f"networks.{net_name}"
        if not NODE_NAME.match(net_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters")
        raw = ck.table(raw_nets, net_name, where) if raw_nets else {}
        if not raw:
            continue
        ck.keys(raw, {"subnet", "gateway", "gateway_mac"}, where)
        subnet = ck.field(raw, "subnet", f"{where}.subnet", as_subnet, "an IPv4 network like 10.0.0.0/24")
        gw = ck.field(raw, "gateway", f"{where}.gateway", as_address, "an IPv4 address")
        mac = ck.field(raw, "gateway_mac", f"{where}.gateway_mac", as_mac, "a unicast MAC like 02:00:00:00:00:01")
        check_in(ck, f"{where}.gateway", gw, subnet, f"{where}.subnet")
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


def network_roles(raw_nats: dict[str, Any], networks: dict[str, Network]) -> dict[str, str]:
    """Each network some NAT node joins (by default or by name) -> "inside" or "public", in network order."""
    used: dict[str, str] = {}
    for raw in raw_nats.values():
        if isinstance(raw, dict):
            for side in NETWORKS:
                used.setdefault(str(raw.get(side, side)), side)
    if not raw_nats:
        used = {side: side for side in NETWORKS}
    return {n: used[n] for n in networks if n in used}


def check_pairs(ck: Checker, nats: dict[str, Nat], networks: dict[str, Network], function: str | None) -> None:
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
            for e in pool_of(n, networks):
                for a in public_pool.addresses((e,)):
                    had = owner.setdefault((n.public, a), name)
                    if nats[had].pair != pair:
                        ck.bad(f"nats.{name}.pool", f"{a} is also translated to by nats.{had} (inside network {nats[had].inside}): NAT instances "
                                                   f"sharing public network {n.public} each need their own public addresses (a pool)")


def check_actives(ck: Checker, nats: dict[str, Nat], actives: list[str]) -> None:
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


def read_machines(ck: Checker, doc: dict[str, Any], networks: dict[str, Network]) -> tuple[dict[str, Machine], Underlay | None]:
    """The ``[machines]`` and the ``[underlay]`` joining them: both or neither."""
    if "machines" not in doc and "underlay" not in doc:
        return {}, None
    raw_under = ck.table(doc, "underlay", "underlay")
    underlay = None
    if raw_under:
        ck.keys(raw_under, {"subnet", "tunnel"}, "underlay")
        usub = ck.field(raw_under, "subnet", "underlay.subnet", as_subnet, "an IPv4 network like 198.51.100.0/24")
        tunnel = ck.field(raw_under, "tunnel", "underlay.tunnel", as_str, "a tunnel type", default="gre")
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
        addr = ck.field(raw, "underlay", f"{where}.underlay", as_address, "an IPv4 address")
        if underlay is not None:
            check_in(ck, f"{where}.underlay", addr, underlay.subnet, "underlay.subnet")
        if addr is not None and addr in taken:
            ck.bad(f"{where}.underlay", f"{addr} is already used by {taken[addr]}")
        elif addr is not None:
            taken[addr] = f"{where}.underlay"
            machines[name] = Machine(name, addr)
    if "machines" in doc and not raw_machines:
        ck.bad("machines", "no machine (declare at least one, or leave [machines] out for one machine)")
    return machines, underlay


def placed(ck: Checker, raw: dict[str, Any], where: str, machines: dict[str, Machine], declared: bool) -> str:
    """The machine a node is placed on: required when machines are declared, refused otherwise."""
    if not declared:
        if "machine" in raw:
            ck.bad(f"{where}.machine", "no [machines] are declared (declare them, or leave machine out)")
        return ""
    machine = ck.field(raw, "machine", f"{where}.machine", as_str, "a machine name")
    if machine is None:
        return ""
    if machine not in machines:
        ck.bad(f"{where}.machine", f"{machine!r} is not a machine (one of: {', '.join(machines) or 'none'})")
        return ""
    return machine
