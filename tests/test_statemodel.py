"""Any state module compiled (natmig.statemodel) and its XML (natmig.wire.state): lists, keys, unique, digest, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from natmig.errors import CodecError, SchemaError
from natmig.model import NatSession, table_digest
from natmig.statemodel import compile_fetched, load_module
from natmig.wire.state import Wire, read_admission, read_held, read_statistics

ROOT = Path(__file__).resolve().parent.parent
LB = ROOT / "examples" / "lb-binding.yang"
NC = "urn:ietf:params:xml:ns:netconf:base:1.0"
NS = "urn:natmig:yang:example:lb-binding"


def binding(client: str, port: int, backend: str = "198.51.100.10", snat: int = 5000, **extra: object) -> str:
    leaves = "".join(f"<{k.replace('_', '-')}>{v}</{k.replace('_', '-')}>" for k, v in extra.items())
    return (f'<binding xmlns="{NS}"><client-address>{client}</client-address><client-port>{port}</client-port>'
            f"<backend-address>{backend}</backend-address><backend-port>80</backend-port><snat-port>{snat}</snat-port>{leaves}</binding>")


def config(*entries: str) -> str:
    return f'<config xmlns="{NC}">{"".join(entries)}</config>'


def test_the_lists_keys_and_unique_come_from_the_module() -> None:
    m = load_module(LB)
    assert (m.name, m.revision) == ("lb-binding", "2026-12-03")
    b = m.list("binding")
    assert b.keys == ("client-address", "client-port")
    assert [s.name for s in b.leaves][:2] == ["client-address", "client-port"]  # keys first
    assert b.uniques == (("backend-address", "backend-port", "snat-port"),)
    assert m.list("backend").uniques == ()
    # what a client needs to compile it again: the module and what it imports
    assert set(m.texts) == {"lb-binding", "ietf-inet-types"}
    again = compile_fetched(m.texts, "lb-binding", "fetched")
    assert again.list("binding").uniques == b.uniques
    with pytest.raises(SchemaError, match="no state list 'nope'"):
        m.list("nope")


def test_the_generic_digest_of_nat_session_is_the_nat_agents_digest() -> None:
    lst = load_module(ROOT / "yang" / "nat-session.yang").list("nat-session")
    sessions = [NatSession("TCP", "10.0.0.2", p, "198.51.100.1", 80, "203.0.113.1", 20000 + p, "ESTABLISHED", 30) for p in range(50)]
    sessions.append(NatSession("UDP", "10.0.0.3", 53, "198.51.100.2", 53, "203.0.113.1", 999, None, 20, True, 7))
    assert lst.digest(dataclasses.astuple(s) for s in sessions) == table_digest(sessions)


def test_unique_clashes_are_named_by_both_entries() -> None:
    b = load_module(LB).list("binding")
    w = Wire([b])
    e1 = w.complete(b, w.decode(config(binding("192.0.2.1", 1))).edits[0].values)
    e2 = w.complete(b, w.decode(config(binding("192.0.2.2", 2))).edits[0].values)
    e3 = w.complete(b, w.decode(config(binding("192.0.2.3", 3, snat=5001))).edits[0].values)
    assert b.clashes([e1, e3]) == []
    [(key, why)] = b.clashes([e1, e2, e3])
    assert key == ("192.0.2.2", 2)
    assert "snat-port=5000 is already used by binding[192.0.2.1 1]" in why


def test_entries_round_trip_in_trim_mode() -> None:
    m = load_module(LB)
    w = Wire(m.lists)
    b = m.list("binding")
    e = w.complete(b, w.decode(config(binding("192.0.2.1", 1, idle_timeout=30))).edits[0].values)
    assert e == ("192.0.2.1", 1, "198.51.100.10", 80, 5000, 30)
    text = Wire.entries_xml(b, [e])
    assert w.entries(f'<data xmlns="{NC}">{text}</data>', b) == [e]
    backend = m.list("backend")
    be = w.complete(backend, {"address": "198.51.100.10", "port": 80})
    assert be == ("198.51.100.10", 80, 1)  # the default weight
    assert "<weight>" not in Wire.entries_xml(backend, [be])
    assert "<weight>1</weight>" in Wire.entries_xml(backend, [be], report_all=True)


@pytest.mark.parametrize("doc, words", [
    (config(binding("192.0.2.1", 70000)), "client-port: 70000 is not in range"),
    (config(binding("not-an-address", 1)), "client-address"),
    (config(f'<binding xmlns="{NS}"><client-port>1</client-port></binding>'), "client-address: missing key leaf"),
    (config(f'<binding xmlns="{NS}"><client-address>192.0.2.1</client-address><client-port>1</client-port><colour>red</colour></binding>'), "not a leaf of binding"),
    (config('<other xmlns="urn:example:other"/>'), "is not a module this node serves"),
    (config(binding("192.0.2.1", 1).replace("<binding ", f'<binding xmlns:nc="{NC}" nc:operation="frobnicate" ')), "operation 'frobnicate'"),
    (config(f'<state-control xmlns="urn:natmig:yang:natmig-state"><admit-new>maybe</admit-new></state-control>'), "not a boolean"),
])
def test_bad_documents_are_refused_whole_with_the_reason(doc: str, words: str) -> None:
    w = Wire(load_module(LB).lists)
    with pytest.raises(CodecError, match=words.replace("(", r"\(").replace("[", r"\[")):
        w.decode(doc)


def test_a_missing_mandatory_leaf_is_named() -> None:
    b = load_module(LB).list("binding")
    with pytest.raises(CodecError, match="backend-port: missing mandatory leaf"):
        Wire.complete(b, {"client-address": "192.0.2.1", "client-port": 1, "backend-address": "198.51.100.1", "snat-port": 9})


def test_statistics_and_admission_read_back() -> None:
    b = load_module(LB).list("binding")
    data = f'<data xmlns="{NC}">{Wire.statistics_xml([(b.qname, 3, "00000000000000ff")])}{Wire.control_xml(False)}</data>'
    assert read_statistics(data) == {"lb-binding:binding": (3, "00000000000000ff")}
    assert read_admission(data) is False
    assert read_admission(f'<data xmlns="{NC}">{Wire.control_xml(True)}</data>') is True  # trim: absent means open


def test_held_is_state_read_back_when_the_node_reports_it_and_none_when_it_does_not() -> None:
    assert read_held(f'<data xmlns="{NC}">{Wire.control_xml(False, held=3)}</data>') == 3
    trimmed = Wire.control_xml(True, held=0)  # admit-new at its default is left out, held is not
    assert "admit-new" not in trimmed and read_held(f'<data xmlns="{NC}">{trimmed}</data>') == 0
    assert read_admission(f'<data xmlns="{NC}">{trimmed}</data>') is True
    assert read_held(f'<data xmlns="{NC}">{Wire.control_xml(False)}</data>') is None
    with pytest.raises(CodecError, match="held"):
        read_held(f'<data xmlns="{NC}"><state-control xmlns="urn:natmig:yang:natmig-state"><held>x</held></state-control></data>')


def test_modules_the_engine_cannot_move_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yang"
    bad.write_text(LB.read_text().replace('unique "backend-address backend-port snat-port";', 'container extra { leaf x { type string; description "x"; } description "x"; }'))
    with pytest.raises(SchemaError, match="container extra: a state list may hold leaves only"):
        load_module(bad)
    pyang_error = tmp_path / "typo.yang"
    pyang_error.write_text(LB.read_text().replace('unique "backend-address backend-port snat-port";', 'unique "backend-address nope";'))
    with pytest.raises(SchemaError, match="nope"):
        load_module(pyang_error)
    none = tmp_path / "empty.yang"
    none.write_text('module empty { yang-version 1.1; namespace "urn:e"; prefix e; container c { leaf l { type string; } } }')
    with pytest.raises(SchemaError, match="has no state list"):
        load_module(none)
    with pytest.raises(SchemaError, match="cannot read"):
        load_module(tmp_path / "missing.yang")


_ODD_DOCS = {
    "plain": [binding("10.0.0.1", 1), binding("10.0.0.2", 2, snat=5001)],
    "a bad value": [binding("10.0.0.1", 1), binding("10.0.0.300", 2)],
    "an unknown leaf": [binding("10.0.0.1", 1), binding("10.0.0.2", 2).replace("</binding>", "<colour>red</colour></binding>")],
    "a leaf twice": [binding("10.0.0.1", 1).replace("</binding>", "<snat-port>7</snat-port></binding>")],
    "a comment": [binding("10.0.0.1", 1).replace("<snat-port>", "<!-- x --><snat-port>")],
    "no key": [binding("10.0.0.1", 1).replace("<client-port>1</client-port>", "")],
    "another namespace": [binding("10.0.0.1", 1).replace("<snat-port>", '<snat-port xmlns="urn:other">')],
    "a leaf operation": [binding("10.0.0.1", 1).replace("<snat-port>", f'<snat-port xmlns:nc="{NC}" nc:operation="delete">')],
}


@pytest.mark.parametrize("case", list(_ODD_DOCS))
def test_the_plain_leaves_path_decodes_exactly_as_the_general_one(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    m = load_module(LB)
    doc = config(*_ODD_DOCS[case])

    def outcome() -> object:
        try:
            return Wire(m.lists).decode(doc)
        except CodecError as e:
            return str(e)

    fast = outcome()
    monkeypatch.setattr(Wire, "_plain_leaves", staticmethod(lambda *a: None))
    assert fast == outcome()
    if case == "plain":
        assert not isinstance(fast, str) and len(fast.edits) == 2  # type: ignore[attr-defined]


def test_the_same_fetched_texts_compile_once_and_other_texts_anew() -> None:
    from natmig.statemodel import compile_fetched

    text = LB.read_text()
    first = compile_fetched({"lb-binding": text}, "lb-binding", "a")
    assert compile_fetched({"lb-binding": text}, "lb-binding", "b") is first  # the other agent of the move: no compile
    other = compile_fetched({"lb-binding": text.replace('description', 'reference', 1)}, "lb-binding", "c")
    assert other is not first and [(l.name, l.keys) for l in other.lists] == [(l.name, l.keys) for l in first.lists]
