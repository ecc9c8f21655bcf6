"""nat-control edits are cheap: they never read the session table."""

from __future__ import annotations

from natmig.agent.datastore import Datastore, EditRequest
from natmig.agent.provider import MemoryProvider, Snapshot
from natmig.codec import default_codec
from natmig.model import NatSession


class CountingProvider(MemoryProvider):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.lists = 0

    def list(self) -> Snapshot:
        self.lists += 1
        return super().list()


def test_admission_edit_on_running_does_not_read_the_table() -> None:
    p = CountingProvider(owned={"203.0.113.1"})
    p.apply([NatSession("UDP", "10.0.0.2", 5000, "198.51.100.1", 53, "203.0.113.1", 20000)])
    ds = Datastore(p, default_codec())
    ds.edit("running", EditRequest(control={"admit-new-sessions": False}, control_operation="merge"), sid=1)
    assert p.admission() is False
    assert p.lists == 0, "a nat-control edit read the whole session table"
    ds.edit("running", EditRequest(control={"admit-new-sessions": True}, control_operation="merge"), sid=1)
    assert p.admission() is True and len(p.table) == 1
