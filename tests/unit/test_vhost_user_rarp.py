"""cosim.vhost_user ``SEND_RARP`` (request 19) against a fake front-end.

After an incoming migration QEMU 7.2 announces the guest (``qemu_announce_self``): for a
vhost-user netdev whose guest did not negotiate ``GUEST_ANNOUNCE`` and whose back-end acked
protocol feature ``RARP`` (bit 2), each announcement becomes ``SEND_RARP`` with a u64 payload
whose first 6 bytes are the guest's MAC, and no reply (net/vhost-user.c, vhost-user.c). The
back-end broadcasts the RARP on the guest's behalf."""

import logging
import struct

import pytest

from cosim import vhost_user as vu
from cosim.vhost_user import Req
from test_vhost_user import F_PROTO, F_VERSION_1, u64
from test_vhost_user_log import (LogDev, P_MQ, P_RARP, P_REPLY_ACK, assert_nothing_more,
                                 make, negotiate)   # noqa: F401 (make is a fixture)

MAC = bytes.fromhex("525400123401")


class RarpDev(LogDev):
    def __init__(self):
        super().__init__()
        self.announced = []

    def send_rarp(self, mac):
        self.announced.append(mac)


def rarp_payload(mac, tail=b"\0\0"):
    return mac + tail


def test_constants():
    assert (Req.SEND_RARP, vu.PROTOCOL_F_RARP) == (19, 2)
    assert vu.SUPPORTED_PROTOCOL_FEATURES & P_RARP
    assert not vu.DEFAULT_PROTOCOL_FEATURES & P_RARP


def test_send_rarp_reaches_the_device_without_a_reply(make):
    h = make(dev=RarpDev())
    f = h.connect()
    negotiate(h, f, proto=P_MQ | P_RARP | P_REPLY_ACK)
    for _ in range(3):                               # QEMU announces several rounds
        f.send(Req.SEND_RARP, rarp_payload(MAC, b"\xAA\xBB"))
    h.pump()
    assert h.dev.announced == [MAC] * 3              # the payload's last two bytes ignored
    assert_nothing_more(f)
    assert h.srv.connected


def test_send_rarp_with_need_reply_is_acked(make):
    h = make(dev=RarpDev())
    f = h.connect()
    negotiate(h, f, proto=P_MQ | P_RARP | P_REPLY_ACK)
    f.send(Req.SEND_RARP, rarp_payload(MAC), flags=1 | vu.FLAG_NEED_REPLY)
    h.pump()
    assert f.reply() == (Req.SEND_RARP, 0x5, u64(0))
    assert h.dev.announced == [MAC]


@pytest.mark.parametrize("case,proto,payload,dev,want", [
    ("not negotiated", P_MQ | P_REPLY_ACK, rarp_payload(MAC), RarpDev, "without RARP negotiated"),
    ("multicast", P_RARP, rarp_payload(b"\x01" + MAC[1:]), RarpDev, "not a station's address"),
    ("zero", P_RARP, rarp_payload(bytes(6)), RarpDev, "not a station's address"),
    ("short", P_RARP, MAC, RarpDev, "SEND_RARP"),
    ("device cannot", P_RARP, rarp_payload(MAC), LogDev, "this device does not announce"),
])
def test_bad_send_rarp_closes_with_one_line(make, caplog, case, proto, payload, dev, want):
    h = make(dev=dev())
    f = h.connect()
    negotiate(h, f, proto=proto)
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        f.send(Req.SEND_RARP, payload)
        h.pump()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and want in errors[0].getMessage(), \
        [r.getMessage() for r in caplog.records]
    assert f.closed_by_peer()
    assert getattr(h.dev, "announced", []) == []
