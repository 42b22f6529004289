"""cosim.vhost_user against a fake front-end written here (no QEMU).

The fake front-end connects to the server's real unix socket and sends messages packed with
``struct`` in this file (not with the module's codec), fds with ``socket.send_fds``. The
server is driven by a :class:`Reactor` in the test's own thread: ``pump()`` runs it until
nothing is left to do."""

import logging
import os
import socket
import struct
import threading
import time
import pytest
from cosim import vhost_user as vu
from cosim.vhost_user import Req, VhostUserDevice, VhostUserServer, Reactor

HDR = struct.Struct("=III")
F_PROTO = 1 << 30
F_VERSION_1 = 1 << 32
DEVICE_FEATURES = F_VERSION_1 | (1 << 15)
MEM_SIZE = 1 << 20
UVA = 0x7F00_0000_0000


class Dev(VhostUserDevice):
    """Records every callback as a tuple in ``calls``."""

    def __init__(self, base=77):
        self.calls = []
        self.base = base
        self.vrings = {}
        self.memory = None

    def features(self):
        return DEVICE_FEATURES

    def num_queues(self):
        return 2

    def set_features(self, f):
        self.calls.append(("set_features", f))

    def set_mem_table(self, memory):
        self.memory = memory
        self.calls.append(("set_mem_table", len(memory.regions)))

    def vring_ready(self, index, vring):
        self.vrings[index] = vring
        self.calls.append(("vring_ready", index, vring.num, vring.base, vring.desc,
                           vring.avail, vring.used))

    def get_vring_base(self, index):
        self.calls.append(("get_vring_base", index))
        return self.base

    def kick(self, index):
        self.calls.append(("kick", index))

    def disconnected(self):
        self.memory = None
        self.vrings.clear()
        self.calls.append(("disconnected",))

    def names(self):
        return [c[0] for c in self.calls]


