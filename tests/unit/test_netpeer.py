"""cosim.netpeer: ARP and ICMP echo answers, byte-exact replies, checksums, what is ignored.

Checksums are checked against an independent computation (a byte-pair loop with an
end-around carry after every addition, written here) and against the RFC 1071 example."""

import socket
import struct
import pytest
from cosim.netpeer import (NetPeer, arp_request, icmp_echo_request, inet_checksum, BROADCAST,
                           ETH_P_ARP, ETH_P_IP)

PEER_MAC = bytes.fromhex("02aabbccddee")
PEER_IP = "10.0.0.254"
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.0.1"


def ref_checksum(data: bytes) -> int:
    """Independent RFC 1071: add 16-bit words one by one, folding the carry each time."""
    acc = 0
    for i in range(0, len(data), 2):
        word = data[i] << 8 | (data[i + 1] if i + 1 < len(data) else 0)
        acc += word
        acc = (acc & 0xFFFF) + (acc >> 16)
    return (~acc) & 0xFFFF


def parse_ipv4_icmp(frame):
    """(eth dst, eth src, ethertype, ip header fields, ip header bytes, icmp bytes)."""
    dst, src, etype = struct.unpack_from("!6s6sH", frame)
    ip = frame[14:]
    fields = struct.unpack_from("!BBHHHBBH4s4s", ip)
    ihl = (fields[0] & 0xF) * 4
    total = fields[2]
    return dst, src, etype, fields, ip[:ihl], ip[ihl:total]


@pytest.fixture
def peer():
    return NetPeer(PEER_MAC, PEER_IP)


def test_rfc1071_example_and_reference():
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert inet_checksum(data) == 0x220D == ref_checksum(data)
    for n in (0, 1, 2, 3, 17, 1472, 1501):
        blob = bytes((i * 37 + 11) & 0xFF for i in range(n))
        assert inet_checksum(blob) == ref_checksum(blob)


def test_arp_request_answered(peer):
    req = arp_request(GUEST_MAC, GUEST_IP, PEER_IP)
    assert len(req) == 60
    [reply] = peer.handle(req)
    expected = (GUEST_MAC + PEER_MAC + struct.pack("!H", ETH_P_ARP)
                + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 2)
                + PEER_MAC + socket.inet_aton(PEER_IP)
                + GUEST_MAC + socket.inet_aton(GUEST_IP))
    assert reply == expected + bytes(60 - len(expected))
    assert peer.stats.arp_requests == 1 and peer.stats.arp_replies == 1


def test_arp_for_other_ip_or_reply_ignored(peer):
    assert peer.handle(arp_request(GUEST_MAC, GUEST_IP, "10.0.0.7")) == []
    reply = bytearray(arp_request(GUEST_MAC, GUEST_IP, PEER_IP))
    reply[14 + 7] = 2                                   # opcode: reply
    assert peer.handle(bytes(reply)) == []
    assert peer.stats.ignored == 2 and peer.stats.arp_replies == 0


@pytest.mark.parametrize("size", [0, 1, 2, 55, 56, 57, 1000, 1471, 1472])
def test_echo_reply_byte_exact(peer, size):
    payload = bytes((i * 7 + size) & 0xFF for i in range(size))
    req = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, ident=0x1234,
                            seq=size, payload=payload, ip_id=0xBEEF, tos=0x10, ttl=17)
    [reply] = peer.handle(req)
    dst, src, etype, f, iph, icmp = parse_ipv4_icmp(reply)
    assert (dst, src, etype) == (GUEST_MAC, PEER_MAC, ETH_P_IP)
    ver_ihl, tos, total, ident, frag, ttl, proto, csum, s, d = f
    assert (ver_ihl, tos, total, ident, frag, ttl, proto) == (
        0x45, 0x10, 28 + size, 0xBEEF, 0, 64, 1)
    assert (s, d) == (socket.inet_aton(PEER_IP), socket.inet_aton(GUEST_IP))
    assert csum == ref_checksum(iph[:10] + b"\0\0" + iph[12:])
    assert ref_checksum(iph) == 0
    assert icmp[0:2] == b"\x00\x00"
    assert struct.unpack("!HH", icmp[4:8]) == (0x1234, size)
    assert icmp[8:] == payload
    assert struct.unpack("!H", icmp[2:4])[0] == ref_checksum(b"\0\0\0\0" + icmp[4:])
    # the whole reply, built independently
    body = b"\x00\x00" + struct.pack("!H", ref_checksum(b"\0\0\0\0" + icmp[4:])) + icmp[4:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0x10, 20 + len(body), 0xBEEF, 0, 64, 1, 0,
                     socket.inet_aton(PEER_IP), socket.inet_aton(GUEST_IP))
    ip = ip[:10] + struct.pack("!H", ref_checksum(ip)) + ip[12:]
    frame = GUEST_MAC + PEER_MAC + b"\x08\x00" + ip + body
    assert reply == frame + bytes(max(0, 60 - len(frame)))
    assert len(reply) == max(60, 14 + 20 + 8 + size)
    assert peer.stats.echo_requests == peer.stats.echo_replies == 1


