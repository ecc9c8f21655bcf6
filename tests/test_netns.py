"""natmig.netns: the one place a namespace is entered; its errors name the namespace."""

from __future__ import annotations

import pytest

from natmig import netns
from natmig.errors import NatmigError


def test_entering_a_namespace_that_does_not_exist_names_it():
    with pytest.raises(netns.NetnsError, match="network namespace natmig-no-such-ns: No such file"):
        netns.enter("natmig-no-such-ns")


def test_call_in_hands_the_error_back_and_never_runs_the_function():
    ran = []
    with pytest.raises(netns.NetnsError, match="natmig-no-such-ns") as ei:
        netns.call_in("natmig-no-such-ns", lambda: ran.append(1))
    assert isinstance(ei.value, NatmigError) and ran == []


@pytest.mark.root
def test_call_in_runs_in_the_namespace_and_the_caller_stays_where_it_was(tmp_path):
    import os

    name = netns.run_prefix("ns")
    netns.add(name)
    try:
        here = os.readlink("/proc/thread-self/ns/net")
        there = netns.call_in(name, lambda: os.readlink("/proc/thread-self/ns/net"))
        assert there != here and os.readlink("/proc/thread-self/ns/net") == here
        assert there == f"net:[{os.stat(netns.NETNS_DIR / name).st_ino}]"
    finally:
        netns.delete(name)
