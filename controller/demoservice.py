"""`natmig demo --via-controller`: the four steps with a controller service that the agents call home to.

The controller (`natmig controller`, a process of its own) runs in the
testbed's management namespace, at the topology's controller address.  The
agents dial it (RFC 8071) as they start; the demo starts the migration
through the controller's northbound with netconf-console2, a third-party
NETCONF client, while a second netconf-console2 subscribed to the northbound
prints each migration phase as the controller announces it.  The demo
itself opens no session to the controller: what it prints of the move is
what the northbound returned.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable
from xml.sax.saxutils import escape

from .. import children
from ..credentials import set_password
from ..errors import ControllerError
from .agentfleet import USER, AgentFleet
from .demo import Demo, DemoOptions
from .inventory import dump_toml, parse
from .northbound import NS
from .report import PhaseTiming

#: Where the controller listens, on the topology's controller address.
CALL_HOME_PORT = 4334
NORTHBOUND_PORT = 8300
#: The northbound's operator (a user of the controller's own password file).
OPERATOR = "ops"


@dataclass
class RemoteMove:
    """A migration as the controller's northbound reported it: its reply and its phase notifications."""

    ok: bool
    outcome: str
    failed_phase: str
    error: str
    report: str
    phases: list[PhaseTiming] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"ok": self.ok, "outcome": self.outcome, "failed_phase": self.failed_phase or None, "error": self.error or None,
                "report": self.report, "phases": [{"name": p.name, "seconds": p.seconds, "ok": p.ok} for p in self.phases]}


