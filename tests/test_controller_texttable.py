"""TextTable: a get-config reply's entries counted, sliced and keyed from its text, or refused when not in the codec's form."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natmig.codec import NETCONF_NS, default_codec
from natmig.wire.nattext import TextTable
from natmig.wire.slices import GROWTH, EntryStream

from .controller_fakes import sessions

CODEC = default_codec()


def reply(body: str, data: str = "<data>{}</data>") -> str:
    return f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3">{data.format(body)}</rpc-reply>'


def text_of(table) -> str:
    return CODEC.encode_xml(table, root=None).decode()


def mixed(n: int):
    out = []
    for i, s in enumerate(sessions(n) + sessions(n // 2, proto="UDP", base_port=31000)):
        if s.protocol == "TCP":
            s = replace(s, tcp_state=["ESTABLISHED", "SYN_SENT", "SYN_RECV", "TIME_WAIT"][i % 4], timeout=100 + i, assured=bool(i % 2), mark=i % 3)
        out.append(s)
    return out


def test_a_reply_in_the_codecs_form_is_counted_keyed_and_its_addresses_read():
    table = mixed(30) + sessions(4, public="203.0.113.7", base_port=40000, first=500)
    t = TextTable.of(reply(text_of(table)), CODEC)
    assert t is not None and t.count == len(table)
    assert all(t.plain(p) for p in t.slices(3, 10))
    assert t.keys() == [s.key for s in table]
    assert set().union(*(t.public_addresses(p) for p in t.slices(3, 10))) == {"203.0.113.1", "203.0.113.7"}


@settings(max_examples=40, deadline=None)
@given(n=st.integers(0, 120), pieces=st.integers(1, 9), size=st.integers(1, 50))
def test_slices_cover_the_table_exactly_and_cut_only_between_entries(n, pieces, size):
    table = mixed(n)
    t = TextTable.of(reply(text_of(table)), CODEC)
    assert t is not None
    parts = t.slices(pieces, size)
    assert all(t.plain(p) for p in parts)
    assert "".join(parts) == text_of(table)
    got = [s for p in parts for s in CODEC.decode_xml(f'<data xmlns="{NETCONF_NS}">{p}</data>')]
    assert got == table
    if table:
        assert 1 <= len(parts) <= len(table)
        if pieces <= len(table) and size >= len(table):
            assert len(parts) >= pieces // 2  # cut by length: about `pieces` slices
        assert all(p.startswith("<nat-session ") and p.endswith("</nat-session>") for p in parts)


def test_an_empty_table_in_either_spelling():
    for r in (reply(""), f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3"><data/></rpc-reply>'):
        t = TextTable.of(r, CODEC)
        assert t is not None and t.count == 0 and t.slices(4, 10) == [] and t.keys() == []


@pytest.mark.parametrize("spoil", [
    lambda b: b.replace("</nat-session><nat-session", "</nat-session>\n<nat-session", 1),       # whitespace between entries
    lambda b: b.replace("</nat-session>", "</nat-session><!-- x -->", 1),                        # a comment
    lambda b: b.replace('<nat-session xmlns="urn:natmig:yang:nat-session">', '<n:nat-session xmlns:n="urn:natmig:yang:nat-session">', 1),  # a prefix
    lambda b: b.replace("<src_port>", "<src_port>0", 1),                                         # still the form: values are the target's to check
    lambda b: b.replace("<dst_port>80</dst_port>", "<dst_port>80</dst_port><dst_port>80</dst_port>", 1),  # a repeated leaf
    lambda b: b.replace("<translated_port>", "<foo>1</foo><translated_port>", 1),                # an unknown leaf
    lambda b: b.replace("</protocol><src_address>10.0.0.2</src_address>", "</protocol>", 1),    # a missing key
    lambda b: b.replace("10.0.0.2", "10.0.0.&amp;2", 1),                                         # an entity
    lambda b: b.replace('xmlns="urn:natmig:yang:nat-session"', 'xmlns="urn:other"', 1),          # another namespace
    lambda b: b + "<nat-control xmlns=\"urn:natmig:yang:nat-session\"/>",                        # another element
])
def test_anything_but_the_plain_form_is_left_to_the_codec(spoil):
    body = text_of(sessions(5))
    spoiled = spoil(body)
    assert spoiled != body
    t = TextTable.of(reply(spoiled), CODEC)
    assert t is not None
    verdicts = [t.plain(p) for p in t.slices(2, 3)]
    if spoiled == body.replace("<src_port>", "<src_port>0", 1):
        assert all(verdicts)  # a value stays in the form: values are the target's to check
    else:
        assert not all(verdicts)
    good = TextTable.of(reply(body), CODEC)
    assert good is not None and all(good.plain(p) for p in good.slices(2, 3))


def test_a_reply_without_a_plain_data_element_or_with_an_error_is_not_a_table():
    assert TextTable.of(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3"><data xmlns="{NETCONF_NS}"></data></rpc-reply>', CODEC) is None
    assert TextTable.of(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3"><ok/></rpc-reply>', CODEC) is None
    assert TextTable.of(f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3"><rpc-error><data/></rpc-error></rpc-reply>', CODEC) is None


# ------------------------------------------------ EntryStream: cut while it arrives


def feed_all(stream: EntryStream, raw: bytes, sizes: list[int]) -> list[str]:
    out, pos, i = [], 0, 0
    while pos < len(raw):
        n = sizes[i % len(sizes)]
        out += stream.feed(raw[pos:pos + n])
        pos, i = pos + n, i + 1
    return out


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 120), sizes=st.lists(st.integers(1, 5000), min_size=1, max_size=6), first=st.integers(1, 30))
def test_entry_stream_cuts_the_body_into_growing_slices_of_whole_entries_for_any_chunking(n, sizes, first):
    body = text_of(mixed(n)) if n else ""
    raw = reply(body).encode()
    stream = EntryStream(CODEC.schema.list_name, first=first, most=4 * first)
    early = feed_all(stream, raw, sizes)
    rest = stream.finish()
    assert rest is not None and stream.fed == len(raw)
    parts = early + rest
    assert "".join(parts) == body
    assert all(TextTable.plain_in(CODEC, p) for p in parts)
    # Slices grow from `first` entries' worth of bytes (by the first entry's
    # length) up to `most`, each cut at an entry boundary within that length.
    size = body.find("</nat-session>") + len("</nat-session>")
    want = first
    for k, p in enumerate(early):
        assert 0 < len(p) <= want * size + len("</nat-session>"), (k, len(p), size)
        want = min(int(want * GROWTH), 4 * first)


def test_entry_stream_hands_out_the_first_slice_before_the_reply_is_complete():
    body = text_of(sessions(50))
    raw = reply(body).encode()
    stream = EntryStream(CODEC.schema.list_name, first=10, most=10)
    got = stream.feed(raw[: len(raw) // 2])
    assert got and got[0].count("</nat-session>") == 10 and body.startswith(got[0])


@pytest.mark.parametrize("raw", [
    reply("", "<data/>"),
    f'<rpc-reply xmlns="{NETCONF_NS}" message-id="3"><rpc-error><error-tag>operation-failed</error-tag></rpc-error></rpc-reply>',
    reply(text_of(sessions(5)), '<nc:data xmlns:nc="urn:x">{}</nc:data>'),
    reply(text_of(sessions(5)), '<data xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">{}</data>'),
], ids=["empty", "rpc-error", "prefixed", "attribute"])
def test_entry_stream_cuts_nothing_but_a_plain_data_body(raw):
    stream = EntryStream(CODEC.schema.list_name, first=1, most=2)
    assert feed_all(stream, raw.encode(), [3, 11]) == []
    assert stream.finish() is None


def test_entry_stream_takes_a_chunk_that_ends_inside_a_character():
    """Chunks are bytes: one may end in the middle of a UTF-8 character (here in an attribute of the reply)."""
    body = text_of(sessions(3))
    raw = f'<rpc-reply xmlns="{NETCONF_NS}" message-id="é">'.encode() + f"<data>{body}</data></rpc-reply>".encode()
    cut = raw.index("é".encode()) + 1
    stream = EntryStream(CODEC.schema.list_name, first=1, most=1)
    parts = stream.feed(raw[:cut]) + stream.feed(raw[cut:])
    assert "".join(parts + (stream.finish() or [])) == body


def test_forwarded_entries_keep_count_addresses_and_keys_of_each_slice() -> None:
    from natmig.wire.nattext import ForwardedEntries

    table = mixed(30) + [replace(s, translated_address="203.0.113.2") for s in sessions(5, base_port=40000, first=900)]
    log = ForwardedEntries(CODEC)
    text = text_of(table)
    t = TextTable.of(reply(text), CODEC)
    assert t is not None
    for part in t.slices(4, 10):
        assert log.add(part)
    assert log.count == len(table) and log.addresses == {"203.0.113.1", "203.0.113.2"}
    assert log.keys() == [s.key for s in table]
    # An entry whose leaves are not keys-then-address is not taken (the caller decodes instead).
    assert not log.add(text.replace("<translated_address>", "<x>", 1)) and log.count == len(table)


@given(n=st.integers(0, 12), cut=st.integers(0, 4000), drop=st.integers(0, 3),
       snippet=st.sampled_from(["", " ", "<", ">", "&amp;", "<x/>", "</nat-session>", "<mark>1</mark>", "<protocol>TCP</protocol>", ' xmlns="a"']))
@settings(max_examples=400, deadline=None)
def test_the_plain_check_judges_as_the_entry_pattern_with_its_groups(n: int, cut: int, drop: int, snippet: str) -> None:
    # is_run's pattern reads no values (no capturing groups); it must accept exactly what the entry pattern with them accepts.
    body = text_of(mixed(n))
    cut = min(cut, len(body))
    damaged = (body[:cut] + snippet + body[cut + drop:]).encode()
    canonical = CODEC.canonical
    attrs = f' xmlns="{CODEC.ns}"'.encode()
    with_groups = re.compile(rb"(?:<" + canonical._name + re.escape(attrs) + rb">" + canonical._body + rb")*")
    assert canonical.is_run(damaged, attrs) == (with_groups.fullmatch(damaged) is not None)
