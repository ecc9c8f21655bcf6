"""A NAT's public address pool: several public addresses, each with the ports it gives out.

A NAT that holds a million sessions translates to more than one public
address, as carrier-grade NATs do and as RFC 8512's external address pools
describe.  This module is the one home of the pool's text form and of its
checks; the NAT node (its nftables rule), the agent (which addresses it
owns), the testbed topology and the controller's inventory all read pools
through it, so a pool means the same everywhere.

Text form of one entry: ``ADDRESS[-LAST][:LOW-HIGH]``, e.g.
``203.0.113.1:20000-29999`` or ``203.0.113.1-203.0.113.4`` (four addresses,
the default ports).  Every error names the field it came from (``where``).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from .errors import UsageError

#: Addresses a pool may hold at most: the nftables map and the ownership
#: checks handle more, but a pool of thousands is a typo (a range like 10.0.0.0-10.255.255.255).
MAX_ADDRESSES = 1024


class PoolError(UsageError):
    """A public address pool (or one of its addresses) is invalid; the message names the field."""


@dataclass(frozen=True)
class PublicRange:
    """One public address of a pool and the ports (and ICMP echo identifiers) it gives out, inclusive."""

    address: str
    ports: tuple[int, int]

    @property
    def size(self) -> int:
        """How many ports the entry holds."""
        return self.ports[1] - self.ports[0] + 1

    def __str__(self) -> str:
        return f"{self.address}:{self.ports[0]}-{self.ports[1]}"


class Owned(frozenset[str]):
    """What a node owns: its public addresses (the set itself) and, for some, the ports each gives out.

    Built from pool entries: a :class:`PublicRange` owns its ports of its
    address, a bare address every port of it (an agent told only its
    addresses cannot know the SNAT rule's ports: it never writes that rule).
    A session translated to an owned address outside its ports is one the
    node's SNAT would never have made; taking it could hand a public port
    out twice once the pool's other users get it.
    """

    ports: Mapping[str, tuple[tuple[int, int], ...]]
    #: the ports every owned address gives out, when they all give out the same (None otherwise, or with no ports)
    shared_ports: tuple[tuple[int, int], ...] | None

    def __new__(cls, entries: Iterable[PublicRange | str]) -> Owned:
        ranges: dict[str, list[tuple[int, int]]] = {}
        anyport: set[str] = set()
        for e in entries:
            if isinstance(e, PublicRange):
                ranges.setdefault(e.address, []).append(e.ports)
            else:
                anyport.add(e)
        self = super().__new__(cls, [*ranges, *anyport])
        self.ports = {a: tuple(sorted(r)) for a, r in ranges.items() if a not in anyport}
        distinct = set(self.ports.values())
        self.shared_ports = distinct.pop() if len(distinct) == 1 and len(self.ports) == len(self) else None
        return self

    def port_problem(self, address: str, port: int) -> str | None:
        """Why ``port`` of owned ``address`` is not the node's, or None when it is."""
        ranges = self.ports.get(address)
        if ranges is None or any(lo <= port <= hi for lo, hi in ranges):
            return None
        return f"translated_port {port} is outside the ports of {address} on this node ({', '.join(f'{lo}-{hi}' for lo, hi in ranges)})"

    def all_ports_inside(self, addresses: Sequence[str], ports: Sequence[int]) -> bool:
        """Whether every port is inside the ports of the address beside it (addresses assumed owned).

        Two columns, not pairs: where every owned address gives out the same
        ports (a pool's usual form, ``ADDRESS-LAST:LOW-HIGH``), the lowest and
        highest port inside one of them answer for all (C loops; 100k pairs
        one by one took ~0.1 s, twice in a copy: its edit-configs, then its
        commit).  Otherwise, or when they are not, pair by pair.
        """
        by_address = self.ports
        if not by_address or not ports:
            return True
        if self.shared_ports is not None:
            lo, hi = min(ports), max(ports)
            if any(a <= lo and hi <= b for a, b in self.shared_ports):
                return True
        for address, port in zip(addresses, ports):
            ranges = by_address.get(address)
            if ranges is not None and not any(a <= port <= b for a, b in ranges):
                return False
        return True


def check_address(where: str, value: object) -> ipaddress.IPv4Address:
    """``value`` as an IPv4 unicast address (what a NAT can translate to), else :class:`PoolError`.

    Loopback and link-local addresses are unicast and pass: a protocol test's
    agent owns 127.0.0.1, and a lab may translate to 169.254/16.
    """
    if not isinstance(value, str):
        raise PoolError(f"{where}: {value!r} is not an IPv4 address")
    try:
        a = ipaddress.IPv4Address(value.strip())
    except ValueError:
        raise PoolError(f"{where}: {value!r} is not an IPv4 address") from None
    # None of these names one host: a session translated to it could never
    # see its replies.
    why = (
        "multicast" if a.is_multicast
        else "unspecified (0.0.0.0/8)" if a in _THIS_NETWORK
        else "broadcast or reserved (240.0.0.0/4)" if a.is_reserved or a == _BROADCAST
        else None
    )
    if why is not None:
        raise PoolError(f"{where}: {a} is {why}, not a unicast address a NAT can translate to")
    return a


_THIS_NETWORK = ipaddress.IPv4Network("0.0.0.0/8")
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def check_ports(where: str, value: object) -> tuple[int, int]:
    """``value`` as an inclusive (low, high) port pair with 1 <= low <= high <= 65535, else :class:`PoolError`."""
    if isinstance(value, str):
        lo, sep, hi = value.partition("-")
        if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
            raise PoolError(f"{where}: {value!r} is not a port range like 20000-29999")
        value = (int(lo), int(hi))
    if isinstance(value, list):
        value = tuple(value)
    if (
        not isinstance(value, tuple)
        or len(value) != 2
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in value)
    ):
        raise PoolError(f"{where}: {value!r} is not a (low, high) port pair")
    lo_i, hi_i = value
    if not 1 <= lo_i <= 65535 or not 1 <= hi_i <= 65535:
        raise PoolError(f"{where}: {lo_i}-{hi_i} is out of 1..65535")
    if lo_i > hi_i:
        raise PoolError(f"{where}: {lo_i}-{hi_i} is empty (low above high)")
    return (lo_i, hi_i)