class Front:
    """A minimal vhost-user front-end on a blocking socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.settimeout(2.0)

    def send(self, request, payload=b"", fds=(), flags=1, size=None):
        data = HDR.pack(request, flags, len(payload) if size is None else size) + payload
        if fds:
            socket.send_fds(self.sock, [data], list(fds))
        else:
            self.sock.sendall(data)

    def recv_exact(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def reply(self):
        request, flags, size = HDR.unpack(self.recv_exact(12))
        return request, flags, self.recv_exact(size)

    def closed_by_peer(self):
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self):
        self.sock.close()


def u64(v):
    return struct.pack("=Q", v)


def state(i, n):
    return struct.pack("=II", i, n)


def addr(i, desc, used, avail, flags=0, logaddr=0):
    return struct.pack("=IIQQQQ", i, flags, desc, used, avail, logaddr)


def mem_table(regions):
    return struct.pack("=II", len(regions), 0) + b"".join(
        struct.pack("=QQQQ", *r) for r in regions)


@pytest.fixture
def env(tmp_path):
    """(server, device, reactor, pump, connect)"""
    path = str(tmp_path / "vu.sock")
    dev = Dev()
    srv = VhostUserServer(path, dev)
    rx = Reactor()
    srv.attach(rx)

    def pump(rounds=5):
        for _ in range(rounds):
            if not rx.poll(0.01):
                break

    fronts = []

    def connect():
        f = Front(path)
        fronts.append(f)
        pump()
        return f

    yield srv, dev, rx, pump, connect
    for f in fronts:
        f.close()
    srv.close()
    rx.close()


def memfd(size=MEM_SIZE):
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def handshake(front, pump, features=F_PROTO | F_VERSION_1, proto=0):
    front.send(Req.GET_FEATURES)
    pump()
    assert front.reply() == (Req.GET_FEATURES, 0x5, u64(DEVICE_FEATURES | F_PROTO))
    front.send(Req.GET_PROTOCOL_FEATURES)
    pump()
    assert front.reply() == (Req.GET_PROTOCOL_FEATURES, 0x5, u64(0b1001))
    front.send(Req.SET_PROTOCOL_FEATURES, u64(proto))
    front.send(Req.SET_OWNER)
    front.send(Req.SET_FEATURES, u64(features))
    pump()


def set_memory(front, pump):
    """One region: GPA 0x0 .. 1 MiB at UVA ``UVA``; returns the memfd (kept by the test)."""
    fd = memfd()
    front.send(Req.SET_MEM_TABLE, mem_table([(0, MEM_SIZE, UVA, 0)]), fds=[fd])
    pump()
    return fd


def setup_ring(front, pump, index, kick=True, enable=True, num=256, base=0):
    """Ring ``index`` at GPA 0x10000 * (index + 1); returns (kick_fd, call_fd)."""
    g = 0x10000 * (index + 1)
    front.send(Req.SET_VRING_NUM, state(index, num))
    front.send(Req.SET_VRING_BASE, state(index, base))
    front.send(Req.SET_VRING_ADDR, addr(index, UVA + g, UVA + g + 0x8000, UVA + g + 0x4000))
    kfd = os.eventfd(0, os.EFD_NONBLOCK)
    cfd = os.eventfd(0, os.EFD_NONBLOCK)
    if kick:
        front.send(Req.SET_VRING_KICK, u64(index), fds=[kfd])
    front.send(Req.SET_VRING_CALL, u64(index), fds=[cfd])
    if enable:
        front.send(Req.SET_VRING_ENABLE, state(index, 1))
    pump()
    return kfd, cfd


# ---- handshake and replies ---------------------------------------------------------------------


def test_handshake_replies(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    assert srv.connected
    handshake(f, pump, proto=0b1001)
    f.send(Req.GET_QUEUE_NUM)
    pump()
    assert f.reply() == (Req.GET_QUEUE_NUM, 0x5, u64(1))
    assert dev.calls == [("set_features", F_VERSION_1)]
    assert srv.session.owner and srv.session.protocol_features == 0b1001


def test_protocol_feature_mask_zero_is_fine(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump, proto=0)
    assert srv.session.protocol_features == 0


def test_reply_ack_only_when_negotiated(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump, proto=0)
    f.send(Req.SET_VRING_NUM, state(0, 64), flags=1 | vu.FLAG_NEED_REPLY)
    f.send(Req.GET_FEATURES)
    pump()
    assert f.reply()[0] == Req.GET_FEATURES            # no ack came before it
    f.send(Req.SET_PROTOCOL_FEATURES, u64(1 << vu.PROTOCOL_F_REPLY_ACK))
    f.send(Req.SET_VRING_NUM, state(0, 128), flags=1 | vu.FLAG_NEED_REPLY)
    pump()
    assert f.reply() == (Req.SET_VRING_NUM, 0x5, u64(0))
    f.send(Req.GET_FEATURES, flags=1 | vu.FLAG_NEED_REPLY)     # has its own reply: one only
    f.send(Req.GET_QUEUE_NUM)
    pump()
    assert f.reply()[0] == Req.GET_FEATURES
    assert f.reply()[0] == Req.GET_QUEUE_NUM


# ---- memory ------------------------------------------------------------------------------------


def test_memory_table_like_qemu(env):
    """Two regions of one memfd, file offset = GPA, a hole at 0xA0000-0xC0000 (QEMU 7.2)."""
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    fd = memfd()
    os.pwrite(fd, b"low!", 0x1000)
    os.pwrite(fd, b"high", 0xC1234)
    regions = [(0, 0xA0000, UVA, 0), (0xC0000, MEM_SIZE - 0xC0000, UVA + 0xC0000, 0xC0000)]
    f.send(Req.SET_MEM_TABLE, mem_table(regions), fds=[fd, os.dup(fd)])
    pump()
    assert dev.calls[-1] == ("set_mem_table", 2)
    m = dev.memory
    assert [(r.guest_phys_addr, r.memory_size, r.userspace_addr) for r in m.regions] == \
        [(0, 0xA0000, UVA), (0xC0000, MEM_SIZE - 0xC0000, UVA + 0xC0000)]
    assert [(r.gpa, r.size, r.uva, r.mmap_offset) for r in m.regions] == \
        [(0, 0xA0000, UVA, 0), (0xC0000, MEM_SIZE - 0xC0000, UVA + 0xC0000, 0xC0000)]
    assert m.uva_to_gpa(UVA + 0x1000) == 0x1000
    assert m.uva_to_gpa(UVA + 0xC1234, 4) == 0xC1234
    assert bytes(m.view(0x1000, 4)) == b"low!"
    assert m.read(0xC1234, 4) == b"high"
    m.write(0xC2000, b"from-device")
    assert os.pread(fd, 11, 0xC2000) == b"from-device"
    view = m.view(0x2000, 3)
    view[:] = b"abc"
    del view
    assert os.pread(fd, 3, 0x2000) == b"abc"
    for bad in [(0xA0000, 1), (0x9FFFF, 2), (MEM_SIZE - 1, 2), (MEM_SIZE, 1)]:
        with pytest.raises(vu.AddressError):
            m.view(*bad)
        assert not m.has_gpa(*bad)
    with pytest.raises(vu.AddressError):
        m.uva_to_gpa(UVA + 0xA0000)
    os.close(fd)


def test_new_table_replaces_old_running_ring_keeps_going(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    fd = set_memory(f, pump)
    setup_ring(f, pump, 0)
    old = dev.memory
    # the same layout again (QEMU re-sends its table when its memory map changes)
    f.send(Req.SET_MEM_TABLE, mem_table([(0, MEM_SIZE, UVA, 0)]), fds=[os.dup(fd)])
    pump()
    assert old.regions == [] and dev.memory is not old           # old one unmapped
    assert dev.names()[-2:] == ["vring_ready", "set_mem_table"]   # no stop, no restart
    assert srv.session.vrings[0].started
    os.close(fd)


def test_new_table_moving_a_running_ring_is_refused(env, caplog):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    fd = set_memory(f, pump)
    setup_ring(f, pump, 0)
    fd2 = memfd()
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        f.send(Req.SET_MEM_TABLE, mem_table([(0x100000, MEM_SIZE, UVA, 0)]), fds=[fd2])
        pump()
    assert len(caplog.records) == 1 and "running vring 0" in caplog.records[0].message
    assert dev.names()[-1] == "disconnected" and "set_mem_table" not in dev.names()[-2:]
    os.close(fd)
    os.close(fd2)


def test_new_table_forgets_stale_addresses_of_a_stopped_ring(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    fd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0)
    f.send(Req.GET_VRING_BASE, state(0, 0))
    pump()
    f.reply()
    fd2 = memfd()                        # RAM now at other user addresses: ring 0's are stale
    f.send(Req.SET_MEM_TABLE, mem_table([(0, MEM_SIZE, UVA + (1 << 30), 0)]), fds=[fd2])
    pump()
    v = srv.session.vrings[0]
    assert srv.connected and v.desc is None and v.desc_uva is None
    f.send(Req.SET_VRING_ADDR, addr(0, UVA + (1 << 30) + 0x10000, UVA + (1 << 30) + 0x18000,
                                    UVA + (1 << 30) + 0x14000))
    f.send(Req.SET_VRING_KICK, u64(0), fds=[kfd])
    pump()
    assert dev.calls[-1] == ("vring_ready", 0, 256, 77, 0x10000, 0x14000, 0x18000)
    for x in (fd, fd2, kfd, cfd):
        os.close(x)


# ---- stops answered later (Deferred) -------------------------------------------------------------


class SlowDev(Dev):
    """get_vring_base answers through a Deferred the test resolves."""

    def __init__(self):
        super().__init__()
        self.deferreds = []

    def get_vring_base(self, index):
        self.calls.append(("get_vring_base", index))
        d = vu.Deferred()
        self.deferreds.append(d)
        return d


@pytest.fixture
def slow(tmp_path):
    path = str(tmp_path / "slow.sock")
    dev = SlowDev()
    srv = VhostUserServer(path, dev, trace=[])
    rx = Reactor()
    srv.attach(rx)

    def pump(rounds=5):
        for _ in range(rounds):
            if not rx.poll(0.01):
                break
    f = Front(path)
    pump()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0)
    yield srv, dev, pump, f, kfd
    f.close()
    srv.close()
    rx.close()
    for x in (mfd, kfd, cfd):
        os.close(x)


def test_deferred_get_vring_base_holds_the_reply_and_later_messages(slow):
    srv, dev, pump, f, kfd = slow
    f.send(Req.GET_VRING_BASE, state(0, 0))
    f.send(Req.GET_FEATURES)                          # already there, waits its turn
    pump()
    assert dev.calls[-1] == ("get_vring_base", 0) and srv.session.pending is not None
    f.sock.settimeout(0.05)
    with pytest.raises(TimeoutError):
        f.sock.recv(1)
    os.eventfd_write(kfd, 1)                          # a stopping ring gets no kick
    pump()
    assert "kick" not in dev.names()
    dev.deferreds[0].resolve(0x1234)
    f.sock.settimeout(2)
    assert f.reply() == (Req.GET_VRING_BASE, 5, state(0, 0x1234))
    assert f.reply()[0] == Req.GET_FEATURES
    assert srv.trace[-2:] == ["GET_VRING_BASE index=0 num=0 -> num=4660",
                              f"GET_FEATURES -> {DEVICE_FEATURES | F_PROTO:#x}"]
    assert srv.session.pending is None and srv.session.vrings[0].base == 0x1234


def test_deferred_stop_around_a_reconfiguration(slow):
    srv, dev, pump, f, kfd = slow
    new_kick = os.eventfd(0, os.EFD_NONBLOCK)
    f.send(Req.SET_VRING_KICK, u64(0), fds=[new_kick])   # a new kick fd on a running ring
    f.send(Req.SET_VRING_NUM, state(0, 512))
    pump()
    assert dev.names()[-1] == "get_vring_base" and srv.session.vrings[0].num == 256
    dev.deferreds[0].resolve(9)
    # the kick message finished (ring ready again from 9), then the NUM (stop, ready again)
    assert dev.calls[-2][:4] == ("vring_ready", 0, 256, 9)
    assert dev.names()[-1] == "get_vring_base"
    dev.deferreds[1].resolve(10)
    assert dev.calls[-1][:4] == ("vring_ready", 0, 512, 10)
    os.eventfd_write(new_kick, 1)
    pump()
    assert dev.calls[-1] == ("kick", 0)
    os.close(new_kick)


def test_disconnect_while_a_stop_is_pending(slow):
    srv, dev, pump, f, kfd = slow
    before = len(os.listdir("/proc/self/fd"))
    new_kick = os.eventfd(0)
    f.send(Req.SET_VRING_KICK, u64(0), fds=[new_kick])
    pump()
    os.close(new_kick)                                # the server holds its own copy
    assert srv.session.pending is not None
    f.close()
    pump()
    assert dev.names().count("disconnected") == 1 and not srv.connected
    dev.deferreds[0].resolve(1)                       # too late: ignored
    assert len(os.listdir("/proc/self/fd")) < before  # the held fd is closed too


def test_deferred_already_resolved_and_failing_resume(slow, caplog):
    srv, dev, pump, f, kfd = slow
    d = vu.Deferred()
    d.resolve(3)
    dev.get_vring_base = lambda index: d
    f.send(Req.GET_VRING_BASE, state(0, 0))
    pump()
    assert f.reply() == (Req.GET_VRING_BASE, 5, state(0, 3))
    with pytest.raises(RuntimeError):
        d.resolve(4)
    # a device that fails while the held message finishes: logged, connection closed;
    # resolve() itself does not raise
    del dev.get_vring_base
    f.send(Req.SET_VRING_KICK, u64(0), fds=[kfd])
    pump()

    def boom(index, vring):
        raise RuntimeError("no")
    f.send(Req.SET_VRING_NUM, state(0, 64))
    pump()
    dev.vring_ready = boom
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        dev.deferreds[-1].resolve(5)
    assert len(caplog.records) == 1 and "device callback failed" in caplog.records[0].message
    assert not srv.connected and dev.names()[-1] == "disconnected"


def test_unmapped_on_disconnect_and_no_fd_leak(env):
    srv, dev, rx, pump, connect = env
    before = len(os.listdir("/proc/self/fd"))
    f = connect()
    handshake(f, pump)
    fd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0)
    k2, c2 = setup_ring(f, pump, 1)
    memory = srv.session.memory
    f.close()
    pump()
    assert dev.calls[-1] == ("disconnected",) and dev.names().count("disconnected") == 1
    assert memory.regions == [] and not srv.connected
    for x in (fd, kfd, cfd, k2, c2):
        os.close(x)
    assert len(os.listdir("/proc/self/fd")) == before


# ---- rings -------------------------------------------------------------------------------------


def test_ring_ready_only_when_complete(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0, kick=False, enable=False, base=5)
    assert "vring_ready" not in dev.names()
    f.send(Req.SET_VRING_ENABLE, state(0, 1))
    pump()
    assert "vring_ready" not in dev.names()
    f.send(Req.SET_VRING_KICK, u64(0), fds=[kfd])
    pump()
    assert dev.calls[-1] == ("vring_ready", 0, 256, 5, 0x10000, 0x14000, 0x18000)
    v = dev.vrings[0]
    assert v.kick_fd is not None and v.call_fd is not None and v.started and v.enabled
    # enable before anything else, kick given as "no fd" (polling)
    f.send(Req.SET_VRING_ENABLE, state(1, 1))
    f.send(Req.SET_VRING_NUM, state(1, 1024))
    f.send(Req.SET_VRING_ADDR, addr(1, UVA + 0x20000, UVA + 0x28000, UVA + 0x24000))
    pump()
    assert not srv.session.vrings[1].started
    f.send(Req.SET_VRING_KICK, u64(1 | vu.VRING_NOFD))
    pump()
    assert dev.calls[-1] == ("vring_ready", 1, 1024, 0, 0x20000, 0x24000, 0x28000)
    assert dev.vrings[1].kick_fd is None
    for x in (mfd, kfd, cfd):
        os.close(x)


def test_rings_start_enabled_without_protocol_features(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump, features=F_VERSION_1)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0, enable=False)
    assert dev.calls[-1][:2] == ("vring_ready", 0)
    for x in (mfd, kfd, cfd):
        os.close(x)


def test_get_vring_base(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    # a ring never started answers the base it was given; the device is not asked
    f.send(Req.SET_VRING_BASE, state(1, 42))
    f.send(Req.GET_VRING_BASE, state(1, 0))
    pump()
    assert f.reply() == (Req.GET_VRING_BASE, 0x5, state(1, 42))
    assert "get_vring_base" not in dev.names()
    # a started ring is stopped by the device, which reports its index
    kfd, cfd = setup_ring(f, pump, 0)
    f.send(Req.GET_VRING_BASE, state(0, 0))
    pump()
    assert f.reply() == (Req.GET_VRING_BASE, 0x5, state(0, 77))
    assert dev.calls[-1] == ("get_vring_base", 0)
    v = srv.session.vrings[0]
    assert not v.started and v.kick_fd is None and v.base == 77
    os.eventfd_write(kfd, 1)                     # the old kick fd is not watched any more
    pump()
    assert "kick" not in dev.names()
    # restart: a new kick starts it again from what the device reported; the kick still
    # pending in the eventfd is delivered after that
    f.send(Req.SET_VRING_KICK, u64(0), fds=[kfd])
    pump()
    assert dev.calls[-2][:4] == ("vring_ready", 0, 256, 77)
    assert dev.calls[-1] == ("kick", 0)
    for x in (mfd, kfd, cfd):
        os.close(x)


def test_disable_stops_and_reenable_restarts(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0)
    f.send(Req.SET_VRING_ENABLE, state(0, 0))
    pump()
    assert dev.calls[-1] == ("get_vring_base", 0)
    f.send(Req.SET_VRING_ENABLE, state(0, 1))
    pump()
    assert dev.calls[-1][:4] == ("vring_ready", 0, 256, 77)
    for x in (mfd, kfd, cfd):
        os.close(x)


def test_kicks_and_calls_through_eventfds(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0)
    k1, c1 = setup_ring(f, pump, 1)
    assert set(srv.fds()) >= {dev.vrings[0].kick_fd, dev.vrings[1].kick_fd}
    os.eventfd_write(kfd, 1)
    os.eventfd_write(kfd, 1)                     # two kicks before we look: one callback
    os.eventfd_write(k1, 1)
    pump()
    assert sorted(c for c in dev.calls if c[0] == "kick") == [("kick", 0), ("kick", 1)]
    assert dev.vrings[0].call() and dev.vrings[0].call()
    assert os.eventfd_read(cfd) == 2
    with pytest.raises(BlockingIOError):
        os.eventfd_read(c1)
    # the front-end replaces the call fd while the ring runs: the same Vring object follows
    c_new = os.eventfd(0, os.EFD_NONBLOCK)
    f.send(Req.SET_VRING_CALL, u64(0), fds=[c_new])
    pump()
    assert dev.vrings[0].call()
    assert os.eventfd_read(c_new) == 1
    f.send(Req.SET_VRING_CALL, u64(0 | vu.VRING_NOFD))
    pump()
    assert dev.vrings[0].call() is False
    for x in (mfd, kfd, cfd, k1, c1, c_new):
        os.close(x)


def test_handle_without_reactor(tmp_path):
    """The sans-IO surface: fds() and handle(fd), no Reactor."""
    import selectors
    dev = Dev()
    path = str(tmp_path / "s")
    with VhostUserServer(path, dev) as srv:
        sel = selectors.DefaultSelector()

        def run():
            for _ in range(5):
                ready = [k.fd for k, _ in sel.select(0.01)] if sel.get_map() else []
                for fd in srv.fds():
                    if fd not in sel.get_map():
                        sel.register(fd, selectors.EVENT_READ)
                for fd in list(sel.get_map()):
                    if fd not in srv.fds():
                        sel.unregister(fd)
                for fd in ready:
                    srv.handle(fd)
        assert len(srv.fds()) == 1
        run()
        f = Front(path)
        run()
        run()
        assert len(srv.fds()) == 2
        f.send(Req.GET_FEATURES)
        run()
        assert f.reply()[2] == u64(DEVICE_FEATURES | F_PROTO)
        assert srv.handle(12345) is False
        f.close()
        sel.close()


# ---- split and packed messages -------------------------------------------------------------------


def test_split_messages_byte_by_byte_with_fds(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    fd = memfd()
    msg = HDR.pack(Req.SET_MEM_TABLE, 1, 40) + mem_table([(0, MEM_SIZE, UVA, 0)])
    socket.send_fds(f.sock, [msg[:1]], [fd])               # the fd rides on the first byte
    pump()
    for i in range(1, len(msg)):
        f.sock.sendall(msg[i:i + 1])
        pump()
        assert ("set_mem_table", 1) not in dev.calls or i == len(msg) - 1
    assert dev.calls[-1] == ("set_mem_table", 1)
    # two whole messages in one send, then a third split across sends
    both = HDR.pack(Req.GET_FEATURES, 1, 0) + HDR.pack(Req.GET_QUEUE_NUM, 1, 0)
    third = HDR.pack(Req.SET_VRING_NUM, 1, 8) + state(0, 64)
    f.sock.sendall(both + third[:5])
    pump()
    assert f.reply()[0] == Req.GET_FEATURES and f.reply()[0] == Req.GET_QUEUE_NUM
    f.sock.sendall(third[5:])
    pump()
    assert srv.session.vrings[0].num == 64
    os.close(fd)


def test_fds_on_message_after_unread_tail(env):
    """A chunk may hold the end of one message and a whole next one with fds."""
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    a = HDR.pack(Req.SET_VRING_NUM, 1, 8) + state(0, 64)
    b = HDR.pack(Req.SET_VRING_CALL, 1, 8) + u64(0)
    cfd = os.eventfd(0)
    f.sock.sendall(a[:6])
    pump()
    socket.send_fds(f.sock, [a[6:] + b], [cfd])
    pump()
    assert srv.session.vrings[0].num == 64 and srv.session.vrings[0].call_fd is not None
    os.close(cfd)


# ---- malformed input ---------------------------------------------------------------------------


def _prepared(front, pump):
    handshake(front, pump)
    return [set_memory(front, pump)]


def _eventfd():
    return os.eventfd(0)


MALFORMED = {
    # name: (function(front) -> fds to close later, text expected in the log line)
    "size_for_request": (lambda f: f.send(Req.SET_VRING_NUM, b"\0" * 4), "payload size 4"),
    "size_on_get": (lambda f: f.send(Req.GET_FEATURES, u64(0)), "payload size 8"),
    "mem_table_size": (lambda f: f.send(Req.SET_MEM_TABLE, b"\0" * 20), "payload size 20"),
    "header_only_huge": (lambda f: f.send(Req.SET_VRING_ADDR, b"", size=1 << 31),
                         "payload size 2147483648"),
    "unknown_request": (lambda f: f.send(99), "unknown request 99"),
    "unsupported_request": (lambda f: f.send(Req.SET_LOG_FD, u64(0)),
                            "unsupported request SET_LOG_FD"),
    "version": (lambda f: f.send(Req.GET_FEATURES, flags=2), "protocol version 2"),
    "reply_flag": (lambda f: f.send(Req.GET_FEATURES, flags=5), "reply flag"),
    "kick_missing_fd": (lambda f: f.send(Req.SET_VRING_KICK, u64(0)), "0 fds attached"),
    "call_extra_fd": (lambda f: [f.send(Req.SET_VRING_CALL, u64(1 | vu.VRING_NOFD),
                                        fds=[fd]) for fd in [_eventfd()]],
                      "1 fds attached, expected 0"),
    "fd_on_get_features": (lambda f: [f.send(Req.GET_FEATURES, fds=[fd])
                                      for fd in [_eventfd()]], "1 fds attached"),
    "kick_high_bits": (lambda f: f.send(Req.SET_VRING_KICK, u64(0x1000 | vu.VRING_NOFD)),
                       "bits beyond 0-8"),
    "mem_table_missing_fd": (
        lambda f: [f.send(Req.SET_MEM_TABLE, mem_table([(0, 0x1000, UVA, 0),
                                                        (0x2000, 0x1000, UVA + 0x2000, 0)]),
                          fds=[fd]) for fd in [memfd()]], "1 fds attached, expected 2"),
    "mem_table_zero_regions": (lambda f: f.send(Req.SET_MEM_TABLE, struct.pack("=II", 0, 0)),
                               "0 regions"),
    "mem_table_count_vs_size": (
        lambda f: f.send(Req.SET_MEM_TABLE, struct.pack("=II", 3, 0) + b"\0" * 64),
        "do not fit"),
    "mem_region_beyond_file": (
        lambda f: [f.send(Req.SET_MEM_TABLE, mem_table([(0, 2 * MEM_SIZE, UVA, 0)]), fds=[fd])
                   for fd in [memfd()]], "file has"),
    "mem_regions_overlap": (
        lambda f: [f.send(Req.SET_MEM_TABLE, mem_table([(0, 0x2000, UVA, 0),
                                                        (0x1000, 0x1000, UVA + 0x8000, 0)]),
                          fds=[fd, os.dup(fd)]) for fd in [memfd()]], "overlap"),
    "mem_fd_not_memory": (
        lambda f: [f.send(Req.SET_MEM_TABLE, mem_table([(0, 0x1000, UVA, 0)]), fds=[fd])
                   for fd in [_eventfd()]], "not a memory file"),
    "ring_outside_table": (
        lambda f: f.send(Req.SET_VRING_ADDR, addr(0, UVA + MEM_SIZE, UVA + 0x8000, UVA + 0x4000)),
        "not in the memory table"),
    "ring_straddles_end": (
        lambda f: [f.send(Req.SET_VRING_NUM, state(0, 256)),
                   f.send(Req.SET_VRING_ADDR, addr(0, UVA + MEM_SIZE - 0x800, UVA, UVA + 0x4000))],
        "not in the memory table"),
    "ring_misaligned": (
        lambda f: f.send(Req.SET_VRING_ADDR, addr(0, UVA + 8, UVA + 0x8000, UVA + 0x4000)),
        "not 16-byte aligned"),
    "ring_log_flag": (
        lambda f: f.send(Req.SET_VRING_ADDR, addr(0, UVA, UVA + 0x8000, UVA + 0x4000, flags=1)),
        "logging"),
    "index_beyond_queues": (lambda f: f.send(Req.SET_VRING_NUM, state(2, 256)),
                            "vring index 2, the device has 2"),
    "index_beyond_queues_kick": (
        lambda f: [f.send(Req.SET_VRING_KICK, u64(5), fds=[fd]) for fd in [_eventfd()]],
        "vring index 5"),
    "num_not_power_of_two": (lambda f: f.send(Req.SET_VRING_NUM, state(0, 384)),
                             "size 384 is not a power of two"),
    "num_too_big": (lambda f: f.send(Req.SET_VRING_NUM, state(0, 65536)), "size 65536"),
    "num_zero": (lambda f: f.send(Req.SET_VRING_NUM, state(0, 0)), "size 0"),
    "base_too_big": (lambda f: f.send(Req.SET_VRING_BASE, state(0, 0x10000)), "16-bit"),
    "enable_value": (lambda f: f.send(Req.SET_VRING_ENABLE, state(0, 2)), "expected 0 or 1"),
    "features_not_offered": (lambda f: f.send(Req.SET_FEATURES, u64(F_PROTO | 1 << 26)),
                             "were not offered"),
    "protocol_not_offered": (lambda f: f.send(Req.SET_PROTOCOL_FEATURES, u64(1 << 14)),
                             "were not offered"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_closes_connection_with_one_line(env, caplog, case):
    srv, dev, rx, pump, connect = env
    send, text = MALFORMED[case]
    f = connect()
    keep = _prepared(f, pump)
    calls_before = list(dev.calls)
    fds_before = len(os.listdir("/proc/self/fd"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        sent = send(f) or []
        pump()
    keep += [x for x in sent if isinstance(x, int)]
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1, [r.getMessage() for r in caplog.records]
    assert text in errors[0].getMessage(), errors[0].getMessage()
    assert [r for r in caplog.records if r.levelno < logging.WARNING] == []
    # nothing of the bad message reached the device; it heard of the disconnect once
    assert dev.calls == calls_before + [("disconnected",)]
    assert f.closed_by_peer() and not srv.connected
    for x in keep:
        os.close(x)
    # every fd the server got is closed again (the memfd of the table included)
    f.close()
    assert len(os.listdir("/proc/self/fd")) <= fds_before - 1
    # and the server takes the next front-end
    g = connect()
    handshake(g, pump)
    assert srv.connected and srv.connections == 2


def test_device_exception_closes_connection(env, caplog):
    srv, dev, rx, pump, connect = env

    def boom(index, vring):
        raise RuntimeError("device says no")
    dev.vring_ready = boom
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        kfd, cfd = setup_ring(f, pump, 0)
    assert len(caplog.records) == 1 and "device callback failed" in caplog.records[0].message
    assert f.closed_by_peer() and dev.calls[-1] == ("disconnected",)
    for x in (mfd, kfd, cfd):
        os.close(x)
    g = connect()
    handshake(g, pump)


def test_device_protocol_error_is_one_line(env, caplog):
    srv, dev, rx, pump, connect = env

    def refuse(features):
        raise vu.ProtocolError("device refuses features")
    dev.set_features = refuse
    f = connect()
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        f.send(Req.SET_FEATURES, u64(F_VERSION_1))
        pump()
    assert [r.getMessage() for r in caplog.records] == [
        f"vhost-user {srv.path}: device refuses features; closing the connection"]
    assert f.closed_by_peer()


# ---- connections -------------------------------------------------------------------------------


def test_disconnect_eof_then_new_front_end(env):
    srv, dev, rx, pump, connect = env
    f = connect()
    handshake(f, pump)
    f.close()
    pump()
    assert dev.names().count("disconnected") == 1 and not srv.connected
    g = connect()
    handshake(g, pump)
    assert srv.connections == 2 and dev.names().count("disconnected") == 1
    g.close()
    pump()
    assert dev.names().count("disconnected") == 2


def test_disconnect_reset(env, caplog):
    """Closing with our reply unread makes the server's next read fail with ECONNRESET."""
    srv, dev, rx, pump, connect = env
    f = connect()
    f.send(Req.GET_FEATURES)
    pump()
    f.close()
    with caplog.at_level(logging.INFO, logger="cosim.vhost_user"):
        pump()
    assert dev.names() == ["disconnected"] and not srv.connected
    assert [r.getMessage() for r in caplog.records] == [
        f"vhost-user {srv.path}: front-end disconnected (Connection reset by peer)"]


