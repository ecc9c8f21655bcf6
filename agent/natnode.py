"""A NAT node's data plane: one network namespace doing source NAT with nftables.

The node is a namespace with an inside interface (the clients' gateway), an
outside interface (the public side), IPv4 forwarding, and an nftables table
``natmig`` that translates the inside subnet to a public address pool: one
address and a port range, or several (:mod:`natmig.pool`).  Everything the node needs is in :class:`NatNodeConfig`; the commands
it runs are built from that data by small pure functions (:func:`ruleset`,
:func:`sysctls`) so they can be checked without root.

Two NAT nodes of a migration share the gateway IP+MAC and the public IP+MAC,
so that only the switch port changes when traffic moves and no ARP cache goes
stale (see FIELD-NOTES).

While admission is closed, packets that would create a session on the
inside are held, not dropped (:mod:`.nfqueue`): the table marks them, a
permanent xtables rule queues what is marked, and the process that lives in
the node (the agent) keeps them until admission opens, then sends them back
to the switch, which hands them to whichever NAT carries traffic by then.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import threading
from dataclasses import dataclass, field
from typing import Callable

from .. import netns
from .. import pool as public_pool
from ..pool import PublicRange
from . import nftables
from .nfqueue import HOLD_LIMIT, Holder, HoldStats, NfqueueError
from ..errors import ProviderError

log = logging.getLogger(__name__)

#: Name of the nftables table natmig owns in a NAT node's namespace.
TABLE = "natmig"
#: The chain that holds the admission rule (nat-control/admit-new-sessions).
ADMISSION_CHAIN = "admission"
ADMISSION_INPUT_CHAIN = "admission_in"
#: The chain that drops a marked packet the xtables rule did not queue (see :func:`ruleset`).
HOLD_GUARD_CHAIN = "hold_guard"
#: The packet mark of "would create a session while admission is closed": queued to :data:`HOLD_QUEUE`.
HOLD_MARK = 0x6E6D0001
#: The NFQUEUE number held packets go to (queues are per namespace; "nm").
HOLD_QUEUE = 0x6E6D

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_MAC = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_NSNAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class NatNodeError(ProviderError):
    """A NAT node's configuration is invalid or its data plane could not be set up."""


def _check_ifname(field_name: str, value: object) -> None:
    if not isinstance(value, str) or not _IFNAME.match(value):
        raise NatNodeError(f"NatNodeConfig.{field_name}: {value!r} is not an interface name (1-15 of A-Z a-z 0-9 _ . -)")


def _check_iface_address(field_name: str, value: object) -> ipaddress.IPv4Interface:
    if not isinstance(value, str) or "/" not in value:
        raise NatNodeError(f"NatNodeConfig.{field_name}: {value!r} is not an IPv4 address with prefix length, e.g. 10.0.0.1/24")
    try:
        return ipaddress.IPv4Interface(value)
    except ValueError as e:
        raise NatNodeError(f"NatNodeConfig.{field_name}: {value!r} is not an IPv4 address with prefix length ({e})") from None


def _check_mac(field_name: str, value: object) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not _MAC.match(value):
        raise NatNodeError(f"NatNodeConfig.{field_name}: {value!r} is not a MAC address like 02:00:00:00:00:01")
    if int(value[:2], 16) & 1:
        raise NatNodeError(f"NatNodeConfig.{field_name}: {value} is a multicast MAC address; an interface needs a unicast one")


