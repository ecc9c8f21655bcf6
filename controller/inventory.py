"""The inventory: where the agents and the switch are, read from a TOML or YAML file.

Example (TOML; the YAML form has the same structure)::

    [agents.nat1]
    host = "192.0.2.11"          # management address of the agent
    port = 830
    username = "natmig"
    password_file = "/etc/natmig/nat1.pw"   # or password = "...", or key = "/path/id_ed25519"
    known_hosts = "/etc/natmig/known_hosts" # host keys are always checked
    public_address = "203.0.113.1"          # optional: checked in preflight; a pool is a list
                                            # of addresses and ranges: ["203.0.113.1-203.0.113.4"]

    [agents.nat2]
    host = "192.0.2.12"
    # ... same fields

    [switch]
    bridge = "br0"
    ovs_rundir = "/run/natmig-ovs"  # OVS_RUNDIR of the daemons owning the bridge
    client_port = 1
    server_port = 2
    [switch.nats.nat1]
    inside = 3
    outside = 4
    [switch.nats.nat2]
    inside = 5
    outside = 6

    [migration]
    source = "nat1"
    target = "nat2"
    retire = "delete"               # delete | keep | stop

An agent may name the ``machine`` (host) its NAT node runs on and the
``networks = [INSIDE, PUBLIC]`` it serves (its NAT instance; default
``["inside", "public"]``): `natmig drain --host A --to B` moves every NAT
on machine A to its twin on B, the one serving the same networks.

An agent may name ``netns``: the namespace its management network is reached
from (the connection is opened there; the controller stays where it is).
Instead of a bridge, ``[switch] testbed = "PREFIX"`` names an embedded
testbed (``natmig testbed up``), whose own atomic ``point_to`` is used.

Every field is checked on load; an error names the file and the dotted
field (``agents.nat2.port: 'x' is not an integer``).  Command-line overrides
are ``PATH=VALUE`` strings applied before the check (``agents.nat2.host=192.0.2.22``).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from .. import pool
from ..errors import EXIT_USAGE, ControllerError
from .plan import NatPorts, SwitchLayout


#: a line of the agent's password file (agent/auth.py), which an inventory's password_file must not be
_AGENT_PASSWORD_LINE = re.compile(r"^[^:\s]+:scrypt\$", re.M)


class InventoryError(ControllerError):
    """The inventory is missing, unreadable, or has a bad field (named in the message)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class AgentSpec:
    """How to reach one NAT node's agent."""

    name: str
    host: str
    port: int = 830
    username: str = "natmig"
    password: str | None = None
    password_file: str | None = None
    key: str | None = None
    known_hosts: str | None = None
    #: an address, or a pool as a list of addresses and ranges FIRST-LAST (see :attr:`public_addresses`)
    public_address: str | list[str] | None = None
    stop_command: list[str] | None = None
    netns: str | None = None
    #: the machine (host) the NAT node runs on: what `natmig drain --host` selects by
    machine: str | None = None
    #: the (inside, public) networks it serves, its NAT instance (default ``inside``, ``public``): a drain pairs twins by them
    networks: tuple[str, str] = ("inside", "public")

    @property
    def public_addresses(self) -> set[str] | None:
        """Every address of ``public_address`` (ranges expanded); None when the inventory does not say."""
        if self.public_address is None:
            return None
        items = [self.public_address] if isinstance(self.public_address, str) else self.public_address
        out: set[str] = set()
        for i, item in enumerate(items):
            where = f"agents.{self.name}.public_address" + (f"[{i}]" if not isinstance(self.public_address, str) else "")
            out.update(_public_entry(where, item))
        return out

    def secret(self) -> str | None:
        """The password (read from ``password_file`` when that is given)."""
        if self.password is not None:
            return self.password
        if self.password_file is None:
            return None
        try:
            text = Path(self.password_file).read_text().strip()
        except OSError as e:
            raise InventoryError(f"agents.{self.name}.password_file: cannot read {self.password_file}: {e}") from e
        if _AGENT_PASSWORD_LINE.match(text):
            # The agent's own file (hashed) given where the plaintext secret belongs: sending the hash would only be refused.
            raise InventoryError(
                f"agents.{self.name}.password_file: {self.password_file} is an agent's hashed password file (USER:scrypt$...); "
                "the inventory needs the plaintext password itself (a file holding only the password), the one set with "
                "`natmig agent passwd` in the agent's --passwords file")
        return text


