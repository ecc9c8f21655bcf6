"""Unit tests of the testbed's pure parts: topology files, the flow plan, parsers, names (no root)."""

from __future__ import annotations

import copy
import tomllib

import pytest

from natmig.cli import main
from natmig.errors import TestbedError
from natmig.ofctl import PortStats, parse_port_stats
from natmig.testbed import flows, topology
from natmig.testbed.bed import Testbed
from natmig.testbed.prefix import check_prefix
from natmig.testbed.topomodel import TopologyError

DEMO = tomllib.loads(topology.DEFAULT_TOPOLOGY.read_text())


def edited(doc: dict, **changes: object) -> dict:
    """A copy of a topology document with dotted-path changes (``nats__nat1__ports``; value None deletes the key)."""
    doc = copy.deepcopy(doc)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = doc
        for p in parents:
            node = node[p]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    return doc


def _doc(**changes):
    """The demo document with changes (see :func:`edited`)."""
    return edited(DEMO, **changes)


def test_the_default_topology_is_the_original_demo():
    t = topology.load(None)
    assert list(t.hosts) == ["client", "server"] and list(t.nats) == ["nat1", "nat2"]
    assert str(t.hosts["client"].address) == "10.0.0.10" and t.hosts["client"].network == "inside"
    assert str(t.hosts["server"].address) == "203.0.113.100" and t.hosts["server"].network == "public"
    assert t.active_nat == "nat1" and t.public_address == "203.0.113.1"
    assert str(t.management.subnet) == "192.0.2.0/24"
    assert {str(n.mgmt_address) for n in t.nats.values()} == {"192.0.2.1", "192.0.2.2"}
    assert t.nats["nat1"].port_range == (20000, 29999)
    assert t.text == topology.DEFAULT_TOPOLOGY.read_text()


@pytest.mark.parametrize(
    ("changes", "field", "why"),
    [
        ({"hosts__client__address": "10.0.1.10"}, "hosts.client.address", "is not in networks.inside.subnet 10.0.0.0/24"),
        ({"hosts__client__address": "10.0.0.300"}, "hosts.client.address", "is not an IPv4 address"),
        ({"hosts__client__address": "10.0.0.255"}, "hosts.client.address", "network or broadcast"),
        ({"hosts__client__address": "10.0.0.1"}, "hosts.client.address", "already used by networks.inside.gateway"),
        ({"hosts__server__network": "dmz"}, "hosts.server.network", "is not a network"),
        ({"hosts__client__network": None}, "hosts.client.network", "missing"),
        ({"hosts__client__mac": "02:00:00:00:00:09"}, "hosts.client.mac", "unknown field"),
        ({"networks__inside__subnet": "10.0.0.1/24"}, "networks.inside.subnet", "is not an IPv4 network"),
        ({"networks__public__subnet": "10.0.0.0/16", "networks__public__gateway": "10.0.200.1"}, "networks.public.subnet", "overlaps"),
        ({"networks__public__gateway_mac": "03:00:00:00:00:01"}, "networks.public.gateway_mac", "multicast"),
        ({"networks__public__gateway_mac": "02:6e:6d:00:00:01"}, "networks.public.gateway_mac", "same as networks.inside.gateway_mac"),
        ({"networks__public": None}, "networks.public", "missing"),
        ({"management__subnet": "10.0.0.0/24"}, "management.subnet", "overlaps networks.inside.subnet"),
        ({"management__controller": "192.0.2.1"}, "nats.nat1.management", "already used by management.controller"),
        ({"nats__nat2__management": "192.0.3.2"}, "nats.nat2.management", "is not in management.subnet"),
        ({"nats__nat2__ports": "30000-20000"}, "nats.nat2.ports", "low <= high"),
        ({"nats__nat2__ports": 20000}, "nats.nat2.ports", "is not a port range"),
        ({"active_nat": "nat3"}, "active_nat", "is not a NAT node"),
        ({"active_nat": None}, "active_nat", "missing"),
        ({"bridge": "Br0"}, "bridge", "is not a bridge name"),
        ({"colour": "blue"}, "colour", "unknown field"),
        ({"name": 7}, "name", "is not a string"),
    ],
)
def test_a_bad_topology_is_refused_naming_the_field(changes, field, why):
    with pytest.raises(TopologyError) as exc:
        topology.parse(_doc(**changes), "bad.toml")
    matching = [p for p in exc.value.problems if p.startswith(f"{field}:")]
    assert matching, exc.value.problems
    assert any(why in p for p in matching), matching
    assert str(exc.value).startswith("bad.toml: ")


