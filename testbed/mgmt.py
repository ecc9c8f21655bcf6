"""Sockets opened inside another network namespace, for reaching the management network.

The management network lives in the testbed's own namespace, not in the
root namespace: a root-namespace address or route in 192.0.2.0/24 could
clash with the machine's real interfaces (on the reference machine eth0
itself is in 192.0.2.0/24) and would send management traffic off the
machine whenever the testbed is down.  A process in the root namespace
(``natmig migrate``) still reaches an agent: :func:`connect` switches one
short-lived thread into the namespace, opens and connects the socket there,
and hands it back; a socket keeps the namespace it was made in, so the
caller never changes namespace (the pyroute2 approach).  Pass the socket to
ncclient (``manager.connect(sock=...)``) or asyncssh (``connect(sock=...)``).
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading

from .. import netns
from ..errors import TestbedError

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _enter(name: str) -> None:
    """Move the calling thread (only) into the named namespace."""
    fd = os.open(str(netns.NETNS_DIR / name), os.O_RDONLY)
    try:
        if _libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def connect(netns_name: str, host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP socket connected to ``host:port`` from inside namespace ``netns_name``.

    Raises :class:`TestbedError` naming the namespace and the address when
    the namespace is missing or the connection fails.
    """
    if not netns.exists(netns_name):
        raise TestbedError(f"management namespace {netns_name} does not exist (is the testbed up?)")
    result: dict[str, object] = {}

    def work() -> None:
        try:
            _enter(netns_name)
            s = socket.create_connection((host, port), timeout=timeout)
            s.settimeout(None)
            result["sock"] = s
        except OSError as e:
            result["error"] = e

    # A fresh thread, thrown away afterwards: setns changes only the calling
    # thread, and no other code ever runs in that thread.
    t = threading.Thread(target=work, name=f"natmig-netns-{netns_name}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise TestbedError(f"cannot connect to {host}:{port} in namespace {netns_name}: {result['error']}")
    return result["sock"]  # type: ignore[return-value]
