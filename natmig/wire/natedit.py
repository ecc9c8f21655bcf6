"""The nat-session list and nat-control as the controller writes them: bodies of <config> for edit-config.

Pure text builders, no session: :class:`~natmig.controller.netconf.NodeClient`
sends what they return.  Entries are the codec's own encoding (every leaf
checked on the way out by the codec, and again by the agent on the way in);
an operation is an ``nc:operation`` attribute on each entry (RFC 6241 7.2).
A bad operation raises :class:`~natmig.errors.CodecError` before anything
is sent.
"""

from __future__ import annotations

from typing import Iterable

from ..codec import EDIT_OPERATIONS, NETCONF_NS, Codec
from ..errors import CodecError, FieldError
from ..model import NatSession, SessionKey


def _check(op: str, where: str) -> None:
    if op not in EDIT_OPERATIONS:
        raise CodecError([FieldError(where, "operation", f"operation {op!r} is not one of {', '.join(EDIT_OPERATIONS)}", "bad-attribute")])


def _open_tag(codec: Codec, op: str | None) -> str:
    """An entry's start tag as the codec writes it, with ``op`` as its nc:operation."""
    extra = f' xmlns:nc="{NETCONF_NS}" nc:operation="{op}"' if op is not None else ""
    return f'<{codec.schema.list_name} xmlns="{codec.ns}"{extra}>'


def sessions(codec: Codec, items: Iterable[NatSession], operation: str | None = None) -> str:
    """Entries, each with ``operation`` (None: the request's default-operation applies)."""
    if operation is not None:
        _check(operation, "edit of sessions")
    body = codec.encode_xml(items, root=None).decode()
    if operation is None:
        return body
    # The codec starts every entry with exactly the plain start tag: each gets the attribute.
    return body.replace(_open_tag(codec, None), _open_tag(codec, operation))


def keys_only(codec: Codec, key: SessionKey) -> str:
    """The key leaves of one entry (what delete and remove need)."""
    return "".join(f"<{k}>{v}</{k}>" for k, v in zip(codec.schema.keys, key))


def mixed(codec: Codec, changes: Iterable[tuple[str, NatSession | SessionKey]]) -> str:
    """Entries with operations of their own: (operation, session), or (operation, key) for delete and remove."""
    close = f"</{codec.schema.list_name}>"
    parts = []
    for op, item in changes:
        _check(op, "mixed edit")
        if isinstance(item, NatSession):
            whole = codec.encode_xml([item], root=None).decode()
            inner = whole[whole.index(">") + 1 : whole.rindex("<")]
        else:
            inner = keys_only(codec, item)
        parts.append(f"{_open_tag(codec, op)}{inner}{close}")
    return "".join(parts)


def removals(codec: Codec, keys: Iterable[SessionKey] | None) -> str:
    """Remove entries by key (absent ones are fine), or the whole list when ``keys`` is None."""
    if keys is None:
        return f'<{codec.schema.list_name} xmlns="{codec.ns}" xmlns:nc="{NETCONF_NS}" nc:operation="remove"/>'
    return mixed(codec, (("remove", k) for k in keys))


def admission(codec: Codec, admit: bool) -> str:
    """nat-control/admit-new-sessions."""
    name = codec.schema.control_name
    return f'<{name} xmlns="{codec.ns}"><admit-new-sessions>{"true" if admit else "false"}</admit-new-sessions></{name}>'


def config(body: str) -> str:
    """A <config> holding ``body``."""
    return f'<config xmlns="{NETCONF_NS}">{body}</config>'