@dataclass(frozen=True)
class SwitchSpec:
    """The Open vSwitch bridge and how the hosts and NATs attach to it."""

    layout: SwitchLayout | None
    ovs_rundir: str | None = None
    netns: str | None = None
    testbed: str | None = None
    #: "ovs" (a bridge, or a testbed's), or "none": the migration moves state only, no traffic.
    kind: str = "ovs"


@dataclass(frozen=True)
class Inventory:
    """Agents by name, the switch, and the default source/target/retire of a migration."""

    agents: dict[str, AgentSpec]
    switch: SwitchSpec | None = None
    source: str | None = None
    target: str | None = None
    retire: str = "delete"
    path: str = "<inventory>"
    #: a controller service's northbound (natmig migrate --controller), when the inventory names one.
    controller: AgentSpec | None = None
    #: which migration engine (see ENGINES).
    engine: str = "generic"

    def agent(self, name: str, role: str) -> AgentSpec:
        """An agent by name; the error says which role wanted it and which exist."""
        try:
            return self.agents[name]
        except KeyError:
            raise InventoryError(f"{self.path}: {role} {name!r} is not an agent of the inventory (agents: {', '.join(sorted(self.agents)) or 'none'})") from None


# ----------------------------------------------------------------- checks


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def check(where: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InventoryError(f"{where}: {v!r} is not an integer")
        if not lo <= v <= hi:
            raise InventoryError(f"{where}: {v} is out of range {lo}..{hi}")
        return v
    return check


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise InventoryError(f"{where}: {v!r} is not a non-empty string")
    return v


def _ip(where: str, v: Any) -> str:
    _str(where, v)
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise InventoryError(f"{where}: {v!r} is not an IP address") from None
    return v


def _public_entry(where: str, v: Any) -> list[str]:
    """One address (IPv4 or IPv6), or an IPv4 range FIRST-LAST of a pool, as the addresses it names."""
    if isinstance(v, str) and "-" in v:
        try:
            return pool.parse_addresses(where, v)
        except pool.PoolError as e:
            raise InventoryError(str(e)) from None
    return [_ip(where, v)]


def _public(where: str, v: Any) -> str | list[str]:
    """An address, or a pool: a non-empty list of addresses and ranges whose addresses do not overlap."""
    if isinstance(v, str):
        _public_entry(where, v)
        return v
    if not isinstance(v, list) or not v:
        raise InventoryError(f"{where}: {v!r} is not an address or a non-empty list of addresses and ranges (a pool)")
    seen: dict[str, int] = {}
    for i, item in enumerate(v):
        for a in _public_entry(f"{where}[{i}]", item):
            if a in seen:
                raise InventoryError(f"{where}[{i}]: {a} is also in entry [{seen[a]}]; a pool's addresses must not overlap")
            seen[a] = i
    return list(v)


def _host(where: str, v: Any) -> str:
    # A host is an IP address or a name; names are resolved by SSH.
    return _str(where, v)


def _mac(where: str, v: Any) -> str:
    _str(where, v)
    parts = v.split(":")
    if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts):
        raise InventoryError(f"{where}: {v!r} is not a MAC address (six hex pairs, e.g. 02:00:00:00:00:01)")
    return v.lower()


def _networks(where: str, v: Any) -> tuple[str, str]:
    if not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, str) and x for x in v):
        raise InventoryError(f"{where}: {v!r} is not the two networks the NAT serves, [INSIDE, PUBLIC] (e.g. [\"inside3\", \"public\"])")
    return (v[0], v[1])


def _argv(where: str, v: Any) -> list[str]:
    if not isinstance(v, list) or not v or not all(isinstance(x, str) for x in v):
        raise InventoryError(f"{where}: {v!r} is not a command as a list of strings")
    return list(v)


def _retire(where: str, v: Any) -> str:
    modes = ("delete", "keep", "stop")
    if v not in modes:
        raise InventoryError(f"{where}: {v!r} is not one of {', '.join(modes)}")
    return v


