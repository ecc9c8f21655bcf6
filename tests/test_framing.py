"""RFC 6242 framing: both framings, split feeds, the switch after hello, bad and oversized input."""

from __future__ import annotations

import pytest

from natmig.framing import _SMALL_CHUNK, EOM, Deframer, FramingError, MessageTooBig, frame


def _all(d: Deframer) -> list[bytes]:
    out = []
    while (m := d.next_message()) is not None:
        out.append(m)
    return out


def test_eom_round_trip_byte_by_byte() -> None:
    d = Deframer()
    wire = frame(b"<a/>", False) + frame(b"<b>]]></b>", False)
    got = []
    for i in range(len(wire)):
        d.feed(wire[i : i + 1])
        got += _all(d)
    # The second message contains "]]>" but not the full mark, so it is one message.
    assert got == [b"<a/>", b"<b>]]></b>"]


def test_chunked_several_chunks_make_one_message() -> None:
    d = Deframer()
    d.chunked = True
    tail = b' message-id="1"/>'
    d.feed(b"\n#4\n<rpc\n#%d\n%s\n##\n" % (len(tail), tail))
    assert _all(d) == [b'<rpc message-id="1"/>']


def test_chunked_split_anywhere() -> None:
    wire = frame(b"x" * 1000, True) + frame(b"hello", True)
    for cut in (1, 2, 3, 5, 7, 500, len(wire) - 3):
        d = Deframer()
        d.chunked = True
        d.feed(wire[:cut])
        got = _all(d)
        d.feed(wire[cut:])
        assert got + _all(d) == [b"x" * 1000, b"hello"]


def test_switch_to_chunked_keeps_bytes_after_hello() -> None:
    # The client's first chunked rpc may arrive in the same read as its hello.
    d = Deframer()
    d.feed(b"<hello/>" + EOM + frame(b"<rpc/>", True))
    assert d.next_message() == b"<hello/>"
    d.chunked = True
    assert d.next_message() == b"<rpc/>"


@pytest.mark.parametrize("wire", [b"#4\n<rpc", b"\n#0\n", b"\n#04\nabcd", b"\n#x\n", b"\n##\n", b"\n#12345678901234\n"])
def test_bad_chunk_headers_are_refused(wire: bytes) -> None:
    d = Deframer()
    d.chunked = True
    d.feed(wire)
    with pytest.raises(FramingError):
        _all(d)


def test_too_big_chunked_is_refused_before_it_is_read() -> None:
    d = Deframer(max_message=100)
    d.chunked = True
    d.feed(b"\n#101\n")  # the header alone says it is too big
    with pytest.raises(MessageTooBig):
        d.next_message()


def test_too_big_eom_is_refused_without_waiting_for_the_mark() -> None:
    d = Deframer(max_message=100)
    d.feed(b"<hello/>" + EOM + b"x" * 200)  # a good message first must not hide the big one
    assert d.next_message() == b"<hello/>"
    with pytest.raises(MessageTooBig):
        d.next_message()


def test_message_at_the_limit_passes() -> None:
    d = Deframer(max_message=100)
    d.chunked = True
    d.feed(frame(b"y" * 100, True))
    assert d.next_message() == b"y" * 100


def test_on_chunk_sees_each_chunk_of_a_message_as_it_arrives_and_which_one_starts_it():
    d = Deframer()
    d.chunked = True
    seen: list[tuple[bytes, bool]] = []
    d.on_chunk = lambda part, first: seen.append((part, first))
    d.feed(b"\n#3\nabc\n#2\nde")
    assert d.next_message() is None and seen == [(b"abc", True), (b"de", False)]
    d.feed(b"\n##\n\n#1\nf")
    assert d.next_message() == b"abcde"
    assert d.next_message() is None and seen[-1] == (b"f", True)  # the next message's first chunk


def test_small_chunks_are_merged_and_the_message_is_whole() -> None:
    d = Deframer(max_message=1 << 20)
    d.chunked = True
    seen: list[tuple[bytes, bool]] = []
    d.on_chunk = lambda part, first: seen.append((bytes(part), first))
    big = b"B" * (_SMALL_CHUNK + 5)
    pieces = [b"ab", b"c", big, b"d", b"ef"]
    d.feed(b"".join(b"\n#%d\n%s" % (len(p), p) for p in pieces) + b"\n##\n")
    assert d.next_message() == b"".join(pieces)
    assert seen == [(p, i == 0) for i, p in enumerate(pieces)]
    assert len(d._parts) == 0 and d.pending == 0


def test_a_message_in_too_many_chunks_is_refused() -> None:
    d = Deframer(max_message=1 << 20, max_chunks=100)
    d.chunked = True
    d.feed(b"\n#1\nx" * 101)
    with pytest.raises(MessageTooBig, match="more than 100 chunks"):
        d.next_message()


def test_an_elided_message_keeps_its_head_and_tail_and_its_chunks_all_go_to_the_reader() -> None:
    d = Deframer(max_message=1 << 30)
    d.chunked = True
    seen: list[bytes] = []

    def on_chunk(part: bytes, first: bool) -> None:
        seen.append(bytes(part))
        if first:
            d.elide = 10  # set by the reader on the first chunk, as the controller's parser does
    d.on_chunk = on_chunk
    pieces = [b"<head>0123", *(b"%05d" % i * 1000 for i in range(300)), b"</head>"]
    d.feed(b"".join(b"\n#%d\n%s" % (len(p), p) for p in pieces) + b"\n##\n")
    msg = d.next_message()
    assert b"".join(seen) == b"".join(pieces)  # every byte reached the reader
    total = sum(map(len, pieces))
    assert d.size == total and d.cut == 10 and msg is not None and msg[:10] == b"<head>0123"
    assert msg.endswith(b"</head>") and 17 <= len(msg) <= 10 + 10 + (1 << 20) and d.elided == total - len(msg)
    # Only that message: the next is whole again.
    d.feed(b"\n#3\nabc\n##\n")
    assert d.next_message() == b"abc" and d.elided == 0 and d.elide is None


def test_a_message_shorter_than_what_is_kept_is_not_elided() -> None:
    d = Deframer()
    d.chunked = True
    d.on_chunk = lambda part, first: setattr(d, "elide", 1000) if first else None
    d.feed(b"\n#5\nabcde\n#3\nfgh\n##\n")
    assert d.next_message() == b"abcdefgh" and d.elided == 0