class ControllerService:
    """A `natmig controller` process for a testbed, its configuration, and a third-party client of its northbound.

    The process is a child of this one, stopped by its pid.
    """

    def __init__(self, tb: Any, fleet_dir: Path, client_key: Path, host_keys: dict[str, Path], keepalive: float = 1.0, nice: int = 19) -> None:
        self.tb = tb
        self.nice = nice
        self.dir = fleet_dir
        self.address = tb.controller_address
        self.ns = tb.mgmt_netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.password = os.urandom(12).hex()
        set_password(self.dir / "northbound-passwords", OPERATOR, self.password)
        # The allow-list: each agent's name and host key (the agents' .pub files, written with the keys).
        (self.dir / "agents.allow").write_text("".join(f"{n} {Path(str(k) + '.pub').read_text().strip()}\n" for n, k in host_keys.items()))
        (self.dir / "controller.toml").write_text(
            f'netns = "{self.ns}"\n\n'
            f'[switch]\ntestbed = "{tb.prefix}"\n\n'
            f'[call_home]\nlisten = "{self.address}:{CALL_HOME_PORT}"\nallow = "{self.dir / "agents.allow"}"\n'
            f'username = "{USER}"\nkey = "{client_key}"\nkeepalive = {keepalive}\n\n'
            f'[northbound]\nlisten = "{self.address}:{NORTHBOUND_PORT}"\nhost_key = "{self.dir / "controller-host-key"}"\n'
            f'passwords = "{self.dir / "northbound-passwords"}"\n')

    @classmethod
    def for_fleet(cls, tb: Any, fleet: AgentFleet, keepalive: float = 1.0) -> "ControllerService":
        """The controller of ``fleet``'s agents: it trusts their host keys and signs in with the fleet's key; the agents will call it home."""
        service = cls(tb, fleet.dir, fleet.client_key, {n: fleet.host_key(n) for n in tb.topology.nats}, keepalive)
        fleet.call_home = service.call_home
        return service

    @property
    def call_home(self) -> str:
        """What the agents are given as --call-home."""
        return f"{self.address}:{CALL_HOME_PORT}"

    def start(self, timeout: float = 30.0) -> int:
        """Start the controller; returns its pid once both of its sockets listen."""
        ready = self.dir / "controller.ready"
        ready.unlink(missing_ok=True)
        with open(self.dir / "controller.log", "ab") as log:
            # Niced like the agents and the one-shot controller (demo.control_plane_priority): on this one
            # machine the userspace switch and the hosts stand in for hardware the control plane must not starve.
            self.proc = subprocess.Popen([sys.executable, "-m", "natmig.cli", "controller", "--config", str(self.dir / "controller.toml"),
                                          "--ready-file", str(ready)], stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, self.nice))
        children.wait_ready(self.proc, ready, timeout, "the controller", self.log_tail, ControllerError)
        return self.proc.pid

    def write_inventory(self, source: str, target: str) -> Path:
        """An inventory for `natmig migrate --controller` (its [controller] table), from the testbed's management namespace."""
        secret = self.dir / "northbound-secret"
        secret.write_text(self.password + "\n")
        secret.chmod(0o600)
        key = (self.dir / "controller-host-key.pub").read_text().split()
        (self.dir / "controller-known-hosts").write_text(f"[{self.address}]:{NORTHBOUND_PORT} {key[0]} {key[1]}\n")
        doc = {"controller": {"host": self.address, "port": NORTHBOUND_PORT, "username": OPERATOR, "password_file": str(secret),
                              "known_hosts": str(self.dir / "controller-known-hosts"), "netns": self.ns},
               "migration": {"source": source, "target": target}}
        parse(doc)  # what we write must load
        p = self.dir / "controller-inventory.toml"
        p.write_text(dump_toml(doc))
        return p

    def log_tail(self, n: int = 1500) -> str:
        """The end of the controller's log (for error messages)."""
        try:
            return (self.dir / "controller.log").read_text(errors="replace")[-n:].strip()
        except OSError:
            return ""

    def console(self, *args: str, timeout: float = 600.0) -> str:
        """netconf-console2 against the northbound, from the management namespace; its standard output."""
        cp = subprocess.run(self._console_argv(*args), capture_output=True, text=True, timeout=timeout)
        if cp.returncode != 0:
            raise ControllerError(f"netconf-console2 {' '.join(args)}: exit {cp.returncode}: {(cp.stderr or cp.stdout).strip()[-800:]}")
        return cp.stdout

    def _console_argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, str(Path(sys.executable).with_name("netconf-console2")), "--host", self.address,
                "--port", str(NORTHBOUND_PORT), "-u", OPERATOR, "-p", self.password, *args]

    def agents_up(self) -> set[str]:
        """The agents the controller's registry lists as up (read from its northbound)."""
        root = ET.fromstring(_payload(self.console("--get")))
        up = set()
        for a in root.iter(f"{{{NS}}}agent"):
            if a.findtext(f"{{{NS}}}up") == "true":
                up.add(a.findtext(f"{{{NS}}}name") or "")
        return up

    def wait_up(self, names: set[str], timeout: float = 30.0) -> None:
        """Until every agent in ``names`` has called home and is up."""
        deadline = time.monotonic() + timeout
        while not names <= (up := self.agents_up()):
            if time.monotonic() > deadline:
                raise ControllerError(f"agents {', '.join(sorted(names - up))} did not call home within {timeout:g} s: {self.log_tail()}")
            time.sleep(0.2)

    def migrate(self, source: str, target: str, retire: str, on_phase: Callable[[PhaseTiming], None]) -> RemoteMove:
        """The northbound's migrate RPC (netconf-console2 --rpc), with a subscriber printing the phases as they come."""
        watcher = _PhaseWatcher(self._console_argv("--create-subscription", "NETCONF", "--sleep", "3600"), on_phase)
        try:
            # The subscription is made before the RPC is sent: no phase is missed.
            watcher.wait_subscribed()
            rpc = self.dir / "migrate.xml"
            rpc.write_text(f'<migrate xmlns="{NS}"><source>{escape(source)}</source><target>{escape(target)}</target>'
                           f"<retire>{escape(retire)}</retire></migrate>")
            reply = ET.fromstring(_payload(self.console("--rpc", str(rpc))))
            watcher.settle("finish", 2.0)
        finally:
            watcher.close()
        n = f"{{{NS}}}"

        def text(tag: str) -> str:
            return next((e.text or "" for e in reply.iter(n + tag)), "")

        ok = text("ok") == "true"
        return RemoteMove(ok, text("outcome") or ("ok" if ok else "attention"), text("failed-phase"), text("error"), text("report"),
                          watcher.phases)

    def close(self) -> None:
        """Stop the controller (SIGTERM, then SIGKILL) by its pid."""
        p, self.proc = self.proc, None
        children.stop(p)


def _payload(out: str) -> str:
    """netconf-console2's output without its XML declaration."""
    return re.sub(r"^\s*<\?xml[^>]*\?>", "", out).strip() or "<empty/>"


