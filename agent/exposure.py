"""Where the agent may listen: its management address, never the NAT's data-plane side.

The agent runs inside the NAT node's namespace, where the public and inside
interfaces live too.  Listening on 0.0.0.0 (the old default) answered SSH on
the NAT's public address: anyone on the public side could try to log in.
:func:`check_listen` refuses a wildcard address, a public address, and any
address of an interface that holds a public address or is the inside
interface -- unless the operator insists (``--listen-anyway``).
"""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from typing import Iterable

from ..errors import AgentError

_WILDCARDS = {"", "0.0.0.0", "::"}


class ListenError(AgentError):
    """The agent was asked to listen where the NAT's data plane answers."""


def interface_addresses() -> dict[str, set[str]]:
    """Interface name -> its addresses, in this process's network namespace (``ip -j addr``)."""
    try:
        out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True, timeout=10).stdout
        links = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise ListenError(f"cannot list this namespace's addresses to check --listen: {e}") from e
    return {link.get("ifname", "?"): {str(a.get("local")) for a in link.get("addr_info", []) if a.get("local")} for link in links}


def _addresses_of(host: str) -> set[str]:
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(ipaddress.ip_address(info[4][0])) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except (OSError, ValueError) as e:
        raise ListenError(f"--listen {host!r}: cannot resolve it: {e}") from e


def data_plane_addresses(public: Iterable[str], inside_if: str | None, interfaces: dict[str, set[str]]) -> dict[str, str]:
    """Address -> why it belongs to the data plane: the public addresses, and every address of the public and inside interfaces."""
    public = {str(ipaddress.ip_address(a)) for a in public}
    out = {a: "a public address of the NAT" for a in public}
    for ifname, addrs in interfaces.items():
        if ifname == inside_if:
            out.update({a: f"an address of the inside interface {ifname}" for a in addrs})
        elif addrs & public:
            out.update({a: f"an address of the public interface {ifname}" for a in addrs if a not in public})
    return out


def check_listen(host: str, public: Iterable[str], inside_if: str | None, interfaces: dict[str, set[str]] | None = None) -> None:
    """:class:`ListenError` when ``host`` would expose the agent on the NAT's public or inside side."""
    hint = "listen on the management address only, or give --listen-anyway to listen there all the same"
    if host in _WILDCARDS:
        raise ListenError(f"--listen {host or '0.0.0.0'}: every address of the node, its public and inside ones included; {hint}")
    plane = data_plane_addresses(public, inside_if, interface_addresses() if interfaces is None else interfaces)
    for a in sorted(_addresses_of(host)):
        if a in plane:
            raise ListenError(f"--listen {host}: {a} is {plane[a]}; {hint}")
