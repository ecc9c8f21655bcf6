"""A document of plain entries read as one completed run: the same request, the same plan, as entries one by one.

The canonical reader completes the entries of a document that all carry one
start tag (``CompletedRun``), and plan_edit writes those sessions whole when
the datastore holds none of their keys.  Everything here compares that path
with the entries one by one (the reader's list, ``Codec.complete`` and the
planner's loop), which test_agent_canonical compares with lxml.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natmig.agent.editplan import plan_edit
from natmig.codec import default_codec
from natmig.editentry import CompletedRun, EditEntry
from natmig.model import FIELD_NAMES, NatSession
from natmig.wire import natread
from natmig.wire.problems import EditRequest

from .strategies import tables
from .test_agent_canonical import entries_text, rpc_message, table_of

CODEC = default_codec()
NETCONF = "{urn:ietf:params:xml:ns:netconf:base:1.0}"


def request(table: list[NatSession], ops: list[str | None] | None = None) -> EditRequest:
    """The edit-config of ``table`` as the canonical reader decodes it."""
    got = natread.parse_canonical(CODEC, rpc_message(entries_text(table, ops)))
    assert got is not None
    return got[1].req


def general(table: list[NatSession], ops: list[str | None] | None = None) -> list[EditEntry]:
    """The same entries as the general reader (lxml) decodes them."""
    root = natread.etree.fromstring(rpc_message(entries_text(table, ops)))
    return natread.edit_request(CODEC, root.find(f"{NETCONF}edit-config/{NETCONF}config")).entries


@settings(max_examples=80, deadline=None)
@given(table=tables.filter(bool), op=st.sampled_from([None, "merge", "create", "replace", "delete", "remove"]))
def test_entries_of_one_start_tag_come_as_a_run_equal_to_them_one_by_one(table: list[NatSession], op: str | None) -> None:
    req = request(table, [op])
    run = req.run
    assert run is not None and run.operation == op and req.entry_count == len(table)
    assert run.keys == [s.key for s in table] == req.keys()
    one_by_one = general(table, [op])
    assert run.entries() == one_by_one
    # Each session is what Codec.complete makes of the entry's leaves.
    assert run.sessions == [CODEC.complete(e.values) for e in one_by_one]
    # Asked one by one, the request expands the run once, into the same entries.
    assert req.entries == one_by_one and req.run is None and req.entries is req.entries


@pytest.mark.parametrize("case", ["two operations", "tcp_state on UDP", "translated_port missing"])
def test_other_documents_come_one_by_one(case: str) -> None:
    table = table_of(6)
    udp = next(s for s in table if s.protocol == "UDP")
    text = entries_text(table, ["merge", "create"] if case == "two operations" else None)
    if case == "tcp_state on UDP":
        port = f"<translated_port>{udp.translated_port}</translated_port>"
        text = text.replace(port, port + "<tcp_state>CLOSE</tcp_state>")
    elif case == "translated_port missing":
        text = text.replace(f"<translated_port>{table[1].translated_port}</translated_port>", "")
    got = natread.parse_canonical(CODEC, rpc_message(text))
    assert got is not None
    req = got[1].req
    # Read one by one, so that the planner's complete names what is wrong with an entry (test_agent_canonical).
    assert req.run is None and len(req.entries) == len(table)


@st.composite
def given_columns(draw: st.DrawFn) -> tuple[list[dict], list[list]]:
    """Entries' given leaves (optional ones dropped at random, now and then a mandatory one or a leaf outside its when)."""
    rows = []
    for s in draw(tables.filter(bool)):
        values = {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None}
        for n in draw(st.lists(st.sampled_from(["tcp_state", "timeout", "assured", "mark", "translated_port"]), max_size=2)):
            values.pop(n, None)
        if draw(st.integers(0, 20)) == 0:
            values["tcp_state"] = "ESTABLISHED"  # on UDP or ICMP: outside its when
        rows.append(values)
    return rows, [[r.get(n) for r in rows] for n in FIELD_NAMES]


@settings(max_examples=150, deadline=None)
@given(data=given_columns())
def test_complete_columns_is_complete_of_each_entry(data: tuple[list[dict], list[list]]) -> None:
    rows, columns = data
    one_by_one = []
    for values in rows:
        try:
            one_by_one.append(CODEC.complete(values))
        except Exception:  # noqa: BLE001 - CodecError: this entry is not complete alone
            one_by_one.append(None)
    done = CODEC.complete_columns(columns)
    if None in one_by_one:
        assert done is None
    else:
        assert done is not None and [NatSession(*row) for row in zip(*done)] == one_by_one


def _outcome(plan) -> tuple:
    return plan.upserts, plan.deletes, plan.control, plan.problems


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=tables.filter(bool), held=st.integers(0, 3), op=st.sampled_from([None, "merge", "create", "replace", "delete", "remove"]),
       default=st.sampled_from(["merge", "replace", "none"]), list_op=st.sampled_from([None, "remove", "delete"]))
def test_a_run_plans_as_its_entries_one_by_one(table: list[NatSession], held: int, op: str | None, default: str, list_op: str | None) -> None:
    # ``held``: 0 the datastore holds none of the keys (the run goes whole), 1 some, 2 another session, 3 all.
    other = table_of(1, start=500)
    current = {0: [], 1: table[: len(table) // 2 + 1], 2: other, 3: table}[held]
    run_req = request(table, [op])
    assert run_req.run is not None
    run_req.list_operation = list_op
    entries_req = EditRequest(entries=general(table, [op]), list_operation=list_op)
    base = {s.key: s for s in current}
    assert _outcome(plan_edit(CODEC, dict(base), None, run_req, default)) == _outcome(plan_edit(CODEC, dict(base), None, entries_req, default))


def test_new_entries_of_a_run_are_written_without_completing_them_again(monkeypatch: pytest.MonkeyPatch) -> None:
    table = table_of(50)
    req = request(table)

    def refuse(values):  # the loop's per-entry completion: not what a whole run takes
        raise AssertionError("completed one by one")

    monkeypatch.setattr(CODEC, "complete", refuse)
    plan = plan_edit(CODEC, {}, None, req, "merge")
    assert plan.upserts == {s.key: s for s in table} and not plan.problems and not plan.deletes


def test_a_request_with_a_run_counts_clears_and_compares_as_its_entries() -> None:
    table = table_of(5)
    req = request(table)
    same = EditRequest(entries=general(table))
    assert req.entry_count == 5 and req.keys() == [s.key for s in table]
    assert req == same  # compares entries one by one (and expands the run)
    req = request(table)
    req.clear_entries()
    assert req.entry_count == 0 and req.entries == [] and req.run is None and req.keys() == []
    run = CompletedRun(None, [], [], [[] for _ in FIELD_NAMES])
    assert len(run) == 0 and run.entries() == [] and EditRequest(run=run).entry_count == 0
