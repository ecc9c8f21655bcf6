"""Bounds on one message's XML, checked before lxml builds anything.

lxml builds a node for every element, attribute and namespace declaration
of a document, and the agent parses whole messages of up to --max-message
bytes: without a bound on nodes, memory follows the message's shape, not
its size (32 MB of ``<x/>`` grew the agent by 2.4 GB).  Counting markup
characters is a C-speed scan of the bytes and an upper bound of the nodes.
"""

from __future__ import annotations

from ..errors import AgentError

_XML_SPACE = b" \t\r\n"

#: Nodes (elements, attributes, namespace declarations, comments, processing
#: instructions) one message's tree may hold at once.  An lxml element costs
#: ~125 bytes, ~240 with the text between elements, an attribute ~280: a
#: 32 MB message of ``<x/>`` is 8 million of them, 2.4 GB of tree; 4 MB of
#: attributes on one element took 114 MB and 1 s (more is worse than linear).  A
#: 100k-session edit-config holds far fewer at once: its entries are read
#: apart (canonical form) or dropped batch by batch (~80k nodes at most).
MAX_ELEMENTS = 250_000


class TooManyElements(AgentError):
    """A message holds more XML nodes than the agent builds a tree for."""

    def __init__(self, count: int, limit: int) -> None:
        self.count = count
        self.limit = limit
        super().__init__(f"the message holds more than {limit} XML nodes at once (at least {count}); the agent's limit is --max-elements")


def count_nodes(data: bytes) -> int:
    """An upper bound of the nodes lxml builds for ``data``: one per '<' that opens no end tag
    (elements, comments, PIs), one per '=' (attributes, namespace declarations).

    Three C-speed scans (~15 ms for 32 MB), done before lxml builds anything.
    Markup characters inside text, comments or CDATA only make it larger.
    """
    return data.count(b"<") - data.count(b"</") + data.count(b"=")


def strip_leading_space(message: bytes) -> bytes:
    """``message`` without the XML white space before its first markup.

    Some clients (scrapli-netconf) send ``\\n<?xml ...?>``; an XML declaration
    is only allowed at the very start of a document, so lxml would refuse
    what RFC 6242 framing merely left a newline in front of.
    """
    if message[:1] in (b" ", b"\t", b"\r", b"\n"):
        return message.lstrip(_XML_SPACE)
    return message
