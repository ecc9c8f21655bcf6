"""A stateful firewall's data plane: one network namespace filtering with nftables.

The node is a namespace with an inside leg (the protected network's
gateway) and an outside leg, IPv4 forwarding, and an nftables table
``natmig_fw``: replies and related traffic of tracked connections pass;
new connections pass outbound and inbound to a declared set of services;
everything else is dropped.  ``nf_conntrack_tcp_loose=0`` (per namespace)
makes a TCP packet of a connection the node does not track *invalid*, so it
is dropped: a firewall without the state of a connection breaks it.

Its own dynamic state: a source that opens new connections faster than
``new_rate`` per second (``new_burst`` at once) lands in the set
``blocked`` for ``block_timeout`` seconds (an nftables set with per-element
timeouts, fed by an ``update @flood`` rule), and everything from a blocked
source is dropped.

Admission (natmig-state's admit-new) is the NAT node's: while it is
closed, packets that would create a connection are marked, a permanent
xtables rule per leg queues them (NFQUEUE: nftables' own ``queue`` is not
built here), and the process that lives in the node holds them
(:class:`.nfqueue.Holder`) until admission opens, then sends each back out
of the leg it came in by, to the switch, which hairpins it to whichever
firewall carries traffic then.  Everything the node runs is built by pure
functions of :class:`FwNodeConfig` (:func:`ruleset`, :func:`sysctls`,
:func:`hold_rules`), checked without root.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

from .. import netns
from ..errors import ProviderError
from . import nftables
from .nfqueue import HOLD_LIMIT, Holder, HoldStats, NfqueueError

log = logging.getLogger(__name__)

#: The nftables table natmig owns in a firewall node (not the NAT's ``natmig``: a node may chain both).
TABLE = "natmig_fw"
#: The set of blocked sources (fw-state's ``blocked`` list).
BLOCKED_SET = "blocked"
#: The per-source rate meter that feeds it (not migrated: see docs/firewall.md).
FLOOD_SET = "flood"
SERVICES_SET = "services"
ADMISSION_CHAIN = "admission"
HOLD_GUARD_CHAIN = "hold_guard"
#: The packet mark of "would create a connection while admission is closed" ("fw" + 1).
HOLD_MARK = 0x66770001
#: NFQUEUE numbers of held packets, per leg (queues are per namespace).
HOLD_QUEUE_INSIDE = 0x6677
HOLD_QUEUE_OUTSIDE = 0x6678

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_NSNAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")


class FwNodeError(ProviderError):
    """A firewall node's configuration is invalid or its data plane could not be set up."""


def _bad(field_name: str, why: str) -> FwNodeError:
    return FwNodeError(f"FwNodeConfig.{field_name}: {why}")


@dataclass(frozen=True)
class Service:
    """An inbound service new connections may reach from outside: protocol (tcp, udp), inside address, port."""

    protocol: str
    address: str
    port: int

    def __post_init__(self) -> None:
        if self.protocol not in ("tcp", "udp"):
            raise _bad("services", f"{self.protocol!r} is not tcp or udp")
        try:
            ipaddress.IPv4Address(self.address)
        except (ValueError, TypeError):
            raise _bad("services", f"{self.address!r} is not an IPv4 address") from None
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 1 <= self.port <= 65535:
            raise _bad("services", f"port {self.port!r} is not in 1..65535")


