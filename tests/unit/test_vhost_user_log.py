"""cosim.vhost_user dirty-page logging (QEMU live migration) against a fake front-end.

Reuses the fake front-end, the recording device and the helpers of ``test_vhost_user.py``;
messages are packed with ``struct`` here (not with the module's codec). The behaviour
modelled is QEMU 7.2's (hw/virtio/vhost.c, vhost-user.c): once ``LOG_SHMFD`` (protocol bit 1)
is negotiated, migration starts with ``SET_LOG_BASE`` (request 6, flags 0x1, payload
``{u64 mmap_size; u64 mmap_offset}``, one memfd) and QEMU blocks until it reads a reply whose
header is exactly (6, 0x5, 8) and whose payload is a u64 0; then ``SET_FEATURES`` with
``VHOST_F_LOG_ALL`` (bit 26) and ``SET_VRING_ADDR`` with ``VHOST_VRING_F_LOG`` (flags 1,
``log`` = used ring GPA) on every running ring, which keeps running. The log is a bitmap:
bit ``p % 8`` of byte ``p // 8`` for the 4 KiB guest page at GPA ``p * 4096``."""

import logging
import mmap
import os
import random
import socket
import struct

import pytest

from cosim import vhost_user as vu
from cosim.vhost_user import Req, VhostUserDevice, VhostUserServer, Reactor
from test_vhost_user import (Dev, Front, F_PROTO, F_VERSION_1, DEVICE_FEATURES, MEM_SIZE, UVA,
                             u64, state, addr, memfd, set_memory, setup_ring)

LOG_ALL = 1 << 26
P_MQ, P_LOG_SHMFD, P_RARP, P_REPLY_ACK = 1 << 0, 1 << 1, 1 << 2, 1 << 3
LOG_PAYLOAD = struct.Struct("=QQ")                 # mmap_size, mmap_offset
LOG_REPLY = struct.pack("=IIIQ", 6, 0x5, 8, 0)     # what QEMU 7.2 insists on reading
LOG_SIZE = 0x1000                                  # bytes of log: 32768 pages = 128 MiB
USED0, USED1 = 0x18000, 0x28000                    # used ring GPAs of rings 0/1 (setup_ring)
NEED_REPLY = 1 | vu.FLAG_NEED_REPLY


class LogDev(Dev):
    """A device that offers ``VHOST_F_LOG_ALL`` and records the logs it is given."""

    def __init__(self, features=DEVICE_FEATURES | LOG_ALL):
        super().__init__()
        self._features = features
        self.logs = []

    def features(self):
        return self._features

    def set_log_base(self, log):
        self.logs.append(log)
        self.calls.append(("set_log_base", log.size))


class Harness:
    """A server (``protocol_features`` as given) on a Reactor, and its fake front-ends."""

    def __init__(self, path, dev, protocol_features, trace=None):
        self.path, self.dev = path, dev
        self.srv = VhostUserServer(path, dev, protocol_features=protocol_features, trace=trace)
        self.rx = Reactor()
        self.srv.attach(self.rx)
        self.fronts = []
        self.kept = []

    def pump(self, rounds=5):
        for _ in range(rounds):
            if not self.rx.poll(0.01):
                break

    def connect(self):
        f = Front(self.path)
        self.fronts.append(f)
        self.pump()
        return f

    def keep(self, *fds):
        """fds the test keeps open until teardown."""
        self.kept += fds
        return fds[0] if len(fds) == 1 else fds

    def close(self):
        for f in self.fronts:
            f.close()
        self.srv.close()
        self.rx.close()
        for fd in self.kept:
            os.close(fd)


