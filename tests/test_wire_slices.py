"""A state list's entries forwarded as text (natmig.wire.slices): cut at entry boundaries, checked plain, read for the keys."""

from __future__ import annotations

import pytest
from lxml import etree

from natmig.statemodel import load_module
from natmig.wire.slices import EntryStream, ListText
from natmig.wire.state import Wire

from .test_statemodel import LB, NC, NS, binding

MOD = load_module(LB)
BINDING = MOD.list("binding")


def entries(n: int) -> list[str]:
    return [binding(f"192.0.2.{i % 200 + 1}", 40000 + i, snat=1024 + i, idle_timeout=300 + i) for i in range(n)]


def reply(body: str) -> str:
    return f'<rpc-reply xmlns="{NC}" message-id="7"><data>{body}</data></rpc-reply>'


def test_plain_slices_are_counted_and_their_removals_name_every_key_as_the_source_wrote_it() -> None:
    text = ListText(BINDING)
    body = "".join(entries(25))
    assert text.add(body[: body.index("</binding>", 4000) + len("</binding>")]) and text.add(body[body.index("</binding>", 4000) + len("</binding>"):])
    assert text.count == 25
    removed = []
    for part in text.removals():
        root = etree.fromstring(f'<config xmlns="{NC}">{part}</config>'.encode())
        for el in root:
            assert el.get(f"{{{NC}}}operation") == "remove" and el.tag == f"{{{NS}}}binding"
            assert [c.tag.split("}")[1] for c in el] == list(BINDING.keys)  # the key leaves only
            removed.append((el[0].text, int(el[1].text)))
    assert removed == [(f"192.0.2.{i % 200 + 1}", 40000 + i) for i in range(25)]


@pytest.mark.parametrize("spoil", [
    lambda e: e.replace(f'<binding xmlns="{NS}">', f'<lb:binding xmlns:lb="{NS}">', 1).replace("</binding>", "</lb:binding>", 1),  # a prefix
    lambda e: e + " ",  # whitespace after an entry
    lambda e: e + "<!-- note -->",  # a comment
    lambda e: e.replace("<snat-port>", "<snat-port><x/>", 1),  # an element inside a leaf
    lambda e: e.replace(NS, "urn:other", 1),  # another namespace
    lambda e: e.replace("<client-address>", "<client-port>9</client-port><client-address>", 1),  # a key out of order
    lambda e: e.replace("</binding>", "<colour>red</colour></binding>", 1),  # a leaf the module has not
], ids=["prefix", "whitespace", "comment", "nested", "namespace", "key-order", "unknown-leaf"])
def test_a_slice_in_any_other_form_is_refused_whole_and_nothing_is_taken(spoil) -> None:
    text = ListText(BINDING)
    good = entries(3)
    assert not text.add(good[0] + spoil(good[1]) + good[2])
    assert text.count == 0 and list(text.removals()) == []


def test_what_the_generic_writer_sends_is_plain_and_the_stream_cuts_it_whole_for_any_chunking() -> None:
    rows = [Wire.complete(BINDING, {"client-address": f"198.51.100.{i % 250 + 1}", "client-port": 1000 + i, "backend-address": "203.0.113.5",
                                    "backend-port": 443, "snat-port": 2000 + i, "idle-timeout": 60}) for i in range(400)]
    body = Wire.entries_xml(BINDING, rows)
    raw = reply(body).encode()
    for size in (1, 7, 4096, len(raw)):
        stream, text, parts = EntryStream(BINDING.name, first=10, most=50), ListText(BINDING), []
        for i in range(0, len(raw), size):
            parts += stream.feed(raw[i:i + size])
        rest = stream.finish()
        assert rest is not None
        parts += rest
        assert "".join(parts) == body and all(text.add(p) for p in parts) and text.count == 400
        assert len(parts) > 1


def test_a_list_with_a_leaf_named_as_itself_is_not_forwardable() -> None:
    import dataclasses

    twin = dataclasses.replace(BINDING.leaves[-1], name="binding")
    assert ListText.forwardable(BINDING)
    assert not ListText.forwardable(dataclasses.replace(BINDING, leaves=(*BINDING.leaves[:-1], twin)))