def test_disconnect_mid_message(env, caplog):
    srv, dev, rx, pump, connect = env
    f = connect()
    fd = memfd()
    socket.send_fds(f.sock, [HDR.pack(Req.SET_MEM_TABLE, 1, 40) + b"\1\0\0\0"], [fd])
    pump()
    f.close()
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        pump()
    assert caplog.records == []
    assert dev.names() == ["disconnected"]
    os.close(fd)


def test_second_front_end_refused_while_first_served(env, caplog):
    srv, dev, rx, pump, connect = env
    f = connect()
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_user"):
        g = connect()
    assert g.closed_by_peer() and "second front-end" in caplog.records[0].message
    handshake(f, pump)                                # the first is not disturbed
    f.close()
    h = connect()                                     # EOF of f and h's connect together
    handshake(h, pump)
    assert srv.connections == 2


def test_stale_socket_removed_live_one_kept(tmp_path):
    path = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()                                          # leaves a socket file nobody serves
    with VhostUserServer(path, Dev()) as srv:
        with pytest.raises(FileExistsError):
            VhostUserServer(path, Dev())               # srv is listening there
        assert srv.fds()
    assert not os.path.exists(path)
    other = tmp_path / "plain"
    other.write_text("x")
    with pytest.raises(FileExistsError):
        VhostUserServer(str(other), Dev())
    assert other.read_text() == "x"


