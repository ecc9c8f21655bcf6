"""The chained node's pure parts and the state agent of several modules (no root)."""

from __future__ import annotations

import pytest

from natmig.agent.chainnode import ChainNode, nat_config, shared_sysctls
from natmig.agent.fwnode import FwNodeConfig, FwNodeError
from natmig.agent.monitoring import Catalog
from natmig.agent.statestore import StateStore
from natmig.errors import ProviderError
from natmig.schema import YANG_DIR
from natmig.statemodel import common_module, load_module

FW = FwNodeConfig("c1", inside_address="10.0.0.1/24", outside_address="203.0.113.1/24", mgmt_if="mgmt0", mgmt_address="192.0.2.1/24")


def test_the_nat_half_translates_the_firewalls_inside_network_on_its_legs() -> None:
    n = nat_config(FW)
    assert (n.name, n.inside_if, n.outside_if) == ("c1", "inside0", "outside0")
    assert n.inside_subnet == "10.0.0.0/24" and n.public_address == "203.0.113.1" and n.mgmt_address == "192.0.2.1/24"
    assert nat_config(FW, "203.0.113.9").public_address == "203.0.113.9"


def test_the_firewall_wins_the_one_sysctl_the_two_halves_disagree_on() -> None:
    # The NAT sets be_liberal for the namespace; the firewall keeps window checks and marks its own writes liberal.
    assert shared_sysctls(FW, nat_config(FW)) == {"net/netfilter/nf_conntrack_tcp_be_liberal": (1, 0)}


def test_both_halves_must_name_the_same_namespace_and_legs() -> None:
    with pytest.raises(FwNodeError, match="same namespace and legs"):
        ChainNode(FW, nat_config(FwNodeConfig("c2")))


def test_a_store_of_two_modules_holds_every_list_and_the_catalog_serves_each_module_once() -> None:
    fw, nat = load_module(YANG_DIR / "fw-state.yang"), load_module(YANG_DIR / "nat-session.yang")
    with pytest.raises(ProviderError, match="one provider"):
        StateStore([fw, nat])
    cat = Catalog.for_modules([fw, nat], common_module(), [])
    names = [e.identifier for e in cat.entries]
    assert {"fw-state", "nat-session", "natmig-state", "ietf-inet-types"} <= set(names) and len(names) == len(set(names))