@pytest.fixture
def make(tmp_path):
    """``make(dev=None, protocol_features=SUPPORTED, trace=None) -> Harness``."""
    made = []

    def make(dev=None, protocol_features=vu.SUPPORTED_PROTOCOL_FEATURES, trace=None):
        h = Harness(str(tmp_path / f"log{len(made)}.sock"), dev if dev is not None else LogDev(),
                    protocol_features, trace)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def negotiate(h, f, proto=P_MQ | P_LOG_SHMFD | P_REPLY_ACK, features=F_PROTO | F_VERSION_1):
    """The handshake QEMU does, checking the two offers against the device / server."""
    f.send(Req.GET_FEATURES)
    h.pump()
    assert f.reply() == (Req.GET_FEATURES, 0x5, u64(h.dev.features() | F_PROTO))
    f.send(Req.GET_PROTOCOL_FEATURES)
    h.pump()
    assert f.reply() == (Req.GET_PROTOCOL_FEATURES, 0x5, u64(h.srv.protocol_features))
    f.send(Req.SET_PROTOCOL_FEATURES, u64(proto))
    f.send(Req.SET_OWNER)
    f.send(Req.SET_FEATURES, u64(features))
    h.pump()
    assert h.srv.connected


def running(h, proto=P_MQ | P_LOG_SHMFD | P_REPLY_ACK):
    """A front-end with memory and rings 0 and 1 started (their fds kept by ``h``)."""
    f = h.connect()
    negotiate(h, f, proto)
    h.keep(set_memory(f, h.pump))
    kfd0, cfd0 = h.keep(*setup_ring(f, h.pump, 0))
    h.keep(*setup_ring(f, h.pump, 1))
    assert [c[:2] for c in h.dev.calls if c[0] == "vring_ready"] == [("vring_ready", 0),
                                                                     ("vring_ready", 1)]
    return f, kfd0


def log_memfd(size=LOG_SIZE, name="vu-log"):
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd


def send_log_base(f, fd, size=LOG_SIZE, offset=0, flags=1):
    f.send(Req.SET_LOG_BASE, LOG_PAYLOAD.pack(size, offset), fds=[fd] if fd is not None else (),
           flags=flags)


def assert_nothing_more(f):
    f.sock.settimeout(0.05)
    try:
        with pytest.raises(TimeoutError):
            f.sock.recv(1)
    finally:
        f.sock.settimeout(2.0)


def mappings_of(name):
    """How many mappings of memfd ``name`` this process has."""
    with open("/proc/self/maps") as maps:
        return sum(f"/memfd:{name} " in line for line in maps)


def open_fds():
    return len(os.listdir("/proc/self/fd"))


# ---- constants and the protocol feature offer -------------------------------------------------


def test_constants_match_the_protocol():
    assert (Req.SET_LOG_BASE, vu.PROTOCOL_F_LOG_SHMFD, vu.VHOST_F_LOG_ALL) == (6, 1, 26)
    assert (vu.VHOST_VRING_F_LOG, vu.LOG_PAGE) == (1, 4096)
    assert vu.DEFAULT_PROTOCOL_FEATURES == P_MQ | P_REPLY_ACK
    assert vu.SUPPORTED_PROTOCOL_FEATURES == P_MQ | P_REPLY_ACK | P_LOG_SHMFD | P_RARP
    assert vu.LOG.pack(0x1000, 0x20) == LOG_PAYLOAD.pack(0x1000, 0x20) and vu.LOG.size == 16


def test_log_shmfd_offered_only_when_asked_for(make, tmp_path):
    h = make()                                      # SUPPORTED_PROTOCOL_FEATURES
    f = h.connect()
    f.send(Req.GET_PROTOCOL_FEATURES)
    h.pump()
    assert f.reply() == (Req.GET_PROTOCOL_FEATURES, 0x5,
                         u64(P_MQ | P_LOG_SHMFD | P_RARP | P_REPLY_ACK))
    d = make(protocol_features=vu.DEFAULT_PROTOCOL_FEATURES)
    g = d.connect()
    g.send(Req.GET_PROTOCOL_FEATURES)
    d.pump()
    assert g.reply() == (Req.GET_PROTOCOL_FEATURES, 0x5, u64(P_MQ | P_REPLY_ACK))
    # the default of the constructor is DEFAULT_PROTOCOL_FEATURES: no LOG_SHMFD
    with VhostUserServer(str(tmp_path / "plain.sock"), LogDev()) as srv:
        assert srv.protocol_features == vu.DEFAULT_PROTOCOL_FEATURES
    with pytest.raises(ValueError):
        VhostUserServer(str(tmp_path / "bad.sock"), LogDev(),
                        protocol_features=vu.SUPPORTED_PROTOCOL_FEATURES | 1 << 5)


