"""The RPC layer without SSH: one message in, one reply out, every error class."""

from __future__ import annotations

import time

import pytest
from lxml import etree

from natmig.agent.datastore import Datastore
from natmig.agent.nacm import OPEN
from natmig.agent.monitoring import Catalog, SessionRecord
from natmig.agent.notifications import NotificationHub
from natmig.agent.provider import MemoryProvider
from natmig.agent.rpc import SessionState, handle_message
from natmig.agent.server import OPTIONAL_CAPABILITIES
from natmig.codec import NETCONF_NS, default_codec
from natmig.model import NatSession

NS = "urn:natmig:yang:nat-session"
NC = f"{{{NETCONF_NS}}}"


class FakeServer:
    def __init__(self) -> None:
        self.codec = default_codec()
        self.provider = MemoryProvider(owned={"203.0.113.1"})
        self.datastore = Datastore(self.provider, self.codec)
        self.catalog = Catalog.for_schema(self.codec.schema, OPTIONAL_CAPABILITIES)
        self.hub = NotificationHub(self.provider, self.codec)
        self.access = OPEN
        self.started = time.time()
        self.killed: list[int] = []
        self.others = {7}

    def kill(self, sid: int) -> bool:
        if sid in self.others:
            self.killed.append(sid)
            return True
        return False

    def session_records(self) -> list[SessionRecord]:
        return [SessionRecord(1, "natmig", "127.0.0.1", time.time())]


@pytest.fixture
def srv() -> FakeServer:
    s = FakeServer()
    s.provider.apply([
        NatSession("TCP", "10.0.0.2", 1000, "198.51.100.1", 80, "203.0.113.1", 20000, "ESTABLISHED", 100),
        NatSession("UDP", "10.0.0.3", 53, "198.51.100.2", 53, "203.0.113.1", 21000, None, 30),
    ])
    return s


def call(srv: FakeServer, body: str, attrs: str = ' message-id="1"') -> etree._Element:
    sess = SessionState(SessionRecord(1, "natmig", "127.0.0.1", time.time()))
    reply = handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}"{attrs}>{body}</rpc>'.encode())
    return etree.fromstring(reply)


def errors(reply: etree._Element) -> list[dict[str, str]]:
    out = []
    for e in reply.iter(NC + "rpc-error"):
        d = {etree.QName(c).localname: (c.text or "") for c in e}
        d["info"] = {etree.QName(c).localname: c.text for c in e.iter() if c.getparent() is not None and etree.QName(c.getparent()).localname == "error-info"}
        out.append(d)
    return out


def entries(reply: etree._Element) -> list[etree._Element]:
    return list(reply.iter(f"{{{NS}}}nat-session"))


def edit(config: str, extra: str = "", target: str = "running") -> str:
    return f"<edit-config><target><{target}/></target>{extra}<config>{config}</config></edit-config>"


def test_reply_echoes_every_rpc_attribute(srv: FakeServer) -> None:
    r = call(srv, "<get-config><source><running/></source></get-config>", ' message-id="42" xmlns:x="urn:x" x:tag="t"')
    assert r.get("message-id") == "42" and r.get("{urn:x}tag") == "t"