def test_serve_forever_and_stop(tmp_path):
    path = str(tmp_path / "sf.sock")
    dev = Dev()
    srv = VhostUserServer(path, dev)
    ticks = []
    t = threading.Thread(target=srv.serve_forever, args=(0.02, lambda: ticks.append(1)))
    t.start()
    try:
        f = Front(path)
        f.send(Req.GET_FEATURES)
        assert f.reply()[2] == u64(DEVICE_FEATURES | F_PROTO)
        f.close()
        deadline = time.monotonic() + 2
        while "disconnected" not in dev.names() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.names() == ["disconnected"]
    finally:
        srv.stop()
        t.join(2)
        srv.close()
    assert not t.is_alive() and ticks


# ---- codec and reactor -------------------------------------------------------------------------


def test_codec_round_trip():
    assert vu.encode(Req.GET_FEATURES, u64(5)) == HDR.pack(1, 5, 8) + u64(5)
    a = vu.VringAddr(1, 0, 0x1000, 0x3000, 0x2000)
    assert vu.VringAddr.unpack(a.pack()) == a and a.pack() == addr(1, 0x1000, 0x3000, 0x2000)
    s = vu.VringState(3, 9)
    assert vu.VringState.unpack(s.pack()) == s
    regions = [vu.MemRegionDesc(0, 0x1000, UVA, 0), vu.MemRegionDesc(0x2000, 0x100, 0, 0x2000)]
    assert vu.parse_mem_table(vu.pack_mem_table(regions)) == regions
    # a full 8-slot table with 2 regions in use is accepted too
    assert vu.parse_mem_table(vu.pack_mem_table(regions) + bytes(6 * 32)) == regions
    r = vu.MessageReader()
    r.feed(vu.encode(Req.SET_OWNER, flags=1)[:7])
    assert r.next() is None and r.pending == 7
    r.feed(vu.encode(Req.SET_OWNER, flags=1)[7:])
    m = r.next()
    assert (m.request, m.flags, m.payload, m.fds, m.name) == (3, 1, b"", [], "SET_OWNER")
    assert vu.req_name(99) == "request 99"


