"""TableReply: "does the target hold these sessions?" answered from a get-config reply's text, never a false yes."""

from __future__ import annotations

from dataclasses import replace

from natmig.codec import NETCONF_NS, default_codec
from natmig.wire.natreply import TableReply

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
    from natmig.controller.ncpatch import RawReply as _RawReply

    err = (f'<rpc-reply xmlns="{NETCONF_NS}" message-id="7"><rpc-error><error-type>protocol</error-type>'
           "<error-tag>in-use</error-tag><error-severity>error</error-severity></rpc-error></rpc-reply>")
    r = _RawReply(err, huge_tree=True)
    assert r.error is not None and r.error.tag == "in-use"
    ok = _RawReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="8"><data></data></rpc-reply>', huge_tree=True)
    assert ok.error is None and ok.xml.endswith("</rpc-reply>")


# ------------------------------------------------ session_chunks' slicing


import pytest  # noqa: E402

from natmig.wire.natreply import slices as _slices  # noqa: E402
from natmig.errors import CodecError  # noqa: E402


@pytest.mark.parametrize("n,size", [(0, 3), (1, 3), (7, 3), (9, 3), (10, 1)])
def test_slices_of_the_agents_reply_add_up_to_the_table(n, size):
    table = sessions(n) + sessions(n, proto="UDP")
    parts = list(_slices(reply_of(table), size))
    assert [s for p in parts for s in p] == table
    assert all(0 < len(p) <= size for p in parts)


def test_a_reply_in_another_shape_is_sliced_after_a_whole_decode():
    # Entries under a prefix declared on <data>: one slice alone would lose the
    # declaration, so the whole reply is decoded instead, in the same order.
    table = sessions(5)
    body = CODEC.encode_xml(table, root=None).decode()
    body = body.replace("<nat-session ", "<n:nat-session ").replace("</nat-session>", "</n:nat-session>")
    r = TableReply(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="7"><data xmlns:n="{CODEC.ns}">{body}</data></rpc-reply>', CODEC)
    with pytest.raises(CodecError):
        CODEC.decode_xml(f'<data xmlns="{NETCONF_NS}">{body}</data>')  # what one slice alone would be
    parts = list(_slices(r, 2))
    assert [s for p in parts for s in p] == table and [len(p) for p in parts] == [2, 2, 1]


def test_a_bad_value_in_a_slice_is_refused_by_the_codec():
    table = sessions(4)
    raw = reply_of(table).raw.replace("<src_port>1025</src_port>", "<src_port>99999</src_port>")
    with pytest.raises(CodecError):
        list(_slices(TableReply(raw, CODEC), 2))


@pytest.mark.parametrize("n,size,pieces,lengths", [(10, 25, 4, [3, 3, 3, 1]), (10, 2, 4, [2] * 5), (3, 25, 4, [1, 1, 1]), (0, 25, 4, [])])
def test_a_small_table_is_still_cut_in_pieces(n, size, pieces, lengths):
    table = sessions(n)
    parts = list(_slices(reply_of(table), size, pieces))
    assert [len(p) for p in parts] == lengths
    assert [s for p in parts for s in p] == table


def test_the_ncclient_adaptations_refuse_another_ncclient_version(monkeypatch):
    import importlib
    import sys

    import ncclient

    from natmig.errors import ControllerError

    monkeypatch.setattr(ncclient, "__version__", "0.7.2")
    monkeypatch.delitem(sys.modules, "natmig.controller.ncpatch")
    with pytest.raises(ControllerError, match=r"adapts ncclient 0\.7\.1's internals, but ncclient 0\.7\.2 is installed"):
        importlib.import_module("natmig.controller.ncpatch")
