"""The agent as a service: systemd's readiness notification, a pidfile, and the host key's known_hosts line.

sd_notify(3) is one datagram to the AF_UNIX socket named by ``$NOTIFY_SOCKET``;
natmig speaks it itself rather than depend on a binding.  The socket is
opened before the agent enters its NAT node's namespace: an abstract socket
name (``@...``) is looked up in the network namespace of the process that
uses it, and systemd's is the root one.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

import asyncssh

from ..errors import UsageError
from .auth import AuthError, load_or_create_host_key

log = logging.getLogger(__name__)


class Notifier:
    """Readiness and stopping notifications to systemd (a no-op when not started by it with Type=notify)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        # Taken out of the environment so that no child (the conntrack tool) notifies in our name.
        addr = os.environ.pop("NOTIFY_SOCKET", "")
        if not addr:
            return
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(addr)
        except OSError as e:
            sock.close()
            log.warning("NOTIFY_SOCKET %r: cannot connect (%s); systemd will not hear that the agent is ready", addr, e)
            return
        self.sock = sock

    def notify(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` fields (READY=1, STOPPING=1, STATUS=...) in one datagram."""
        if self.sock is None:
            return
        try:
            self.sock.send("\n".join(fields).encode())
        except OSError as e:
            log.warning("sd_notify %s: %s", fields[0], e)

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class PidFile:
    """``FILE`` holding the agent's pid while it serves (written once listening, removed at exit)."""

    def __init__(self, path: str | None) -> None:
        self.path = Path(path) if path else None

    def write(self) -> None:
        """Write the pid (temporary file + rename: a reader never sees a partial file)."""
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_text(f"{os.getpid()}\n")
            os.replace(tmp, self.path)
        except OSError as e:
            raise UsageError(f"--pidfile {self.path}: cannot write: {e.strerror or e}") from e

    def remove(self) -> None:
        """Remove the file if it still holds this process's pid."""
        if self.path is None:
            return
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


def known_hosts_line(key: asyncssh.SSHKey, host: str, port: int) -> str:
    """The OpenSSH known_hosts line of ``key`` for ``host``:``port`` (``[host]:port`` unless port 22)."""
    where = host if port == 22 else f"[{host}]:{port}"
    alg, blob = key.export_public_key("openssh").decode().split()[:2]
    return f"{where} {alg} {blob}"


def keygen(path: str) -> tuple[asyncssh.SSHKey, bool]:
    """The host key at ``path``, created (with ``.pub``) when missing; and whether it was created now."""
    existed = Path(path).exists()
    try:
        return load_or_create_host_key(path), not existed
    except OSError as e:
        raise AuthError(f"host key {path}: cannot create: {e.strerror or e}") from e
