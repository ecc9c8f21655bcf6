"""Sockets opened inside another network namespace, for reaching the management network.

The management network lives in the testbed's own namespace, not in the
root namespace: a root-namespace address or route in 192.0.2.0/24 could
clash with the machine's real interfaces (on the reference machine eth0
itself is in 192.0.2.0/24) and would send management traffic off the
machine whenever the testbed is down.  A process in the root namespace
(``natmig migrate``) still reaches an agent: :func:`connect` switches one
short-lived thread into the namespace (:func:`natmig.netns.call_in`), opens and connects the socket there,
and hands it back; a socket keeps the namespace it was made in, so the
caller never changes namespace (the pyroute2 approach).  Pass the socket to
ncclient (``manager.connect(sock=...)``) or asyncssh (``connect(sock=...)``).
"""

from __future__ import annotations

import socket

from .. import netns
from ..errors import TestbedError


def connect(netns_name: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket connected to ``host:port`` from inside namespace ``netns_name``.

    Raises :class:`TestbedError` naming the namespace and the address when
    the namespace is missing or the connection fails.
    """
    if not netns.exists(netns_name):
        raise TestbedError(f"management namespace {netns_name} does not exist (is the testbed up?)")

    def work() -> socket.socket:
        s = socket.create_connection((host, port), timeout=timeout)
        s.settimeout(None)
        return s

    # netns.call_in: a fresh thread, thrown away afterwards (entering a
    # namespace moves only the calling thread), and no other code runs in it.
    try:
        sock: socket.socket = netns.call_in(netns_name, work)
    except (OSError, netns.NetnsError) as e:
        raise TestbedError(f"cannot connect to {host}:{port} in namespace {netns_name}: {e}") from e
    return sock
