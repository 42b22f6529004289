"""A network peer model: the host at the other end of the guest's link. Standard library only.

:class:`NetPeer` answers, for its one IPv4 address and MAC:

* ARP requests for its address (Ethernet/IPv4 ARP): an ARP reply to the asker;
* ICMP echo requests to its address: an echo reply carrying the same identifier, sequence
  number and data, any data size (up to what one frame holds: 1472 bytes at a 1500-byte MTU,
  more if the guest sends jumbo frames).

Everything else is ignored and counted (:class:`PeerStats`): frames for another MAC, other
ethertypes (IPv6, VLAN-tagged frames...), other IP protocols, other ICMP types, packets with a
bad IPv4 header or ICMP checksum, and IPv4 *fragments*: they are **not reassembled** (a
fragmented echo request gets no reply; the counter ``fragments`` says how many came).

Reply format (the model of a plain host, deterministic so tests can compare bytes):

* Ethernet: destination = the request's source MAC, source = the peer's MAC; a frame shorter
  than 60 bytes is padded with zeros to 60 (the minimum Ethernet frame without FCS), as a NIC
  does on the wire;
* ARP reply: opcode 2, sender = peer MAC / IP, target = the asker's sender MAC / IP;
* IPv4: version 4, header of 20 bytes (request options are not echoed), same TOS, total
  length = 20 + ICMP length, identification copied from the request, no flags, fragment
  offset 0, TTL 64, protocol 1, header checksum computed, source = the peer, destination =
  the request's source;
* ICMP: type 0, code 0, checksum computed over the whole ICMP message, the rest (identifier,
  sequence, data) copied byte for byte.

The IPv4 total length decides where a packet ends: Ethernet padding after it is ignored.

TCP and UDP segments to its address are not answered, but their checksum is checked against
the pseudo-header (a bad one lands in ``bad_checksum``, a good one in ``ignored``): the peer is
where the card's transmit checksum offload is judged.

Helpers for tests: :func:`arp_request`, :func:`icmp_echo_request` and :func:`l4_frame` (TCP or
UDP over IPv4 or IPv6, checksummed or with the partial checksum a driver hands a device that
offers ``VIRTIO_NET_F_CSUM``) build frames, :func:`inet_checksum` is the RFC 1071 checksum and
:func:`l4_checksum_ok` judges a frame's TCP or UDP checksum.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import asdict, dataclass

__all__ = ["NetPeer", "PeerStats", "inet_checksum", "arp_request", "icmp_echo_request",
           "l4_frame", "l4_checksum_ok", "IPPROTO_TCP", "IPPROTO_UDP", "ETH_P_IPV6", "ETH_P_IP",
           "ETH_P_ARP", "BROADCAST", "MIN_FRAME"]

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = b"\xff" * 6
MIN_FRAME = 60                 # minimum Ethernet frame, FCS excluded
ETH = struct.Struct("!6s6sH")
ARP = struct.Struct("!HHBBH6s4s6s4s")
IPV4 = struct.Struct("!BBHHHBBH4s4s")
ICMP_ECHO = struct.Struct("!BBHHH")
IPPROTO_ICMP = 1
IPPROTO_TCP, IPPROTO_UDP = 6, 17
L4_CSUM_AT = {IPPROTO_TCP: 16, IPPROTO_UDP: 6}     # the checksum field in the L4 header
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8
TTL = 64


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``: one's complement of the one's complement
    sum of its 16-bit big-endian words (an odd last byte padded with zero)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pad(frame: bytes) -> bytes:
    return frame + bytes(MIN_FRAME - len(frame)) if len(frame) < MIN_FRAME else frame


def _ipv4_header(src: bytes, dst: bytes, payload_len: int, *, tos: int = 0, ident: int = 0,
                 flags_frag: int = 0, ttl: int = TTL, proto: int = IPPROTO_ICMP) -> bytes:
    head = IPV4.pack(0x45, tos, 20 + payload_len, ident, flags_frag, ttl, proto, 0, src, dst)
    return head[:10] + struct.pack("!H", inet_checksum(head)) + head[12:]


def _sum16(data: bytes) -> int:
    """The one's complement sum (not complemented) of ``data``'s 16-bit big-endian words."""
    return ~inet_checksum(data) & 0xFFFF


def _pseudo(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The pseudo-header TCP and UDP sum over (RFC 793 / RFC 8200 8.1)."""
    if len(src) == 4:
        return src + dst + struct.pack("!BBH", 0, proto, length)
    return src + dst + struct.pack("!IxxxB", length, proto)


