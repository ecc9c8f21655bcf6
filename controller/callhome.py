"""The controller's side of NETCONF call home (RFC 8071): accept agents on port 4334.

Each TCP connection that arrives is an agent: this side is the SSH client
and the NETCONF client on it.  The agent is known by its host key, checked
against an allow-list before any credential is sent
(:meth:`~.netconf.NodeClient.accept`); an agent not on the list is refused
and logged.  Accepted sessions go to ``on_agent`` (the registry).
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path
from typing import Callable

from .. import netns
from ..errors import ControllerError
from .ncsession import key_fingerprint
from .netconf import NodeClient

log = logging.getLogger(__name__)


def load_allow_list(path: str | Path) -> dict[str, str]:
    """host-key fingerprint -> agent name, from lines ``NAME KEYTYPE BASE64 [comment]`` (# comments allowed).

    That is a known_hosts line with the agent's name where the host would
    be; ``natmig agent``'s ``HOST_KEY.pub`` gives the rest.
    """
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ControllerError(f"cannot read the call-home allow-list {path}: {e}") from e
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, key = line.partition(" ")
        try:
            fp = key_fingerprint(key)
        except ControllerError as e:
            raise ControllerError(f"{path}:{n}: {e}") from None
        if fp in out and out[fp] != name:
            raise ControllerError(f"{path}:{n}: the key of {name} is already the key of {out[fp]}")
        out[fp] = name
    return out


class CallHomeListener:
    """Listens for agents calling home; each accepted, authenticated session is handed to ``on_agent(client, peer)``."""

    def __init__(self, host: str, port: int, allowed: dict[str, str], on_agent: Callable[[NodeClient, str], object],
                 username: str = "natmig", password: str | None = None, key_filename: str | None = None,
                 namespace: str | None = None, timeout: float = 30.0) -> None:
        self.allowed = allowed
        self.on_agent = on_agent
        self.username, self.password, self.key_filename, self.timeout = username, password, key_filename, timeout
        self._closed = threading.Event()

        def bind() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                s.close()
                raise ControllerError(f"call home: cannot listen on {host}:{port}: {e}") from e
            s.listen(64)
            return s

        # Bound inside the management namespace, when given: the socket stays there, its threads need not.
        self._sock = netns.call_in(namespace, bind) if namespace else bind()
        self._thread = threading.Thread(target=self._accept, name="natmig-call-home", daemon=True)
        self._thread.start()
        log.info("listening for call home on %s:%d", host, self.port)

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1])

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, addr = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handshake, args=(conn, f"{addr[0]}:{addr[1]}"), daemon=True).start()

    def _handshake(self, conn: socket.socket, peer: str) -> None:
        try:
            client = NodeClient.accept(conn, self.allowed, self.username, self.password, self.key_filename, self.timeout)
        except ControllerError as e:
            log.warning("call home from %s refused: %s", peer, e)
            conn.close()
            return
        try:
            self.on_agent(client, peer)
        except ControllerError as e:
            log.warning("%s", e)

    def close(self) -> None:
        """Stop accepting (sessions already handed over stay)."""
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
