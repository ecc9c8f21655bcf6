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


def test_socket_in_a_namespace_that_does_not_exist_names_it_and_the_agent_says_netlink():
    import socket

    from natmig.agent.ctnetlink import NetlinkError, socket_in

    with pytest.raises(netns.NetnsError, match="network namespace natmig-no-such-ns"):
        netns.socket_in("natmig-no-such-ns", socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(NetlinkError, match="natmig-no-such-ns"):
        socket_in("natmig-no-such-ns", socket.AF_INET, socket.SOCK_DGRAM)
    with netns.socket_in(None, socket.AF_INET, socket.SOCK_DGRAM) as s:  # the caller's own namespace
        assert s.family == socket.AF_INET


@pytest.mark.root
def test_socket_in_makes_the_socket_there_and_the_thread_comes_back():
    import os
    import socket

    name = netns.run_prefix("ns")
    netns.add(name)
    try:
        here = os.readlink("/proc/thread-self/ns/net")
        with netns.socket_in(name, socket.AF_INET, socket.SOCK_DGRAM) as s:
            assert os.readlink("/proc/thread-self/ns/net") == here
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            # Seen from inside the namespace (by ss there), not from here.
            assert f":{port} " in netns.run(["ss", "-Hlun"], name).stdout
    finally:
        netns.delete(name)
