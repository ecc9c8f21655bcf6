"""The canonical reader of edit-config entries must agree with lxml on every document.

``natread.parse_canonical`` reads entries written exactly as the codec writes
them without building elements; anything else must fall back to the general
path.  Each test sends the same message to two agents, one with the
canonical reader and one without, and requires the same reply and the same
resulting datastore -- for canonical documents (where the fast path must
also really be taken) and for near misses (where it must step aside).
"""

from __future__ import annotations

import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from natmig.agent import rpc
from natmig.wire import natread, natwrite
from natmig.agent.datastore import Datastore
from natmig.agent.nacm import OPEN
from natmig.agent.monitoring import Catalog, SessionRecord
from natmig.agent.notifications import NotificationHub
from natmig.agent.provider import MemoryProvider
from natmig.agent.server import OPTIONAL_CAPABILITIES
from natmig.codec import EDIT_OPERATIONS, NETCONF_NS, default_codec
from natmig.model import NatSession

from .strategies import tables

CODEC = default_codec()
NS = CODEC.ns
OFF = 1 << 62  # a threshold no message reaches


class Agent:
    """Just enough of the server for handle_message (as in test_agent_rpc)."""

    def __init__(self, owned: set[str]) -> None:
        self.codec = CODEC
        self.provider = MemoryProvider(owned=owned)
        self.datastore = Datastore(self.provider, self.codec)
        self.catalog = Catalog.for_schema(self.codec.schema, OPTIONAL_CAPABILITIES)
        self.hub = NotificationHub(self.provider, self.codec)
        self.access = OPEN
        self.started = time.time()

    def kill(self, sid: int) -> bool:
        return False

    def session_records(self) -> list[SessionRecord]:
        return []


def _send(monkeypatch: pytest.MonkeyPatch, message: bytes, canonical: bool, stream: bool, table: list[NatSession]) -> tuple[bytes, object]:
    with monkeypatch.context() as m:
        m.setattr(natread, "CANONICAL_THRESHOLD", 0 if canonical else OFF)
        m.setattr(natread, "STREAM_THRESHOLD", 200 if stream else OFF)
        m.setattr(natread.Batches, "SIZE", 3)
        agent = Agent({s.translated_address for s in table} | {"203.0.113.1"})
        sess = rpc.SessionState(SessionRecord(1, "natmig", "127.0.0.1", 0.0))
        reply = rpc.handle_message(agent, sess, message)
    cand, control = agent.datastore.read("candidate")
    return reply, (sorted(cand, key=repr), control, sorted(agent.provider.table.values(), key=repr))


def same_outcome(monkeypatch: pytest.MonkeyPatch, message: bytes, table: list[NatSession] = ()) -> bytes:
    """The reply, after checking it and the datastores equal those of the general path (streamed or not)."""
    replies = []
    for stream in (False, True):
        fast = _send(monkeypatch, message, True, stream, list(table))
        slow = _send(monkeypatch, message, False, stream, list(table))
        assert fast == slow, (stream, message[:3000])
        replies.append(fast[0])
    return replies[0]


def rpc_message(config: str, target: str = "candidate", head: str = "", config_tag: str = f'config xmlns="{NETCONF_NS}"') -> bytes:
    close = config_tag.split(" ")[0]
    return (f'{head}<rpc xmlns="{NETCONF_NS}" message-id="7"><edit-config><target><{target}/></target>'
            f"<{config_tag}>{config}</{close}></edit-config></rpc>").encode()


def entries_text(table: list[NatSession], ops: list[str | None] | None = None, attrs: str = "") -> str:
    """The controller's forms: the codec's bare entries, each with its own nc:operation or none."""
    out = []
    for i, s in enumerate(table):
        e = CODEC.encode_xml([s], root=None).decode()
        op = ops[i % len(ops)] if ops else None
        if op is not None:
            e = e.replace("<nat-session ", f'<nat-session xmlns:nc="{NETCONF_NS}" nc:operation="{op}" ', 1)
        if attrs:
            e = e.replace("<nat-session ", f"<nat-session {attrs} ", 1)
        out.append(e)
    return "".join(out)


