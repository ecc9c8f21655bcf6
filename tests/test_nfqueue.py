"""Unit tests (no root) of the NFQUEUE messages: encoders and decoder against hand-built bytes."""

from __future__ import annotations

import struct
import sys

import pytest

from natmig.agent import nfqueue as q

# Netlink headers and attribute headers are host-endian; the hand-built bytes below are little-endian.
pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="hand-built bytes are little-endian")

QUEUE = 0x6E6D


def test_bind_asks_for_whole_packets_and_an_acknowledgement() -> None:
    want = bytes.fromhex(
        "30000000" "0203" "0500" "01000000" "00000000"  # nlmsghdr: 48 bytes, QUEUE<<8|CONFIG, REQUEST|ACK, seq 1
        "00" "00" "6e6d"  # nfgenmsg: AF_UNSPEC, v0, queue 28269 big-endian
        "0800" "0100" "01000000"  # NFQA_CFG_CMD: BIND, pad, pf 0
        "0900" "0200" "0000ffff" "02" "000000"  # NFQA_CFG_PARAMS: copy_range 65535, COPY_PACKET, padded to 4
        "0800" "0300" "00001000"  # NFQA_CFG_QUEUE_MAXLEN 4096
    )
    assert q.bind_message(QUEUE, seq=1) == want


def test_unbind_and_verdict() -> None:
    assert q.unbind_message(7, seq=2) == bytes.fromhex("1c000000" "0203" "0500" "02000000" "00000000" "0000" "0007" "0800" "0100" "02000000")
    assert q.verdict_message(QUEUE, 0x01020304, q.NF_DROP) == bytes.fromhex(
        "20000000" "0103" "0100" "00000000" "00000000"  # VERDICT, REQUEST only: the kernel answers only an error
        "00006e6d"
        "0c00" "0200" "00000000" "01020304"  # NFQA_VERDICT_HDR: NF_DROP, packet id (both big-endian)
    )


def _packet_message(packet_id: int, mac: bytes | None, payload: bytes, seq: int = 0) -> bytes:
    """A packet message as the kernel sends it, with attributes the decoder must skip (mark, in-device)."""
    def attr(kind: int, data: bytes) -> bytes:
        return struct.pack("<HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)

    body = bytes.fromhex("00006e6d")
    body += attr(1, struct.pack("!IHB", packet_id, 0x0800, 0))  # NFQA_PACKET_HDR, 7 bytes (packed)
    body += attr(3, struct.pack("!I", 0x6E6D0001))  # NFQA_MARK
    body += attr(5, struct.pack("!I", 4))  # NFQA_IFINDEX_INDEV
    if mac is not None:
        body += attr(9, struct.pack("!HH", len(mac), 0) + mac + b"\0" * (8 - len(mac)))  # NFQA_HWADDR
    body += attr(10, payload)  # NFQA_PAYLOAD
    return struct.pack("<IHHII", 16 + len(body), 0x0300, 0, seq, 0) + body


def test_parse_reads_packets_and_acks_and_skips_the_rest() -> None:
    ip = bytes.fromhex("4500001c0001000040110000" "0a00000a" "cb007164" "9c41138a00080000")  # IPv4 + UDP header
    ack = struct.pack("<IHHII", 36, 2, 0, 1, 0) + struct.pack("<i", 0) + bytes(16)  # NLMSG_ERROR 0 for seq 1
    refused = struct.pack("<IHHII", 36, 2, 0, 5, 0) + struct.pack("<i", -16) + bytes(16)  # EBUSY for seq 5
    other = struct.pack("<IHHII", 20, 0x0102, 0, 0, 0) + bytes(4)  # another subsystem's message
    mac = bytes.fromhex("02aabbccddee")
    data = ack + _packet_message(9, mac, ip) + other + _packet_message(10, None, b"\x45" * 21) + refused
    got = list(q.parse(data))
    assert got == [
        q.NetlinkAck(1, 0),
        q.QueuedPacket(9, 0x0800, 0, mac, ip),
        q.QueuedPacket(10, 0x0800, 0, None, b"\x45" * 21),
        q.NetlinkAck(5, 16),
    ]


def test_parse_stops_at_a_cut_or_malformed_message() -> None:
    whole = _packet_message(1, bytes(6), b"x" * 40)
    assert list(q.parse(whole[:-8])) == []
    assert list(q.parse(struct.pack("<IHHII", 8, 0x0300, 0, 0, 0) + whole)) == []  # length below a header


def test_a_released_packet_is_framed_to_the_gateway_from_its_sender() -> None:
    frame = q.ethernet_frame(bytes.fromhex("026e6d000001"), bytes.fromhex("02aabbccddee"), 0x0800, b"IP")
    assert frame == bytes.fromhex("026e6d000001" "02aabbccddee" "0800") + b"IP"
    assert q.format_mac(bytes.fromhex("026e6d000001")) == "02:6e:6d:00:00:01"


def _tcp(flags: int, seq: int = 0x01020304, sport: int = 40000, frag: int = 0) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, frag, 64, 6, 0, bytes([10, 0, 0, 10]), bytes([203, 0, 113, 100]))
    return ip + struct.pack("!HHIIBBHHH", sport, 5001, seq, 0, 0x50, flags, 64240, 0, 0)


def test_syn_key_names_one_connection_attempt() -> None:
    syn = _tcp(0x02)
    assert q.syn_key(syn) == q.syn_key(_tcp(0x02)) is not None  # a retransmission: the same attempt
    assert q.syn_key(_tcp(0x02, seq=5)) != q.syn_key(syn)  # a new attempt from the same port
    assert q.syn_key(_tcp(0x02, sport=40001)) != q.syn_key(syn)
    assert q.syn_key(_tcp(0x12)) is None  # SYN-ACK
    assert q.syn_key(_tcp(0x10)) is None  # ACK
    assert q.syn_key(_tcp(0x02, frag=5)) is None  # a later fragment: no TCP header
    assert q.syn_key(syn[:30]) is None  # cut short
    udp = bytearray(syn)
    udp[9] = 17
    assert q.syn_key(bytes(udp)) is None
