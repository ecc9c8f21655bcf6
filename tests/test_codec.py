"""The bulk codec: round trips, every class of bad input, and nothing partial."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings

from natmig.codec import NETCONF_NS, default_codec, decode_json, decode_xml, encode_json, encode_xml
from natmig.errors import CodecError
from natmig.model import NatSession

from .strategies import tables

NS = "urn:natmig:yang:nat-session"

# The seed slides' example session, with a destination added (the key is the
# 5-tuple) and its public address moved into a documentation range.
SEED = NatSession("TCP", "10.0.0.1", 2526, "203.0.113.100", 80, "203.0.113.79", 5678, "ESTABLISHED")
SEED_XML = (
    f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><src_address>10.0.0.1</src_address>'
    "<src_port>2526</src_port><dst_address>203.0.113.100</dst_address><dst_port>80</dst_port>"
    "<translated_address>203.0.113.79</translated_address><translated_port>5678</translated_port>"
    "</nat-session>"
)
SEED_JSON = {
    "nat-session:nat-session": [
        {
            "protocol": "TCP", "src_address": "10.0.0.1", "src_port": 2526,
            "dst_address": "203.0.113.100", "dst_port": 80,
            "translated_address": "203.0.113.79", "translated_port": 5678,
        }
    ]
}


def entry(**leaves: object) -> str:
    """An XML list entry with the seed's leaves, overridden (None drops a leaf)."""
    base = {
        "protocol": "TCP", "src_address": "10.0.0.1", "src_port": "2526", "dst_address": "203.0.113.100",
        "dst_port": "80", "translated_address": "203.0.113.79", "translated_port": "5678",
    }
    base.update(leaves)
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in base.items() if v is not None)
    return f'<nat-session xmlns="{NS}">{inner}</nat-session>'


def doc(*entries: str) -> bytes:
    return f'<data xmlns="{NETCONF_NS}">{"".join(entries)}</data>'.encode()


def test_seed_session_round_trips_through_xml() -> None:
    decoded = decode_xml(SEED_XML)
    assert len(decoded) == 1 and decoded[0].key == SEED.key
    assert decoded[0].tcp_state == "ESTABLISHED"  # the module's default for TCP
    assert decode_xml(encode_xml(decoded)) == decoded


def test_seed_session_round_trips_through_json() -> None:
    decoded = decode_json(json.dumps(SEED_JSON))
    assert decoded == decode_xml(SEED_XML)
    assert json.loads(encode_json(decoded)) == SEED_JSON  # trim mode: defaults omitted


def test_defaults_and_when() -> None:
    udp = decode_xml(entry(protocol="UDP"))[0]
    assert udp.tcp_state is None and udp.assured is False and udp.mark == 0 and udp.timeout is None


def test_ipv6_is_canonicalised() -> None:
    s = decode_xml(entry(src_address="2001:DB8:0:0::1"))[0]
    assert s.src_address == "2001:db8::1"


@settings(max_examples=60, deadline=None)
@given(tables)
def test_random_tables_round_trip_xml(table: list[NatSession]) -> None:
    assert decode_xml(encode_xml(table)) == table
    assert decode_xml(encode_xml(table, root="config")) == table


@settings(max_examples=60, deadline=None)
@given(tables)
def test_random_tables_round_trip_json(table: list[NatSession]) -> None:
    assert decode_json(encode_json(table)) == table
    assert decode_json(encode_json(table)) == decode_xml(encode_xml(table))


# (document, expected message fragment, expected NETCONF error-tag)
BAD_XML = {
    "bad address": (doc(entry(src_address="10.0.0.300")), "nat-session[TCP 10.0.0.300 2526 203.0.113.100 80]/src_address: '10.0.0.300' is not a valid inet:ip-address", "invalid-value"),
    "port out of range": (doc(entry(translated_port="70000")), "nat-session[TCP 10.0.0.1 2526 203.0.113.100 80]/translated_port: 70000 is not in range 0..65535", "invalid-value"),
    "port not a number": (doc(entry(src_port="http")), "/src_port: 'http' is not an integer", "invalid-value"),
    "unknown protocol": (doc(entry(protocol="SCTP")), "/protocol: 'SCTP' is not one of TCP, UDP, ICMP", "invalid-value"),
    "missing key": (doc(entry(dst_port=None)), "nat-session[TCP 10.0.0.1 2526 203.0.113.100 ?]/dst_port: missing key leaf", "missing-element"),
    "missing mandatory": (doc(entry(translated_port=None)), "nat-session[TCP 10.0.0.1 2526 203.0.113.100 80]/translated_port: missing mandatory leaf", "missing-element"),
    "unknown element": (doc(entry(colour="blue")), "/colour: unknown element in nat-session", "unknown-element"),
    "wrong namespace": (doc(entry().replace(f'xmlns="{NS}"', 'xmlns="urn:example:other"')), "expected 'urn:natmig:yang:nat-session'", "unknown-namespace"),
    "leaf in wrong namespace": (doc(entry().replace("<mark>", "").replace("</nat-session>", '<mark xmlns="urn:example:other">1</mark></nat-session>')), "/mark: element in namespace 'urn:example:other'", "unknown-namespace"),
    "duplicate keys": (doc(entry(), entry(translated_port="5679")), "nat-session[TCP 10.0.0.1 2526 203.0.113.100 80]: duplicate key", "bad-element"),
    "leaf twice": (doc(entry().replace("</nat-session>", "<mark>1</mark><mark>2</mark></nat-session>")), "/mark: appears more than once", "bad-element"),
    "tcp_state on UDP": (doc(entry(protocol="UDP", tcp_state="ESTABLISHED")), "/tcp_state: only allowed when protocol = 'TCP'", "unknown-element"),
    "malformed XML": (b"<data><nat-session>", "malformed XML", "malformed-message"),
    "empty document": (b"  ", "document: empty document", "malformed-message"),
    "state data": (doc(f'<nat-statistics xmlns="{NS}"><sessions>1</sessions></nat-statistics>'), "config false", "invalid-value"),
    "timeout zero": (doc(entry(timeout="0")), "/timeout: 0 is not in range 1..4294967295", "invalid-value"),
    "boolean": (doc(entry(assured="yes")), "/assured: 'yes' is not true or false", "invalid-value"),
}


