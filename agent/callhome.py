"""NETCONF call home (RFC 8071): the agent dials the controller, and stays the SSH server.

An agent behind a NAT or a firewall, or one that starts before its
controller, cannot wait to be dialled: it opens the TCP connection to the
controller's call-home port (4334), and on that connection the usual roles
of SSH and NETCONF follow (RFC 8071 3.1): the agent presents its host key
and authenticates the controller as it would any NETCONF client.  When the
connection ends, or cannot be made, the agent dials again with a backoff
(RFC 8071 4.1: "The NETCONF server SHOULD support connecting to ...
continuously"), so an agent started first registers once the controller is up.
"""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import asyncssh

from ..errors import AgentError

if TYPE_CHECKING:
    from .server import Agent

log = logging.getLogger(__name__)

#: IANA's port for NETCONF call home over SSH (RFC 8071 6).
CALL_HOME_PORT = 4334
#: first wait before dialling again, doubling up to the cap; jittered so that many agents spread out.
BACKOFF_FIRST = 0.5
BACKOFF_CAP = 30.0


@dataclass(frozen=True)
class CallHomeTarget:
    """A controller to dial: ``HOST[:PORT]`` or ``[V6]:PORT`` (port 4334 by default)."""

    host: str
    port: int = CALL_HOME_PORT

    @classmethod
    def parse(cls, text: str) -> "CallHomeTarget":
        host, port = text, str(CALL_HOME_PORT)
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port = rest.lstrip(":") or port
        elif text.count(":") == 1:
            host, port = text.split(":")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise AgentError(f"--call-home {text!r}: give HOST or HOST:PORT (port 1..65535, default {CALL_HOME_PORT})")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


async def call_home(agent: "Agent", target: CallHomeTarget, stop: asyncio.Event) -> None:
    """Keep one call-home connection to ``target`` up until ``stop`` is set."""
    wait = BACKOFF_FIRST
    while not stop.is_set():
        try:
            conn = await asyncssh.connect_reverse(target.host, target.port, **agent.ssh_options())
        except (OSError, asyncssh.Error) as e:
            log.info("call home to %s: %s; again in %.1f s", target, e, wait)
        else:
            log.info("called home to %s", target)
            wait = BACKOFF_FIRST  # a connection that came up resets the backoff
            closed = asyncio.ensure_future(conn.wait_closed())
            stopped = asyncio.ensure_future(stop.wait())
            await asyncio.wait({closed, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if stop.is_set():
                conn.close()
                closed.cancel()
                return
            log.info("call-home connection to %s ended; dialling again in %.1f s", target, wait)
        try:
            await asyncio.wait_for(stop.wait(), timeout=wait * random.uniform(0.8, 1.2))
        except asyncio.TimeoutError:
            pass
        wait = min(wait * 2, BACKOFF_CAP)