def table_of(n: int, start: int = 0) -> list[NatSession]:
    return [NatSession("TCP" if i % 3 else "UDP", f"10.0.{i // 200}.{i % 200 + 1}", 1024 + i, "198.51.100.7", 443,
                       "203.0.113.1", 20000 + i, None if i % 3 == 0 else ("SYN_SENT" if i % 5 == 0 else "ESTABLISHED"),
                       None if i % 4 == 0 else 600 + i, bool(i % 2), i % 7) for i in range(start, start + n)]


def fast_entries(message: bytes):
    got = natread.parse_canonical(CODEC, message)
    return None if got is None else got[1].req.entries


# ----------------------------------------------------------- canonical forms


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=tables, ops=st.sampled_from([None, ["merge"], ["create"], ["replace"], ["merge", "replace", None, "create"], ["delete"], ["remove"]]),
       form=st.sampled_from(["own-xmlns", "module-default-on-config"]))
def test_canonical_documents_take_the_fast_path_and_agree(monkeypatch: pytest.MonkeyPatch, table: list[NatSession], ops, form: str) -> None:
    if not table:
        return
    if form == "own-xmlns":
        msg = rpc_message(entries_text(table, ops))
    else:
        # As Codec.encode_xml(root="config") writes it: the module is the default namespace of <nc:config>.
        body = entries_text(table, ops).replace(f'<nat-session xmlns="{NS}"', "<nat-session")
        msg = rpc_message(body, config_tag=f'nc:config xmlns:nc="{NETCONF_NS}" xmlns="{NS}"')
    fast = fast_entries(msg)
    assert fast is not None, msg[:500]
    with monkeypatch.context() as m:
        m.setattr(natread, "CANONICAL_THRESHOLD", OFF)
        root, _ = natread.parse_message(CODEC, msg)
    config = root.find(f"{{{NETCONF_NS}}}edit-config/{{{NETCONF_NS}}}config")
    assert fast == natread.edit_request(CODEC, config).entries
    same_outcome(monkeypatch, msg, table)


def test_get_config_output_forwarded_as_is_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a source agent's get-config reply holds, wrapped in <config> unchanged.
    table = table_of(50)
    inner = natwrite.encode_sessions(CODEC, table, None, False).decode()
    msg = rpc_message(inner, target="running")
    entries = fast_entries(msg)
    assert entries is not None and [e.key for e in entries] == [s.key for s in table]
    assert all(e.operation is None for e in entries)
    reply = same_outcome(monkeypatch, msg)
    assert b"<ok/>" in reply


def test_large_request_by_parse_message(monkeypatch: pytest.MonkeyPatch) -> None:
    # Big enough for several chunks of the reader and for the streaming path it replaces.
    table = table_of(9000)
    msg = rpc_message(entries_text(table, ["merge"]), head='<?xml version="1.0" encoding="UTF-8"?>\n')
    root, batches = natread.parse_message(CODEC, msg)
    assert batches is not None and batches.unique and len(batches.req.entries) == len(table)
    assert root.find(f"{{{NETCONF_NS}}}edit-config/{{{NETCONF_NS}}}config") is not None
    assert len(root.find(f"{{{NETCONF_NS}}}edit-config/{{{NETCONF_NS}}}config")) == 0  # the marker is gone
    got = {e.key: CODEC.complete(e.values) for e in batches.req.entries}
    assert got == {s.key: s for s in table}
    assert b"<ok/>" in same_outcome(monkeypatch, msg)


# ----------------------------------------------------------------- near misses