def test_reactor():
    rx = Reactor()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    seen = []
    rx.register(a.fileno(), lambda: seen.append(a.recv(10)))
    rx.register(c.fileno(), lambda: (seen.append(c.recv(10)), rx.unregister(a.fileno())))
    assert rx.poll(0) is False
    b.send(b"x")
    assert rx.poll(1) is True and seen == [b"x"]
    d.send(b"y")
    b.send(b"z")                                  # may be suppressed if c runs first
    rx.poll(1)
    assert b"y" in seen
    rx.unregister(a.fileno())                     # twice is fine
    rx.register(c.fileno(), lambda: seen.append(("again", c.recv(10))))
    d.send(b"w")
    rx.poll(1)
    assert seen[-1] == ("again", b"w")
    rx.close()
    for s in (a, b, c, d):
        s.close()


def test_trace_lines_name_requests_and_replies(env):
    srv, dev, rx, pump, connect = env
    srv.trace = []
    f = connect()
    handshake(f, pump)
    mfd = set_memory(f, pump)
    kfd, cfd = setup_ring(f, pump, 0, num=64, base=3)
    f.send(Req.GET_VRING_BASE, state(0, 0))
    pump()
    f.reply()
    assert srv.trace[:5] == [f"GET_FEATURES -> {DEVICE_FEATURES | F_PROTO:#x}",
                             "GET_PROTOCOL_FEATURES -> 0x9", "SET_PROTOCOL_FEATURES 0x0",
                             "SET_OWNER", f"SET_FEATURES {F_PROTO | F_VERSION_1:#x}"]
    assert srv.trace[5] == (f"SET_MEM_TABLE [gpa=0x0 size={MEM_SIZE:#x} uva={UVA:#x} "
                            f"off=0x0]")
    assert srv.trace[6:] == [
        "SET_VRING_NUM index=0 num=64", "SET_VRING_BASE index=0 num=3",
        f"SET_VRING_ADDR index=0 flags=0x0 desc={UVA + 0x10000:#x} used={UVA + 0x18000:#x} "
        f"avail={UVA + 0x14000:#x}",
        "SET_VRING_KICK index=0 fd", "SET_VRING_CALL index=0 fd",
        "SET_VRING_ENABLE index=0 num=1", "GET_VRING_BASE index=0 num=0 -> num=77"]
    assert srv.messages == len(srv.trace)
    for x in (mfd, kfd, cfd):
        os.close(x)