def test_bad_node_names_are_refused():
    doc = _doc()
    doc["hosts"]["Client-With-A-Long-Name"] = doc["hosts"].pop("client")
    doc["nats"]["ovs"] = doc["nats"].pop("nat2")
    with pytest.raises(TopologyError) as exc:
        topology.parse(doc)
    text = "\n".join(exc.value.problems)
    assert "hosts.Client-With-A-Long-Name: name must be" in text
    assert "nats.ovs: 'ovs' is reserved" in text


def test_every_problem_is_reported_at_once():
    with pytest.raises(TopologyError) as exc:
        topology.parse(_doc(hosts__client__address="x", nats__nat1__ports="a-b", active_nat="nat9"))
    fields = {p.split(":")[0] for p in exc.value.problems}
    assert fields == {"hosts.client.address", "nats.nat1.ports", "active_nat"}


def test_topology_needs_a_client_and_a_server():
    doc = _doc()
    del doc["hosts"]["server"]
    with pytest.raises(TopologyError, match="hosts: no host on the public network"):
        topology.parse(doc)


def test_unreadable_or_invalid_toml_names_the_file(tmp_path):
    with pytest.raises(TopologyError, match="cannot read the file"):
        topology.load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(TopologyError, match=f"(?s){bad}: .*not valid TOML"):
        topology.load(bad)


def test_yaml_topologies_read_like_toml_ones(tmp_path):
    import yaml

    f = tmp_path / "demo.yaml"
    f.write_text(yaml.safe_dump(DEMO))
    t = topology.load(f)
    assert t.hosts == topology.load(None).hosts and t.nats == topology.load(None).nats
    assert topology.load_text(t.text, str(f)) == t
    f.write_text(yaml.safe_dump(_doc(nats__nat2__ports="1-2-3")))
    with pytest.raises(TopologyError, match=r"nats\.nat2\.ports: '1-2-3' is not a port range"):
        topology.load(f)
    f.write_text("- just\n- a list\n")
    with pytest.raises(TopologyError, match="must be a mapping"):
        topology.load(f)


def test_cli_refuses_a_bad_topology_file_naming_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(topology.DEFAULT_TOPOLOGY.read_text().replace('address = "10.0.0.10"', 'address = "10.9.0.10"'))
    assert main(["testbed", "up", "--topology", str(bad), "--prefix", "nmunit"]) == 2  # usage: the file is wrong
    err = capsys.readouterr().err
    assert "hosts.client.address: 10.9.0.10 is not in networks.inside.subnet 10.0.0.0/24" in err


def test_switch_ports_are_numbered_by_topology_order():
    t = topology.load(None)
    assert flows.port_names(t) == {"client": 1, "server": 2, "nat1-in": 100, "nat1-out": 101, "nat2-in": 102, "nat2-out": 103}