def test_log_shmfd_cannot_be_acked_when_not_offered(make, caplog):
    d = make(protocol_features=vu.DEFAULT_PROTOCOL_FEATURES)
    f = d.connect()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        f.send(Req.SET_PROTOCOL_FEATURES, u64(P_LOG_SHMFD))
        d.pump()
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "were not offered" in caplog.records[0].getMessage()
    assert f.closed_by_peer()


@pytest.mark.parametrize("setup", ["default_server", "not_acked"])
def test_log_base_without_log_shmfd_is_refused(make, caplog, setup):
    if setup == "default_server":                 # LOG_SHMFD never offered
        h = make(protocol_features=vu.DEFAULT_PROTOCOL_FEATURES)
        proto = P_MQ | P_REPLY_ACK
    else:                                         # offered, but the front-end did not ack it
        h = make()
        proto = P_MQ | P_REPLY_ACK
    f = h.connect()
    negotiate(h, f, proto)
    h.keep(set_memory(f, h.pump))
    calls_before = list(h.dev.calls)
    fd = log_memfd(name="unacked-log")
    fds_before = open_fds()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        send_log_base(f, fd)
        h.pump()
    os.close(fd)
    assert [r.levelno for r in caplog.records] == [logging.ERROR], \
        [r.getMessage() for r in caplog.records]
    text = caplog.records[0].getMessage()
    assert "SET_LOG_BASE" in text and "LOG_SHMFD" in text, text
    assert h.dev.calls == calls_before + [("disconnected",)] and h.dev.logs == []
    assert f.closed_by_peer() and not h.srv.connected
    assert open_fds() <= fds_before - 1             # the log fd the server got is closed
    assert mappings_of("unacked-log") == 0


# ---- the migration start sequence ---------------------------------------------------------------


def test_migration_start_sequence_on_running_rings(make):
    h = make(trace=[])
    f, kfd0 = running(h)
    calls_before = list(h.dev.calls)
    fd = log_memfd(name="mig-log")
    # SET_LOG_BASE exactly as QEMU 7.2 sends it: flags 0x1, no NEED_REPLY
    send_log_base(f, fd)
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    assert_nothing_more(f)
    assert h.dev.calls == calls_before + [("set_log_base", LOG_SIZE)]
    log = h.dev.logs[-1]
    assert isinstance(log, vu.DirtyLog) and h.srv.session.log is log
    assert log.size == LOG_SIZE and log.pages == 8 * LOG_SIZE
    assert h.srv.trace[-1] == f"SET_LOG_BASE size={LOG_SIZE:#x} offset=0x0 -> 0x0"
    # the log is the front-end's memory, both ways
    qemu = mmap.mmap(fd, LOG_SIZE)
    view = log.view()
    assert len(view) == LOG_SIZE
    view[7] = 0xA5
    assert qemu[7] == 0xA5
    qemu[LOG_SIZE - 1] = 0x80
    assert view[LOG_SIZE - 1] == 0x80 and log.is_marked((8 * LOG_SIZE - 1) * vu.LOG_PAGE)
    view[7] = 0
    qemu[LOG_SIZE - 1] = 0
    view.release()
    log.mark(0x1234, 1)                             # page 1: bit 1 of byte 0
    assert qemu[0] == 0b10
    # SET_FEATURES with LOG_ALL (QEMU wants an ack for it when REPLY_ACK is there)
    f.send(Req.SET_FEATURES, u64(F_PROTO | F_VERSION_1 | LOG_ALL), flags=NEED_REPLY)
    h.pump()
    assert f.reply() == (Req.SET_FEATURES, 0x5, u64(0))
    assert h.dev.calls[-1] == ("set_features", F_VERSION_1 | LOG_ALL)
    # used-ring logging on both running rings: no stop, no restart
    mark = len(h.dev.calls)
    for i, used in ((0, USED0), (1, USED1)):
        g = 0x10000 * (i + 1)
        f.send(Req.SET_VRING_ADDR, addr(i, UVA + g, UVA + g + 0x8000, UVA + g + 0x4000,
                                        flags=1, logaddr=used), flags=NEED_REPLY)
        h.pump()
        assert f.reply() == (Req.SET_VRING_ADDR, 0x5, u64(0))
    assert h.dev.calls[mark:] == []                 # no get_vring_base, no vring_ready
    for i, used in ((0, USED0), (1, USED1)):
        v = h.srv.session.vrings[i]
        assert v.started and v.log_addr == used and v.flags == 1
        assert h.dev.vrings[i] is v                 # the object the device keeps sees it
        assert (v.desc, v.avail, v.used) == (0x10000 * (i + 1) + 0x0,
                                             0x10000 * (i + 1) + 0x4000, used)
    os.eventfd_write(kfd0, 1)                       # the ring still runs
    h.pump()
    assert h.dev.calls[mark:] == [("kick", 0)]
    # migration cancelled: logging off again, still without a stop
    f.send(Req.SET_FEATURES, u64(F_PROTO | F_VERSION_1))
    f.send(Req.SET_VRING_ADDR, addr(0, UVA + 0x10000, UVA + 0x18000, UVA + 0x14000))
    h.pump()
    assert h.dev.calls[mark + 1:] == [("set_features", F_VERSION_1)]
    v = h.srv.session.vrings[0]
    assert v.started and v.log_addr is None and v.flags == 0
    assert h.srv.connected
    qemu.close()
    os.close(fd)