class _PhaseWatcher:
    """A netconf-console2 subscribed to the northbound; each migration-phase notification becomes a PhaseTiming."""

    _NOTIFICATION = re.compile(r"<notification\b.*?</notification>", re.S)

    def __init__(self, argv: list[str], on_phase: Callable[[PhaseTiming], None]) -> None:
        self.on_phase = on_phase
        self.phases: list[PhaseTiming] = []
        self._subscribed = threading.Event()
        self._seen = threading.Condition()
        # Wall-clock event times become this process's monotonic clock (the traffic prober's).
        self._offset = time.time() - time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._thread = threading.Thread(target=self._read, name="natmig-demo-phases", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        buf = ""
        for line in self.proc.stdout:
            buf += line
            if re.search(r"<(\w+:)?ok\b", buf):  # the subscription's reply
                self._subscribed.set()
            for m in list(self._NOTIFICATION.finditer(buf)):
                self._handle(m.group(0))
            if (last := buf.rfind("</notification>")) >= 0:
                buf = buf[last + len("</notification>"):]
        self._subscribed.set()

    def _handle(self, xml: str) -> None:
        try:
            root = ET.fromstring(xml)
        except ET.ParseError:
            return
        ph = root.find(f"{{{NS}}}migration-phase")
        if ph is None:
            return
        seconds = float(ph.findtext(f"{{{NS}}}seconds") or 0)
        ended = _monotonic(root.findtext("{urn:ietf:params:xml:ns:netconf:notification:1.0}eventTime") or "", self._offset)
        p = PhaseTiming(ph.findtext(f"{{{NS}}}phase") or "?", seconds, ok=ph.findtext(f"{{{NS}}}ok") == "true",
                        started=(ended - seconds) if ended else 0.0)
        with self._seen:
            self.phases.append(p)
            self._seen.notify_all()
        self.on_phase(p)

    def wait_subscribed(self, timeout: float = 20.0) -> None:
        if not self._subscribed.wait(timeout) or self.proc.poll() is not None:
            raise ControllerError("netconf-console2 could not subscribe to the controller's notifications")

    def settle(self, last: str, timeout: float) -> None:
        """Until the phase ``last`` (or a failed one) was seen, at most ``timeout`` s: notifications may trail the reply."""
        deadline = time.monotonic() + timeout
        with self._seen:
            while not any(p.name == last or not p.ok for p in self.phases):
                if not self._seen.wait(max(0.0, deadline - time.monotonic())):
                    return

    def close(self) -> None:
        children.stop(self.proc, grace=5)
        self._thread.join(5)


def _monotonic(event_time: str, offset: float) -> float:
    try:
        return datetime.strptime(event_time, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp() - offset
    except ValueError:
        return 0.0


class ServiceDemo(Demo):
    """The demo with the controller as a service: agents call home, the move is asked of the northbound."""

    service: ControllerService | None = None

    def same_as(self, inventory: Path) -> str:
        return "natmig migrate --controller, through the northbound"

    def fleet(self, tb: Any, work: Path) -> AgentFleet:
        fleet = AgentFleet(tb, work, provider=self.opts.provider)
        self.service = ControllerService.for_fleet(tb, fleet)
        pid = self.service.start()
        self.say(f"      controller service: pid {pid}, call home on {self.service.call_home}, "
                 f"northbound on {self.service.address}:{NORTHBOUND_PORT} (namespace {self.service.ns})")
        return fleet

    def migrate(self, tb: Any, fleet: AgentFleet, src: str, dst: str, on_phase: Callable[[PhaseTiming], None]) -> RemoteMove:
        assert self.service is not None
        self.service.wait_up({src, dst})
        self.say(f"      both agents called home; the move is asked of the northbound: netconf-console2 --rpc migrate.xml "
                 f"(source {src}, target {dst})")
        return self.service.migrate(src, dst, self.opts.retire, on_phase)

    def teardown_extra(self) -> None:
        if self.service is not None:
            self.service.close()


def run(opts: DemoOptions) -> int:
    """Run the demo through a controller service; exit status 0 only when every flow survived."""
    return 0 if ServiceDemo(opts, sys.stderr if opts.json_path == "-" else sys.stdout).run().ok else 1
