"""Odd but legal input, and hostile values, at the RPC layer: each gets a proper reply, never "internal error"."""

from __future__ import annotations

import time

import pytest
from lxml import etree

from natmig.agent.monitoring import SessionRecord
from natmig.agent.rpc import SessionState, handle_message
from natmig.wire.natread import parse_message
from natmig.wire.xmlbounds import TooManyElements
from natmig.codec import NETCONF_NS

from .test_agent_rpc import NC, NS, FakeServer, call, edit, errors, srv  # noqa: F401 - srv is a fixture

XML_LANG = "{http://www.w3.org/XML/1998/namespace}lang"


def _entry(port: str, translated: str = "20001") -> str:
    return (f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>{port}</src_port>'
            f"<dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><translated_address>203.0.113.1</translated_address>"
            f"<translated_port>{translated}</translated_port></nat-session>")


def test_white_space_before_the_xml_declaration_is_accepted(srv: FakeServer) -> None:
    # scrapli-netconf sends "\n<?xml ...?>": framing leaves the newline in front.
    sess = SessionState(SessionRecord(1, "natmig", "127.0.0.1", time.time()))
    msg = f'\n \t<?xml version="1.0" encoding="UTF-8"?><rpc xmlns="{NETCONF_NS}" message-id="5"><get/></rpc>'.encode()
    r = etree.fromstring(handle_message(srv, sess, msg))
    assert r.get("message-id") == "5" and r.find(NC + "data") is not None


def test_xml_prefixed_attributes_of_rpc_are_echoed_well_formed(srv: FakeServer) -> None:
    r = call(srv, "<get-config><source><running/></source></get-config>",
             ' message-id="3" xml:lang="de" xml:space="preserve" xmlns:x="urn:x" x:tag="t&amp;&quot;"')
    assert r.get("message-id") == "3" and r.get(XML_LANG) == "de"
    assert r.get("{http://www.w3.org/XML/1998/namespace}space") == "preserve" and r.get("{urn:x}tag") == 't&"'


def test_an_integer_of_5000_digits_is_an_invalid_value(srv: FakeServer) -> None:
    r = call(srv, edit(_entry("1" * 5000)))
    errs = errors(r)
    assert [e["error-tag"] for e in errs] == ["invalid-value"], errs
    assert "internal error" not in errs[0]["error-message"]
    # Leading zeros are still an integer's lexical form.
    assert call(srv, edit(_entry("0" * 5000 + "7"))).find(NC + "ok") is not None
    # In a filter, a value no entry can hold selects nothing.
    flt = f'<get-config><source><running/></source><filter><nat-session xmlns="{NS}"><src_port>{"9" * 5000}</src_port></nat-session></filter></get-config>'
    r = call(srv, flt)
    assert not errors(r) and not list(r.iter(f"{{{NS}}}nat-session"))


def test_kill_session_ids_must_be_ascii_digits(srv: FakeServer) -> None:
    # '²' made int() fail (internal error); '٧' (Arabic-Indic seven) was read as 7.
    for text in ("²", "٧", "7" * 5000, "4294967296", "+7", " "):
        r = call(srv, f"<kill-session><session-id>{text}</session-id></kill-session>")
        errs = errors(r)
        assert [e["error-tag"] for e in errs] == ["invalid-value"], (text, errs)
        assert "internal error" not in errs[0]["error-message"]
    assert srv.killed == []


def test_the_count_of_errors_left_out_is_exact(srv: FakeServer) -> None:
    # Over 1 MB, entries are decoded batch by batch; each batch's own
    # "... and N more" was cut off, so the reply's count was wrong.
    bad = 9900
    config = "".join(_entry(str(1 + i), translated="99999") for i in range(bad))
    r = call(srv, edit(config))
    errs = errors(r)
    listed = [e for e in errs if not e["error-message"].startswith("... and ")]
    more = [e for e in errs if e["error-message"].startswith("... and ")]
    assert len(listed) == 100 and len(more) == 1
    assert int(more[0]["error-message"].split()[2]) == bad - 100


def test_a_confirm_timeout_of_5000_digits_is_an_invalid_value_naming_it(srv: FakeServer) -> None:
    r = call(srv, f"<commit><confirmed/><confirm-timeout>{'9' * 5000}</confirm-timeout></commit>")
    errs = errors(r)
    assert [e["error-tag"] for e in errs] == ["invalid-value"]
    assert "confirm-timeout" in errs[0]["error-message"] and "4300" not in errs[0]["error-message"]
    r = call(srv, f"<commit><confirmed/><confirm-timeout>{'0' * 5000}7</confirm-timeout></commit>")
    assert not errors(r)  # leading zeros are a number's lexical form


def test_attributes_and_namespace_declarations_count_as_nodes(srv: FakeServer) -> None:
    # 4 MB of attributes on one element: 114 MB and 1 s of lxml (worse than linear beyond).
    for attr in (b'a%d="1"', b'xmlns:p%d="u"'):
        doc = b"<r " + b" ".join(attr % i for i in range(300_000)) + b"/>"
        with pytest.raises(TooManyElements):
            parse_message(srv.codec, doc)
    r = call(srv, "<get-config><source><running/></source></get-config>", ' message-id="1" ' + " ".join(f'a{i}="1"' for i in range(300_000)))
    assert [e["error-tag"] for e in errors(r)] == ["too-big"]
