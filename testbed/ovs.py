"""Private Open vSwitch daemons, and OpenFlow on their bridge through :mod:`natmig.ofctl`.

natmig never uses the system's Open vSwitch service (it does not start on a
machine without the openvswitch kernel module, and other users may rely on
it).  Each testbed runs its own ovsdb-server and ovs-vswitchd, inside the
testbed's switch namespace, with every OVS_* directory under the testbed's
state directory; they are stopped by the pids in their pidfiles, after
checking that the pid still is that daemon, never by process name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from .. import netns
from . import ovsdb
from ..errors import TestbedError
from ..ofctl import OF14, Ofctl, PortStats

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
#: The daemons, in start order (stopped in reverse).
DAEMONS = ("ovsdb-server", "ovs-vswitchd")
#: OpenFlow versions the bridge speaks; 1.4 is needed for bundles.
PROTOCOLS = "OpenFlow10,OpenFlow13,OpenFlow14"
OF_VERSION = OF14


class OvsError(TestbedError):
    """An Open vSwitch daemon or tool failed; the message carries its stderr."""


@dataclass
class Ovs:
    """One private pair of OVS daemons whose files all live under ``home``.

    ``netns`` is the namespace the daemons run in (None: the caller's); the
    tools reach them from any namespace through the unix sockets in ``rundir``.
    """

    home: Path
    netns: str | None = None

    @property
    def rundir(self) -> Path:
        """OVS_RUNDIR: sockets and pidfiles (``<bridge>.mgmt`` is the OpenFlow socket)."""
        return self.home / "run"

    @property
    def db_sock(self) -> Path:
        """The ovsdb-server socket."""
        return self.rundir / "db.sock"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points OVS tools at these daemons and nothing else."""
        e = dict(os.environ)
        e.update(
            OVS_RUNDIR=str(self.rundir),
            OVS_DBDIR=str(self.home / "db"),
            OVS_LOGDIR=str(self.home / "log"),
            OVS_SYSCONFDIR=str(self.home / "etc"),
        )
        return e

    def pidfile(self, daemon: str) -> Path:
        """Where ``daemon`` writes its pid."""
        return self.rundir / f"{daemon}.pid"

    # -- commands -------------------------------------------------------

    def _run(self, cmd: Sequence[str], *, input: str | None = None, check: bool = True, in_netns: bool = False) -> subprocess.CompletedProcess:
        argv = netns.ns_cmd(cmd, self.netns if in_netns else None)
        try:
            cp = subprocess.run(argv, input=input, capture_output=True, text=True, env=self.env, timeout=30)
        except FileNotFoundError as e:
            raise OvsError(f"{cmd[0]}: not installed (Debian package openvswitch-switch): {e}") from e
        except subprocess.TimeoutExpired:
            raise OvsError(f"{' '.join(cmd)}: timed out after 30 s") from None
        if check and cp.returncode != 0:
            raise OvsError(f"{' '.join(cmd)} exited {cp.returncode}: {cp.stderr.strip()}")
        return cp

    def vsctl(self, *args: str, check: bool = True) -> str:
        """Run ovs-vsctl against these daemons; its stdout."""
        return self._run(["ovs-vsctl", "--timeout=10", *args], check=check).stdout

    def openflow(self, bridge: str) -> Ofctl:
        """ovs-ofctl (OpenFlow 1.4) against ``bridge`` of these daemons."""
        return Ofctl(bridge, self.rundir, version=OF_VERSION)

    @contextmanager
    def _ofctl(self) -> Iterator[None]:
        try:
            yield
        except netns.CommandError as e:
            raise OvsError(str(e)) from e

    # -- life cycle -----------------------------------------------------

    def start(self) -> None:
        """Create a fresh database and start both daemons (detached, in ``netns``)."""
        for sub in ("run", "db", "log", "etc"):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
        db = self.home / "db" / "conf.db"
        if db.exists():
            db.unlink()
        self._run(["ovsdb-tool", "create", str(db), str(SCHEMA)])
        log = self.home / "log"
        self._run(
            [
                "ovsdb-server", str(db),
                f"--remote=punix:{self.db_sock}",
                f"--pidfile={self.pidfile('ovsdb-server')}",
                f"--log-file={log / 'ovsdb-server.log'}",
                f"--unixctl={self.rundir / 'ovsdb-server.ctl'}",
                "--detach", "--no-chdir",
            ],
            in_netns=True,
        )
        self.vsctl("--no-wait", "init")
        self._start_vswitchd()

    def _start_vswitchd(self) -> None:
        self._run(
            [
                "ovs-vswitchd", f"unix:{self.db_sock}",
                f"--pidfile={self.pidfile('ovs-vswitchd')}",
                f"--log-file={self.home / 'log' / 'ovs-vswitchd.log'}",
                f"--unixctl={self.rundir / 'ovs-vswitchd.ctl'}",
                "--detach", "--no-chdir",
            ],
            in_netns=True,
        )

    def revalidated(self, timeout: float = 10.0) -> None:
        """Wait until ovs-vswitchd's revalidators have run once (``revalidator/wait``).

        A bundle returns when the OpenFlow tables changed; packets keep
        following the datapath's cached flows of the old rules until the
        revalidators have been through them, which a loaded machine delays.
        A change that must be in effect before the next (a move across
        switches, make-before-break) waits for this.
        """
        self._run(["ovs-appctl", f"--timeout={int(timeout)}", "-t", str(self.rundir / "ovs-vswitchd.ctl"), "revalidator/wait"])

    def restart_vswitchd(self, bridge: str, down: float = 0.0, timeout: float = 10.0) -> None:
        """Restart ovs-vswitchd as `ovs-ctl restart` does: flows saved, the daemon stopped by its pid and started again, flows restored.

        OpenFlow flows live in the daemon, not in OVSDB: a bare restart would
        leave a secure-mode bridge dropping everything.  ``down``: seconds the
        daemon stays stopped (a fault test's window).
        """
        saved = self.dump_flows(bridge)
        pid = _read_pid(self.pidfile("ovs-vswitchd"))
        if pid is not None and _is_ours(pid, "ovs-vswitchd", self.home):
            _kill(pid, 3.0)
        time.sleep(down)
        self._start_vswitchd()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.replace_flows(bridge, "".join(f"{line}\n" for line in saved))
                return
            except TestbedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # the bridge appears once the daemon has read the database

    def pids(self) -> dict[str, int]:
        """The running daemons of this home, by name (a stale pidfile is ignored)."""
        found = {}
        for daemon in DAEMONS:
            pid = _read_pid(self.pidfile(daemon))
            if pid is not None and _is_ours(pid, daemon, self.home):
                found[daemon] = pid
        return found

    def running(self) -> bool:
        """Whether both daemons run."""
        return len(self.pids()) == len(DAEMONS)

    def stop(self, timeout: float = 3.0) -> list[int]:
        """Stop the daemons by their pidfiles: SIGTERM, then SIGKILL after ``timeout``; the pids stopped."""
        stopped = []
        for daemon in reversed(DAEMONS):
            pid = _read_pid(self.pidfile(daemon))
            if pid is None or not _is_ours(pid, daemon, self.home):
                continue
            _kill(pid, timeout)
            stopped.append(pid)
        return stopped

    # -- the bridge -----------------------------------------------------

    def add_bridge(self, bridge: str, ports: dict[str, int], settings: Mapping[str, Sequence[str]] | None = None) -> None:
        """Create a userspace-datapath bridge in secure fail mode with ``ports`` (name -> ofport), in one transaction.

        Secure fail mode: with no flow the bridge drops, it never falls back
        to a learning switch that would leak traffic between the NAT nodes.
        ``settings``: more Interface columns of some ports (a tunnel's
        ``type=gre``, ``options:remote_ip=...``).
        """
        args = [
            "--may-exist", "add-br", bridge, "--",
            "set", "bridge", bridge, "datapath_type=netdev", "fail-mode=secure", f"protocols={PROTOCOLS}",
            # No in-band control flows: nothing here talks OpenFlow over the data network.
            "other-config:disable-in-band=true",
        ]
        for name, ofport in ports.items():
            args += ["--", "--may-exist", "add-port", bridge, name, "--", "set", "interface", name, f"ofport_request={ofport}",
                     *(settings or {}).get(name, ())]
        self.vsctl(*args)

    def add_phy_bridge(self, bridge: str, port: str, mtu: int) -> None:
        """A userspace-datapath learning bridge on ``port`` whose own interface carries a machine's underlay address.

        Open vSwitch's userspace tunnels leave through the bridge that holds
        the route to the remote endpoint; a plain learning switch (standalone
        fail mode) is all the underlay needs.
        """
        self.vsctl("--may-exist", "add-br", bridge, "--", "set", "bridge", bridge, "datapath_type=netdev",
                   "other-config:disable-in-band=true", "--", "set", "interface", bridge, f"mtu_request={mtu}",
                   "--", "--may-exist", "add-port", bridge, port)

    def ofports(self, bridge: str) -> dict[str, int]:
        """Port name -> OpenFlow port number of the bridge (the bridge's own port excluded), read over OVSDB."""
        return ovsdb.bridge_ofports(self.db_sock, bridge)

    def replace_flows(self, bridge: str, flows: str) -> None:
        """Make ``flows`` (one a line) the bridge's whole flow table in one OpenFlow bundle (atomic)."""
        with self._ofctl():
            self.openflow(bridge).replace_flows(flows.splitlines())

    def dump_flows(self, bridge: str) -> list[str]:
        """The bridge's flows, one ovs-ofctl line each, port numbers not names."""
        with self._ofctl():
            return self.openflow(bridge).dump_flows()

    def port_stats(self, bridge: str) -> dict[int, PortStats]:
        """OpenFlow port counters by port number (LOCAL left out)."""
        with self._ofctl():
            return self.openflow(bridge).port_stats()


def _read_pid(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _is_ours(pid: int, daemon: str, home: Path) -> bool:
    """Whether ``pid`` still is ``daemon`` started for ``home`` (a pid may have been reused)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not argv or not argv[0].endswith(daemon.encode()):
        return False
    # --detach forks a monitor-less daemon whose argv is ours: it names our home.
    return any(str(home).encode() in a for a in argv[1:])


def _kill(pid: int, timeout: float) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return
        time.sleep(0.01)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True
