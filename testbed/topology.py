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
import tomllib
from pathlib import Path
from typing import Any, Callable

from .topocheck import (
    BRIDGE, NODE_NAME, Checker, as_address, as_name, as_names, as_port_range, as_str, as_subnet, check_actives, check_in, check_pairs,
    declared_networks, network_roles, placed, read_firewall, read_machines, read_networks, read_pool,
)
from .topomodel import FUNCTIONS, NETWORKS, RESERVED, Host, Management, Nat, Topology, TopologyError

DEFAULT_TOPOLOGY = Path(__file__).parent / "topologies" / "demo.toml"


def parse(doc: dict[str, Any], source: str = "<memory>", text: str = "") -> Topology:
    """Validate a decoded topology document; :class:`TopologyError` lists every problem."""
    ck = Checker()
    ck.keys(doc, {"name", "bridge", "active_nat", "networks", "hosts", "nats", "management", "function", "firewall", "machines", "underlay"}, "")
    name = ck.field(doc, "name", "name", as_str, "a string", default="testbed")
    function = ck.field(doc, "function", "function", as_str, "a string", default="nat")
    if function is not None and function not in FUNCTIONS:
        ck.bad("function", f"{function!r} is not one of {', '.join(FUNCTIONS)}")
        function = None
    bridge = ck.field(doc, "bridge", "bridge", lambda v: as_name(BRIDGE, v), "a bridge name (a-z, then a-z 0-9 _ -, at most 15)", default="br0")

    raw_nats_doc: dict[str, Any] = doc["nats"] if isinstance(doc.get("nats"), dict) else {}
    networks = read_networks(ck, doc, raw_nats_doc)

    machines, underlay = read_machines(ck, doc, networks)

    hosts: dict[str, Host] = {}
    raw_hosts = ck.table(doc, "hosts", "hosts")
    taken: dict[ipaddress.IPv4Address, str] = {n.gateway: f"networks.{n.name}.gateway" for n in networks.values()}
    for host_name, raw in raw_hosts.items():
        where = f"hosts.{host_name}"
        if not NODE_NAME.match(host_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters (it names a namespace and a switch port)")
        if host_name in RESERVED:
            ck.bad(where, f"{host_name!r} is reserved for the testbed's own namespace")
        if not isinstance(raw, dict):
            ck.bad(where, f"must be a table, not {type(raw).__name__}")
            continue
        ck.keys(raw, {"network", "address", "machine"}, where)
        machine = placed(ck, raw, where, machines, "machines" in doc)
        net = ck.field(raw, "network", f"{where}.network", as_str, "a network name")
        known = [n for n in declared_networks(doc) if n in networks] or list(NETWORKS)
        if net is not None and net not in declared_networks(doc):
            ck.bad(f"{where}.network", f"{net!r} is not a network (one of: {', '.join(known)})")
            net = None
        addr = ck.field(raw, "address", f"{where}.address", as_address, "an IPv4 address")
        if net in networks:
            check_in(ck, f"{where}.address", addr, networks[net].subnet, f"networks.{net}.subnet")
        if addr is not None and addr in taken:
            ck.bad(f"{where}.address", f"{addr} is already used by {taken[addr]}")
        elif addr is not None:
            taken[addr] = f"{where}.address"
        if net is not None and addr is not None:
            hosts[host_name] = Host(host_name, net, addr, machine)
    # Judged on what the file declares, so one bad address does not also
    # report its network as empty.
    declared = {raw.get("network") for raw in raw_hosts.values() if isinstance(raw, dict)}
    for net_name, role in network_roles(raw_nats_doc, networks).items():
        if raw_hosts and net_name not in declared:
            ck.bad("hosts", f"no host on the {net_name} network ({'a client' if role == 'inside' else 'a server'} is needed)")

    mgmt = None
    raw_mgmt = ck.table(doc, "management", "management")
    if raw_mgmt:
        ck.keys(raw_mgmt, {"subnet", "controller"}, "management")
        msub = ck.field(raw_mgmt, "subnet", "management.subnet", as_subnet, "an IPv4 network like 192.0.2.0/24")
        mctl = ck.field(raw_mgmt, "controller", "management.controller", as_address, "an IPv4 address")
        check_in(ck, "management.controller", mctl, msub, "management.subnet")
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
        if not NODE_NAME.match(nat_name):
            ck.bad(where, "name must be a-z then a-z 0-9, at most 10 characters (it names a namespace and switch ports)")
        if nat_name in RESERVED:
            ck.bad(where, f"{nat_name!r} is reserved for the testbed's own namespace")
        if nat_name in raw_hosts:
            ck.bad(where, f"{nat_name!r} is also the name of a host")
        if not isinstance(raw, dict):
            ck.bad(where, f"must be a table, not {type(raw).__name__}")
            continue
        ck.keys(raw, {"management", "ports", "pool", "machine", "inside", "public"}, where)
        machine = placed(ck, raw, where, machines, "machines" in doc)
        legs = {side: ck.field(raw, side, f"{where}.{side}", as_str, "a network name", default=side) for side in NETWORKS}
        for side, net in legs.items():
            if net is not None and net not in declared_networks(doc):
                ck.bad(f"{where}.{side}", f"{net!r} is not a network (one of: {', '.join(networks) or 'none'})")
        maddr = ck.field(raw, "management", f"{where}.management", as_address, "an IPv4 address")
        ports = ck.field(raw, "ports", f"{where}.ports", as_port_range, "a port range like \"20000-29999\"")
        pool = read_pool(ck, raw, f"{where}.pool", ports, networks.get(legs["public"] or ""), taken)
        if mgmt is not None:
            check_in(ck, f"{where}.management", maddr, mgmt.subnet, "management.subnet")
        if maddr is not None and maddr in mgmt_taken:
            ck.bad(f"{where}.management", f"{maddr} is already used by {mgmt_taken[maddr]}")
        elif maddr is not None:
            mgmt_taken[maddr] = f"{where}.management"
        if maddr is not None and ports is not None and legs["inside"] in networks and legs["public"] in networks:
            nats[nat_name] = Nat(nat_name, maddr, ports, pool, machine, legs["inside"], legs["public"])
    if not raw_nats and "nats" in doc:
        ck.bad("nats", "no NAT node (at least one is needed)")
    check_pairs(ck, nats, networks, function)

    actives = ck.field(doc, "active_nat", "active_nat", as_names, "a NAT node name, or a list of them (one per network pair)")
    active = actives[0] if actives else None
    for name in actives or []:
        if raw_nats and name not in raw_nats:
            ck.bad("active_nat", f"{name!r} is not a NAT node (one of: {', '.join(raw_nats)})")
    if actives and all(a in nats for a in actives) and not ck.problems:
        check_actives(ck, nats, actives)

    policy = read_firewall(ck, doc, function, networks.get("inside"))

    if ck.problems:
        raise TopologyError(source, ck.problems)
    assert mgmt is not None and active is not None and function is not None  # guaranteed when no problem was found
    return Topology(name, bridge, networks, hosts, nats, mgmt, active, source, text, function, policy, machines, underlay, tuple(actives))


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