@dataclass(frozen=True)
class NatNodeConfig:
    """Everything that defines a NAT node; validated on construction.

    ``name`` is the namespace; ``inside_if``/``outside_if`` are interface
    names inside it; ``inside_address`` is the clients' gateway with its
    prefix; ``outside_address`` the node's address on the public side;
    ``public_address`` the address sessions are translated to (added to the
    outside interface as a /32 when it is not ``outside_address`` itself);
    ``inside_subnet`` the source addresses that get translated;
    ``port_range`` the public ports (and ICMP echo identifiers) to use.

    ``pool``, when given, is the node's public address pool (several
    addresses, each with its port range; :mod:`natmig.pool`), and
    ``public_address`` and ``port_range`` become its first entry's.  Without
    it the pool is the one entry ``public_address:port_range``, so a
    single-address node is a pool of one.  :attr:`public_pool` is the pool
    either way.
    """

    name: str
    inside_if: str = "inside0"
    outside_if: str = "outside0"
    inside_address: str = "10.0.0.1/24"
    outside_address: str = "203.0.113.1/24"
    public_address: str = "203.0.113.1"
    inside_subnet: str = "10.0.0.0/24"
    port_range: tuple[int, int] = (20000, 29999)
    inside_mac: str | None = None
    outside_mac: str | None = None
    mgmt_if: str | None = None
    mgmt_address: str | None = None
    pool: tuple[PublicRange, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NSNAME.match(self.name):
            raise NatNodeError(f"NatNodeConfig.name: {self.name!r} is not a namespace name (1-64 of A-Z a-z 0-9 _ . -)")
        _check_ifname("inside_if", self.inside_if)
        _check_ifname("outside_if", self.outside_if)
        if self.inside_if == self.outside_if:
            raise NatNodeError(f"NatNodeConfig.outside_if: {self.outside_if!r} is the same interface as inside_if")
        inside = _check_iface_address("inside_address", self.inside_address)
        _check_iface_address("outside_address", self.outside_address)
        try:
            ipaddress.IPv4Address(self.public_address)
        except (ValueError, TypeError):
            raise NatNodeError(f"NatNodeConfig.public_address: {self.public_address!r} is not an IPv4 address") from None
        try:
            subnet = ipaddress.IPv4Network(self.inside_subnet)
        except (ValueError, TypeError) as e:
            raise NatNodeError(f"NatNodeConfig.inside_subnet: {self.inside_subnet!r} is not an IPv4 network like 10.0.0.0/24 ({e})") from None
        if inside.ip not in subnet:
            raise NatNodeError(f"NatNodeConfig.inside_address: {self.inside_address} is not in inside_subnet {self.inside_subnet}")
        pr = self.port_range
        if (
            not isinstance(pr, tuple)
            or len(pr) != 2
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in pr)
            or not 1 <= pr[0] <= pr[1] <= 65535
        ):
            raise NatNodeError(f"NatNodeConfig.port_range: {pr!r} is not a (low, high) pair with 1 <= low <= high <= 65535")
        if self.pool:
            try:
                pool = public_pool.check("NatNodeConfig.pool", self.pool)
            except public_pool.PoolError as err:
                raise NatNodeError(str(err)) from None
            # Frozen, but these two are derived: code that knows one address reads the pool's first.
            object.__setattr__(self, "pool", pool)
            object.__setattr__(self, "public_address", pool[0].address)
            object.__setattr__(self, "port_range", pool[0].ports)
        for i, entry in enumerate(self.public_pool):
            if ipaddress.IPv4Address(entry.address) in subnet:
                # Translating to an inside address would send the replies back inside.
                raise NatNodeError(f"NatNodeConfig.pool[{i}].address: {entry.address} is in inside_subnet {self.inside_subnet}")
        _check_mac("inside_mac", self.inside_mac)
        _check_mac("outside_mac", self.outside_mac)
        if (self.mgmt_if is None) != (self.mgmt_address is None):
            raise NatNodeError("NatNodeConfig.mgmt_if/mgmt_address: give both or neither")
        if self.mgmt_if is not None:
            _check_ifname("mgmt_if", self.mgmt_if)
            if self.mgmt_if in (self.inside_if, self.outside_if):
                raise NatNodeError(f"NatNodeConfig.mgmt_if: {self.mgmt_if!r} is already the inside or outside interface")
            _check_iface_address("mgmt_address", self.mgmt_address)

    @property
    def public_is_outside(self) -> bool:
        """Whether the public address is the outside interface's own address."""
        return str(ipaddress.IPv4Interface(self.outside_address).ip) == self.public_address

    @property
    def public_pool(self) -> tuple[PublicRange, ...]:
        """The public address pool: ``pool``, or the one entry ``public_address:port_range``."""
        return self.pool or (PublicRange(self.public_address, self.port_range),)

    @property
    def public_addresses(self) -> list[str]:
        """The pool's distinct addresses, first ``public_address`` (what the node translates to and owns)."""
        return public_pool.addresses(self.public_pool)