def test_flow_plan_joins_each_network_to_the_active_nat_only():
    t = topology.load(None)
    nat2 = flows.plan(t, "nat2").splitlines()
    assert nat2 == [
        "cookie=0x6e6d,priority=100,in_port=1,actions=output:102",
        "cookie=0x6e6d,priority=100,in_port=100,actions=output:1",
        "cookie=0x6e6d,priority=100,in_port=102,actions=output:1",
        "cookie=0x6e6d,priority=100,in_port=2,actions=output:103",
        "cookie=0x6e6d,priority=100,in_port=101,actions=output:2",
        "cookie=0x6e6d,priority=100,in_port=103,actions=output:2",
        # Packets a NAT held while its admission was closed, released to the gateway MAC: to the active NAT.
        "cookie=0x6e6d,priority=101,in_port=100,dl_dst=02:6e:6d:00:00:01,actions=output:102",
        "cookie=0x6e6d,priority=101,in_port=102,dl_dst=02:6e:6d:00:00:01,actions=output:in_port",
        "cookie=0x6e6d,priority=0,actions=drop",
    ]
    # A move changes exactly the two steering flows (one per direction) and
    # the hairpins; the return flows of every NAT stay, so packets in flight still arrive.
    nat1 = flows.plan(t, "nat1").splitlines()
    assert sorted(set(nat1) ^ set(nat2)) == sorted([
        "cookie=0x6e6d,priority=100,in_port=1,actions=output:100",
        "cookie=0x6e6d,priority=100,in_port=2,actions=output:101",
        "cookie=0x6e6d,priority=101,in_port=100,dl_dst=02:6e:6d:00:00:01,actions=output:in_port",
        "cookie=0x6e6d,priority=101,in_port=102,dl_dst=02:6e:6d:00:00:01,actions=output:100",
        "cookie=0x6e6d,priority=100,in_port=1,actions=output:102",
        "cookie=0x6e6d,priority=100,in_port=2,actions=output:103",
        "cookie=0x6e6d,priority=101,in_port=100,dl_dst=02:6e:6d:00:00:01,actions=output:102",
        "cookie=0x6e6d,priority=101,in_port=102,dl_dst=02:6e:6d:00:00:01,actions=output:in_port",
    ])
    with pytest.raises(ValueError, match="'nat3' is not a NAT node"):
        flows.plan(t, "nat3")


def test_flow_plan_with_several_hosts_on_a_network_is_a_hub():
    doc = _doc()
    doc["hosts"]["client2"] = {"network": "inside", "address": "10.0.0.11"}
    t = topology.parse(doc)
    lines = flows.plan(t, "nat1").splitlines()
    # client=1, server=2, client2=3, nat1-in=100, nat2-in=102
    assert "cookie=0x6e6d,priority=100,in_port=1,actions=output:3,output:100" in lines
    assert "cookie=0x6e6d,priority=100,in_port=100,actions=output:1,output:3" in lines
    assert "cookie=0x6e6d,priority=100,in_port=102,actions=output:1,output:3" in lines


def test_active_nat_is_read_back_from_a_dump():
    t = topology.load(None)
    dump = [
        "cookie=0x6e6d, priority=100,in_port=1 actions=output:100",
        "cookie=0x6e6d, priority=100,in_port=101 actions=output:2",
        "cookie=0x6e6d, priority=0 actions=drop",
    ]
    assert flows.nats_in_flows(t, dump) == {"nat1"}
    # Return flows from an idle NAT do not make it active; an output to it does.
    assert flows.nats_in_flows(t, dump + ["priority=100,in_port=103 actions=output:2"]) == {"nat1"}
    assert flows.nats_in_flows(t, dump + ["priority=100,in_port=2 actions=output:103"]) == {"nat1", "nat2"}
    assert flows.nats_in_flows(t, dump[2:]) == set()
    assert flows.nats_in_flows(t, flows.plan(t, "nat2").splitlines()) == {"nat2"}
    # The hairpins as ovs-ofctl dumps them: the active NAT's own is IN_PORT, the other's outputs to the active one.
    hairpins = [
        "cookie=0x6e6d, priority=101,in_port=100,dl_dst=02:6e:6d:00:00:01 actions=IN_PORT",
        "cookie=0x6e6d, priority=101,in_port=102,dl_dst=02:6e:6d:00:00:01 actions=output:100",
    ]
    assert flows.nats_in_flows(t, dump + hairpins) == {"nat1"}


def test_port_counters_are_parsed_from_dump_ports():
    text = """OFPST_PORT reply (OF1.4) (xid=0x2): 3 ports
  port LOCAL: rx pkts=0, bytes=0, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=0, bytes=0, drop=0, errs=0, coll=0
           duration=0.035s
  port 101: rx pkts=7, bytes=686, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=9, bytes=882, drop=0, errs=0, coll=0
           duration=0.035s
  port  1: rx pkts=12, bytes=1000, drop=0, errs=0, frame=0, over=0, crc=0
           tx pkts=3, bytes=300, drop=0, errs=0, coll=0
"""
    assert parse_port_stats(text) == {101: PortStats(7, 9, 686, 882), 1: PortStats(12, 3, 1000, 300)}


