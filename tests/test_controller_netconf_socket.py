"""The client's TCP socket: Nagle off (no delayed-ACK stalls), a refused connection named in the error."""

from __future__ import annotations

import socket

import pytest

from natmig.controller.ncerrors import ConnectError
from natmig.controller.ncsession import tcp_socket


def test_the_socket_is_connected_with_nagle_off():
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        s = tcp_socket("127.0.0.1", port, 5.0, f"natmig@127.0.0.1:{port}")
        try:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            assert s.getpeername() == ("127.0.0.1", port)
        finally:
            s.close()


def test_a_refused_connection_is_a_connect_error_naming_the_agent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            tcp_socket("127.0.0.1", port, 5.0, f"natmig@127.0.0.1:{port}")