def l4_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, proto: int,
             payload: bytes, *, sport: int = 4000, dport: int = 5000, seq: int = 1,
             partial: bool = False, corrupt: bool = False) -> tuple[bytes, int, int]:
    """An Ethernet frame with a TCP (20-byte header, ACK|PSH) or UDP segment carrying
    ``payload``, over IPv4 or IPv6 (from the address family of ``src_ip``), not padded. The
    checksum is right, or with ``partial`` the pseudo-header sum a driver leaves for the device
    (virtio 1.2, 5.1.6.2), or with ``corrupt`` wrong by one. Returns ``(frame, csum_start,
    csum_offset)``."""
    v6 = ":" in src_ip
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    src, dst = socket.inet_pton(fam, src_ip), socket.inet_pton(fam, dst_ip)
    if proto == IPPROTO_TCP:
        l4 = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 0xFFFF, 0, 0)
    elif proto == IPPROTO_UDP:
        l4 = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    else:
        raise ValueError(f"proto must be TCP (6) or UDP (17), got {proto}")
    l4 += payload
    at = L4_CSUM_AT[proto]
    pseudo = _pseudo(src, dst, proto, len(l4))
    value = _sum16(pseudo) if partial else inet_checksum(pseudo + l4)
    if proto == IPPROTO_UDP and not partial and value == 0:
        value = 0xFFFF                           # UDP sends a computed 0 as 0xFFFF
    if corrupt:
        value ^= 1
    l4 = l4[:at] + struct.pack("!H", value) + l4[at + 2:]
    if v6:
        ip = struct.pack("!IHBB", 6 << 28, len(l4), proto, TTL) + src + dst
        eth = ETH.pack(dst_mac, src_mac, ETH_P_IPV6)
    else:
        ip = _ipv4_header(src, dst, len(l4), proto=proto)
        eth = ETH.pack(dst_mac, src_mac, ETH_P_IP)
    start = ETH.size + len(ip)
    return eth + ip + l4, start, at


def l4_checksum_ok(frame: bytes) -> bool | None:
    """Whether the TCP or UDP checksum of ``frame`` (IPv4 without fragments, or IPv6 without
    extension headers) holds; ``None`` for a frame that carries no such segment."""
    frame = bytes(frame)
    if len(frame) < ETH.size:
        return None
    ethertype = ETH.unpack_from(frame)[2]
    ip = frame[ETH.size:]
    if ethertype == ETH_P_IP and len(ip) >= IPV4.size and ip[0] >> 4 == 4:
        ihl = (ip[0] & 0xF) * 4
        total, flags_frag, proto = struct.unpack_from("!H2xHxB", ip, 2)
        if flags_frag & 0x3FFF or not ihl <= total <= len(ip):
            return None
        src, dst, l4 = ip[12:16], ip[16:20], ip[ihl:total]
    elif ethertype == ETH_P_IPV6 and len(ip) >= 40 and ip[0] >> 4 == 6:
        length, proto = struct.unpack_from("!HB", ip, 4)
        src, dst, l4 = ip[8:24], ip[24:40], ip[40:40 + length]
    else:
        return None
    return _l4_ok(src, dst, proto, l4)


def _l4_ok(src: bytes, dst: bytes, proto: int, l4: bytes) -> bool | None:
    """Whether TCP / UDP segment ``l4`` between addresses ``src`` and ``dst`` is checksummed
    right; ``None`` for another protocol or a segment too short to hold the field."""
    if proto not in L4_CSUM_AT or len(l4) < L4_CSUM_AT[proto] + 2:
        return None
    return inet_checksum(_pseudo(src, dst, proto, len(l4)) + l4) == 0


def arp_request(src_mac: bytes, src_ip: str, target_ip: str) -> bytes:
    """A broadcast ARP request "who has ``target_ip``, tell ``src_ip``", padded to 60 bytes."""
    arp = ARP.pack(1, ETH_P_IP, 6, 4, 1, src_mac, socket.inet_aton(src_ip), bytes(6),
                   socket.inet_aton(target_ip))
    return _pad(ETH.pack(BROADCAST, src_mac, ETH_P_ARP) + arp)


def icmp_echo_request(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, *,
                      ident: int = 1, seq: int = 1, payload: bytes = b"", ttl: int = TTL,
                      ip_id: int = 0, tos: int = 0, flags_frag: int = 0) -> bytes:
    """An Ethernet frame with an ICMP echo request (checksums right), padded to 60 bytes."""
    icmp = ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    ip = _ipv4_header(socket.inet_aton(src_ip), socket.inet_aton(dst_ip), len(icmp), tos=tos,
                      ident=ip_id, flags_frag=flags_frag, ttl=ttl)
    return _pad(ETH.pack(dst_mac, src_mac, ETH_P_IP) + ip + icmp)


