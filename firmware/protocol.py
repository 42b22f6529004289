"""The management UART's frame format, firmware side (the card side is hdl.mgmt.frames).

The format and the command set are defined once, in :class:`regmap.UartProto`::

    request  0xA5 LEN CMD SEQ PAYLOAD[LEN] CRC
    reply    0x5A LEN CMD|0x80 SEQ STATUS PAYLOAD[LEN-1] CRC     (CMD 0xFF: error)
"""

import struct
from dataclasses import dataclass

from regmap import UartProto as P

__all__ = ["P", "crc8", "encode_request", "read_request", "write_request", "ping_request",
           "Reply", "parse_reply", "STATUS_NAMES", "FrameError"]

crc8 = P.crc8

STATUS_NAMES = {P.OK: "ok", P.BAD_CRC: "bad CRC", P.TRUNCATED: "truncated frame",
                P.UNKNOWN_CMD: "unknown command", P.BAD_LEN: "bad length",
                P.BAD_ADDR: "bad address"}


class FrameError(Exception):
    """A reply that is not a well-formed frame."""


def encode_request(cmd: int, seq: int, payload: bytes = b"") -> bytes:
    if len(payload) > 255:
        raise ValueError("payload longer than 255 bytes")
    body = bytes([len(payload), cmd & 0xFF, seq & 0xFF]) + payload
    return bytes([P.SYNC_REQ]) + body + bytes([crc8(body)])


def ping_request(seq):
    return encode_request(P.PING, seq)


def read_request(seq, addr):
    return encode_request(P.READ, seq, struct.pack("<H", addr))


def write_request(seq, addr, value):
    return encode_request(P.WRITE, seq, struct.pack("<HI", addr, value & 0xFFFF_FFFF))


@dataclass
class Reply:
    cmd: int          # the request's command (0x7F for an error reply)
    seq: int
    status: int
    data: bytes
    error: bool       # CMD was 0xFF

    @property
    def value(self) -> int:
        if len(self.data) != 4:
            raise FrameError(f"reply carries {len(self.data)} data bytes, not 4")
        return struct.unpack("<I", self.data)[0]


def parse_reply(frame: bytes) -> Reply:
    """Parse one complete reply frame (sync byte to CRC)."""
    if len(frame) < 6 or frame[0] != P.SYNC_REPLY:
        raise FrameError(f"not a reply frame: {frame.hex()}")
    n = frame[1]
    if n < 1 or len(frame) != n + 5:
        raise FrameError(f"reply length {n} does not match {len(frame)} bytes")
    body = frame[1:-1]
    if crc8(body) != frame[-1]:
        raise FrameError(f"reply CRC {frame[-1]:#04x}, expected {crc8(body):#04x}")
    cmd = frame[2]
    return Reply(cmd=cmd & 0x7F, seq=frame[3], status=frame[4], data=bytes(frame[5:-1]),
                 error=cmd == P.ERROR)