# ---- random input ------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

_SMALL = st.sampled_from([0, 1, 2, 3, 64, 256, 0x100, 0x101, 0x1FF, 32768, 65536, 2**32 - 1])
_OFFSETS = st.sampled_from([0, 0x1000, 0x10000, 0x10008, 4095, MEM_SIZE - 16, MEM_SIZE])


def _shaped(request, index, num, offsets, nregions, size):
    """A payload of the shape ``request`` takes, with fuzzed values."""
    if request in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE,
                   Req.SET_VRING_ENABLE):
        return state(index, num)
    if request == Req.SET_VRING_ADDR:
        return addr(index, *(UVA + o for o in offsets))
    if request == Req.SET_MEM_TABLE:
        return mem_table([(k * size, size, UVA + k * size, 0) for k in range(nregions)])
    if request in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
        return u64(index | (num & vu.VRING_NOFD))
    if request in (Req.SET_FEATURES, Req.SET_PROTOCOL_FEATURES):
        return u64(F_PROTO | F_VERSION_1 if num % 2 else num)
    return b""


_SHAPED = st.builds(lambda r, i, n, o, k, z: (r, 1, _shaped(r, i, n, o, k, z)),
                    st.sampled_from(sorted(vu.PAYLOAD_SIZES)), st.integers(0, 2), _SMALL,
                    st.tuples(_OFFSETS, _OFFSETS, _OFFSETS), st.integers(0, 3),
                    st.sampled_from([0x1000, 0x40000, MEM_SIZE]))
