"""plan_edit and Codec.complete: the shortcut for new entries changes no outcome."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.agent.datastore import EditRequest
from natmig.agent.editplan import plan_edit
from natmig.codec import EditEntry, default_codec
from natmig.errors import CodecError
from natmig.model import FIELD_NAMES, NatSession

from .strategies import sessions

CODEC = default_codec()
A = NatSession("TCP", "10.0.0.2", 1000, "198.51.100.1", 80, "203.0.113.1", 20000, "SYN_SENT", 100, True, 3)
B = NatSession("UDP", "10.0.0.3", 53, "198.51.100.2", 53, "203.0.113.1", 21000, None, 30)
C = NatSession("TCP", "10.0.0.4", 1001, "198.51.100.1", 80, "203.0.113.1", 20001, "ESTABLISHED", 7, True, 5)


def entry(s: NatSession, op: str | None = None, drop: tuple[str, ...] = (), **extra: Any) -> EditEntry:
    values = {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None and n not in drop}
    values.update(extra)
    return EditEntry(op, s.key, values)


def plan(current: list[NatSession], entries: list[EditEntry], default: str = "merge", list_op: str | None = None):
    return plan_edit(CODEC, {s.key: s for s in current}, {"admit-new-sessions": True}, EditRequest(entries=entries, list_operation=list_op), default)


def test_default_operation_replace_keeps_named_entries_and_deletes_the_rest() -> None:
    p = plan([A, B], [entry(A), entry(C)], default="replace")
    assert p.upserts == {C.key: C} and p.deletes == {B.key} and not p.problems


@pytest.mark.parametrize("op", ["merge", "replace", "create", None])
def test_new_complete_entry_is_written_as_completed(op: str | None) -> None:
    p = plan([], [entry(C, op, drop=("tcp_state",))])
    assert p.upserts == {C.key: C} and not p.problems  # tcp_state: the module's default for TCP


def test_merge_over_an_existing_entry_keeps_its_other_leaves() -> None:
    p = plan([A], [EditEntry("merge", A.key, {"translated_port": 20005})])
    assert p.upserts[A.key] == NatSession(*[20005 if n == "translated_port" else getattr(A, n) for n in FIELD_NAMES])


def test_existing_and_missing_entries() -> None:
    p = plan([A], [entry(A, "create"), entry(B, "delete"), entry(C, "remove")])
    assert sorted(pr.tag for pr in p.problems) == ["data-exists", "data-missing"] and not p.upserts and not p.deletes
    assert plan([A], [entry(A, "merge")]).upserts == {}  # unchanged: nothing to write


@pytest.mark.parametrize("op", ["merge", "replace", "create"])
def test_new_entries_missing_a_mandatory_leaf_or_breaking_when_are_refused(op: str) -> None:
    p = plan([], [entry(C, op, drop=("translated_port",)), entry(B, op, tcp_state="CLOSE")])
    assert [(pr.tag, pr.leaf) for pr in p.problems] == [("missing-element", "translated_port"), ("unknown-element", "tcp_state")]
    assert not p.upserts


def test_whole_list_delete_with_an_entry_rewrites_it() -> None:
    p = plan([A, B], [entry(A, "merge", drop=("mark",))], list_op="remove")
    assert p.deletes == {B.key} and p.upserts == {A.key: NatSession(*[0 if n == "mark" else getattr(A, n) for n in FIELD_NAMES])}


def _complete_reference(values: dict[str, Any]) -> NatSession | list[tuple[str, str, str]]:
    """Codec.complete as it was before its shortcut (the general path, spelled out)."""
    problems = []
    path = CODEC._path(values)
    for m in CODEC._mandatory:
        if m not in values:
            problems.append((path, m, "missing-element"))
    row = dict(CODEC._defaults)
    for lname, (cond, want) in CODEC._when:
        if values.get(cond) != want:
            if lname in values:
                problems.append((path, lname, "unknown-element"))
            row[lname] = None
    row.update(values)
    return problems or NatSession(*[row[n] for n in FIELD_NAMES])


@settings(max_examples=300, deadline=None)
@given(s=sessions(), drop=st.sets(st.sampled_from(FIELD_NAMES)), state=st.sampled_from([None, "CLOSE", "ESTABLISHED"]))
def test_complete_agrees_with_the_general_path(s: NatSession, drop: set[str], state: str | None) -> None:
    values = {n: v for n in FIELD_NAMES if (v := getattr(s, n)) is not None and n not in drop}
    if state is not None:
        values["tcp_state"] = state
    want = _complete_reference(values)
    try:
        got: Any = CODEC.complete(values)
    except CodecError as e:
        got = [(f.path, f.leaf, f.tag) for f in e.errors]
    assert got == want
