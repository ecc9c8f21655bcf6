"""Reading the switch's configuration database with Open vSwitch's own library.

The OVSDB IDL of the `ovs` package keeps typed rows in step with the
database; natmig uses it for questions about the bridge (which OpenFlow port
number each interface got) instead of parsing ovs-vsctl's text output.
Writes stay with ovs-vsctl: one transaction per bridge set-up, done once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import ovs.db.idl
import ovs.poller

from ..errors import TestbedError

#: The schema the Debian package installs (the daemons were created from it).
SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")

_COLUMNS = {
    "Bridge": ["name", "ports"],
    "Port": ["name", "interfaces"],
    "Interface": ["name", "ofport"],
}


@contextmanager
def replica(db_sock: Path, timeout: float = 5.0) -> Iterator[ovs.db.idl.Idl]:
    """An IDL replica of the bridge tables, filled with the database's current contents."""
    helper = ovs.db.idl.SchemaHelper(location=str(SCHEMA))
    for table, columns in _COLUMNS.items():
        helper.register_columns(table, columns)
    idl = ovs.db.idl.Idl(f"unix:{db_sock}", helper)
    try:
        seqno = idl.change_seqno
        deadline = time.monotonic() + timeout
        while idl.change_seqno == seqno:
            if time.monotonic() > deadline:
                raise TestbedError(f"no answer from ovsdb-server at {db_sock} within {timeout} s")
            idl.run()
            poller = ovs.poller.Poller()
            idl.wait(poller)
            # A bare block() can wait forever if the first snapshot was already
            # consumed by run(); the timer bounds each wait.
            poller.timer_wait(100)
            poller.block()
        yield idl
    finally:
        idl.close()


def bridge_ofports(db_sock: Path, bridge: str) -> dict[str, int]:
    """Interface name -> OpenFlow port number, for the interfaces of ``bridge`` only.

    The bridge's own internal interface and interfaces not yet given a number
    are left out.
    """
    with replica(db_sock) as idl:
        for br in idl.tables["Bridge"].rows.values():
            if br.name != bridge:
                continue
            out = {}
            for port in br.ports:
                for iface in port.interfaces:
                    numbers = iface.ofport  # optional column: [] or [n]
                    if iface.name != bridge and numbers and numbers[0] > 0:
                        out[iface.name] = numbers[0]
            return out
    raise TestbedError(f"bridge {bridge!r} is not in the database at {db_sock}")
