"""The typed single-entry API (pyangbind) and the bulk codec agree."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from natmig.errors import CodecError
from natmig.model import NatSession
from natmig.typed import from_binding, new_root, to_binding

from .strategies import tables


@settings(max_examples=25, deadline=None)
@given(tables)
def test_tables_survive_the_bindings(table: list[NatSession]) -> None:
    assert sorted(from_binding(to_binding(table)), key=lambda s: s.key) == sorted(table, key=lambda s: s.key)


def test_bindings_refuse_a_bad_leaf_by_name() -> None:
    bad = NatSession("UDP", "10.0.0.1", 53, "198.51.100.1", 53, "203.0.113.1", 70000)
    with pytest.raises(CodecError, match=r"nat-session\[UDP 10.0.0.1 53 198.51.100.1 53\]/translated_port"):
        to_binding([bad])


def test_empty_root_is_an_empty_table() -> None:
    assert from_binding(new_root()) == []