def test_echo_request_builder_checksums():
    req = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"abc")
    _, _, _, f, iph, icmp = parse_ipv4_icmp(req)
    assert ref_checksum(iph) == 0 and ref_checksum(icmp) == 0 and icmp[0] == 8
    assert len(req) == 60 and f[2] == 31


def test_ip_options_not_echoed(peer):
    req = bytearray(icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"x" * 30))
    ip = req[14:]
    opts = b"\x01\x01\x01\x00"                          # NOP NOP NOP EOL
    ip = bytearray(ip[:20] + opts + ip[20:])
    ip[0] = 0x46
    ip[2:4] = struct.pack("!H", len(ip))
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", ref_checksum(bytes(ip[:24])))
    [reply] = peer.handle(bytes(req[:14] + ip))
    _, _, _, f, iph, icmp = parse_ipv4_icmp(reply)
    assert f[0] == 0x45 and len(iph) == 20 and icmp[8:] == b"x" * 30


def test_padding_after_total_length_ignored(peer):
    req = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"hi")
    [reply] = peer.handle(req + bytes(40))
    assert parse_ipv4_icmp(reply)[5][8:] == b"hi"


def corrupt(frame, offset):
    b = bytearray(frame)
    b[offset] ^= 0x01
    return bytes(b)


def test_ignored_and_counted(peer):
    good = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"p" * 100)
    cases = {
        "bad_checksum": [corrupt(good, 14 + 8),            # TTL changed, header sum stale
                         corrupt(good, 14 + 20 + 8 + 5)],  # ICMP data changed
        "fragments": [icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP,
                                        payload=b"p" * 100, flags_frag=0x2000),   # MF
                      icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP,
                                        payload=b"p" * 100, flags_frag=0x0010)],  # offset
        "not_for_us": [GUEST_MAC + good[6:], bytes.fromhex("333300000001") + good[6:]],
        "malformed": [good[:10], good[:14 + 10], good[:14 + 20 + 4]],
        "ignored": [icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, "10.0.0.9"),
                    good[:12] + b"\x86\xdd" + good[14:],                  # IPv6 ethertype
                    BROADCAST + good[6:]],                                # IPv4 to broadcast
    }
    for frames in cases.values():
        for frame in frames:
            assert peer.handle(frame) == []
    s = peer.stats.as_dict()
    for key, frames in cases.items():
        assert s[key] == len(frames), key
    assert s["frames"] == sum(len(v) for v in cases.values())
    assert s["echo_replies"] == 0


def test_echo_reply_and_other_icmp_ignored(peer):
    req = bytearray(icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"q"))
    icmp = req[34:34 + 9]
    icmp[0] = 0                                          # an echo *reply* to us
    icmp[2:4] = b"\0\0"
    icmp[2:4] = struct.pack("!H", ref_checksum(bytes(icmp)))
    req[34:34 + 9] = icmp
    assert peer.handle(bytes(req)) == []
    assert peer.stats.ignored == 1


def test_bad_mac():
    with pytest.raises(ValueError):
        NetPeer(b"\x01\x02", PEER_IP)
