"""OpenFlow on an Open vSwitch bridge through ``ovs-ofctl``: the one place natmig runs it.

The controller's steering (:mod:`natmig.controller.steering`) and the
testbed's switch (:mod:`natmig.testbed.ovs`) both apply flows planned by
:mod:`natmig.controller.plan` through :class:`Ofctl`: bundles (atomic: no
packet sees half a change), flow dumps, port counters.  Failures raise
:class:`natmig.netns.CommandError`, which each caller turns into its own
layer's error.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

from . import netns

#: The OpenFlow version bundles need (the testbed's bridges speak it).
OF14 = "OpenFlow14"
#: natmig's flows name ports by number.  Without this option ovs-ofctl, to
#: resolve names, first asks the switch for its port descriptions and, from
#: OpenFlow 1.3 on, for the features of all its 255 tables (a reply of ~1 MB):
#: ~12 ms of a ~17 ms flow change here, and the switch is moved inside the
#: migration's hold window.
NUMBERS_ONLY = ("--no-names",)


@dataclass(frozen=True)
class PortStats:
    """Packet and byte counters of one switch port, as OpenFlow reports them."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int


@dataclass(frozen=True)
class Ofctl:
    """``ovs-ofctl`` against one bridge.

    ``rundir`` is the OVS_RUNDIR of the daemons that own the bridge (a
    private Open vSwitch; None: the system's); ``netns`` the namespace to run
    ovs-ofctl in (None: the caller's; the bridge's unix socket is reachable
    from any); ``version`` the OpenFlow version to speak (None: ovs-ofctl's
    choice).
    """

    bridge: str
    rundir: str | os.PathLike[str] | None = None
    netns: str | None = None
    version: str | None = None

    def run(self, *args: str, input: str | None = None) -> str:
        """Run ``ovs-ofctl ARGS`` (the bridge is not added); its stdout."""
        env = {**os.environ, "OVS_RUNDIR": os.fspath(self.rundir)} if self.rundir is not None else None
        version = ["-O", self.version] if self.version else []
        return netns.run(["ovs-ofctl", *version, *args], self.netns, input=input, env=env).stdout

    def add_flows(self, flows: Sequence[str]) -> None:
        """Add (or replace, same match) ``flows`` in one bundle; the other flows stay."""
        with _flows_file(f"add {fl}" for fl in flows) as path:
            self.run(*NUMBERS_ONLY, "--bundle", "add-flows", self.bridge, path)

    def replace_flows(self, flows: Sequence[str]) -> None:
        """Make ``flows`` the bridge's whole flow table in one bundle."""
        with _flows_file(flows) as path:
            self.run(*NUMBERS_ONLY, "--bundle", "replace-flows", self.bridge, path)

    def dump_flows(self, match: str | None = None) -> list[str]:
        """The bridge's flows (those matching ``match``), one ovs-ofctl line each, port numbers not names."""
        out = self.run(*NUMBERS_ONLY, "--no-stats", "dump-flows", self.bridge, *([match] if match else []))
        return [line.strip() for line in out.splitlines() if line.strip() and "reply" not in line]

    def port_stats(self) -> dict[int, PortStats]:
        """OpenFlow port counters by port number (LOCAL left out)."""
        return parse_port_stats(self.run(*NUMBERS_ONLY, "dump-ports", self.bridge))


@contextmanager
def _flows_file(lines: Iterable[str]) -> Iterator[str]:
    """A temporary file holding ``lines`` whole before ovs-ofctl is started on it.

    Never stdin: ovs-ofctl applies whatever it read when its input ends, and
    a controller killed while writing a pipe would leave it a truncated table
    to apply as the switch's whole one (the fault suite caught a switch with
    no steering rule this way).  `-` is not accepted by every version either.
    """
    fd, path = tempfile.mkstemp(prefix="natmig-flows-", suffix=".txt")
    try:
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{line}\n" for line in lines))
        yield path
    finally:
        os.unlink(path)


_PORT = re.compile(r"port\s+(\d+):\s*rx pkts=(\d+), bytes=(\d+).*?tx pkts=(\d+), bytes=(\d+)", re.S)


def parse_port_stats(text: str) -> dict[int, PortStats]:
    """Parse ``ovs-ofctl dump-ports`` output into counters by port number."""
    stats = {}
    for block in re.split(r"\n(?=\s*port\s)", text):
        m = _PORT.search(block)
        if m:
            port, rxp, rxb, txp, txb = (int(g) for g in m.groups())
            stats[port] = PortStats(rx_packets=rxp, tx_packets=txp, rx_bytes=rxb, tx_bytes=txb)
    return stats
