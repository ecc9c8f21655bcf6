"""Whether an agent's address can be reached from the namespace the controller connects from.

An inventory agent without ``netns`` is connected to from the controller's
own network namespace.  On a machine whose own network uses the management
range (192.0.2.0/24 is a testbed's management subnet, and may be a real
LAN as well), that would talk to whatever answers there; the host key check
stops it, but the operator is better told what is missing: the ``netns``
field.  The route lookup sends nothing (a UDP socket's connect only asks the
kernel for a route).
"""

from __future__ import annotations

import socket


def route_error(host: str, port: int) -> str | None:
    """Why this namespace has no route to ``host`` (None: the kernel has one). Sends no packet."""
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}"
    why = "no address"
    for af, _, _, _, sa in infos:
        s = socket.socket(af, socket.SOCK_DGRAM)
        try:
            s.connect(sa)
            return None
        except OSError as e:
            why = e.strerror or str(e)
        finally:
            s.close()
    return f"no route to {host} from this network namespace ({why})"


def netns_hint(agent: str) -> str:
    """What to set when an agent without ``netns`` cannot be reached: names the field."""
    return (f"agents.{agent}.netns is not set, so the controller connects from its own network namespace; "
            f"if the agent's management network is inside a namespace (a testbed's is), name it in agents.{agent}.netns")