@pytest.mark.parametrize("proto", [P_MQ | P_LOG_SHMFD | P_REPLY_ACK, P_LOG_SHMFD],
                         ids=["reply_ack", "no_reply_ack"])
def test_log_base_with_need_reply_gets_one_reply(make, proto):
    h = make()
    f = h.connect()
    negotiate(h, f, proto)
    fd = log_memfd()
    send_log_base(f, fd, flags=NEED_REPLY)
    f.send(Req.GET_QUEUE_NUM)
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    assert f.reply() == (Req.GET_QUEUE_NUM, 0x5, u64(1))    # not a second SET_LOG_BASE reply
    assert_nothing_more(f)
    assert len(h.dev.logs) == 1
    os.close(fd)


def test_log_base_before_memory_and_rings(make):
    """SET_LOG_BASE needs no memory table nor rings (QEMU may resize the log at any time)."""
    h = make()
    f = h.connect()
    negotiate(h, f)
    fd = log_memfd()
    send_log_base(f, fd)
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    assert h.dev.names()[-1] == "set_log_base"
    os.close(fd)


# ---- DirtyLog: the bitmap -----------------------------------------------------------------------


def _pages(gpa, length, pages):
    """Reference: the pages a non-empty range touches, cut at the end of the log."""
    first, last = gpa // 4096, (gpa + length - 1) // 4096
    return {p for p in range(first, last + 1) if p < pages}


def _bits(data):
    return {8 * i + b for i, byte in enumerate(data) for b in range(8) if byte >> b & 1}


