"""TableReply: "does the target hold these sessions?" answered from a get-config reply's text, never a false yes."""

from __future__ import annotations

from dataclasses import replace

from natmig.codec import NETCONF_NS, default_codec
from natmig.controller.netconf import TableReply

from .controller_fakes import sessions

CODEC = default_codec()


def reply_of(table, data_attrs: str = "") -> TableReply:
    body = CODEC.encode_xml(table, root=None).decode()
    return TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="7"><data{data_attrs}>{body}</data></rpc-reply>', CODEC)


def test_a_table_holding_every_session_with_its_mapping_says_yes_and_counts_its_entries():
    want = sessions(20) + sessions(5, proto="UDP")
    extra = sessions(3, base_port=30000, first=900)
    r = reply_of(extra + want[::-1])
    assert r.holds(want)
    assert r.size == 28
    assert r.holds([])


def test_a_missing_session_is_a_no():
    want = sessions(10)
    assert not reply_of(want[:9]).holds(want)


def test_another_public_port_is_a_no_and_the_decoded_table_shows_it():
    want = sessions(10)
    moved = replace(want[3], translated_port=want[3].translated_port + 1000)
    r = reply_of(want[:3] + [moved] + want[4:])
    assert not r.holds(want)
    assert moved in r.sessions() and want[3] not in r.sessions()


def test_another_public_address_is_a_no():
    want = sessions(4)
    r = reply_of([replace(s, translated_address="203.0.113.2") for s in want])
    assert not r.holds(want)


def test_entries_in_another_form_are_never_taken_for_a_yes_but_still_decode():
    want = sessions(6)
    body = CODEC.encode_xml(want, root=None).decode()
    body = body.replace("<nat-session ", "<n:nat-session ").replace("</nat-session>", "</n:nat-session>")
    r = TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="7"><data xmlns:n="{CODEC.ns}">{body}</data></rpc-reply>', CODEC)
    assert not r.holds(want)
    assert r.sessions() == want


def test_a_key_leaf_holding_another_value_is_a_no():
    want = sessions(3)
    r = reply_of([replace(want[0], dst_port=81)] + want[1:])
    assert not r.holds(want)


def test_a_reply_kept_as_text_still_surfaces_its_rpc_error():
    from natmig.controller.netconf import _RawReply

    err = (f'<rpc-reply xmlns="{NETCONF_NS}" message-id="7"><rpc-error><error-type>protocol</error-type>'
           "<error-tag>in-use</error-tag><error-severity>error</error-severity></rpc-error></rpc-reply>")
    r = _RawReply(err, huge_tree=True)
    assert r.error is not None and r.error.tag == "in-use"
    ok = _RawReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="8"><data></data></rpc-reply>', huge_tree=True)
    assert ok.error is None and ok.xml.endswith("</rpc-reply>")