def sysctls(cfg: NatNodeConfig) -> dict[str, int]:
    """The namespace's sysctls of a NAT node, and why each is set.

    Keys are slash-separated (sysctl accepts both) because an interface name
    may contain a dot.
    """
    return {
        # A router forwards.
        "net/ipv4/ip_forward": 1,
        # Reverse-path filtering would drop traffic of a node that shares its
        # addresses with another node and receives it through a switch port
        # that changed under it; nothing here needs it.
        "net/ipv4/conf/all/rp_filter": 0,
        "net/ipv4/conf/default/rp_filter": 0,
        f"net/ipv4/conf/{cfg.inside_if}/rp_filter": 0,
        f"net/ipv4/conf/{cfg.outside_if}/rp_filter": 0,
        # Injected sessions carry no TCP window-tracking data: without this,
        # a live bulk TCP flow moved onto the node is dropped as INVALID.
        "net/netfilter/nf_conntrack_tcp_be_liberal": 1,
        # With the default 2 ("auto"), a session created while nobody listened
        # for events never reports its end: watch() would miss it.
        "net/netfilter/nf_conntrack_events": 1,
        # Router solicitations and DAD are noise nobody asked for.
        "net/ipv6/conf/all/disable_ipv6": 1,
        "net/ipv6/conf/default/disable_ipv6": 1,
    }


def admission_rule(cfg: NatNodeConfig) -> str:
    """The rule that marks packets which would create a new session, to be held (see :func:`hold_rule`).

    An entry that is not yet confirmed is one this very packet has just
    created; sessions injected with the conntrack tool are confirmed, so their
    packets pass even when the kernel still calls them ``ct state new`` (a
    UDP or ICMP session never answered yet).
    """
    return f'iifname "{cfg.inside_if}" ct status & confirmed == 0 counter meta mark set {HOLD_MARK:#x}'


def hold_rule(cfg: NatNodeConfig) -> list[str]:
    """The xtables rule (``iptables-nft -t mangle`` arguments after the chain) that queues marked packets.

    nftables cannot queue here (``CONFIG_NFT_QUEUE`` is not built; the
    xtables NFQUEUE target is), so this one rule lives in xtables' mangle
    PREROUTING (priority -150), between the ``admission`` chain that marks
    (-160) and the ``hold_guard`` chain (-140).  It is installed once at
    configure and never changes: admission is still switched in natmig's own
    table, in-process.  No ``--queue-bypass``: with no process bound to the
    queue the kernel drops the packet, as closed admission always did.
    """
    return ["-i", cfg.inside_if, "-m", "mark", "--mark", f"{HOLD_MARK:#x}", "-j", "NFQUEUE", "--queue-num", str(HOLD_QUEUE)]


def admission_input_rule(cfg: NatNodeConfig) -> str:
    """The rule that, while admission is closed, drops unknown packets to the public address.

    A packet from outside for a session this node does not know yet (its
    state is still on the way during a migration) is addressed to the node
    itself: without this rule its own stack answers with a TCP reset or an
    ICMP unreachable, which kills the connection.  Dropped, it is
    retransmitted and finds the session once the state has arrived.
    """
    addrs = cfg.public_addresses
    daddr = addrs[0] if len(addrs) == 1 else "{ " + ", ".join(addrs) + " }"
    return f'iifname "{cfg.outside_if}" ip daddr {daddr} ct status & confirmed == 0 counter drop'


def snat_target(cfg: NatNodeConfig) -> str:
    """What the SNAT rule translates to: ``ADDR:LO-HI`` for one address, a map over the pool for several.

    nftables 1.0.6 on kernel 6.18 (measured) takes both ``snat to
    A-B:LO-HI`` (an address range, one port range) and a map whose data is
    ``address . port-range``; the map is used because a pool's addresses need
    not be contiguous nor share one port range.  It is keyed by a hash of the
    inside source address, so one inside host always gets the same public
    address ("paired" pooling, RFC 4787 REQ-2): servers that tie a client to
    its address keep seeing one.  Entries are chosen evenly, whatever their
    sizes.  The map is only read for a session's first packet.
    """
    pool = cfg.public_pool
    if len(pool) == 1:
        lo, hi = pool[0].ports
        return f"to {pool[0].address}:{lo}-{hi}"
    items = ", ".join(f"{i} : {e.address} . {e.ports[0]}-{e.ports[1]}" for i, e in enumerate(pool))
    return f"ip to jhash ip saddr mod {len(pool)} map {{ {items} }}"


