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


class AdmissionCountingProvider(CountingProvider):
    def __post_init__(self) -> None:
        super().__post_init__()
        self.admission_reads = 0
        self.refuse_apply = False

    def admission(self) -> bool:
        self.admission_reads += 1
        return super().admission()

    def apply(self, sessions, before_create=None) -> None:
        from natmig.agent.provider import ApplyError

        if self.refuse_apply and sessions:
            raise ApplyError({sessions[0].key: "kernel refused to create it"})
        super().apply(sessions, before_create)


S1 = NatSession("UDP", "10.0.0.2", 5000, "198.51.100.1", 53, "203.0.113.1", 20000)
S2 = NatSession("UDP", "10.0.0.3", 5000, "198.51.100.1", 53, "203.0.113.1", 20001)


def test_an_admission_edit_reads_the_admission_once() -> None:
    p = AdmissionCountingProvider(owned={"203.0.113.1"})
    ds = Datastore(p, default_codec())
    ds.edit("running", EditRequest(control={"admit-new-sessions": False}, control_operation="merge"), sid=1)
    assert p.admission_reads == 1 and p.admit is False


def test_a_commit_that_only_writes_does_not_read_the_admission() -> None:
    from natmig.codec import EditEntry

    p = AdmissionCountingProvider(owned={"203.0.113.1"})
    ds = Datastore(p, default_codec())
    ds.edit("candidate", EditRequest(entries=[EditEntry("merge", S1.key, {n: getattr(S1, n) for n in ("protocol", "src_address", "src_port", "dst_address", "dst_port", "translated_address", "translated_port")})]), sid=1)
    reads = p.admission_reads  # the candidate's copy of nat-control
    ds.commit(sid=1)
    assert p.admission_reads == reads and S1.key in p.table


def test_a_refused_write_puts_the_admission_back() -> None:
    from natmig.agent.datastore import DatastoreError
    from natmig.codec import EditEntry

    p = AdmissionCountingProvider(owned={"203.0.113.1"})
    ds = Datastore(p, default_codec())
    p.refuse_apply = True
    values = {n: getattr(S2, n) for n in ("protocol", "src_address", "src_port", "dst_address", "dst_port", "translated_address", "translated_port")}
    req = EditRequest(entries=[EditEntry("merge", S2.key, values)], control={"admit-new-sessions": False}, control_operation="merge")
    try:
        ds.edit("running", req, sid=1)
    except DatastoreError as e:
        assert "refused" in str(e)
    else:
        raise AssertionError("the refused write was reported as applied")
    assert p.admit is True and S2.key not in p.table