#: Fields of an agent: (checker, required).
AGENT_FIELDS: Mapping[str, tuple[Callable[[str, Any], Any], bool]] = {
    "host": (_host, True),
    "port": (_int(1, 65535), False),
    "username": (_str, False),
    "password": (_str, False),
    "password_file": (_str, False),
    "key": (_str, False),
    "known_hosts": (_str, False),
    "public_address": (_public, False),
    "stop_command": (_argv, False),
    "netns": (_str, False),
    "machine": (_str, False),
    "networks": (_networks, False),
}
SWITCH_FIELDS: Mapping[str, tuple[Callable[[str, Any], Any], bool]] = {
    "bridge": (_str, True),
    "ovs_rundir": (_str, False),
    "netns": (_str, False),
    "client_port": (_int(1, 65279), True),
    "server_port": (_int(1, 65279), True),
    "priority": (_int(1, 65535), False),
    # The inside MAC the NATs share: with it, packets a NAT held while its
    # admission was closed are handed to whichever NAT is active when released.
    "gateway_mac": (_mac, False),
}
PORT_FIELDS: Mapping[str, tuple[Callable[[str, Any], Any], bool]] = {
    "inside": (_int(1, 65279), True),
    "outside": (_int(1, 65279), True),
}
def _engine(where: str, v: Any) -> str:
    if v not in ENGINES:
        raise InventoryError(f"{where}: {v!r} is not one of {', '.join(ENGINES)}")
    return str(v)


#: "generic" (the default): the engine of any state module (controller/engine.py); "nat": the NAT's own migration
#: (controller/migrate.py), kept for what only it has: --retire stop, --verify-source read, verify by key ranges.
ENGINES = ("nat", "generic")

MIGRATION_FIELDS: Mapping[str, tuple[Callable[[str, Any], Any], bool]] = {
    "source": (_str, False),
    "target": (_str, False),
    "retire": (_retire, False),
    "engine": (_engine, False),
}
TOP_LEVEL = ("agents", "switch", "migration", "controller")


