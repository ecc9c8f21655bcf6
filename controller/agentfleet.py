"""The agents of a testbed's NAT nodes: one natmig agent per node, its credentials, and the inventory to reach them.

Used by `natmig demo`, the firewall demo, the demo through a controller
service, the functional tests and the benchmarks.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any, Sequence

from .. import children
from ..errors import ControllerError
from .inventory import AgentSpec, dump_toml, parse
from .migrate import Endpoint, endpoint_from_spec

USER = "natmig"
AGENT_PORT = 830


class AgentFleet:
    """One natmig agent per NAT node of a testbed, with fresh credentials, and the inventory to reach them.

    Agents are child processes of this one, stopped by their own pid.
    """

    def __init__(self, tb: Any, workdir: str | Path, provider: str = "conntrack", port: int = AGENT_PORT, nice: int = 19,
                 call_home: str | None = None) -> None:
        from ..credentials import load_or_create_host_key, set_password

        self.tb = tb
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.provider = provider
        self.port = port
        self.nice = nice
        #: HOST[:PORT] of a controller service the agents call home to (RFC 8071), or None.
        self.call_home = call_home
        self.procs: dict[str, subprocess.Popen] = {}
        self.password = os.urandom(12).hex()
        self.passwords = self.dir / "agent-passwords"
        set_password(self.passwords, USER, self.password)
        self.secret = self.dir / "controller-password"
        self.secret.write_text(self.password + "\n")
        self.secret.chmod(0o600)
        # The controller signs in with a key (a password check is a ~50 ms
        # scrypt on the agent); the password stays valid for people.
        import asyncssh

        ckey = asyncssh.generate_private_key("ssh-ed25519")
        self.client_key = self.dir / "controller-key"
        fd = os.open(self.client_key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(ckey.export_private_key("openssh"))
        # One authorized_keys file per user (the agent's --authorized-keys has %u).
        self.authorized_keys = self.dir / "authorized_keys.%u"
        (self.dir / f"authorized_keys.{USER}").write_bytes(ckey.export_public_key("openssh"))
        self.known_hosts = self.dir / "known_hosts"
        lines = []
        for nat in tb.topology.nats:
            key = load_or_create_host_key(self.host_key(nat))
            pub = " ".join(key.export_public_key("openssh").decode().split()[:2])
            lines.append(f"[{tb.mgmt_address(nat)}]:{port} {pub}")
        self.known_hosts.write_text("\n".join(lines) + "\n")

    def host_key(self, nat: str) -> Path:
        """Where ``nat``'s agent keeps its host key."""
        return self.dir / f"{nat}-host-key"

    def start(self, nat: str, timeout: float = 30.0) -> int:
        """Start ``nat``'s agent in its namespace; returns its pid once it listens."""
        return self.start_all([nat], timeout)[nat]

    def start_all(self, nats: Sequence[str], timeout: float = 60.0) -> dict[str, int]:
        """Start the agents of ``nats`` all at once (their start-ups overlap), then wait until each listens; their pids."""
        ready = {nat: self._spawn(nat) for nat in nats}
        for nat, path in ready.items():
            children.wait_ready(self.procs[nat], path, timeout, f"agent of {nat}", partial(self.log_tail, nat), ControllerError)
        return {nat: self.procs[nat].pid for nat in nats}

    def _spawn(self, nat: str) -> Path:
        """Start ``nat``'s agent process; the file it writes once it listens."""
        ready = self.dir / f"{nat}.ready"
        ready.unlink(missing_ok=True)
        log = open(self.dir / f"{nat}-agent.log", "ab")
        # A firewall translates nothing: it has no public address to serve.
        public = [] if self.provider == "firewall" else [arg for a in self.tb.public_addresses(nat) for arg in ("--public-address", a)]
        argv = [
            sys.executable, "-m", "natmig.cli", "agent", "--netns", self.tb.netns(nat),
            "--listen", f"{self.tb.mgmt_address(nat)}:{self.port}", "--provider", self.provider,
            *public, "--host-key", str(self.host_key(nat)),
            "--passwords", str(self.passwords), "--authorized-keys", str(self.authorized_keys), "--ready-file", str(ready),
            # A restarted agent undoes what it had pending (an interrupted migration's confirmed commits).
            "--state-dir", str(self.dir / f"{nat}-state"),
        ]
        if self.call_home:
            argv += ["--call-home", self.call_home]
        # The agents run niced: on this one machine the switch (a userspace
        # OVS) and the hosts stand in for hardware and other machines, and a
        # control plane busy serialising 100k sessions must not starve them;
        # on a real node the kernel datapath preempts the agent anyway.
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                             preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, self.nice))
        log.close()
        self.procs[nat] = p
        return ready

    def log_tail(self, nat: str, n: int = 1500) -> str:
        """The end of an agent's log (for error messages)."""
        try:
            return (self.dir / f"{nat}-agent.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def stop(self, nat: str, kill: bool = False) -> None:
        """Stop ``nat``'s agent (SIGTERM, or SIGKILL with ``kill``) and wait for it."""
        children.stop(self.procs.pop(nat, None), kill)

    def spec(self, nat: str) -> AgentSpec:
        """How the controller reaches ``nat``'s agent."""
        return AgentSpec(
            name=nat, host=self.tb.mgmt_address(nat), port=self.port, username=USER,
            key=str(self.client_key), known_hosts=str(self.known_hosts),
            public_address=self._public(nat), netns=self.tb.mgmt_netns,
        )

    def _public(self, nat: str) -> str | list[str]:
        """The inventory's public_address of ``nat``: its address, or its pool's as a list."""
        addrs = self.tb.public_addresses(nat)
        return addrs[0] if len(addrs) == 1 else addrs

    def endpoint(self, nat: str, timeout: float = 30.0) -> Endpoint:
        """A migration endpoint for ``nat`` (``timeout``: of each RPC, in seconds); ``stop`` stops its agent."""
        ep = endpoint_from_spec(self.spec(nat), timeout=timeout)
        ep.stop = lambda: self.stop(nat)
        return ep

    def inventory_doc(self, source: str, target: str) -> dict[str, Any]:
        """The inventory (as a document) that `natmig migrate --inventory` takes for this testbed."""
        agents = {}
        topo = self.tb.topology
        for nat in topo.nats:
            s = self.spec(nat)
            agents[nat] = {k: v for k, v in (
                ("host", s.host), ("port", s.port), ("username", s.username), ("key", s.key),
                ("known_hosts", s.known_hosts), ("public_address", s.public_address), ("netns", s.netns),
                # Where each NAT runs and which instance it is a node of: what a drain selects and pairs by.
                ("machine", topo.nats[nat].machine or None),
                ("networks", list(topo.nats[nat].pair) if topo.nats[nat].pair != ("inside", "public") else None),
            ) if v is not None}
        doc = {"agents": agents, "switch": {"testbed": self.tb.prefix}, "migration": {"source": source, "target": target}}
        parse(doc)  # what we write must load
        return doc

    def write_inventory(self, source: str, target: str) -> Path:
        """Write the inventory as TOML in the work directory; returns its path."""
        p = self.dir / "inventory.toml"
        p.write_text(dump_toml(self.inventory_doc(source, target)))
        return p

    def close(self) -> None:
        """Stop every agent this fleet started."""
        for nat in list(self.procs):
            self.stop(nat)