@dataclass
class PeerStats:
    """What a :class:`NetPeer` saw. ``frames`` counts every frame; each frame also lands in
    exactly one of the other counters but ``arp_replies`` / ``echo_replies`` (what was sent)."""
    frames: int = 0
    arp_requests: int = 0        # ARP requests for our IP (each answered)
    arp_replies: int = 0
    echo_requests: int = 0       # ICMP echo requests to our IP (each answered)
    echo_replies: int = 0
    not_for_us: int = 0          # Ethernet destination neither our MAC nor broadcast
    fragments: int = 0           # IPv4 fragments (not reassembled)
    bad_checksum: int = 0        # IPv4 header, ICMP, TCP or UDP checksum wrong
    malformed: int = 0           # too short, or lengths that do not add up
    ignored: int = 0             # well-formed but not for this model (other protocol, type...)

    def as_dict(self) -> dict:
        return asdict(self)


class NetPeer:
    """A host with MAC ``mac`` (6 bytes) and IPv4 address ``ip`` (dotted quad).

    ``handle(frame)`` takes one Ethernet frame (no FCS) the guest sent and returns the frames
    the peer sends back (zero or one). Pure: no I/O, no clock; state is only ``stats``."""

    def __init__(self, mac: bytes, ip: str) -> None:
        if len(mac) != 6:
            raise ValueError("mac must be 6 bytes")
        self.mac = bytes(mac)
        self.ip = ip
        self._ip = socket.inet_aton(ip)
        self.stats = PeerStats()

    def handle(self, frame: bytes) -> list[bytes]:
        frame = bytes(frame)
        self.stats.frames += 1
        if len(frame) < ETH.size:
            self.stats.malformed += 1
            return []
        dst, src, ethertype = ETH.unpack_from(frame)
        if dst not in (self.mac, BROADCAST):
            self.stats.not_for_us += 1
            return []
        if ethertype == ETH_P_ARP:
            return self._arp(src, frame[ETH.size:])
        if ethertype == ETH_P_IP and dst == self.mac:
            return self._ipv4(src, frame[ETH.size:])
        self.stats.ignored += 1
        return []

    def _arp(self, eth_src: bytes, arp: bytes) -> list[bytes]:
        if len(arp) < ARP.size:
            self.stats.malformed += 1
            return []
        htype, ptype, hlen, plen, op, sha, spa, _tha, tpa = ARP.unpack_from(arp)
        if (htype, ptype, hlen, plen, op) != (1, ETH_P_IP, 6, 4, 1) or tpa != self._ip:
            self.stats.ignored += 1
            return []
        self.stats.arp_requests += 1
        reply = ARP.pack(1, ETH_P_IP, 6, 4, 2, self.mac, self._ip, sha, spa)
        self.stats.arp_replies += 1
        return [_pad(ETH.pack(eth_src, self.mac, ETH_P_ARP) + reply)]

    def _ipv4(self, eth_src: bytes, ip: bytes) -> list[bytes]:
        if len(ip) < IPV4.size:
            self.stats.malformed += 1
            return []
        ver_ihl, tos, total, ident, flags_frag, _ttl, proto, _sum, src, dst = \
            IPV4.unpack_from(ip)
        ihl = (ver_ihl & 0xF) * 4
        if ver_ihl >> 4 != 4 or ihl < 20 or not ihl <= total <= len(ip):
            self.stats.malformed += 1
            return []
        if inet_checksum(ip[:ihl]) != 0:
            self.stats.bad_checksum += 1
            return []
        if dst != self._ip:
            self.stats.ignored += 1
            return []
        if flags_frag & 0x3FFF:                  # MF set or a fragment offset
            self.stats.fragments += 1
            return []
        if proto in L4_CSUM_AT:                 # not answered, but judged
            if _l4_ok(src, dst, proto, ip[ihl:total]) is False:
                self.stats.bad_checksum += 1
            else:
                self.stats.ignored += 1
            return []
        if proto != IPPROTO_ICMP:
            self.stats.ignored += 1
            return []
        icmp = ip[ihl:total]
        if len(icmp) < ICMP_ECHO.size:
            self.stats.malformed += 1
            return []
        if inet_checksum(icmp) != 0:
            self.stats.bad_checksum += 1
            return []
        if icmp[0] != ICMP_ECHO_REQUEST or icmp[1] != 0:
            self.stats.ignored += 1
            return []
        self.stats.echo_requests += 1
        body = bytes([ICMP_ECHO_REPLY, 0]) + b"\0\0" + icmp[4:]
        body = body[:2] + struct.pack("!H", inet_checksum(body)) + body[4:]
        head = _ipv4_header(self._ip, src, len(body), tos=tos, ident=ident)
        self.stats.echo_replies += 1
        return [_pad(ETH.pack(eth_src, self.mac, ETH_P_IP) + head + body)]
