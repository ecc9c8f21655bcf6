"""A standalone NAT node with its NETCONF agent, for functional tests, benches and demos.

:class:`AgentLab` builds, under one run prefix, a NAT namespace (inside and
outside interfaces on veths looped inside it, the real nftables SNAT of :class:`NatNode`) and a
management namespace joined to it by a veth on 192.0.2.0/24, starts
``natmig agent`` inside the NAT namespace listening on its management
address, and removes all of it again -- by name and pid, never anything it
did not create.  Clients connect from the management namespace:
:func:`call_in_netns` opens their socket there (a socket keeps the
namespace it was made in), and :meth:`AgentLab.cmd` prefixes external
clients with ``ip netns exec``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .. import children, netns
from ..errors import AgentError
from .auth import load_or_create_host_key, set_password
from .natnode import NatNode, NatNodeConfig

USER = "natmig"


def call_in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a thread that entered network namespace ``name`` (see :func:`natmig.netns.call_in`)."""
    return netns.call_in(name, fn)


class AgentLab:
    """One NAT node + management namespace + running agent; use as a context manager."""

    def __init__(self, workdir: str | Path, provider: str = "conntrack", tag: str = "ag", port: int = 830, extra_args: Sequence[str] = ()) -> None:
        prefix = netns.run_prefix(tag) + f"{int(time.monotonic() * 1000) % 1000:03d}"
        self.nat_ns = prefix + "n"
        self.mgmt_ns = prefix + "m"
        self.dir = Path(workdir)
        self.provider = provider
        self.port = port
        self.extra_args = list(extra_args)
        self.mgmt_address = "192.0.2.11"
        self.client_address = "192.0.2.1"
        self.public_address = "203.0.113.1"
        self.password = os.urandom(8).hex()
        self.cfg = NatNodeConfig(name=self.nat_ns, mgmt_if="mgmt0", mgmt_address=f"{self.mgmt_address}/24")
        self.node = NatNode(self.cfg)
        self.proc: subprocess.Popen | None = None

    # ------------------------------------------------------------ lifecycle

    def __enter__(self) -> "AgentLab":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        """Build the namespaces and start the agent."""
        self.dir.mkdir(parents=True, exist_ok=True)
        netns.add(self.nat_ns)
        netns.add(self.mgmt_ns)
        for ifname in (self.cfg.inside_if, self.cfg.outside_if):
            # A veth looped back into the namespace (this kernel has no dummy driver).
            netns.add_veth(ifname, ifname + "p", self.nat_ns, self.nat_ns)
        # Loopback-sized MTU: the management link carries 30 MB documents, and
        # add_veth turns segmentation offloads off (needed only on OVS paths).
        netns.add_veth("mgmt0", "mgmt1", self.nat_ns, self.mgmt_ns, mtu=65535)
        netns.run(["ip", "addr", "add", f"{self.client_address}/24", "dev", "mgmt1"], self.mgmt_ns)
        self.node.configure()
        set_password(self.passwords, USER, self.password)
        key = load_or_create_host_key(self.host_key)
        pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
        self.known_hosts.write_text(f"[{self.mgmt_address}]:{self.port} {pub}\n")
        self.start_agent()

    def start_agent(self, timeout: float = 30.0) -> None:
        """Start ``natmig agent`` in the NAT namespace; returns once it listens."""
        ready = self.dir / "agent.ready"
        ready.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "natmig.cli", "-v", "agent", "--netns", self.nat_ns,
            "--listen", f"{self.mgmt_address}:{self.port}", "--provider", self.provider,
            "--public-address", self.public_address, "--host-key", str(self.host_key),
            "--passwords", str(self.passwords), "--ready-file", str(ready), *self.extra_args,
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        children.wait_ready(self.proc, ready, timeout, "agent", self.log_tail, AgentError)

    def stop_agent(self) -> None:
        """SIGTERM the agent (by its pid) and wait; SIGKILL if it does not go."""
        p, self.proc = self.proc, None
        children.stop(p)

    def down(self) -> None:
        """Stop the agent and delete both namespaces (idempotent)."""
        self.stop_agent()
        netns.delete(self.mgmt_ns)
        netns.delete(self.nat_ns)

    # ---------------------------------------------------------------- files

    @property
    def passwords(self) -> Path:
        """The agent's password file."""
        return self.dir / "passwords"

    @property
    def host_key(self) -> Path:
        """The agent's host key."""
        return self.dir / "host_key"

    @property
    def known_hosts(self) -> Path:
        """known_hosts holding the agent's key for ``[mgmt_address]:port``."""
        return self.dir / "known_hosts"

    @property
    def log(self) -> Path:
        """The agent's log file."""
        return self.dir / "agent.log"

    def log_tail(self, n: int = 2000) -> str:
        """The end of the agent's log."""
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        """The agent's pid."""
        assert self.proc is not None
        return self.proc.pid

    # -------------------------------------------------------------- clients

    def client(self, **kw: Any) -> Any:
        """A :class:`~natmig.controller.netconf.NodeClient` opened from the management namespace."""
        from ..controller.netconf import NodeClient

        kw.setdefault("password", self.password)
        kw.setdefault("known_hosts", str(self.known_hosts))
        return call_in_netns(self.mgmt_ns, lambda: NodeClient.connect(self.mgmt_address, self.port, USER, **kw))

    def cmd(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run a client program in the management namespace (not checked; look at the result)."""
        kw.setdefault("timeout", 60)
        return subprocess.run(netns.ns_cmd(list(argv), self.mgmt_ns), capture_output=True, text=True, **kw)

    def conntrack(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run the conntrack tool in the NAT namespace."""
        return netns.run(["conntrack", *args], self.nat_ns, check=check)
