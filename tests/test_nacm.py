"""Access control (RFC 8341, agent/nacm.py): decisions, the operator's file, and a real agent refusing a read-only user."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from ncclient import manager
from ncclient.operations import RPCError

from natmig.agent.auth import set_password
from natmig.agent.nacm import NacmError, load
from natmig.agent.provider import MemoryProvider
from natmig.agent.server import Agent, AgentConfig
from natmig.codec import default_codec
from natmig.model import NatSession

RULES = '''
[groups]
admin = ["natmig"]
operators = ["alice"]

[[rule-list]]
name = "admin"
groups = ["admin"]
rule = [{ name = "all", action = "permit" }]

[[rule-list]]
name = "operators"
groups = ["operators"]
rule = [{ name = "admission", module = "natmig-state", access = "write", action = "permit" },
        { name = "lock", rpc = "lock", action = "permit" },
        { name = "unlock", rpc = "unlock", action = "permit" }]
'''


def test_decisions_follow_rule_lists_in_order_then_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "nacm.toml").write_text(RULES)
    ac = load(tmp_path / "nacm.toml")
    assert ac.decide("natmig", "edit-config", ["nat-session"]).permitted
    assert ac.decide("natmig", "kill-session").permitted
    # a user no rule list names: read yes, write no
    assert ac.decide("bob", "get-config").permitted
    for op in ("edit-config", "lock", "kill-session", "commit"):
        d = ac.decide("bob", op, ["nat-session"] if op == "edit-config" else [])
        assert not d.permitted and d.why.startswith("write-default deny")
    # an operator: admission (natmig-state) but not the table
    assert ac.decide("alice", "edit-config", ["natmig-state"]).permitted
    assert not ac.decide("alice", "edit-config", ["nat-session"]).permitted
    mixed = ac.decide("alice", "edit-config", ["nat-session", "natmig-state"])  # a rule for one module is no licence for another
    assert not mixed.permitted and mixed.why == "write-default deny for nat-session"
    assert ac.decide("alice", "lock").why == "rule operators/lock"
    assert ac.decide("bob", "close-session").permitted


@pytest.mark.parametrize("text, words", [
    ("frob = 1", "frob: unknown key"),
    ('write-default = "maybe"', "write-default: 'maybe' is not permit or deny"),
    ('[[rule-list]]\nname = "x"\nrule = [{ name = "r", access = "sing" }]', "rule[0].access"),
    ('[groups]\nadmin = "natmig"', "groups.admin: a list of names"),
    ("this is not toml", "not TOML"),
])
def test_a_wrong_file_is_refused_naming_the_key(tmp_path: Path, text: str, words: str) -> None:
    (tmp_path / "nacm.toml").write_text(text)
    with pytest.raises(NacmError, match=words.replace("[", r"\[").replace("(", r"\(")):
        load(tmp_path / "nacm.toml")


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[int]:
    for user in ("natmig", "bob", "alice"):
        set_password(tmp_path / "passwords", user, "secret")
    (tmp_path / "nacm.toml").write_text(RULES)
    cfg = AgentConfig(host="127.0.0.1", port=0, host_key=str(tmp_path / "key"), passwords=str(tmp_path / "passwords"), nacm=str(tmp_path / "nacm.toml"))
    a = Agent(cfg, MemoryProvider(owned={"203.0.113.1"}), default_codec())
    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    asyncio.run_coroutine_threadsafe(a.start(), loop).result(10)
    try:
        yield a.port
    finally:
        loop.call_soon_threadsafe(a.close)
        time.sleep(0.1)
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)


def connect(port: int, user: str) -> manager.Manager:
    return manager.connect(host="127.0.0.1", port=port, username=user, password="secret", hostkey_verify=False, allow_agent=False, look_for_keys=False, timeout=10)


SESSION = NatSession("TCP", "10.0.0.2", 1000, "198.51.100.1", 80, "203.0.113.1", 20000, "ESTABLISHED", 300)
NAT_ENTRY = ('<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0">' + default_codec().encode_xml([SESSION], root=None).decode() + "</config>")
CLOSE = ('<config xmlns="urn:ietf:params:xml:ns:netconf:base:1.0"><state-control xmlns="urn:natmig:yang:natmig-state">'
         "<admit-new>false</admit-new></state-control></config>")


def test_a_read_only_user_reads_and_is_denied_every_change(agent: int) -> None:
    admin, bob = connect(agent, "natmig"), connect(agent, "bob")
    try:
        admin.edit_config(target="running", config=NAT_ENTRY)
        assert "20000" in bob.get_config("running").data_xml  # reads
        for call in (lambda: bob.edit_config(target="running", config=NAT_ENTRY),
                     lambda: bob.lock("running"),
                     lambda: bob.kill_session(admin.session_id),
                     lambda: bob.edit_config(target="running", config=CLOSE)):
            with pytest.raises(RPCError) as e:
                call()
            assert e.value.tag == "access-denied" and "bob" in e.value.message
        assert admin.connected  # the kill was refused
    finally:
        bob.close_session()
        admin.close_session()


def test_an_operator_may_change_admission_but_not_the_table(agent: int) -> None:
    alice = connect(agent, "alice")
    try:
        alice.lock("running")
        alice.edit_config(target="running", config=CLOSE)
        assert "<admit-new>false</admit-new>" in alice.get(filter=("subtree", '<state-control xmlns="urn:natmig:yang:natmig-state"/>')).data_xml
        with pytest.raises(RPCError) as e:
            alice.edit_config(target="running", config=NAT_ENTRY)
        assert e.value.tag == "access-denied" and "nat-session" in e.value.message
        alice.unlock("running")
    finally:
        alice.close_session()