GOOD = table_of(6)
BODY = entries_text(GOOD, ["merge"])
ONE = entries_text(GOOD[:1], ["merge"])
NEAR_MISSES = {
    "entity in a value": BODY.replace("<src_port>1024</src_port>", "<src_port>&#49;024</src_port>"),
    "CDATA value": BODY.replace("<src_port>1024</src_port>", "<src_port><![CDATA[1024]]></src_port>"),
    "comment between entries": ONE + "<!-- x -->" + BODY[len(ONE):],
    "entries inside a comment": "<!--" + BODY + "-->",
    "whitespace between entries": ONE + "\n  " + BODY[len(ONE):],
    "whitespace in a value": BODY.replace("<src_port>1024</src_port>", "<src_port> 1024</src_port>"),
    "carriage return in a value": BODY.replace("<translated_address>203.0.113.1</translated_address>", "<translated_address>203.0.113.1\r</translated_address>", 1),
    "leaves out of order": BODY.replace("<src_address>10.0.0.1</src_address><src_port>1024</src_port>", "<src_port>1024</src_port><src_address>10.0.0.1</src_address>"),
    "leaf twice": BODY.replace("<src_port>1024</src_port>", "<src_port>1024</src_port><src_port>1024</src_port>"),
    "mark twice": BODY.replace("<mark>1</mark>", "<mark>1</mark><mark>2</mark>"),
    "unknown leaf": BODY.replace("</nat-session>", "<colour>red</colour></nat-session>", 1),
    "missing key": BODY.replace("<dst_port>443</dst_port>", "", 1),
    "empty leaf": BODY.replace("<mark>1</mark>", "<mark></mark>"),
    "self-closed leaf": BODY.replace("<mark>1</mark>", "<mark/>"),
    "bad value": BODY.replace("<src_port>1025</src_port>", "<src_port>70000</src_port>"),
    "bad enum": BODY.replace("<protocol>UDP</protocol>", "<protocol>SCTP</protocol>", 1),
    "same entry twice": BODY + ONE,
    "attribute on a leaf": BODY.replace("<src_port>1024</src_port>", '<src_port xmlns="' + NS + '">1024</src_port>'),
    "operation on a leaf": BODY.replace("<src_port>1024</src_port>", f'<src_port xmlns:nc="{NETCONF_NS}" nc:operation="delete">1024</src_port>'),
    "unknown operation": BODY.replace('nc:operation="merge"', 'nc:operation="frobnicate"', 1),
    "nc bound to another namespace": BODY.replace(f'xmlns:nc="{NETCONF_NS}"', 'xmlns:nc="urn:example:other"'),
    "undeclared prefix": BODY.replace(f'xmlns:nc="{NETCONF_NS}" ', ""),
    "foreign attribute": BODY.replace("<nat-session ", '<nat-session colour="red" ', 1),
    "xml:lang attribute": BODY.replace("<nat-session ", '<nat-session xml:lang="en" ', 1),
    "no namespace": BODY.replace(f' xmlns="{NS}"', ""),
    "namespace undeclared": BODY.replace(f' xmlns="{NS}"', ' xmlns=""', 1),
    "another namespace": BODY.replace(f'xmlns="{NS}"', 'xmlns="urn:example:other"', 1),
    "prefixed entry": BODY.replace("<nat-session ", '<n:nat-session xmlns:n="' + NS + '" ', 1).replace("</nat-session>", "</n:nat-session>", 1),
    "entity in the operation": BODY.replace('nc:operation="merge"', 'nc:operation="&#114;eplace"', 1),
    "attribute twice": BODY.replace('nc:operation="merge"', 'nc:operation="merge" nc:operation="merge"', 1),
    "nat-control beside": BODY + f'<nat-control xmlns="{NS}"><admit-new-sessions>false</admit-new-sessions></nat-control>',
    "whole-list remove beside": f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}" nc:operation="remove"/>' + BODY,
    "pretty-printed entry first": BODY.replace("<src_address>", "\n<src_address>", 1),
    "text after the entries": BODY + "hello",
    "end tag with a space": BODY.replace("</nat-session>", "</nat-session >", 1),
    "truncated": BODY[:-5],
    "stray end tag": BODY + "</nat-session>",
    "stray start tag": BODY.replace("</nat-session>", "<nat-session></nat-session>", 1),
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_fall_back_and_answer_as_before(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    msg = rpc_message(NEAR_MISSES[name])
    assert fast_entries(msg) is None, name
    same_outcome(monkeypatch, msg, GOOD)


#: Other spellings of canonical entries (the fast path takes them), and entries
#: the decoder accepts but the plan refuses.
ACCEPTED = {
    "single-quoted operation": BODY.replace('nc:operation="merge"', "nc:operation='delete'", 1),
    "attributes in another order": BODY.replace(f'<nat-session xmlns:nc="{NETCONF_NS}" nc:operation="merge" xmlns="{NS}">',
                                                f'<nat-session xmlns="{NS}"\n   nc:operation="replace"\txmlns:nc="{NETCONF_NS}" >'),
    "extra declaration": BODY.replace("<nat-session ", '<nat-session xmlns:x="urn:example:x" ', 2),
    "tcp_state on UDP": BODY.replace("<translated_port>20000</translated_port>", "<translated_port>20000</translated_port><tcp_state>CLOSE</tcp_state>"),
    "translated_port missing": BODY.replace("<translated_port>20001</translated_port>", ""),
    "translated_address not owned": BODY.replace("<translated_address>203.0.113.1</translated_address>", "<translated_address>192.0.2.9</translated_address>", 1),
    "public endpoint used twice": BODY.replace("<translated_port>20002</translated_port>", "<translated_port>20001</translated_port>"),  # two TCP entries
}


#: The error-tag each of ACCEPTED gets (None: accepted).
ACCEPTED_TAGS = {
    "single-quoted operation": "data-missing",  # delete of an entry the candidate lacks
    "attributes in another order": None,
    "extra declaration": None,
    "tcp_state on UDP": "unknown-element",
    "translated_port missing": "missing-element",
    "translated_address not owned": "invalid-value",
    "public endpoint used twice": "operation-failed",
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_spellings_and_plan_refusals_agree(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    msg = rpc_message(ACCEPTED[name])
    assert fast_entries(msg) is not None, name
    reply = same_outcome(monkeypatch, msg, [])
    tag = ACCEPTED_TAGS[name]
    if tag is None:
        assert b"<ok/>" in reply, reply
    else:
        assert f"<error-tag>{tag}</error-tag>".encode() in reply and b"<ok/>" not in reply, reply


def test_operation_prefix_declared_on_config(monkeypatch: pytest.MonkeyPatch) -> None:
    body = BODY.replace(f'xmlns:nc="{NETCONF_NS}" ', "")
    msg = rpc_message(body, config_tag=f'config xmlns="{NETCONF_NS}" xmlns:nc="{NETCONF_NS}"')
    entries = fast_entries(msg)
    assert entries is not None and {e.operation for e in entries} == {"merge"}
    assert b"<ok/>" in same_outcome(monkeypatch, msg, GOOD)


@pytest.mark.parametrize("head,fast", [
    ('<?xml version="1.0" encoding="UTF-8"?>', True),
    ("<?xml version='1.0' encoding='us-ascii'?>\n", True),
    ('<?xml version="1.0"?>', True),
    ('<?xml version="1.0" encoding="ISO-8859-1"?>', False),
    ('<?xml version="1.0" encoding="UTF-16"?>', False),
    ('<!DOCTYPE rpc [<!ATTLIST nat-session xmlns CDATA "urn:example:other">]>', False),
    ('<!DOCTYPE rpc [<!ENTITY e "x">]>', False),
    ("<!-- a comment first -->", False),
])
def test_prolog(monkeypatch: pytest.MonkeyPatch, head: str, fast: bool) -> None:
    msg = rpc_message(BODY, head=head)
    assert (fast_entries(msg) is not None) == fast
    same_outcome(monkeypatch, msg, GOOD)


@pytest.mark.parametrize("message", [
    # Entries that are not those of an edit-config's <config>.
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><validate><source><config>{BODY}</config></source></validate></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config><x xmlns="urn:x">{BODY}</x></config></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config xmlns="urn:example:other">{BODY}</config></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config>{BODY}</config></edit-config><get/></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config>{BODY}<entries xmlns="urn:natmig:agent:entries-read-apart"/></config></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}"><edit-config><target><candidate/></target><config>{BODY}</config></edit-config></rpc>',
    f'<rpc xmlns="urn:example:other" message-id="1"><edit-config><target><candidate/></target><config>{BODY}</config></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config>{BODY}</config><config>{BODY}</config></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config>{BODY}</config></edit-config></rpc><!--',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config a="{BODY}"/></edit-config></rpc>',
    f'<rpc xmlns="{NETCONF_NS}" message-id="1"><edit-config><target><candidate/></target><config><?pi {BODY}?></config></edit-config></rpc>',
])
def test_entries_elsewhere_fall_back(monkeypatch: pytest.MonkeyPatch, message: str) -> None:
    same_outcome(monkeypatch, message.encode(), GOOD)


def test_bad_entries_are_named_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    # One bad value among canonical entries: the general path names it.
    body = BODY.replace("<src_port>1025</src_port>", "<src_port>70000</src_port>")
    reply = same_outcome(monkeypatch, rpc_message(body), GOOD)
    assert b"<error-tag>invalid-value</error-tag>" in reply and b"src_port" in reply


def test_plan_outcomes_match_for_existing_entries(monkeypatch: pytest.MonkeyPatch) -> None:
    # create of an entry that exists, delete of one that does not, merge over an existing one.
    first = table_of(4)
    monkeypatch.setattr(natread, "CANONICAL_THRESHOLD", 0)
    for ops in (["create"], ["delete"], ["merge"], ["replace"], ["remove"]):
        for extra in (first[:2], table_of(3, start=2)):
            # Each agent first gets `first` (by the general path), then the edit under test.
            def run(canonical: bool):
                monkeypatch.setattr(natread, "CANONICAL_THRESHOLD", 0 if canonical else OFF)
                agent = Agent({"203.0.113.1"})
                sess = rpc.SessionState(SessionRecord(1, "natmig", "127.0.0.1", 0.0))
                assert b"<ok/>" in rpc.handle_message(agent, sess, rpc_message(entries_text(first), target="running"))
                reply = rpc.handle_message(agent, sess, rpc_message(entries_text(extra, ops)))
                return reply, sorted(agent.datastore.read("candidate")[0], key=repr)

            assert run(True) == run(False), ops


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, len(BODY)), snippet=st.sampled_from(["", " ", "\n", "<", ">", "&", "&amp;", "&#32;", "]]>", "<!--c-->", "<?p?>", "<x/>",
                                                                "</nat-session>", '"', "'", "=", f' xmlns="{NS}"', ' nc:operation="delete"', "\r", "é", "\x00", "/"]),
       drop=st.integers(0, 3))
def test_random_damage_is_refused_or_accepted_as_before(monkeypatch: pytest.MonkeyPatch, cut: int, snippet: str, drop: int) -> None:
    body = BODY[:cut] + snippet + BODY[cut + drop:]
    try:
        msg = rpc_message(body)
    except UnicodeEncodeError:
        return
    same_outcome(monkeypatch, msg, GOOD)


def test_operations_are_the_known_ones() -> None:
    # Every operation the codec knows reaches the plan from the fast path.
    for op in sorted(EDIT_OPERATIONS):
        entries = fast_entries(rpc_message(entries_text(GOOD, [op])))
        assert entries is not None and {e.operation for e in entries} == {op}