@dataclass(frozen=True)
class FwNodeConfig:
    """Everything that defines a firewall node; validated on construction.

    ``name`` is the namespace; ``inside_if``/``outside_if`` its legs, with
    addresses (prefix included); ``services`` what new connections from
    outside may reach; a source opening more than ``new_rate`` new
    connections a second (``new_burst`` at once) is blocked for
    ``block_timeout`` seconds; ``routes`` are (network, via) routes the
    node needs beyond its connected networks; ``mgmt_if``/``mgmt_address``
    the leg its agent is reached by (the node's own traffic: never a session).
    """

    name: str
    inside_if: str = "inside0"
    outside_if: str = "outside0"
    inside_address: str = "10.0.0.1/24"
    outside_address: str = "203.0.113.1/24"
    services: tuple[Service, ...] = ()
    new_rate: int = 20
    new_burst: int = 40
    block_timeout: int = 60
    routes: tuple[tuple[str, str], ...] = ()
    inside_mac: str | None = None
    outside_mac: str | None = None
    mgmt_if: str | None = None
    mgmt_address: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NSNAME.match(self.name):
            raise _bad("name", f"{self.name!r} is not a namespace name (1-64 of A-Z a-z 0-9 _ . -)")
        for f in ("inside_if", "outside_if") + (("mgmt_if",) if self.mgmt_if is not None else ()):
            v = getattr(self, f)
            if not isinstance(v, str) or not _IFNAME.match(v):
                raise _bad(f, f"{v!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")
        if len({self.inside_if, self.outside_if, self.mgmt_if} - {None}) != 2 + (self.mgmt_if is not None):
            raise _bad("outside_if", "inside, outside and management interfaces must differ")
        for f in ("inside_address", "outside_address") + (("mgmt_address",) if self.mgmt_address is not None else ()):
            v = getattr(self, f)
            try:
                if not isinstance(v, str) or "/" not in v:
                    raise ValueError("no prefix length")
                ipaddress.IPv4Interface(v)
            except ValueError as e:
                raise _bad(f, f"{v!r} is not an IPv4 address with prefix length, e.g. 10.0.0.1/24 ({e})") from None
        if (self.mgmt_if is None) != (self.mgmt_address is None):
            raise _bad("mgmt_if", "give mgmt_if and mgmt_address both or neither")
        for f in ("new_rate", "new_burst", "block_timeout"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise _bad(f, f"{v!r} is not a positive integer")
        if not all(isinstance(s, Service) for s in self.services):
            raise _bad("services", "each service is a Service(protocol, address, port)")
        for net, via in self.routes:
            try:
                ipaddress.IPv4Network(net)
                ipaddress.IPv4Address(via)
            except ValueError as e:
                raise _bad("routes", f"({net!r}, {via!r}) is not (network, gateway) ({e})") from None
        for f in ("inside_mac", "outside_mac"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, str) or not _MAC.match(v) or int(v[:2], 16) & 1):
                raise _bad(f, f"{v!r} is not a unicast MAC address like 02:00:00:00:00:01")

    @property
    def own_addresses(self) -> frozenset[str]:
        """The node's own addresses: connections to or from them are the host's, never sessions."""
        addrs = {str(ipaddress.IPv4Interface(self.inside_address).ip), str(ipaddress.IPv4Interface(self.outside_address).ip)}
        if self.mgmt_address is not None:
            addrs.add(str(ipaddress.IPv4Interface(self.mgmt_address).ip))
        return frozenset(addrs)


def sysctls(cfg: FwNodeConfig) -> dict[str, int]:
    """The namespace's sysctls of a firewall node, and why each is set (slash-separated: an interface name may hold a dot)."""
    return {
        # A router forwards.
        "net/ipv4/ip_forward": 1,
        # Two firewalls of a migration may share addresses behind one switch; nothing here needs it.
        "net/ipv4/conf/all/rp_filter": 0,
        "net/ipv4/conf/default/rp_filter": 0,
        f"net/ipv4/conf/{cfg.inside_if}/rp_filter": 0,
        f"net/ipv4/conf/{cfg.outside_if}/rp_filter": 0,
        # A TCP packet of a connection the node does not track is invalid (and
        # dropped), not picked up mid-stream: what makes the state matter.
        "net/netfilter/nf_conntrack_tcp_loose": 0,
        # Every entry reports its end, also one created while nobody listened
        # (the default 2 reports nothing of those): the provider's events.
        "net/netfilter/nf_conntrack_events": 1,
        "net/ipv6/conf/all/disable_ipv6": 1,
        "net/ipv6/conf/default/disable_ipv6": 1,
    }


def admission_rule(cfg: FwNodeConfig) -> str:
    """The rule that marks packets which would create a connection (an unconfirmed entry), to be held.

    Entries written by the provider are confirmed: their packets pass.  A
    packet without an entry (invalid) does not match and meets the forward
    chain's drop.  The management leg is not held: the agent stays reachable.
    """
    # Unicast to this node's MAC only: a multicast or broadcast frame (an IGMP report) is no connection to hold.
    return (f'iifname {{ "{cfg.inside_if}", "{cfg.outside_if}" }} meta pkttype host ct status & confirmed == 0 '
            f'counter meta mark set {HOLD_MARK:#x}')


def hold_rules(cfg: FwNodeConfig) -> list[list[str]]:
    """The xtables rules (``iptables-nft -t mangle`` arguments after the chain) that queue marked packets, one per leg.

    As the NAT node's :func:`.natnode.hold_rule`: mangle PREROUTING (-150)
    between the mark (-160) and the guard (-140), installed once; no
    ``--queue-bypass``, so with nobody holding the kernel drops.
    """
    return [["-i", ifname, "-m", "mark", "--mark", f"{HOLD_MARK:#x}", "-j", "NFQUEUE", "--queue-num", str(q)]
            for ifname, q in ((cfg.inside_if, HOLD_QUEUE_INSIDE), (cfg.outside_if, HOLD_QUEUE_OUTSIDE))]


