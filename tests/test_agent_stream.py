"""A large edit-config is decoded while it streams; the result must equal decoding it whole."""

from __future__ import annotations

import random

import pytest

from natmig.wire import natread
from natmig.codec import NETCONF_NS, default_codec
from natmig.model import NatSession


def _table(n: int) -> list[NatSession]:
    return [
        NatSession("TCP" if i % 2 else "UDP", f"10.0.0.{2 + i % 250}", 1024 + i // 250, "198.51.100.7", 80 + i % 3,
                   "203.0.113.1", 20000 + i % 10000, "ESTABLISHED" if i % 2 else None, 1 + i)
        for i in range(n)
    ]


def test_streamed_edit_config_loses_nothing_wherever_reads_split_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The canonical reader would take these entries whole (test_agent_canonical): off, to test streaming.
    monkeypatch.setattr(natread, "CANONICAL_THRESHOLD", 1 << 62)
    codec = default_codec()
    table = _table(12_000)
    body = codec.encode_xml(table, root=None).decode().replace(
        "<nat-session ", f'<nat-session xmlns:nc="{NETCONF_NS}" nc:operation="merge" ')
    rnd = random.Random(7)
    for _ in range(3):
        # Padding moves every 1 MB feed boundary to another place in the entries.
        pad = " " * rnd.randrange(1 << 20)
        msg = (f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target>'
               f'<config>{pad}{body}</config></edit-config></rpc>').encode()
        assert len(msg) > natread.STREAM_THRESHOLD  # the streaming path is the one under test
        root, batches = natread.parse_message(codec, msg)
        assert batches is not None and not batches.problems
        config = root.find(f"{{{NETCONF_NS}}}edit-config/{{{NETCONF_NS}}}config")
        rest = natread.fast_entries(codec, config)
        assert rest is not None
        got = {e.key: e.values for e in [*batches.req.entries, *rest]}
        assert len(got) == len(table) == len(batches.req.entries) + len(rest)
        for s in table:
            v = got[s.key]
            # tcp_state at its default (ESTABLISHED) is omitted on the wire (trim mode).
            state = v.get("tcp_state", "ESTABLISHED" if s.protocol == "TCP" else None)
            assert (v["translated_port"], v["timeout"], state) == (s.translated_port, s.timeout, s.tcp_state)


def test_canonical_reader_takes_the_same_message_whole() -> None:
    codec = default_codec()
    table = _table(12_000)
    body = codec.encode_xml(table, root=None).decode().replace(
        "<nat-session ", f'<nat-session xmlns:nc="{NETCONF_NS}" nc:operation="merge" ')
    msg = (f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target>'
           f'<config>{" " * 5000}{body}</config></edit-config></rpc>').encode()
    root, batches = natread.parse_message(codec, msg)
    assert batches is not None and batches.unique and not batches.problems
    config = root.find(f"{{{NETCONF_NS}}}edit-config/{{{NETCONF_NS}}}config")
    assert len(config) == 0  # every entry was read apart from the tree
    got = {e.key: codec.complete(e.values) for e in batches.req.entries}
    assert got == {s.key: s for s in table} and len(batches.req.entries) == len(table)
    assert {e.operation for e in batches.req.entries} == {"merge"}