def test_get_config_and_filters(srv: FakeServer) -> None:
    assert len(entries(call(srv, "<get-config><source><running/></source></get-config>"))) == 2
    f = f'<filter type="subtree"><nat-session xmlns="{NS}"><protocol>UDP</protocol></nat-session></filter>'
    got = entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>"))
    assert [e.findtext(f"{{{NS}}}src_port") for e in got] == ["53"]
    # Any leaf selects, not only keys.
    f = f'<filter><nat-session xmlns="{NS}"><translated_port>20000</translated_port></nat-session></filter>'
    assert [e.findtext(f"{{{NS}}}protocol") for e in entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>"))] == ["TCP"]
    # Selection leaves: keys plus the chosen leaf only.
    f = f'<filter><nat-session xmlns="{NS}"><protocol>TCP</protocol><timeout/></nat-session></filter>'
    (e,) = entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>"))
    assert {etree.QName(c).localname for c in e} == {"protocol", "src_address", "src_port", "dst_address", "dst_port", "timeout"}
    # A value no entry can hold selects nothing; an empty filter selects nothing.
    f = f'<filter><nat-session xmlns="{NS}"><src_port>99999</src_port></nat-session></filter>'
    assert entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>")) == []
    assert entries(call(srv, "<get-config><source><running/></source><filter/></get-config>")) == []


def test_get_has_statistics_and_monitoring(srv: FakeServer) -> None:
    r = call(srv, "<get/>")
    assert r.findtext(f".//{{{NS}}}nat-statistics/{{{NS}}}sessions") == "2"
    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    assert "nat-session" in [x.text for x in r.iter(f"{{{mon}}}identifier")]
    r = call(srv, f'<get><filter><nat-statistics xmlns="{NS}"/></filter></get>')
    assert entries(r) == [] and r.find(f".//{{{NS}}}nat-statistics") is not None


def test_with_defaults_report_all(srv: FakeServer) -> None:
    wd = '<with-defaults xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-with-defaults">report-all</with-defaults>'
    (tcp, udp) = sorted(entries(call(srv, f"<get-config><source><running/></source>{wd}</get-config>")), key=lambda e: e.findtext(f"{{{NS}}}protocol"))
    assert tcp.findtext(f"{{{NS}}}assured") == "false" and tcp.findtext(f"{{{NS}}}tcp_state") == "ESTABLISHED"
    assert udp.find(f"{{{NS}}}tcp_state") is None  # `when` false: not there at all


def test_edit_config_bad_value_has_tag_and_path(srv: FakeServer) -> None:
    cfg = f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>1</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><translated_address>203.0.113.1</translated_address><translated_port>70000</translated_port></nat-session>'
    (e,) = errors(call(srv, edit(cfg)))
    assert e["error-tag"] == "invalid-value"
    assert e["error-path"] == "/nats:nat-session[nats:protocol='TCP'][nats:src_address='10.0.0.9'][nats:src_port='1'][nats:dst_address='198.51.100.1'][nats:dst_port='80']/nats:translated_port"
    assert len(srv.provider.table) == 2


@pytest.mark.parametrize("body,tag", [
    (edit(f'<nat-session xmlns="{NS}"><protocol>TCP</protocol></nat-session>'), "missing-element"),
    (edit(f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>1</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><colour>red</colour></nat-session>'), "unknown-element"),
    (edit('<other xmlns="urn:other"/>'), "unknown-namespace"),
    (edit(f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><protocol>UDP</protocol></nat-session>'), "bad-element"),
    (edit(f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}" nc:operation="frobnicate"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>1</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port></nat-session>'), "bad-attribute"),
    (edit(f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}" nc:operation="create"><protocol>TCP</protocol><src_address>10.0.0.2</src_address><src_port>1000</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><translated_address>203.0.113.1</translated_address><translated_port>20009</translated_port></nat-session>'), "data-exists"),
    (edit(f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}" nc:operation="delete"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>1</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port></nat-session>'), "data-missing"),
    (edit("", "<default-operation>sideways</default-operation>"), "invalid-value"),
    (edit(f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}"><protocol>TCP</protocol><src_address>10.0.0.2</src_address><src_port>1000</src_port><dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><mark nc:operation="delete">1</mark></nat-session>'), "operation-not-supported"),
    ("<edit-config><config/></edit-config>", "missing-element"),
    ("<edit-config><target><startup/></target><config/></edit-config>", "invalid-value"),
    ("<get-config><source><running/></source><bogus/></get-config>", "unknown-element"),
    ('<get-config><source><running/></source><filter type="xpath" select="/x"/></get-config>', "operation-not-supported"),
    ("<frobnicate/>", "operation-not-supported"),
    ("<get/><get/>", "malformed-message"),
    ("<kill-session><session-id>1</session-id></kill-session>", "invalid-value"),
    ("<kill-session><session-id>99</session-id></kill-session>", "invalid-value"),
    ('<get-schema xmlns="urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"><identifier>no-such</identifier></get-schema>', "invalid-value"),
    ('<create-subscription xmlns="urn:ietf:params:xml:ns:netconf:notification:1.0"><stream>OTHER</stream></create-subscription>', "invalid-value"),
    ('<unlock><target><running/></target></unlock>', "operation-failed"),
])
def test_error_tags(srv: FakeServer, body: str, tag: str) -> None:
    before = dict(srv.provider.table)
    errs = errors(call(srv, body))
    assert errs and errs[0]["error-tag"] == tag, errs
    assert srv.provider.table == before


def test_missing_message_id_and_malformed_xml(srv: FakeServer) -> None:
    (e,) = errors(call(srv, "<get/>", attrs=""))
    assert e["error-tag"] == "missing-attribute" and e["info"]["bad-attribute"] == "message-id"
    sess = SessionState(SessionRecord(1, "u", "h", 0))
    r = etree.fromstring(handle_message(srv, sess, b"<rpc><unclosed>"))
    assert errors(r)[0]["error-tag"] == "malformed-message"
    assert sess.record.in_bad_rpcs == 1


def test_whole_request_refused_when_one_entry_is_bad(srv: FakeServer) -> None:
    good = f'<nat-session xmlns="{NS}"><protocol>UDP</protocol><src_address>10.0.0.8</src_address><src_port>5</src_port><dst_address>198.51.100.1</dst_address><dst_port>53</dst_port><translated_address>203.0.113.1</translated_address><translated_port>21005</translated_port></nat-session>'
    # same public port towards the same remote as an existing session: the reply tuple clashes
    bad = good.replace("10.0.0.8", "10.0.0.9").replace("21005", "21000").replace("198.51.100.1", "198.51.100.2")
    assert errors(call(srv, edit(good + bad)))[0]["error-tag"] == "operation-failed"
    assert len(srv.provider.table) == 2
    assert call(srv, edit(good)).find(NC + "ok") is not None
    assert len(srv.provider.table) == 3


def test_delete_whole_list_and_nat_control(srv: FakeServer) -> None:
    r = call(srv, edit(f'<nat-session xmlns="{NS}" xmlns:nc="{NETCONF_NS}" nc:operation="remove"/><nat-control xmlns="{NS}"><admit-new-sessions>false</admit-new-sessions></nat-control>'))
    assert r.find(NC + "ok") is not None, errors(r)
    assert srv.provider.table == {} and srv.provider.admission() is False
    r = call(srv, "<get-config><source><running/></source></get-config>")
    assert r.findtext(f".//{{{NS}}}admit-new-sessions") == "false"


def test_get_schema_serves_the_module_and_its_imports(srv: FakeServer) -> None:
    mon = "urn:ietf:params:xml:ns:yang:ietf-netconf-monitoring"
    for ident in ("nat-session", "ietf-inet-types"):
        r = call(srv, f'<get-schema xmlns="{mon}"><identifier>{ident}</identifier></get-schema>')
        assert r.findtext(f"{{{mon}}}data").startswith(f"module {ident}")
    r = call(srv, f'<get-schema xmlns="{mon}"><identifier>nat-session</identifier><version>1999-01-01</version></get-schema>')
    assert errors(r)[0]["error-tag"] == "invalid-value"


def test_kill_session_and_close_session(srv: FakeServer) -> None:
    assert call(srv, "<kill-session><session-id>7</session-id></kill-session>").find(NC + "ok") is not None
    assert srv.killed == [7]
    sess = SessionState(SessionRecord(1, "u", "h", 0))
    handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}" message-id="1"><close-session/></rpc>'.encode())
    assert sess.closing


def _entry(i: int, pub: int | None = None, extra: str = "") -> str:
    return (f'<nat-session xmlns="{NS}"><protocol>TCP</protocol><src_address>10.0.0.9</src_address><src_port>{i}</src_port>'
            f"<dst_address>198.51.100.1</dst_address><dst_port>80</dst_port><translated_address>203.0.113.1</translated_address>"
            f"<translated_port>{pub or 30000 + i}</translated_port>{extra}</nat-session>")


@pytest.fixture
def streaming(monkeypatch: pytest.MonkeyPatch) -> None:
    # Exercise the incremental path of large requests on small ones.
    from natmig.wire import natread

    monkeypatch.setattr(natread, "STREAM_THRESHOLD", 100)
    monkeypatch.setattr(natread.Batches, "SIZE", 3)


def test_large_edit_is_decoded_in_batches_with_the_same_result(srv: FakeServer, streaming: None) -> None:
    body = "".join(_entry(i) for i in range(1, 11)) + f'<nat-control xmlns="{NS}"><admit-new-sessions>false</admit-new-sessions></nat-control>'
    r = call(srv, edit(body))
    assert r.find(NC + "ok") is not None, errors(r)
    assert len(srv.provider.table) == 12 and srv.provider.admission() is False


def test_large_edit_refuses_duplicates_across_batches(srv: FakeServer, streaming: None) -> None:
    body = "".join(_entry(i) for i in range(1, 8)) + _entry(2, pub=31000)
    errs = errors(call(srv, edit(body)))
    assert [e["error-tag"] for e in errs] == ["bad-element"]
    assert len(srv.provider.table) == 2


def test_large_edit_with_a_bad_entry_in_an_early_batch_applies_nothing(srv: FakeServer, streaming: None) -> None:
    body = _entry(1) + _entry(2, extra="<mark>-1</mark>") + "".join(_entry(i) for i in range(3, 10))
    errs = errors(call(srv, edit(body)))
    assert [e["error-tag"] for e in errs] == ["invalid-value"] and errs[0]["error-path"].endswith("/nats:mark")
    assert len(srv.provider.table) == 2


def test_fast_and_careful_decoders_agree(srv: FakeServer) -> None:
    from natmig.wire.natread import fast_entries as _fast_entries

    codec = srv.codec
    good = etree.fromstring(f'<config xmlns="{NETCONF_NS}">' + _entry(1) + _entry(2, extra="<mark>5</mark>") + "</config>")
    assert _fast_entries(codec, good) == codec.decode_edit_xml(good)
    for odd in (_entry(1) + _entry(1), _entry(1, extra="<colour>red</colour>"), _entry(1, extra="<mark>x</mark>"),
                _entry(1).replace("<protocol>TCP</protocol>", ""), '<other xmlns="urn:x"/>', _entry(1, extra="<mark>1<x/></mark>"),
                _entry(1, extra="<mark>1</mark><mark>2</mark>")):
        assert _fast_entries(codec, etree.fromstring(f'<config xmlns="{NETCONF_NS}">{odd}</config>')) is None


def test_garbage_collector_is_back_on_after_every_rpc(srv: FakeServer) -> None:
    import gc

    call(srv, "<get/>")
    call(srv, "<frobnicate/>")
    handle_message(srv, SessionState(SessionRecord(1, "u", "h", 0)), b"<not-xml")
    assert gc.isenabled()


def test_filter_by_whole_key_uses_the_providers_lookup(srv: FakeServer) -> None:
    # A provider that can look entries up by key is not asked for its whole table.
    calls: list[object] = []
    provider = srv.provider

    def lookup(keys):
        calls.append(list(keys))
        return [provider.table[k] for k in keys if k in provider.table]

    def no_list():
        raise AssertionError("the whole table was read")

    provider.lookup = lookup  # type: ignore[attr-defined]
    provider.list = no_list  # type: ignore[method-assign]
    key = '<protocol>UDP</protocol><src_address>10.0.0.3</src_address><src_port>53</src_port><dst_address>198.51.100.2</dst_address><dst_port>53</dst_port>'
    f = f'<filter><nat-session xmlns="{NS}">{key}</nat-session><nat-session xmlns="{NS}">{key.replace("53</src_port>", "54</src_port>")}</nat-session></filter>'
    got = entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>"))
    assert [e.findtext(f"{{{NS}}}translated_port") for e in got] == ["21000"]
    assert len(calls) == 1 and len(calls[0]) == 2
    # Extra content matches still apply on top of the lookup.
    f = f'<filter><nat-session xmlns="{NS}">{key}<mark>7</mark></nat-session></filter>'
    assert entries(call(srv, f"<get-config><source><running/></source>{f}</get-config>")) == []


def test_validate(srv: FakeServer) -> None:
    assert call(srv, "<validate><source><running/></source></validate>").find(NC + "ok") is not None
    cfg = _entry(1) + _entry(2, pub=20000)  # 20000 is taken by nothing in an empty table: valid alone
    assert call(srv, f"<validate><source><config>{cfg}</config></source></validate>").find(NC + "ok") is not None
    bad = _entry(1) + _entry(2, pub=30001)  # two entries, one public port
    assert errors(call(srv, f"<validate><source><config>{bad}</config></source></validate>"))[0]["error-tag"] == "operation-failed"
    # A staged candidate that traffic made invalid: its public port got taken on running meanwhile.
    assert call(srv, edit(_entry(5, pub=20555), target="candidate")).find(NC + "ok") is not None
    assert call(srv, "<validate><source><candidate/></source></validate>").find(NC + "ok") is not None
    srv.provider.apply([NatSession("TCP", "10.0.0.4", 7, "198.51.100.1", 80, "203.0.113.1", 20555, "ESTABLISHED", 100)])
    assert errors(call(srv, "<validate><source><candidate/></source></validate>"))[0]["error-tag"] == "operation-failed"
    assert len(srv.provider.table) == 3


# ------------------------------------------------ a whole-table reply streamed while it is read


class BatchProvider(MemoryProvider):
    """Hands out its table two sessions at a time, as conntrack's streamed read does; may fail at batch ``fail_at``."""

    fail_at: int | None = None

    def batches(self):
        table = self.list().sessions
        for i in range(0, max(len(table), 1), 2):
            if self.fail_at is not None and i // 2 >= self.fail_at:
                from natmig.errors import ProviderError
                raise ProviderError("conntrack -L exited 1")
            yield table[i:i + 2]


def batch_server(n: int) -> FakeServer:
    srv = FakeServer()
    srv.provider = BatchProvider(owned={"203.0.113.1"})
    srv.datastore = Datastore(srv.provider, srv.codec)
    srv.provider.apply([NatSession("TCP", "10.0.0.2", 1000 + i, "198.51.100.1", 80, "203.0.113.1", 20000 + i, "ESTABLISHED", 100) for i in range(n)])
    return srv


WHOLE_LIST = f'<get-config><source><running/></source><filter type="subtree"><nat-session xmlns="{default_codec().ns}"/></filter></get-config>'


def streamed(srv: FakeServer, body: str, subscribed: bool = False) -> tuple[list[bytes], bytes]:
    pieces: list[bytes] = []
    sess = SessionState(SessionRecord(1, "natmig", "127.0.0.1", time.time()), stream=pieces.append, subscribed=subscribed)
    tail = handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}" message-id="9">{body}</rpc>'.encode())
    return pieces, tail


def test_a_whole_table_reply_is_streamed_batch_by_batch_and_equals_the_whole_reply():
    srv = batch_server(5)
    pieces, tail = streamed(srv, WHOLE_LIST)
    assert len(pieces) == 3  # the start tag with the first batch, then one piece per further batch
    assert pieces[0].startswith(b'<rpc-reply xmlns="' + NETCONF_NS.encode() + b'" message-id="9"><data>')
    whole = handle_message(srv, SessionState(SessionRecord(2, "natmig", "127.0.0.1", time.time())),
                           f'<rpc xmlns="{NETCONF_NS}" message-id="9">{WHOLE_LIST}</rpc>'.encode())
    assert b"".join(pieces) + tail == whole
    assert len(etree.fromstring(whole).find(NC + "data")) == 5


def test_a_read_failing_before_any_piece_is_an_ordinary_rpc_error():
    srv = batch_server(5)
    srv.provider.fail_at = 0
    pieces, reply = streamed(srv, WHOLE_LIST)
    assert pieces == []
    errs = errors(etree.fromstring(reply))
    assert errs and errs[0]["error-tag"] == "operation-failed" and "conntrack -L exited 1" in errs[0]["error-message"]


def test_a_read_failing_after_a_piece_was_sent_breaks_the_stream():
    from natmig.agent.rpc import StreamBroken
    srv = batch_server(5)
    srv.provider.fail_at = 2
    pieces: list[bytes] = []
    sess = SessionState(SessionRecord(1, "natmig", "127.0.0.1", time.time()), stream=pieces.append)
    with pytest.raises(StreamBroken, match="conntrack -L exited 1"):
        handle_message(srv, sess, f'<rpc xmlns="{NETCONF_NS}" message-id="9">{WHOLE_LIST}</rpc>'.encode())
    assert len(pieces) == 2
    # The datastore is not left locked (its lock is reentrant: ask from another thread).
    srv.provider.fail_at = None
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(1) as pool:
        pieces, tail = pool.submit(streamed, srv, WHOLE_LIST).result(timeout=5)
    assert len(etree.fromstring(b"".join(pieces) + tail).find(NC + "data")) == 5


@pytest.mark.parametrize("body,subscribed", [
    (f'<get-config><source><running/></source><filter type="subtree"><nat-session xmlns="{default_codec().ns}"><src_port>1001</src_port></nat-session></filter></get-config>', False),
    ('<get-config><source><running/></source></get-config>', False),
    (f'<get><filter type="subtree"><nat-session xmlns="{default_codec().ns}"/></filter></get>', False),
], ids=["content-match", "no-filter", "get"])
def test_other_reads_go_whole(body, subscribed):
    srv = batch_server(5)
    pieces, reply = streamed(srv, body, subscribed)
    assert pieces == []
    assert etree.fromstring(reply).find(NC + "data") is not None