def ruleset(cfg: FwNodeConfig, *, admit: bool = True) -> str:
    """The nftables script that (re)creates the node's table (idempotent: one transaction replaces it)."""
    adm = "" if admit else f"\n    {admission_rule(cfg)}"
    services = ", ".join(f"{s.protocol} . {s.address} . {s.port}" for s in cfg.services)
    svc_set = f"\n    elements = {{ {services} }}" if services else ""
    mgmt = f'\n    iifname "{cfg.mgmt_if}" accept' if cfg.mgmt_if else ""
    # Order in forward: a blocked source first (its established flows too);
    # then what the table tracks; then invalid (no state: a mid-stream
    # packet with tcp_loose=0); then the meter of new connections per
    # source, whose excess blocks the source; then the policy.
    return f"""table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
  set {BLOCKED_SET} {{
    type ipv4_addr; size 65535; flags dynamic, timeout; timeout {cfg.block_timeout}s;
  }}
  set {FLOOD_SET} {{
    type ipv4_addr; size 65535; flags dynamic, timeout; timeout 10s;
  }}
  set {SERVICES_SET} {{
    type inet_proto . ipv4_addr . inet_service;{svc_set}
  }}
  chain {ADMISSION_CHAIN} {{
    type filter hook prerouting priority mangle - 10; policy accept;{adm}
  }}
  chain {HOLD_GUARD_CHAIN} {{
    type filter hook prerouting priority mangle + 10; policy accept;
    meta mark {HOLD_MARK:#x} counter drop
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ip saddr @{BLOCKED_SET} counter drop
    ct state established,related counter accept
    ct state invalid counter drop
    ct state new update @{FLOOD_SET} {{ ip saddr limit rate over {cfg.new_rate}/second burst {cfg.new_burst} packets }} add @{BLOCKED_SET} {{ ip saddr }} counter drop
    iifname "{cfg.inside_if}" oifname "{cfg.outside_if}" ct state new counter accept
    iifname "{cfg.outside_if}" oifname "{cfg.inside_if}" ct state new meta l4proto . ip daddr . th dport @{SERVICES_SET} counter accept
    counter
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    iif "lo" accept
    ct state established,related accept
    ct state invalid drop{mgmt}
    icmp type echo-request accept
  }}
}}
"""