def _fields(where: str, table: Any, spec: Mapping[str, tuple[Callable[[str, Any], Any], bool]], allow: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise InventoryError(f"{where}: expected a table of fields, got {type(table).__name__}")
    unknown = sorted(set(table) - set(spec) - set(allow))
    if unknown:
        raise InventoryError(f"{where}.{unknown[0]}: unknown field (known: {', '.join(sorted(spec))})")
    out: dict[str, Any] = {}
    for name, (check, required) in spec.items():
        if name not in table:
            if required:
                raise InventoryError(f"{where}.{name}: missing (required)")
            continue
        out[name] = check(f"{where}.{name}", table[name])
    return out


def parse_switch(where: str, raw: Any) -> SwitchSpec:
    """A ``switch`` section: "none", ``{testbed = PREFIX}``, or a bridge with its ports (errors start with ``where``)."""
    if isinstance(raw, str):
        if raw != "none":
            raise InventoryError(f"{where}: {raw!r}: the one switch given by a word is \"none\" (state transfer only); "
                                 "an Open vSwitch bridge is a [switch] table")
        return SwitchSpec(None, kind="none")
    if isinstance(raw, dict) and "testbed" in raw:
        # An embedded testbed knows its own bridge, ports and flows.
        f = _fields(where, raw, {"testbed": (_str, True)})
        return SwitchSpec(None, testbed=f["testbed"])
    f = _fields(where, raw, SWITCH_FIELDS, allow=("nats",))
    nats_raw = raw.get("nats")
    if not isinstance(nats_raw, dict) or not nats_raw:
        raise InventoryError(f"{where}.nats: missing or empty (one table per NAT, e.g. [switch.nats.nat1])")
    nats = {n: NatPorts(**_fields(f"{where}.nats.{n}", t, PORT_FIELDS)) for n, t in nats_raw.items()}
    layout = SwitchLayout(f["bridge"], f["client_port"], f["server_port"], nats, f.get("priority", 100), f.get("gateway_mac"))
    return SwitchSpec(layout, f.get("ovs_rundir"), f.get("netns"))


def parse(data: Any, path: str = "<inventory>") -> Inventory:
    """Check a loaded inventory document and build an :class:`Inventory`."""
    if not isinstance(data, dict):
        raise InventoryError(f"{path}: the document must be a table/mapping at the top level")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise InventoryError(f"{path}: {unknown[0]}: unknown section (known: {', '.join(TOP_LEVEL)})")
    agents_raw = data.get("agents", {} if "controller" in data else None)
    if not isinstance(agents_raw, dict) or (not agents_raw and "controller" not in data):
        raise InventoryError(f"{path}: agents: missing or empty (one table per agent, e.g. [agents.nat1])")
    agents = {}
    for name, table in agents_raw.items():
        f = _fields(f"{path}: agents.{name}", table, AGENT_FIELDS)
        if "password" not in f and "password_file" not in f and "key" not in f:
            raise InventoryError(f"{path}: agents.{name}: give password, password_file or key")
        agents[name] = AgentSpec(name=str(name), **f)
    switch = parse_switch(f"{path}: switch", data["switch"]) if "switch" in data else None
    mig = _fields(f"{path}: migration", data.get("migration", {}), MIGRATION_FIELDS)
    controller = None
    if "controller" in data:
        # The controller service's northbound: reached like an agent (host key checked, credentials, namespace).
        f = _fields(f"{path}: controller", data["controller"], {k: v for k, v in AGENT_FIELDS.items() if k not in ("public_address", "stop_command", "machine", "networks")})
        if "password" not in f and "password_file" not in f and "key" not in f:
            raise InventoryError(f"{path}: controller: give password, password_file or key")
        controller = AgentSpec(name="controller", **f)
    # The generic engine by default; a switch of "none" moves state only, which is the generic engine's alone.
    engine = mig.get("engine", "generic")
    if engine == "nat" and switch is not None and switch.kind == "none":
        raise InventoryError(f"{path}: migration.engine: the NAT migration needs an Open vSwitch switch; with switch = \"none\" the engine is generic")
    inv = Inventory(agents, switch, mig.get("source"), mig.get("target"), mig.get("retire", "delete"), path, controller, engine)
    for role in ("source", "target"):
        name = getattr(inv, role)
        if name is not None and agents:  # with a controller alone, the agents are the ones that called it home
            inv.agent(name, f"migration.{role}")
    if switch is not None and switch.layout is not None:
        for name in agents:
            if name not in switch.layout.nats:
                raise InventoryError(f"{path}: switch.nats.{name}: missing; agent {name} has no ports on the bridge")
    return inv


def _convert(text: str) -> Any:
    """A command-line override's value: int, bool, or string (a YAML scalar, so lists work too)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``PATH=VALUE`` overrides (dotted path) to a loaded document, creating tables as needed."""
    for item in overrides:
        if "=" not in item:
            raise InventoryError(f"override {item!r}: expected PATH=VALUE, e.g. agents.nat2.host=192.0.2.12")
        path, value = item.split("=", 1)
        parts = [p for p in path.strip().split(".") if p]
        if not parts:
            raise InventoryError(f"override {item!r}: empty path")
        node = data
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise InventoryError(f"override {item!r}: {p} is not a table")
            node = nxt
        node[parts[-1]] = _convert(value)
    return data


def load_document(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a plain dict."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InventoryError(f"inventory {p}: cannot read: {e}") from e
    try:
        if p.suffix == ".toml":
            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            return yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
        raise InventoryError(f"inventory {p}: not valid {p.suffix[1:].upper()}: {e}") from e
    raise InventoryError(f"inventory {p}: unknown format {p.suffix!r}; use .toml, .yaml or .yml")


def load(path: str | Path | None, overrides: list[str] | None = None) -> Inventory:
    """Load, override and check an inventory (``path`` None: from overrides alone)."""
    data = load_document(path) if path is not None else {}
    apply_overrides(data, list(overrides or []))
    return parse(data, str(path) if path is not None else "<command line>")


def dump_toml(inv_doc: Mapping[str, Any]) -> str:
    """Write a plain inventory document as TOML (tables of scalars and lists of strings only)."""
    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, list):
            return "[" + ", ".join(scalar(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    def table(prefix: str, t: Mapping[str, Any]) -> None:
        plain = {k: v for k, v in t.items() if not isinstance(v, dict)}
        subs = {k: v for k, v in t.items() if isinstance(v, dict)}
        if plain and prefix:
            lines.append(f"[{prefix}]")
        for k, v in plain.items():
            lines.append(f"{k} = {scalar(v)}")
        if plain:
            lines.append("")
        for k, v in subs.items():
            table(f"{prefix}.{k}" if prefix else k, v)

    table("", inv_doc)
    return "\n".join(lines)


@dataclass
class Overrides:
    """Convenience command-line options turned into ``PATH=VALUE`` overrides."""

    items: list[str] = field(default_factory=list)

    def add(self, path: str, value: Any) -> None:
        """Add one override when ``value`` is not None."""
        if value is not None:
            self.items.append(f"{path}={value}")