@pytest.mark.parametrize("offset", [0, 0x1008], ids=["offset0", "offset0x1008"])
def test_mark_sets_exactly_the_touched_pages(offset):
    size = 4                                        # 32 pages: GPA 0 .. 128 KiB
    fd = log_memfd(size=0x3000)
    dup = os.dup(fd)
    log = vu.DirtyLog.map(size, offset, dup)
    with pytest.raises(OSError):
        os.fstat(dup)                               # map() closed the fd it was given
    assert log.pages == 32
    os.pwrite(fd, b"\x11\x22\x33\x44", offset)
    view = log.view()                               # the log's bytes, from mmap_offset on
    assert bytes(view) == b"\x11\x22\x33\x44"
    view[3] = 0x55
    view.release()
    assert os.pread(fd, 4, offset) == b"\x11\x22\x33\x55"
    os.pwrite(fd, bytes(4), offset)

    def file_log():
        return os.pread(fd, size, offset)
    cases = [
        ((0x1000, 1), {1}),                         # length 1
        ((0x1FFF, 1), {1}),                         # last byte of a page
        ((0x2FFF, 2), {2, 3}),                      # two bytes across a boundary
        ((0x5000, 0x1000), {5}),                    # exactly one page: end is exclusive
        ((0x6001, 0x1FFF), {6, 7}),                 # ends on the last byte of page 7
        ((0x8800, 0x3000), {8, 9, 10, 11}),         # spans four pages
        ((31 * 4096 + 5, 0x3000), {31}),            # runs past the end: cut
        ((32 * 4096, 1), set()),                    # wholly past the end: ignored
        ((1 << 40, 1 << 20), set()),
    ]
    for (gpa, length), pages in cases:
        before = file_log()
        log.mark(gpa, length)
        assert _bits(file_log()) == _bits(before) | pages, (hex(gpa), hex(length))
        for p in range(40):
            assert log.is_marked(p * 4096 + 4095) == (p in _bits(file_log())), p
    assert _bits(file_log()) == {1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 31}
    assert file_log() == bytes([0b1110_1110, 0b0000_1111, 0, 0x80])
    # the bytes around the log are never touched
    assert os.pread(fd, offset, 0) == bytes(offset)
    assert os.pread(fd, 0x3000 - offset - size, offset + size) == bytes(0x3000 - offset - size)
    # bits are only ever set: QEMU's own bits survive a mark
    os.pwrite(fd, b"\xff", offset + 2)
    log.mark(0x4000, 1)
    assert file_log()[2] == 0xFF and log.is_marked(0x10000) and log.is_marked(0x4000)
    log.close()
    os.close(fd)


def test_mark_matches_a_reference_model():
    rng = random.Random(1234)
    size = 16                                       # 128 pages
    fd = log_memfd(size=0x1000)
    log = vu.DirtyLog.map(size, 0, os.dup(fd))
    expect = set()
    for _ in range(300):
        gpa = rng.choice([rng.randrange(0, 140 * 4096),
                          rng.randrange(0, 140) * 4096 + rng.choice([0, 1, 4095])])
        length = rng.choice([1, 2, 4095, 4096, 4097, rng.randrange(1, 5 * 4096)])
        if rng.random() < 0.05:                     # QEMU harvests the log now and then
            os.pwrite(fd, bytes(size), 0)
            expect.clear()
        log.mark(gpa, length)
        expect |= _pages(gpa, length, 128)
        assert _bits(os.pread(fd, size, 0)) == expect, (gpa, length)
    assert [p for p in range(130) if log.is_marked(p * 4096)] == sorted(expect)
    log.close()
    os.close(fd)


# ---- refusals around SET_VRING_ADDR logging ---------------------------------------------------


@pytest.mark.parametrize("case", ["log_flag_no_log_all", "flags_2", "flags_3"])
def test_vring_addr_log_refusals(make, caplog, case):
    dev = LogDev(DEVICE_FEATURES) if case == "log_flag_no_log_all" else LogDev()
    flags, text = {"log_flag_no_log_all": (1, "used-ring logging"),
                   "flags_2": (2, "flags 0x2"), "flags_3": (3, "flags 0x3")}[case]
    h = make(dev)
    f, _ = running(h)
    calls_before = list(dev.calls)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        f.send(Req.SET_VRING_ADDR, addr(0, UVA + 0x10000, UVA + 0x18000, UVA + 0x14000,
                                        flags=flags, logaddr=USED0))
        h.pump()
    assert [r.levelno for r in caplog.records] == [logging.ERROR], \
        [r.getMessage() for r in caplog.records]
    assert "SET_VRING_ADDR" in caplog.records[0].getMessage()
    assert text in caplog.records[0].getMessage(), caplog.records[0].getMessage()
    # refused before the ring was touched: no stop, the disconnect only
    assert dev.calls == calls_before + [("disconnected",)]
    assert f.closed_by_peer()