@dataclass
class FwNode:
    """Sets up, queries and tears down one firewall node described by a :class:`FwNodeConfig`.

    ``hold``: who holds the packets of new connections while admission is
    closed, as :class:`.natnode.NatNode`'s: None this process when it lives
    in the node (the agent), True this process in any case (tests), False never.
    """

    cfg: FwNodeConfig
    run: Callable[..., object] = field(default=netns.run, repr=False)
    hold: bool | None = None
    #: packets held at most while admission is closed (per queue), beyond that dropped and counted
    hold_limit: int = HOLD_LIMIT
    _holders: list[Holder] | None = field(default=None, init=False, repr=False, compare=False)
    _holder_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The namespace of the node."""
        return self.cfg.name

    def create(self) -> None:
        """Create the node's namespace (standalone use; a test network may create it instead)."""
        netns.add(self.cfg.name)

    def configure(self) -> None:
        """Addresses, links, routes, sysctls, the table (admission open) and the hold rules; the legs must be in the namespace."""
        c = self.cfg
        if not netns.exists(c.name):
            raise FwNodeError(f"firewall node {c.name}: namespace does not exist")
        for f in ("inside_if", "outside_if", "mgmt_if"):
            ifname = getattr(c, f)
            if ifname is not None and not netns.link_exists(ifname, c.name):
                raise FwNodeError(f"firewall node {c.name}: {f} {ifname!r} is not an interface of the namespace")
        steps: list[list[str]] = [["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in sysctls(c).items())]]
        for ifname, mac in ((c.inside_if, c.inside_mac), (c.outside_if, c.outside_mac)):
            if mac is not None:
                steps.append(["ip", "link", "set", "dev", ifname, "address", mac])
        steps += [["ip", "link", "set", "lo", "up"],
                  ["ip", "addr", "replace", c.inside_address, "dev", c.inside_if],
                  ["ip", "addr", "replace", c.outside_address, "dev", c.outside_if],
                  ["ip", "link", "set", c.inside_if, "up"],
                  ["ip", "link", "set", c.outside_if, "up"]]
        if c.mgmt_if is not None:
            steps += [["ip", "addr", "replace", str(c.mgmt_address), "dev", c.mgmt_if], ["ip", "link", "set", c.mgmt_if, "up"]]
        steps += [["ip", "route", "replace", net, "via", via] for net, via in c.routes]
        for cmd in steps:
            self._run(cmd)
        self._run(["nft", "-f", "-"], input=ruleset(c))
        for rule in hold_rules(c):
            if self._run(["iptables-nft", "-t", "mangle", "-C", "PREROUTING", *rule], check=False).returncode != 0:
                self._run(["iptables-nft", "-t", "mangle", "-A", "PREROUTING", *rule])

    def unconfigure(self) -> None:
        """Remove the table and the hold rules (the namespace stays)."""
        self.close()
        self._run(["nft", "delete", "table", "ip", TABLE], check=False)
        for rule in hold_rules(self.cfg):
            self._run(["iptables-nft", "-t", "mangle", "-D", "PREROUTING", *rule], check=False)

    def destroy(self) -> None:
        """Delete the node's namespace and everything in it (idempotent)."""
        self.close()
        netns.delete(self.cfg.name)

    def set_admission(self, admit: bool) -> None:
        """Admit (True) or hold (False) packets that would create a connection, from either leg.

        The order is the NAT node's: holders hold before the first packet is
        marked, and release only once the rule is gone.
        """
        script = f"flush chain ip {TABLE} {ADMISSION_CHAIN}\n"
        if not admit:
            script += f"add rule ip {TABLE} {ADMISSION_CHAIN} {admission_rule(self.cfg)}\n"
        holders = self._holding_process() if not admit else (self._holders or [])
        if not admit:
            for h in holders:
                h.hold()
        self.nft(script)
        if admit:
            released = sum(h.release() for h in holders)
            if released:
                log.info("firewall node %s: %d held packet(s) sent back to the switch", self.cfg.name, released)

    def admission(self) -> bool:
        """Whether new connections are admitted, read from the kernel's ruleset."""
        return "meta mark set" not in self.nft(f"list chain ip {TABLE} {ADMISSION_CHAIN}\n")

    def addresses(self) -> set[str]:
        """Every IPv4 address of the namespace's interfaces: the host's own (an agent's config knows only the interface names)."""
        out = self._run(["ip", "-o", "-4", "addr", "show"]).stdout
        # One line per address: "2: outside0    inet 203.0.113.1/24 brd ... scope global outside0".
        return {line.split("inet ", 1)[1].split("/", 1)[0] for line in out.splitlines() if "inet " in line}

    def hold_stats(self) -> list[HoldStats]:
        """Each leg's holder's counters (empty when this process holds nothing)."""
        return [h.stats() for h in self._holders or []]

    def close(self) -> None:
        """Release what is held and stop holding (idempotent)."""
        with self._holder_lock:
            holders, self._holders = self._holders, None
        for h in holders or []:
            h.close()

    def _holding_process(self) -> list[Holder]:
        if self.hold is False or (self.hold is None and not (self.run is netns.run and netns.inside(self.cfg.name))):
            return []
        with self._holder_lock:
            if self._holders is None:
                made: list[Holder] = []
                try:
                    for ifname, q in ((self.cfg.inside_if, HOLD_QUEUE_INSIDE), (self.cfg.outside_if, HOLD_QUEUE_OUTSIDE)):
                        made.append(Holder(self.cfg.name, q, ifname, limit=self.hold_limit))
                except (NfqueueError, OSError) as e:
                    for h in made:
                        h.close()
                    if self.hold:
                        raise FwNodeError(f"firewall node {self.cfg.name}: cannot hold packets: {e}") from e
                    log.warning("firewall node %s: cannot hold packets, new connections are dropped while admission is closed: %s", self.cfg.name, e)
                    return []
                self._holders = made
            return self._holders

    def nft(self, script: str) -> str:
        """Run an nft script in the node (in this process when it lives there: libnftables)."""
        if self.run is not netns.run:
            return self._run(["nft", "-f", "-"], input=script).stdout
        try:
            return nftables.run(self.cfg.name, script)
        except nftables.NftablesError as e:
            raise FwNodeError(f"firewall node {self.cfg.name}: nft: {e}") from e

    def _run(self, cmd: list[str], **kw: object):
        try:
            return self.run(cmd, self.cfg.name, **kw)
        except netns.CommandError as e:
            raise FwNodeError(f"firewall node {self.cfg.name}: {e}") from e