_RANDOM = st.tuples(st.one_of(st.sampled_from(sorted(int(r) for r in Req)),
                              st.integers(0, 2**32 - 1)),
                    st.sampled_from([1, 1 | 8, 0, 5, 2**32 - 1]), st.binary(max_size=80))
_MESSAGES = st.lists(st.tuples(st.one_of(_SHAPED, _SHAPED, _SHAPED, _RANDOM),
                               st.integers(0, 2)), max_size=16)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_MESSAGES, chop=st.integers(1, 64), prologue=st.booleans())
def test_random_messages_never_crash(tmp_path_factory, messages, chop, prologue):
    """Random requests, flags, payloads and fds, cut into random pieces: handle() never
    raises, every connection ends at most once, and the server still serves afterwards."""
    path = str(tmp_path_factory.mktemp("fuzz") / "s")
    dev = Dev()
    with VhostUserServer(path, dev) as srv:
        rx = Reactor()
        srv.attach(rx)
        f = Front(path)
        opened = []

        def pump():
            while rx.poll(0):
                pass
        try:
            pump()
            if prologue:                       # a valid start: features, memory, ring 0
                handshake(f, pump)
                opened.append(set_memory(f, pump))
                opened += setup_ring(f, pump, 0)
            for (request, flags, payload), nfds in messages:
                data = HDR.pack(request, flags, len(payload)) + payload
                fds = [memfd() if (i + request) % 2 else os.eventfd(0) for i in range(nfds)]
                opened += fds
                try:
                    for i in range(0, len(data), chop):
                        piece = data[i:i + chop]
                        if i == 0 and fds:
                            socket.send_fds(f.sock, [piece], fds)
                        else:
                            f.sock.sendall(piece)
                        pump()
                except (BrokenPipeError, ConnectionResetError):
                    break
            f.close()
            while rx.poll(0.005):
                pass
            assert dev.names().count("disconnected") == 1 and not srv.connected
            g = Front(path)
            rx.poll(0.01)
            g.send(Req.GET_FEATURES)
            while rx.poll(0.005):
                pass
            assert g.reply()[0] == Req.GET_FEATURES
            g.close()
        finally:
            for fd in opened:
                os.close(fd)
            rx.close()