@pytest.mark.parametrize("case", sorted(BAD_XML))
def test_bad_xml_is_refused_with_its_reason(case: str) -> None:
    data, message, tag = BAD_XML[case]
    with pytest.raises(CodecError) as ei:
        decode_xml(data)
    errors = ei.value.errors
    assert any(message in str(e) for e in errors), [str(e) for e in errors]
    assert any(e.tag == tag for e in errors if message in str(e)), [(str(e), e.tag) for e in errors]


def _json_doc(**leaves: object) -> str:
    e = dict(SEED_JSON["nat-session:nat-session"][0])
    for k, v in leaves.items():
        if v is None:
            e.pop(k)
        else:
            e[k] = v
    return json.dumps({"nat-session:nat-session": [e]})


BAD_JSON = {
    "bad address": (_json_doc(dst_address="203.0.113"), "/dst_address: '203.0.113' is not a valid inet:ip-address"),
    "port out of range": (_json_doc(src_port=65536), "/src_port: 65536 is not in range 0..65535"),
    "port as string": (_json_doc(src_port="2526"), "/src_port: '2526' is not a JSON integer"),
    "unknown protocol": (_json_doc(protocol="GRE"), "/protocol: 'GRE' is not one of TCP, UDP, ICMP"),
    "missing key": (_json_doc(protocol=None), "nat-session[? 10.0.0.1 2526 203.0.113.100 80]/protocol: missing key leaf"),
    "missing mandatory": (_json_doc(translated_address=None), "/translated_address: missing mandatory leaf"),
    "unknown element": (_json_doc(colour="blue"), "/colour: unknown element"),
    "wrong module": (json.dumps({"other:nat-session": []}), "unknown module 'other'"),
    "duplicate keys": (json.dumps({"nat-session:nat-session": SEED_JSON["nat-session:nat-session"] * 2}), "duplicate key"),
    "malformed JSON": ('{"nat-session:nat-session": [', "malformed JSON"),
    "empty document": ("", "empty document"),
    "not an object": ("[1, 2]", "top level must be a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_bad_json_is_refused_with_its_reason(case: str) -> None:
    data, message = BAD_JSON[case]
    with pytest.raises(CodecError) as ei:
        decode_json(data)
    assert any(message in str(e) for e in ei.value.errors), [str(e) for e in ei.value.errors]


def test_all_errors_of_a_document_are_collected_up_to_a_limit() -> None:
    bad = [entry(src_port=str(1000 + i), translated_port="99999") for i in range(30)]
    with pytest.raises(CodecError) as ei:
        decode_xml(doc(entry(), *bad))
    assert len(ei.value.errors) == 30
    with pytest.raises(CodecError) as ei:
        decode_xml(doc(*bad), limit=10)
    assert len(ei.value.errors) == 10 and ei.value.more == 20
    assert "and 20 more errors" in str(ei.value)


def test_nothing_partial_is_returned() -> None:
    # 999 good entries and one bad one: the whole document is refused.
    good = [entry(src_port=str(i)) for i in range(999)]
    with pytest.raises(CodecError) as ei:
        decode_xml(doc(*good, entry(src_port="1000", protocol="XTP")))
    assert len(ei.value.errors) == 1


def test_edit_entries_carry_operations_and_only_present_leaves() -> None:
    c = default_codec()
    data = (
        f'<config xmlns="{NETCONF_NS}" xmlns:nc="{NETCONF_NS}">'
        + entry().replace("<nat-session ", '<nat-session nc:operation="create" ')
        + entry(src_port="1", translated_port=None, translated_address=None).replace("<nat-session ", '<nat-session nc:operation="delete" ')
        + "</config>"
    )
    edits = c.decode_edit_xml(data)
    assert [e.operation for e in edits] == ["create", "delete"]
    assert edits[1].key == ("TCP", "10.0.0.1", 1, "203.0.113.100", 80)
    assert "translated_port" not in edits[1].values
    with pytest.raises(CodecError, match="unknown operation 'frobnicate'"):
        c.decode_edit_xml(data.replace('"create"', '"frobnicate"'))


def test_control_and_events_round_trip() -> None:
    c = default_codec()
    assert c.decode_control_xml(c.encode_control_xml({"admit-new-sessions": False})) == {"admit-new-sessions": False}
    assert c.decode_event_xml(c.encode_event_xml("destroyed", SEED)) == ("destroyed", SEED)
