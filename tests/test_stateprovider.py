"""The in-memory state provider: O(K) writes proven equal to the whole-table rule they replace (random changes)."""

from __future__ import annotations

import random

import pytest

from natmig.agent.stateprovider import Change, MemoryStateProvider, StateProvider, StateRefused
from natmig.statemodel import load_module
from natmig.wire.state import Wire

from .test_statemodel import LB

MODULE = load_module(LB)
LST = MODULE.list("binding")


def entry(client: int, backend: int, snat: int):
    return Wire.complete(LST, {"client-address": f"10.0.0.{client}", "client-port": 1000, "backend-address": f"198.51.100.{backend}",
                               "backend-port": 80, "snat-port": snat})


def reference(table: dict, ch: Change) -> tuple[dict, list] | None:
    """The whole-table rule: the list after the change, unless unique is broken anywhere in it (None)."""
    after = dict(table)
    for k in ch.deletes:
        after.pop(k, None)
    for e in ch.upserts:
        after[LST.key_of(e)] = e
    if LST.clashes(after.values()):
        return None
    events = [("deleted", e) for k, e in table.items() if after.get(k) != e] + [("created", e) for k, e in after.items() if table.get(k) != e]
    return after, events


@pytest.mark.parametrize("seed", range(20))
def test_random_changes_give_what_the_whole_table_rule_gives(seed: int) -> None:
    rnd = random.Random(seed)
    p = MemoryStateProvider(MODULE)
    seen: list = []
    p.on_change = lambda lst, ev, e: seen.append((ev, e))  # type: ignore[method-assign, assignment]
    table: dict = {}
    refused = 0
    for _ in range(60):
        # Few clients, backends and ports: keys and unique values collide often.
        ups = [entry(rnd.randint(1, 8), rnd.randint(1, 2), rnd.randint(1, 6)) for _ in range(rnd.randint(0, 4))]
        dels = [LST.key_of(entry(rnd.randint(1, 8), 1, 1)) for _ in range(rnd.randint(0, 3))]
        ch = Change(ups, dels)
        want = reference(table, ch)
        plan: dict = {k: None for k in dels} | {LST.key_of(e): e for e in ups}
        # The datastore's check of a candidate: indexed, it agrees with the whole-list rule.
        assert bool(p.unique_clashes(LST, plan)) == bool(StateProvider.unique_clashes(p, LST, plan)) == (want is None)
        seen.clear()
        if want is None:
            with pytest.raises(StateRefused, match="unique"):
                p.apply({LST: ch})
            refused += 1
        else:
            p.apply({LST: ch})
            table, events = want
            assert sorted(seen, key=repr) == sorted(events, key=repr)
        assert p.read()[LST] == table
        (_, (name, count, digest)) = p.statistics()
        assert (name, count, digest) == (LST.qname, len(table), LST.digest(table.values()))
    assert refused  # the random changes did exercise refusals
