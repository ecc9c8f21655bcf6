"""The session record and the table digest of nat-statistics."""

from __future__ import annotations

import dataclasses
import random

from hypothesis import given, settings

from natmig.model import KEY_OF, REPLY_KEY_OF, NatSession, table_digest

from .strategies import tables


@settings(max_examples=40, deadline=None)
@given(tables)
def test_digest_ignores_order(table: list[NatSession]) -> None:
    shuffled = list(table)
    random.Random(3).shuffle(shuffled)
    assert table_digest(shuffled) == table_digest(table)


@settings(max_examples=40, deadline=None)
@given(tables)
def test_digest_sees_a_missing_session_and_a_changed_mapping(table: list[NatSession]) -> None:
    if not table:
        assert table_digest(table) == "0000000000000000"
        return
    d = table_digest(table)
    assert table_digest(table[1:]) != d
    moved = dataclasses.replace(table[0], translated_port=(table[0].translated_port + 1) % 65536)
    assert table_digest([moved, *table[1:]]) != d


def test_digest_is_the_documented_function() -> None:
    # SHA-256("TCP 10.0.0.1 2526 203.0.113.100 80 203.0.113.79 5678")[:8], as the module describes.
    import hashlib

    s = NatSession("TCP", "10.0.0.1", 2526, "203.0.113.100", 80, "203.0.113.79", 5678)
    want = hashlib.sha256(b"TCP 10.0.0.1 2526 203.0.113.100 80 203.0.113.79 5678").hexdigest()[:16]
    assert table_digest([s]) == want
    assert table_digest([s, s]) == "0000000000000000"  # XOR: a table holds a key once


@settings(max_examples=40, deadline=None)
@given(tables)
def test_the_key_getters_are_the_key_properties(table: list[NatSession]) -> None:
    # Batch passes use the getters (C), everything else the properties: they must give the same tuples.
    assert list(map(KEY_OF, table)) == [s.key for s in table]
    assert list(map(REPLY_KEY_OF, table)) == [s.reply_key for s in table]