def ruleset(cfg: NatNodeConfig, *, admit: bool = True) -> str:
    """The nftables script that (re)creates the node's ``natmig`` table."""
    nat_to = snat_target(cfg)
    adm = "" if admit else f"\n    {admission_rule(cfg)}"
    adm_in = "" if admit else f"\n    {admission_input_rule(cfg)}"
    # `table ... {}` then `delete table` makes the script idempotent: it
    # replaces a table left by an earlier run in one atomic transaction.
    # The admission chain runs in prerouting after conntrack (-200), so the
    # packet's entry exists and is unconfirmed, and before routing, so a held
    # packet is untouched (TTL, no NAT) when it is sent back to the switch;
    # it marks, xtables' mangle PREROUTING (-150) queues the marked, and the
    # guard (-140) drops whatever is still marked: were the xtables rule
    # missing, closed admission still admits nothing.
    return f"""table ip {TABLE} {{}}
delete table ip {TABLE}
table ip {TABLE} {{
  chain {ADMISSION_CHAIN} {{
    type filter hook prerouting priority mangle - 10; policy accept;{adm}
  }}
  chain {HOLD_GUARD_CHAIN} {{
    type filter hook prerouting priority mangle + 10; policy accept;
    meta mark {HOLD_MARK:#x} counter drop
  }}
  chain {ADMISSION_INPUT_CHAIN} {{
    type filter hook input priority filter - 10; policy accept;{adm_in}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{cfg.outside_if}" ip saddr {cfg.inside_subnet} meta l4proto {{ tcp, udp }} snat {nat_to}
    oifname "{cfg.outside_if}" ip saddr {cfg.inside_subnet} meta l4proto icmp snat {nat_to}
  }}
}}
"""


