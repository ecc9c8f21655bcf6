"""rpc-reply and rpc-error as the agent writes them (RFC 6241 4.2, 4.3), as bytes.

A reply is joined once (a 100k-session reply is ~30 MB); a reply whose
start was already streamed is a :class:`Streamed` rest.  An rpc-error's
error-path is an XPath into the module the codec serves, its prefixes bound
on the element.
"""

from __future__ import annotations

from typing import Any
from xml.sax.saxutils import escape, quoteattr

from lxml import etree

from ..codec import NETCONF_NS, Codec
from .problems import Problem

_XML_NS = "http://www.w3.org/XML/1998/namespace"
#: tags whose error-info names the element at fault (RFC 6241 appendix A).
BAD_ELEMENT_TAGS = {"unknown-element", "missing-element", "bad-element", "unknown-namespace", "bad-attribute", "missing-attribute", "unknown-attribute"}


def error_path(codec: Codec, path: str, leaf: str) -> str:
    """An error-path in XPath, prefixes bound on the element (see :func:`error_xml`)."""
    p = codec.schema.prefix
    name = codec.schema.list_name
    out = ""
    if path.startswith(name + "["):
        out = f"/{p}:{name}"
        values = path[len(name) + 1 : -1].split(" ")
        for k, v in zip(codec.schema.keys, values):
            if v != "?":
                out += f"[{p}:{k}='{v}']"  # key values (addresses, numbers, enums) hold no quotes
    elif path in (codec.schema.control_name, codec.schema.stats_name, name):
        out = f"/{p}:{path}"
    if leaf and out:
        out += f"/{p}:{leaf}"
    return out


def rpc_error(pr: Problem, path: str = "", path_ns: str = "") -> str:
    """One rpc-error (RFC 6241 4.3): the one writer of them, for every server natmig runs.

    ``path`` is the error-path (an XPath), ``path_ns`` the namespace
    declarations its prefixes need, put on the error-path element.
    """
    info = dict(pr.info)
    if pr.leaf and pr.tag in BAD_ELEMENT_TAGS and "bad-element" not in info:
        info["bad-element"] = pr.leaf
    parts = [f"<error-type>{pr.type}</error-type><error-tag>{pr.tag}</error-tag><error-severity>error</error-severity>"]
    if pr.app_tag:
        parts.append(f"<error-app-tag>{escape(pr.app_tag)}</error-app-tag>")
    if path:
        parts.append(f"<error-path{path_ns}>{escape(path)}</error-path>")
    where = f"{pr.path}/{pr.leaf}: " if pr.path and pr.leaf else (f"{pr.path}: " if pr.path else "")
    parts.append(f'<error-message xml:lang="en">{escape(where + pr.message)}</error-message>')
    if info:
        parts.append("<error-info>" + "".join(f"<{k}>{escape(v)}</{k}>" for k, v in info.items()) + "</error-info>")
    return "<rpc-error>" + "".join(parts) + "</rpc-error>"


def error_xml(codec: Codec, pr: Problem) -> str:
    """An rpc-error about the module the codec serves (its error-path in that module)."""
    return rpc_error(pr, error_path(codec, pr.path, pr.leaf), f' xmlns:{codec.schema.prefix}="{codec.ns}"')


class Streamed(list[bytes]):
    """The rest of a reply whose start tag and first parts were already streamed."""


def reply_head(attrs: str) -> bytes:
    return f'<rpc-reply xmlns="{NETCONF_NS}"{attrs}>'.encode()


def reply(attrs: str, body: bytes | list[bytes]) -> bytes:
    # One join: a 100k-session reply is ~30 MB, and every copy of it counts.
    parts = body if isinstance(body, list) else [body]
    if isinstance(body, Streamed):
        return b"".join([*body, b"</rpc-reply>"])
    return b"".join([reply_head(attrs), *parts, b"</rpc-reply>"])


def attrs_of(rpc: Any) -> str:
    # RFC 6241 4.2: every attribute of <rpc> comes back unchanged in <rpc-reply>.
    out: list[str] = []
    for k, v in rpc.attrib.items():
        q = etree.QName(k)
        if q.namespace == _XML_NS:
            # The xml prefix is bound by definition and may not be declared again.
            out.append(f" xml:{q.localname}={quoteattr(v)}")
        elif q.namespace:
            prefix = "a" + str(len(out))
            out.append(f' xmlns:{prefix}="{escape(q.namespace)}" {prefix}:{q.localname}={quoteattr(v)}')
        else:
            out.append(f" {k}={quoteattr(v)}")
    return "".join(out)


def error_reply(codec: Codec, problems: list[Problem], attrs: str = "") -> bytes:
    """An rpc-reply carrying one rpc-error per problem."""
    return errors_reply([error_xml(codec, p) for p in problems], attrs)


def errors_reply(errors: list[str], attrs: str = "") -> bytes:
    """An rpc-reply carrying these rpc-error elements."""
    return reply(attrs, "".join(errors).encode())