def test_set_features_log_all_refused_when_not_offered(make, caplog):
    h = make(LogDev(DEVICE_FEATURES))
    f = h.connect()
    negotiate(h, f)
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        f.send(Req.SET_FEATURES, u64(F_PROTO | F_VERSION_1 | LOG_ALL))
        h.pump()
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "were not offered" in caplog.records[0].getMessage()
    assert h.dev.names()[-1] == "disconnected"


# ---- log replacement and life time --------------------------------------------------------------


def test_second_log_base_replaces_the_first(make):
    h = make()
    f, _ = running(h)
    a, b = log_memfd(name="log-a"), log_memfd(size=2 * LOG_SIZE, name="log-b")
    send_log_base(f, a)
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    first = h.dev.logs[-1]
    assert mappings_of("log-a") == 1
    send_log_base(f, b, size=2 * LOG_SIZE)          # QEMU grows its log: a new one
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    second = h.dev.logs[-1]
    assert second is not first and h.srv.session.log is second
    assert h.dev.calls[-2:] == [("set_log_base", LOG_SIZE), ("set_log_base", 2 * LOG_SIZE)]
    assert second.pages == 16 * LOG_SIZE
    assert first.mapping.closed and mappings_of("log-a") == 0
    assert not second.mapping.closed and mappings_of("log-b") == 1
    second.mark(0x3000, 1)
    assert os.pread(b, 1, 0) == b"\x08" and os.pread(a, 1, 0) == b"\x00"
    # the connection goes on
    f.send(Req.GET_QUEUE_NUM)
    h.pump()
    assert f.reply() == (Req.GET_QUEUE_NUM, 0x5, u64(1))
    os.close(a)
    os.close(b)


def give_log(h, f, name):
    """Send a log on ``f``, check the reply; (the memfd, the DirtyLog the device got)."""
    fd = log_memfd(name=name)
    send_log_base(f, fd)
    h.pump()
    assert f.recv_exact(len(LOG_REPLY)) == LOG_REPLY
    return fd, h.dev.logs[-1]


def test_disconnect_closes_the_log(make):
    h = make()
    f, _ = running(h)
    fd, log = give_log(h, f, "log-dc")
    os.close(fd)
    assert mappings_of("log-dc") == 1
    f.close()
    h.pump()
    assert h.dev.names().count("disconnected") == 1 and not h.srv.connected
    assert log.mapping.closed and mappings_of("log-dc") == 0
    # a new front-end starts without a log
    g = h.connect()
    negotiate(h, g)
    assert h.srv.session.log is None


def test_device_refusing_the_log_keeps_the_old_one(make, caplog):
    h = make()
    f, _ = running(h)
    a, first = give_log(h, f, "log-keep")

    def refuse(log):
        raise vu.ProtocolError("SET_LOG_BASE: the device refuses")
    h.dev.set_log_base = refuse
    b = log_memfd(name="log-refused")
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        send_log_base(f, b)
        h.pump()
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "the device refuses" in caplog.records[0].getMessage()
    assert f.closed_by_peer() and h.dev.names()[-1] == "disconnected"
    assert mappings_of("log-refused") == 0 and mappings_of("log-keep") == 0
    assert first.mapping.closed
    os.close(a)
    os.close(b)


# ---- malformed SET_LOG_BASE -------------------------------------------------------------------


def _pipe_fd():
    r, w = os.pipe()
    os.close(w)
    return r


def _socket_fd():
    a, b = socket.socketpair()
    b.close()
    return a.detach()


