"""natmig.wire.natedit: the controller's edit-config bodies, read back by the agent's own decoder (no network)."""

from __future__ import annotations

import pytest
from lxml import etree

from natmig.codec import NETCONF_NS, default_codec
from natmig.errors import CodecError
from natmig.model import NatSession
from natmig.wire import natedit

CODEC = default_codec()


def _sessions(n: int) -> list[NatSession]:
    return [NatSession(protocol="TCP", src_address="10.0.0.10", src_port=1024 + i, dst_address="203.0.113.100",
                       dst_port=80, translated_address="203.0.113.1", translated_port=20000 + i, tcp_state="ESTABLISHED")
            for i in range(n)]


def _decoded(body: str) -> list:
    return CODEC.decode_edit_xml(etree.fromstring(natedit.config(body).encode()))


def test_every_entry_carries_the_operation_and_decodes_to_the_same_sessions() -> None:
    ss = _sessions(3)
    got = _decoded(natedit.sessions(CODEC, ss, "replace"))
    assert [e.operation for e in got] == ["replace"] * 3
    assert [e.key for e in got] == [s.key for s in ss]
    assert [e.operation for e in _decoded(natedit.sessions(CODEC, ss))] == [None] * 3


def test_mixed_and_removals_name_each_entry_s_own_operation() -> None:
    a, b = _sessions(2)
    got = _decoded(natedit.mixed(CODEC, [("create", a), ("delete", b.key)]))
    assert [(e.operation, e.key) for e in got] == [("create", a.key), ("delete", b.key)]
    assert [e.operation for e in _decoded(natedit.removals(CODEC, [a.key, b.key]))] == ["remove", "remove"]
    assert natedit.removals(CODEC, []) == ""
    whole = etree.fromstring(natedit.removals(CODEC, None))
    assert whole.get(f"{{{NETCONF_NS}}}operation") == "remove" and len(whole) == 0


def test_an_unknown_operation_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(CodecError, match="operation 'upsert' is not one of"):
        natedit.sessions(CODEC, _sessions(1), "upsert")
    with pytest.raises(CodecError, match="operation 'drop' is not one of"):
        natedit.mixed(CODEC, [("drop", _sessions(1)[0].key)])
