"""Unit tests of the inventory: TOML and YAML, overrides, and errors that name the field."""

from __future__ import annotations

import pytest

from natmig.controller.inventory import InventoryError, apply_overrides, dump_toml, load, parse

TOML = """
[agents.nat1]
host = "192.0.2.11"
port = 8301
password = "pw"
known_hosts = "/tmp/kh"
public_address = "203.0.113.1"

[agents.nat2]
host = "192.0.2.12"
key = "/tmp/id"

[switch]
bridge = "br0"
ovs_rundir = "/run/x"
client_port = 1
server_port = 2
[switch.nats.nat1]
inside = 3
outside = 4
[switch.nats.nat2]
inside = 5
outside = 6

[migration]
source = "nat1"
target = "nat2"
retire = "keep"
"""

YAML = """
agents:
  nat1: {host: 192.0.2.11, password_file: /tmp/pw}
  nat2: {host: 192.0.2.12, password: pw, port: 830}
migration: {source: nat1, target: nat2}
"""


def test_toml_loads(tmp_path):
    p = tmp_path / "inv.toml"
    p.write_text(TOML)
    inv = load(p)
    assert inv.agents["nat1"].port == 8301 and inv.agents["nat2"].port == 830
    assert inv.agents["nat2"].username == "natmig"
    assert inv.switch.layout.nats["nat2"].outside == 6 and inv.switch.ovs_rundir == "/run/x"
    assert (inv.source, inv.target, inv.retire) == ("nat1", "nat2", "keep")


def test_yaml_loads_and_password_file_is_read(tmp_path):
    p = tmp_path / "inv.yaml"
    p.write_text(YAML)
    (tmp_path / "pw").write_text("s3cret\n")
    inv = load(p, [f"agents.nat1.password_file={tmp_path / 'pw'}"])
    assert inv.agents["nat1"].secret() == "s3cret"
    assert inv.switch is None


def test_overrides_win_and_are_typed(tmp_path):
    p = tmp_path / "inv.toml"
    p.write_text(TOML)
    inv = load(p, ["agents.nat2.host=192.0.2.22", "agents.nat2.port=9999", "migration.retire=delete"])
    assert inv.agents["nat2"].host == "192.0.2.22" and inv.agents["nat2"].port == 9999
    assert inv.retire == "delete"
    with pytest.raises(InventoryError, match="expected PATH=VALUE"):
        apply_overrides({}, ["agents.nat2.host"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("agents.nat1.port=abc", "agents.nat1.port: 'abc' is not an integer"),
        ("agents.nat1.port=70000", "agents.nat1.port: 70000 is out of range"),
        ("agents.nat1.colour=red", "agents.nat1.colour: unknown field"),
        ("agents.nat1.public_address=nowhere", "agents.nat1.public_address: 'nowhere' is not an IP address"),
        ("switch.client_port=0", "switch.client_port: 0 is out of range"),
        ("migration.target=nat7", "migration.target 'nat7' is not an agent"),
        ("migration.retire=burn", "migration.retire: 'burn' is not one of"),
        ("switch.nats.nat2.inside=x", "switch.nats.nat2.inside: 'x' is not an integer"),
        ("frobnicate.x=1", "frobnicate: unknown section"),
    ],
)
def test_errors_name_the_field(tmp_path, override, message):
    p = tmp_path / "inv.toml"
    p.write_text(TOML)
    with pytest.raises(InventoryError) as ei:
        load(p, [override])
    assert message in str(ei.value)
    assert str(p) in str(ei.value)


def test_missing_things_are_named(tmp_path):
    with pytest.raises(InventoryError, match="agents: missing"):
        parse({})
    with pytest.raises(InventoryError, match="agents.a.host: missing"):
        parse({"agents": {"a": {"password": "x"}}})
    with pytest.raises(InventoryError, match="agents.a: give password"):
        parse({"agents": {"a": {"host": "h"}}})
    with pytest.raises(InventoryError, match="switch.nats.b: missing"):
        parse({"agents": {"a": {"host": "h", "key": "k"}, "b": {"host": "h", "key": "k"}},
               "switch": {"bridge": "br0", "client_port": 1, "server_port": 2, "nats": {"a": {"inside": 3, "outside": 4}}}})
    bad = tmp_path / "inv.json"
    bad.write_text("{}")
    with pytest.raises(InventoryError, match="unknown format"):
        load(bad)
    broken = tmp_path / "inv.toml"
    broken.write_text("[agents\n")
    with pytest.raises(InventoryError, match="not valid TOML"):
        load(broken)
    with pytest.raises(InventoryError, match="cannot read"):
        load(tmp_path / "absent.toml")


def test_dump_toml_round_trips(tmp_path):
    p = tmp_path / "inv.toml"
    p.write_text(TOML)
    import tomllib
    doc = tomllib.loads(TOML)
    again = tmp_path / "again.toml"
    again.write_text(dump_toml(doc))
    assert tomllib.loads(again.read_text()) == doc
    assert load(again) == load(p).__class__(**{**load(p).__dict__, "path": str(again)})


def test_a_gateway_mac_adds_the_hairpin_rules_and_a_bad_one_is_named(tmp_path):
    from natmig.controller.inventory import InventoryError, parse
    from natmig.controller.plan import steering_flows

    doc = {
        "agents": {n: {"host": "192.0.2.1", "password": "x"} for n in ("nat1", "nat2")},
        "switch": {"bridge": "br0", "client_port": 1, "server_port": 2, "gateway_mac": "02:AA:00:00:00:01",
                   "nats": {"nat1": {"inside": 3, "outside": 4}, "nat2": {"inside": 5, "outside": 6}}},
    }
    inv = parse(doc)
    flows = steering_flows(inv.switch.layout, "nat2")
    assert "priority=101,in_port=3,dl_dst=02:aa:00:00:00:01,actions=output:5" in flows
    doc["switch"]["gateway_mac"] = "02:aa:00:00:01"
    with pytest.raises(InventoryError, match="switch.gateway_mac: '02:aa:00:00:01' is not a MAC address"):
        parse(doc)