@dataclass
class NatNode:
    """Sets up, queries and tears down one NAT node described by a :class:`NatNodeConfig`.

    ``hold`` says who holds the packets that would create a session while
    admission is closed (:mod:`.nfqueue`): None (the default) this process
    when it lives in the node's namespace (the agent), True this process in
    any case (its sockets are opened in the namespace; tests), False never
    (nobody listens on the queue, so the kernel drops them).
    """

    cfg: NatNodeConfig
    run: Callable[..., object] = field(default=netns.run, repr=False)
    hold: bool | None = None
    #: packets held at most while admission is closed (per queue), beyond that dropped and counted
    hold_limit: int = HOLD_LIMIT
    _holder: Holder | None = field(default=None, init=False, repr=False, compare=False)
    _holder_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def name(self) -> str:
        """The namespace of the node."""
        return self.cfg.name

    def create(self) -> None:
        """Create the node's namespace (for standalone use; a testbed may create it instead)."""
        netns.add(self.cfg.name)

    def configure(self) -> None:
        """Configure a namespace whose inside and outside interfaces are already in it.

        Sets addresses, MACs and link state, the sysctls of :func:`sysctls`,
        and loads the nftables ruleset with new sessions admitted.
        """
        c = self.cfg
        ns = c.name
        if not netns.exists(ns):
            raise NatNodeError(f"NAT node {ns}: namespace does not exist (create() it or let the testbed make it)")
        for field_name in ("inside_if", "outside_if", "mgmt_if"):
            ifname = getattr(c, field_name)
            if ifname is not None and not netns.link_exists(ifname, ns):
                raise NatNodeError(f"NAT node {ns}: {field_name} {ifname!r} is not an interface of the namespace")
        # IPv6 goes first so that the interfaces never send router solicitations.
        steps: list[list[str]] = [["sysctl", "-q", "-w", *(f"{k}={v}" for k, v in sysctls(c).items())]]
        for ifname, mac in ((c.inside_if, c.inside_mac), (c.outside_if, c.outside_mac)):
            if mac is not None:
                steps.append(["ip", "link", "set", "dev", ifname, "address", mac])
        steps += [
            ["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "replace", c.inside_address, "dev", c.inside_if],
            ["ip", "addr", "replace", c.outside_address, "dev", c.outside_if],
        ]
        outside_ip = str(ipaddress.IPv4Interface(c.outside_address).ip)
        for addr in c.public_addresses:
            if addr != outside_ip:
                steps.append(["ip", "addr", "replace", f"{addr}/32", "dev", c.outside_if])
        if c.mgmt_if is not None:
            steps.append(["ip", "addr", "replace", str(c.mgmt_address), "dev", c.mgmt_if])
            steps.append(["ip", "link", "set", c.mgmt_if, "up"])
        steps += [
            ["ip", "link", "set", c.inside_if, "up"],
            ["ip", "link", "set", c.outside_if, "up"],
        ]
        for cmd in steps:
            self._run(cmd)
        self._run(["nft", "-f", "-"], input=ruleset(c))
        # Checked first: configure() is idempotent and must not add a second copy.
        if self._run(["iptables-nft", "-t", "mangle", "-C", "PREROUTING", *hold_rule(c)], check=False).returncode != 0:
            self._run(["iptables-nft", "-t", "mangle", "-A", "PREROUTING", *hold_rule(c)])

    def unconfigure(self) -> None:
        """Remove the node's nftables table and its xtables hold rule (the namespace stays)."""
        self.close()
        self._run(["nft", "delete", "table", "ip", TABLE], check=False)
        self._run(["iptables-nft", "-t", "mangle", "-D", "PREROUTING", *hold_rule(self.cfg)], check=False)

    def destroy(self) -> None:
        """Delete the node's namespace and everything in it (idempotent)."""
        netns.delete(self.cfg.name)

    def set_admission(self, admit: bool) -> None:
        """Admit (True) or stop (False) packets that would create a new session, from either side.

        Stopped packets from the inside are held while a holder listens (see
        ``hold``) and sent back to the switch when admission opens again;
        those from the outside are dropped (:func:`admission_input_rule`).
        """
        script = f"flush chain ip {TABLE} {ADMISSION_CHAIN}\nflush chain ip {TABLE} {ADMISSION_INPUT_CHAIN}\n"
        if not admit:
            script += f"add rule ip {TABLE} {ADMISSION_CHAIN} {admission_rule(self.cfg)}\n"
            script += f"add rule ip {TABLE} {ADMISSION_INPUT_CHAIN} {admission_input_rule(self.cfg)}\n"
        # Started when admission first closes; opening only releases what an existing one holds.
        holder = self._holding_process() if not admit else self._holder
        # The holder holds before the first packet is marked, and releases
        # only once the rule is gone: a released packet that the switch sends
        # back to this very node must not be held again.  Should the script
        # fail, it keeps holding: releasing into a closed admission would
        # send packets round between the node and the switch.
        if holder is not None and not admit:
            holder.hold()
        # One nft transaction: there is no instant without the chain's rule
        # when switching it off, nor two copies of it.
        self._nft(script)
        if holder is not None and admit:
            released = holder.release()
            if released:
                log.info("NAT node %s: %d held packet(s) sent back to the switch", self.cfg.name, released)

    def admission(self) -> bool:
        """Whether new sessions are admitted, as read from the kernel's ruleset."""
        return "meta mark set" not in self._nft(f"list chain ip {TABLE} {ADMISSION_CHAIN}\n")

    def hold_stats(self) -> HoldStats | None:
        """The holder's counters (held now, in all, released, over the limit), None when this process holds nothing."""
        holder = self._holder
        return holder.stats() if holder is not None else None

    def _holding_process(self) -> Holder | None:
        """This process's holder, started at first use; None when this process does not hold (see ``hold``)."""
        if self.hold is False or (self.hold is None and not self._lives_here()):
            return None
        with self._holder_lock:
            if self._holder is None:
                try:
                    self._holder = Holder(self.cfg.name, HOLD_QUEUE, self.cfg.inside_if, limit=self.hold_limit)
                except (NfqueueError, OSError) as e:
                    if self.hold:
                        raise NatNodeError(f"NAT node {self.cfg.name}: cannot hold packets: {e}") from e
                    # Admission still closes: the kernel drops what nobody holds.
                    log.warning("NAT node %s: cannot hold packets, new sessions are dropped while admission is closed: %s", self.cfg.name, e)
                    return None
            return self._holder

    def close(self) -> None:
        """Release what is held and stop holding (the queue is unbound; idempotent)."""
        with self._holder_lock:
            holder, self._holder = self._holder, None
        if holder is not None:
            holder.close()

    def _lives_here(self) -> bool:
        """Whether this process lives in the node's namespace and runs nft itself (the agent)."""
        return self.run is netns.run and netns.inside(self.cfg.name)

    def _nft(self, script: str) -> str:
        """Run an nft script in the node: in this process when it lives in the node (the agent), else with the tool."""
        lib = nftables.in_process(self.cfg.name) if self.run is netns.run else None
        if lib is None:
            return self._run(["nft", "-f", "-"], input=script).stdout
        try:
            return lib.run(script)
        except nftables.NftablesError as e:
            raise NatNodeError(f"NAT node {self.cfg.name}: nft: {e}") from e

    def owned_addresses(self) -> set[str]:
        """The IPv4 addresses configured on the outside interface (what the node can translate to)."""
        out = self._run(["ip", "-o", "-4", "addr", "show", "dev", self.cfg.outside_if]).stdout
        # One line per address: "2: outside0    inet 203.0.113.1/24 brd ... scope global outside0".
        return {line.split("inet ", 1)[1].split("/", 1)[0] for line in out.splitlines() if "inet " in line}

    def _run(self, cmd: list[str], **kw: object):
        try:
            return self.run(cmd, self.cfg.name, **kw)
        except netns.CommandError as e:
            raise NatNodeError(f"NAT node {self.cfg.name}: {e}") from e
