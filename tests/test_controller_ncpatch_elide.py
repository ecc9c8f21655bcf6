"""The controller's parser reads a tapped reply alone: only the reply's root element is dispatched, never its body."""

from __future__ import annotations

import pytest

from natmig.codec import NETCONF_NS
from natmig.controller.ncpatch import KEPT, Parser, emptied
from ncclient.transport import TransportError
from ncclient.transport.session import NetconfBase


class Session:
    """What the parser needs of ncclient's session: its framing base and where messages go."""

    _base = NetconfBase.BASE_11

    def __init__(self) -> None:
        self.messages: list[str] = []

    def _dispatch_message(self, raw: str) -> None:
        self.messages.append(raw)


def chunked(msg: bytes, size: int) -> bytes:
    return b"".join(b"\n#%d\n%s" % (len(msg[i:i + size]), msg[i:i + size]) for i in range(0, len(msg), size)) + b"\n##\n"


def reply(n: int) -> bytes:
    body = b"<nat-session>x</nat-session>" * n
    return f'<rpc-reply xmlns="{NETCONF_NS}" message-id="9"><data>'.encode() + body + b"</data></rpc-reply>"


@pytest.mark.parametrize("keep", [True, False])
def test_a_reply_read_by_its_tap_alone_is_dispatched_as_its_empty_root_element(keep: bool) -> None:
    s = Session()
    p = Parser(s)
    got: list[bytes] = []
    msg = reply(20_000)  # ~560 KB, more than KEPT
    assert len(msg) > 2 * KEPT
    assert p.tap_next(got.append, keep=keep)
    p.parse(chunked(msg, 65536))
    assert b"".join(got) == msg and p.tapped_size == len(msg)
    if keep:
        assert s.messages == [msg.decode()] and not p.tapped_elided
    else:
        assert s.messages == [f'<rpc-reply xmlns="{NETCONF_NS}" message-id="9"></rpc-reply>'] and p.tapped_elided
    # The next reply is neither tapped nor elided.
    p.parse(chunked(reply(3), 100))
    assert s.messages[-1] == reply(3).decode() and len(got) == -(-len(msg) // 65536)


def test_an_error_is_never_emptied_and_a_reply_without_a_root_is_refused() -> None:
    assert emptied(b'<rpc-reply message-id="1"><rpc-error>x' + b"." * 10) == b'<rpc-reply message-id="1"><rpc-error>x' + b"." * 10
    assert emptied(b'<?xml version="1.0"?>\n<nc:rpc-reply a="1"><data>') == b'<?xml version="1.0"?>\n<nc:rpc-reply a="1"></nc:rpc-reply>'
    with pytest.raises(TransportError, match="no root element"):
        emptied(b"garbage")