def test_prefixes_are_checked():
    assert check_prefix("nm4711") == "nm4711"
    for bad in ("", "4711", "NM", "nm-1", "a" * 11):
        with pytest.raises(TestbedError, match="prefix"):
            check_prefix(bad)


def test_testbed_names_and_nat_configs_follow_the_topology():
    tb = Testbed.from_file(None, prefix="nmunit")
    assert tb.netns("client") == "nmunit-client" and tb.switch_netns == "nmunit-ovs" and tb.mgmt_netns == "nmunit-mgmt"
    assert tb.mgmt_address("nat2") == "192.0.2.2" and tb.controller_address == "192.0.2.254"
    c1, c2 = tb.nat_config("nat1"), tb.nat_config("nat2")
    assert c2.name == "nmunit-nat2" and c2.mgmt_address == "192.0.2.2/24" and c2.port_range == (20000, 29999)
    # Both NAT nodes are the same gateway on both networks: only switch ports differ.
    for attr in ("inside_address", "outside_address", "public_address", "inside_mac", "outside_mac"):
        assert getattr(c1, attr) == getattr(c2, attr), attr
    assert (c1.inside_address, c1.outside_address, c1.inside_mac) == ("10.0.0.1/24", "203.0.113.1/24", "02:6e:6d:00:00:01")
    assert tb.ovs_env()["OVS_RUNDIR"] == "/run/natmig/nmunit/ovs/run"
    with pytest.raises(TestbedError, match="'nat3' is not a NAT node"):
        tb.point_to("nat3")
    with pytest.raises(TestbedError, match="'router' is neither"):
        tb.netns("router")


def test_the_firewall_topology_gives_firewall_nodes_their_policy():
    t = topology.load(topology.DEFAULT_TOPOLOGY.parent / "firewall.toml")
    assert t.function == "firewall" and list(t.nats) == ["fw1", "fw2"]
    assert set(t.hosts) == {"client", "web", "server", "attacker"}
    assert t.firewall is not None and ("tcp", "10.0.0.20", 5001) in t.firewall.services
    c = Testbed(t, "nm1").fw_config("fw2")
    assert c.name == "nm1-fw2" and c.inside_address == "10.0.0.1/24" and c.mgmt_address == "192.0.2.2/24"
    assert c.inside_mac == "02:66:77:00:00:01" and c.new_burst == 100 and c.block_timeout == 120
    assert topology.load(None).function == "nat"
    with pytest.raises(TestbedError, match="not firewalls"):
        Testbed(topology.load(None), "nm1").fw_config("nat1")


@pytest.mark.parametrize("changes, field, why", [
    ({"function": "router"}, "function", "'router' is not one of nat, firewall"),
    ({"firewall": {"services": []}}, "firewall", 'only with function = "firewall"'),
    ({"function": "firewall", "firewall": {"services": ["tcp 10.0.0.20"]}}, "firewall.services[0]", "is not a service"),
    ({"function": "firewall", "firewall": {"services": ["udp 203.0.113.5:53"]}}, "firewall.services[0]", "not in networks.inside.subnet"),
    ({"function": "firewall", "firewall": {"new_rate": 0}}, "firewall.new_rate", "not a positive integer"),
    ({"function": "firewall", "firewall": {"colour": 1}}, "firewall.colour", "unknown field"),
])
def test_a_bad_firewall_topology_is_refused_naming_the_field(changes, field, why):
    doc = copy.deepcopy(DEMO)
    doc.update(changes)
    with pytest.raises(TopologyError) as e:
        topology.parse(doc)
    assert any(p.startswith(f"{field}:") and why in p for p in e.value.problems), e.value.problems


def test_demo_refuses_the_nat_demos_options_with_the_firewall(capsys):
    assert main(["demo", "--nf", "firewall", "--plot", "x.png"]) == 2
    assert "--plot: the NAT demo's alone" in capsys.readouterr().err