BAD_LOG_BASE = {
    # name: (payload, fd factory or None, text expected in the log line)
    "fd_is_pipe": (LOG_PAYLOAD.pack(LOG_SIZE, 0), _pipe_fd, "SET_LOG_BASE"),
    "fd_is_socket": (LOG_PAYLOAD.pack(LOG_SIZE, 0), _socket_fd, "SET_LOG_BASE"),
    "fd_is_dev_zero": (LOG_PAYLOAD.pack(LOG_SIZE, 0), lambda: os.open("/dev/zero", os.O_RDWR),
                       "SET_LOG_BASE"),              # maps fine, but is not a memory file
    "fd_is_eventfd": (LOG_PAYLOAD.pack(LOG_SIZE, 0), lambda: os.eventfd(0), "SET_LOG_BASE"),
    "memfd_too_short": (LOG_PAYLOAD.pack(LOG_SIZE, 0), lambda: log_memfd(LOG_SIZE - 1),
                        "SET_LOG_BASE"),
    "offset_past_file": (LOG_PAYLOAD.pack(LOG_SIZE, 0x1000), lambda: log_memfd(LOG_SIZE),
                         "SET_LOG_BASE"),
    "size_zero": (LOG_PAYLOAD.pack(0, 0), log_memfd, "SET_LOG_BASE"),
    "no_fd": (LOG_PAYLOAD.pack(LOG_SIZE, 0), None, "0 fds attached, expected 1"),
    "two_fds": (LOG_PAYLOAD.pack(LOG_SIZE, 0), lambda: [log_memfd(), log_memfd()],
                "2 fds attached, expected 1"),
    "payload_8_bytes": (u64(LOG_SIZE), log_memfd, "SET_LOG_BASE: payload size 8, expected 16"),
    "payload_24_bytes": (LOG_PAYLOAD.pack(LOG_SIZE, 0) + u64(0), log_memfd,
                         "SET_LOG_BASE: payload size 24"),
    "payload_empty": (b"", None, "SET_LOG_BASE: payload size 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_LOG_BASE))
def test_bad_log_base_closes_connection_with_one_line(make, caplog, case):
    payload, factory, text = BAD_LOG_BASE[case]
    h = make()
    f, _ = running(h)
    calls_before = list(h.dev.calls)
    made = factory() if factory is not None else []
    fds = made if isinstance(made, list) else [made]
    fds_before = open_fds()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        f.send(Req.SET_LOG_BASE, payload, fds=fds)
        h.pump()
    for fd in fds:
        os.close(fd)
    assert [r.levelno for r in caplog.records] == [logging.ERROR], \
        [r.getMessage() for r in caplog.records]
    assert text in caplog.records[0].getMessage(), caplog.records[0].getMessage()
    # nothing reached the device; it heard of the disconnect once
    assert h.dev.calls == calls_before + [("disconnected",)] and h.dev.logs == []
    assert f.closed_by_peer() and not h.srv.connected
    assert mappings_of("vu-log") == 0
    # every fd the server got is closed again (the connection's and ring fds too)
    f.close()
    assert open_fds() <= fds_before - len(fds) - 1
    # the server takes the next front-end
    g = h.connect()
    negotiate(h, g)
    assert h.srv.connections == 2


# ---- the device contract ------------------------------------------------------------------------


def test_device_without_set_log_base_refuses_with_one_line(make, caplog):
    class NoLog(Dev):
        def features(self):
            return DEVICE_FEATURES | LOG_ALL
    h = make(NoLog())
    f = h.connect()
    negotiate(h, f)
    fd = log_memfd(name="log-nolog")
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        send_log_base(f, fd)
        h.pump()
    os.close(fd)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "this device does not log" in caplog.records[0].getMessage()
    assert f.closed_by_peer() and mappings_of("log-nolog") == 0


def test_set_log_base_only_for_a_device_offering_log_all(make, caplog):
    dev = LogDev(DEVICE_FEATURES)                   # implements set_log_base, no LOG_ALL
    h = make(dev)
    f = h.connect()
    negotiate(h, f)
    calls_before = list(dev.calls)
    fd = log_memfd()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        send_log_base(f, fd)
        h.pump()
    os.close(fd)
    assert dev.logs == []
    assert dev.calls == calls_before + [("disconnected",)]
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    assert "SET_LOG_BASE" in caplog.records[0].getMessage()