def parse_addresses(where: str, text: object) -> list[str]:
    """``ADDRESS`` or ``FIRST-LAST`` as the list of addresses it names, each checked."""
    if not isinstance(text, str) or not text.strip():
        raise PoolError(f"{where}: {text!r} is not an address or a range like 203.0.113.1-203.0.113.4")
    first, sep, last = text.strip().partition("-")
    a = check_address(where, first)
    if not sep:
        return [str(a)]
    b = check_address(where, last)
    if b < a:
        raise PoolError(f"{where}: {text!r} is an empty range ({b} is before {a})")
    if int(b) - int(a) + 1 > MAX_ADDRESSES:
        raise PoolError(f"{where}: {text!r} holds {int(b) - int(a) + 1} addresses; a pool holds at most {MAX_ADDRESSES}")
    out = [str(ipaddress.IPv4Address(i)) for i in range(int(a), int(b) + 1)]
    for addr in out:
        check_address(where, addr)  # a range may cross into a reserved block
    return out


def parse_entry(where: str, text: object, default_ports: tuple[int, int] | None = None) -> list[PublicRange]:
    """One entry's text, ``ADDRESS[-LAST][:LOW-HIGH]``, as one :class:`PublicRange` per address."""
    if not isinstance(text, str):
        raise PoolError(f"{where}: {text!r} is not a pool entry like 203.0.113.1:20000-29999")
    addrs, sep, ports = text.strip().partition(":")
    if sep:
        p = check_ports(where, ports)
    elif default_ports is not None:
        p = default_ports
    else:
        raise PoolError(f"{where}: {text!r} has no port range (ADDRESS:LOW-HIGH, e.g. 203.0.113.1:20000-29999)")
    return [PublicRange(a, p) for a in parse_addresses(where, addrs)]


def parse(where: str, entries: Iterable[object] | str, default_ports: tuple[int, int] | None = None) -> tuple[PublicRange, ...]:
    """A pool from entries' text (a string is one entry), checked with :func:`check`; ``where[i]`` names entry i."""
    if isinstance(entries, str):
        entries = [entries]
    out: list[PublicRange] = []
    names: list[str] = []
    for i, e in enumerate(entries):
        got = parse_entry(f"{where}[{i}]", e, default_ports)
        out += got
        names += [f"{where}[{i}]"] * len(got)
    return check(where, out, names)


def check(where: str, pool: Sequence[object], names: Sequence[str] | None = None) -> tuple[PublicRange, ...]:
    """The pool as a tuple, or :class:`PoolError` naming the first bad entry.

    Refused: an empty pool, an entry that is not a :class:`PublicRange` with a
    unicast address and a non-empty port range, more than
    :data:`MAX_ADDRESSES` entries, and two entries of one address whose port
    ranges overlap (the NAT could give one public port twice).  ``names``
    says how to name entry i (default ``where[i]``).
    """
    if isinstance(pool, (str, bytes)) or not isinstance(pool, Sequence):
        raise PoolError(f"{where}: {pool!r} is not a sequence of public ranges")
    if not pool:
        raise PoolError(f"{where}: is empty (a NAT needs at least one public address)")
    if len(pool) > MAX_ADDRESSES:
        raise PoolError(f"{where}: {len(pool)} entries; a pool holds at most {MAX_ADDRESSES}")
    seen: dict[str, list[tuple[str, PublicRange]]] = {}
    for i, e in enumerate(pool):
        at = names[i] if names is not None else f"{where}[{i}]"
        if not isinstance(e, PublicRange):
            raise PoolError(f"{at}: {e!r} is not a public range (address and ports)")
        check_address(f"{at}.address", e.address)
        check_ports(f"{at}.ports", e.ports)
        for j, other in seen.get(e.address, []):
            if e.ports[0] <= other.ports[1] and other.ports[0] <= e.ports[1]:
                raise PoolError(f"{at}: {e} overlaps {other} of {j} (one public port could be given twice)")
        seen.setdefault(e.address, []).append((at, e))
    return tuple(pool)  # type: ignore[arg-type]  # every entry was checked above


def addresses(pool: Iterable[PublicRange]) -> list[str]:
    """The pool's distinct addresses, in pool order."""
    return list(dict.fromkeys(e.address for e in pool))


def describe(addresses: Iterable[str], most: int = 8) -> str:
    """Addresses for a message, in address order: all of a small pool, the first ``most`` and a count of a large one's rest."""
    ordered = sorted(set(addresses), key=_order)
    if not ordered:
        return "none"
    more = f" and {len(ordered) - most} more" if len(ordered) > most else ""
    return ", ".join(ordered[:most]) + more


def _order(a: str) -> tuple[int, str]:
    try:
        return (int(ipaddress.ip_address(a)), a)
    except ValueError:
        return (-1, a)
