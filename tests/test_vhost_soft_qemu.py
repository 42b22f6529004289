"""cosim.vhost_soft: the software virtio-net back-end, first against a fake driver written here
(no QEMU), then against a real Linux guest under QEMU (``-netdev vhost-user``).

The QEMU tests boot the guest of :mod:`cosim.guest` three times (about 10 s each under TCG):
twice on one in-process :class:`VhostUserServer` (20 pings of 1..1472 bytes and 20 more for
the RTT, with EVENT_IDX; then a second QEMU on the same socket, without EVENT_IDX and with RAM
in two regions), once on the stand-alone back-end (``python -m cosim.vhost_soft``). They fail
(saying so) when QEMU or busybox is missing: ``make install`` installs both. ``pytest -s``
prints the boot time and the RTTs."""

import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import pytest
from cosim.netpeer import NetPeer, arp_request, icmp_echo_request
from cosim.vhost_soft import (RX, TX, VIRTIO_NET_HDR, SoftNetDevice, need_event,
                              VIRTIO_RING_F_EVENT_IDX, VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF)
from cosim.vhost_user import GuestMemory, MemRegionDesc, VhostUserServer, Vring
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER_MAC = bytes.fromhex("0200000000fe")
PEER_IP = "10.0.0.254"
GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.0.1"
HDR12 = bytes(12)


# ---- the device against a fake driver ---------------------------------------------------------


class FakeDriver:
    """A virtio-net driver's half of two split rings in a memfd (GPA = file offset).

    RX ring (queue 0) at 0x1000, TX ring (queue 1) at 0x5000, buffers from 0x10000."""

    NUM = 8

    def __init__(self, event_idx=False):
        self.fd = os.memfd_create("fake-guest")
        os.ftruncate(self.fd, 1 << 20)
        self.memory = GuestMemory.map([MemRegionDesc(0, 1 << 20, 0x4000_0000, 0)],
                                      [os.dup(self.fd)])
        self.calls = {RX: os.eventfd(0, os.EFD_NONBLOCK), TX: os.eventfd(0, os.EFD_NONBLOCK)}
        self.base = {RX: 0x1000, TX: 0x5000}
        self.avail_idx = {RX: 0, TX: 0}
        self.next_desc = {RX: 0, TX: 0}
        self.next_buf = 0x10000
        self.event_idx = event_idx

    def vring(self, q):
        b = self.base[q]
        return Vring(q, num=self.NUM, desc=b, avail=b + 0x1000, used=b + 0x2000,
                     kick_set=True, call_fd=self.calls[q], enabled=True, started=True)

    def w(self, gpa, fmt, *values):
        os.pwrite(self.fd, struct.pack(fmt, *values), gpa)

    def r(self, gpa, fmt):
        return struct.unpack(fmt, os.pread(self.fd, struct.calcsize(fmt), gpa))

    def buffer(self, size):
        gpa, self.next_buf = self.next_buf, self.next_buf + ((size + 63) & ~63)
        return gpa

    def add_chain(self, q, pieces, publish=True):
        """Descriptors for ``pieces`` (bytes to read, or an int = writable size); returns the
        head and the GPAs."""
        head = self.next_desc[q]
        gpas = []
        for i, piece in enumerate(pieces):
            index = (head + i) % self.NUM
            size = piece if isinstance(piece, int) else len(piece)
            gpa = self.buffer(size)
            gpas.append(gpa)
            if not isinstance(piece, int):
                os.pwrite(self.fd, piece, gpa)
            flags = (2 if isinstance(piece, int) else 0) | (1 if i < len(pieces) - 1 else 0)
            self.w(self.base[q] + 16 * index, "<QIHH", gpa, size, flags, (index + 1) % self.NUM)
        self.next_desc[q] = (head + len(pieces)) % self.NUM
        avail = self.base[q] + 0x1000
        self.w(avail + 4 + 2 * (self.avail_idx[q] % self.NUM), "<H", head)
        self.avail_idx[q] += 1
        if publish:
            self.w(avail + 2, "<H", self.avail_idx[q])
        return head, gpas

    def used(self, q):
        """(used idx, [(id, len) ...])"""
        u = self.base[q] + 0x2000
        idx = self.r(u + 2, "<H")[0]
        return idx, [self.r(u + 4 + 8 * (i % self.NUM), "<II") for i in range(idx)]

    def calls_seen(self, q):
        try:
            return os.eventfd_read(self.calls[q])
        except BlockingIOError:
            return 0

    def close(self):
        self.memory.close()
        for fd in (self.fd, *self.calls.values()):
            os.close(fd)


@pytest.fixture
def fake():
    drivers = []

    def make(event_idx=False, offer=True):
        drv = FakeDriver(event_idx)
        peer = NetPeer(PEER_MAC, PEER_IP)
        dev = SoftNetDevice(peer, event_idx=offer)
        f = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF)
        if event_idx:
            f |= 1 << VIRTIO_RING_F_EVENT_IDX
        assert dev.features() & f == f
        dev.set_features(f)
        dev.set_mem_table(drv.memory)
        drivers.append((drv, dev))
        return drv, dev, peer

    yield make
    for drv, dev in drivers:
        dev.disconnected()
        drv.close()


def start(drv, dev):
    dev.vring_ready(RX, drv.vring(RX))
    dev.vring_ready(TX, drv.vring(TX))


def test_features_offered():
    dev = SoftNetDevice(NetPeer(PEER_MAC, PEER_IP))
    assert dev.features() == (1 << 32) | (1 << 15) | (1 << 29)
    assert not SoftNetDevice(NetPeer(PEER_MAC, PEER_IP), event_idx=False).features() & (1 << 29)


def test_need_event():
    assert need_event(0, 1, 0) and not need_event(5, 3, 2) and need_event(0xFFFF, 0, 0xFFFE)


def test_arp_and_ping_through_rings(fake):
    drv, dev, peer = fake()
    rx_heads = [drv.add_chain(RX, [2048]) for _ in range(4)]
    start(drv, dev)
    drv.add_chain(TX, [HDR12 + arp_request(GUEST_MAC, GUEST_IP, PEER_IP)])
    dev.kick(TX)
    assert drv.used(TX) == (1, [(0, 0)])
    idx, elems = drv.used(RX)
    assert idx == 1 and elems == [(rx_heads[0][0], 12 + 60)]
    data = os.pread(drv.fd, 72, rx_heads[0][1][0])
    assert VIRTIO_NET_HDR.unpack(data[:12]) == (0, 0, 0, 0, 0, 0, 1)
    assert data[12:] == peer.handle(arp_request(GUEST_MAC, GUEST_IP, PEER_IP))[0]
    assert drv.calls_seen(TX) == 1 and drv.calls_seen(RX) == 1
    # a 1472-byte ping, its virtio header in a descriptor of its own, the frame in two
    req = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=bytes(range(
        256)) * 5 + bytes(192), seq=7)
    assert len(req) == 1514
    drv.add_chain(TX, [HDR12, req[:100], req[100:]])
    dev.kick(TX)
    assert drv.used(TX)[0] == 2 and drv.used(TX)[1][1] == (1, 0)
    idx, elems = drv.used(RX)
    assert idx == 2 and elems[1] == (rx_heads[1][0], 12 + 1514)
    got = os.pread(drv.fd, 12 + 1514, rx_heads[1][1][0])
    assert got[12:] == NetPeer(PEER_MAC, PEER_IP).handle(req)[0]
    assert dev.stats.tx_frames == 2 and dev.stats.rx_frames == 2 and peer.stats.echo_replies == 1


def test_rx_chain_of_small_buffers_and_waiting_for_buffers(fake):
    drv, dev, peer = fake()
    start(drv, dev)
    req = icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP, payload=b"z" * 1000)
    drv.add_chain(TX, [HDR12 + req])
    dev.kick(TX)                                     # no RX buffer yet: the reply waits
    assert drv.used(RX)[0] == 0 and len(dev.rx_pending) == 1
    head, gpas = drv.add_chain(RX, [500, 500, 500])
    dev.kick(RX)
    idx, elems = drv.used(RX)
    assert idx == 1 and elems == [(head, 12 + len(req))]
    data = b"".join(os.pread(drv.fd, 500, g) for g in gpas)[:12 + len(req)]
    assert data[12:] == NetPeer(PEER_MAC, PEER_IP).handle(req)[0]


def test_rx_buffer_too_small_drops_the_frame(fake):
    drv, dev, peer = fake()
    drv.add_chain(RX, [64])
    start(drv, dev)
    drv.add_chain(TX, [HDR12 + icmp_echo_request(GUEST_MAC, PEER_MAC, GUEST_IP, PEER_IP,
                                                 payload=b"y" * 200)])
    dev.kick(TX)
    assert dev.stats.rx_dropped == 1 and drv.used(RX)[0] == 0 and not dev.rx_pending


def test_event_idx_suppression_and_avail_event(fake):
    drv, dev, peer = fake(event_idx=True)
    drv.add_chain(RX, [2048])
    drv.add_chain(RX, [2048])
    # the driver wants a TX interrupt only after 2 more used buffers, RX after the first
    drv.w(drv.base[TX] + 0x1000 + 4 + 2 * drv.NUM, "<H", 1)      # TX used_event = 1
    drv.w(drv.base[RX] + 0x1000 + 4 + 2 * drv.NUM, "<H", 0)      # RX used_event = 0
    start(drv, dev)
    drv.add_chain(TX, [HDR12 + arp_request(GUEST_MAC, GUEST_IP, PEER_IP)])
    dev.kick(TX)
    assert drv.used(TX)[0] == 1 and drv.calls_seen(TX) == 0       # 0 -> 1 does not pass 1
    assert drv.calls_seen(RX) == 1
    # avail_event published: the next buffer past what was processed kicks
    assert drv.r(drv.base[TX] + 0x2000 + 4 + 8 * drv.NUM, "<H") == (1,)
    drv.add_chain(TX, [HDR12 + arp_request(GUEST_MAC, GUEST_IP, PEER_IP)])
    dev.kick(TX)
    assert drv.used(TX)[0] == 2 and drv.calls_seen(TX) == 1       # 1 -> 2 passes 1
    assert drv.used(RX)[0] == 2 and drv.calls_seen(RX) == 0       # RX used_event still 0


def test_no_interrupt_flag_without_event_idx(fake):
    drv, dev, peer = fake(event_idx=False, offer=False)
    start(drv, dev)
    drv.w(drv.base[TX] + 0x1000, "<H", 1)                        # VRING_AVAIL_F_NO_INTERRUPT
    drv.add_chain(TX, [HDR12 + b"\xff" * 60])
    dev.kick(TX)
    assert drv.used(TX)[0] == 1 and drv.calls_seen(TX) == 0
    drv.w(drv.base[TX] + 0x1000, "<H", 0)
    drv.add_chain(TX, [HDR12 + b"\xff" * 60])
    dev.kick(TX)
    assert drv.calls_seen(TX) == 1


def test_poll_finds_work_without_a_kick(fake):
    drv, dev, peer = fake()
    drv.add_chain(RX, [2048])
    start(drv, dev)
    drv.add_chain(TX, [HDR12 + arp_request(GUEST_MAC, GUEST_IP, PEER_IP)])
    dev.poll()
    assert drv.used(TX)[0] == 1 and drv.used(RX)[0] == 1


def test_restart_continues_from_base(fake):
    drv, dev, peer = fake()
    start(drv, dev)
    drv.add_chain(TX, [HDR12 + b"\xff" * 60])
    dev.kick(TX)
    base = dev.get_vring_base(TX)
    assert base == 1
    v = drv.vring(TX)
    v.base = base
    dev.vring_ready(TX, v)                        # used idx is read back from the ring
    drv.add_chain(TX, [HDR12 + b"\xff" * 60])
    dev.kick(TX)
    assert drv.used(TX)[0] == 2


@pytest.mark.parametrize("bad", ["head", "loop", "outside", "write_on_tx", "idx_jump"])
def test_broken_driver_stops_the_queue_with_one_line(fake, caplog, bad):
    drv, dev, peer = fake()
    start(drv, dev)
    head, _ = drv.add_chain(TX, [HDR12 + b"\xff" * 60], publish=False)
    d = drv.base[TX] + 16 * head
    avail = drv.base[TX] + 0x1000
    if bad == "head":
        drv.w(avail + 4, "<H", 99)
    elif bad == "loop":
        drv.w(d + 12, "<HH", 1, head)                            # NEXT to itself
    elif bad == "outside":
        drv.w(d, "<Q", 1 << 40)
    elif bad == "write_on_tx":
        drv.w(d + 12, "<H", 2)
    drv.w(avail + 2, "<H", 50 if bad == "idx_jump" else 1)
    with caplog.at_level(logging.WARNING, logger="cosim.vhost_soft"):
        dev.kick(TX)
        dev.kick(TX)
    assert len(caplog.records) == 1 and "queue 1 stopped" in caplog.records[0].message
    assert dev.stats.ring_errors == 1 and dev.rings[TX].broken


# ---- against QEMU ------------------------------------------------------------------------------


def _image():
    assert shutil.which("qemu-system-x86_64"), \
        "qemu-system-x86_64 missing: apt-get install qemu-system-x86 (make install does)"
    assert os.path.exists("/bin/busybox"), "/bin/busybox missing: apt-get install busybox-static"
    from cosim.guest.image import ensure_image
    return ensure_image()


class InProcessBackend:
    """A SoftNetDevice behind a VhostUserServer, served by a thread."""

    def __init__(self, path):
        self.peer = NetPeer(PEER_MAC, PEER_IP)
        self.device = SoftNetDevice(self.peer)
        self.trace = []
        self.server = VhostUserServer(path, self.device, trace=self.trace)
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       args=(0.1, self.device.poll), daemon=True)
        self.thread.start()

    def close(self):
        self.server.stop()
        self.thread.join(5)
        self.server.close()


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


SIZES = [1 + i * 1471 // 19 for i in range(20)]            # 1, 78, ..., 1394, 1472


def ping_sizes(guest, sizes):
    """One ``ping -c 1 -s N`` per size; {size: rtt in ms or None (too small to time)}."""
    script = " ; ".join(f"ping -c 1 -W 3 -s {s} {PEER_IP} || echo PING-FAILED {s}"
                        for s in sizes)
    rc, out = guest.run(script, timeout=30 + 4 * len(sizes))
    assert "PING-FAILED" not in out, out
    rtts = {}
    for s in sizes:
        m = re.search(rf"^{s + 8} bytes from {re.escape(PEER_IP)}: seq=0 ttl=64"
                      rf"(?: time=([\d.]+) ms)?$", out, re.M)
        assert m, (s, out)
        rtts[s] = float(m.group(1)) if m.group(1) else None
    assert out.count("1 packets transmitted, 1 packets received") == len(sizes), out
    return rtts


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vhost") / "soft.sock")
    b = InProcessBackend(path)
    yield b
    b.close()


def test_qemu_ping_sizes_1_to_1472(backend):
    from cosim.guest.qemu import Guest, vhost_user_net
    image = _image()
    t0 = time.monotonic()
    with Guest.start(image, netdev_args=vhost_user_net(backend.server.path),
                     ip=f"{GUEST_IP}/24", boot_timeout=120) as guest:
        guest.wait_ready()
        boot_s = time.monotonic() - t0
        assert guest.errors == []
        rtts = ping_sizes(guest, SIZES)
        timed = [v for v in rtts.values() if v is not None]
        # 20 more at the default size, for the RTT figure
        rc, out = guest.run(f"ping -c 20 -i 0.2 -W 3 {PEER_IP}", timeout=60)
        assert rc == 0 and "20 packets transmitted, 20 packets received" in out, out
        summary = re.search(r"min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms", out).groups()
        guest.poweroff()
    dev, peer = backend.device, backend.peer
    assert peer.stats.echo_requests == peer.stats.echo_replies == 40
    assert peer.stats.bad_checksum == peer.stats.malformed == peer.stats.fragments == 0
    assert dev.stats.ring_errors == 0 and dev.stats.rx_dropped == 0
    assert dev.features_acked & (1 << VIRTIO_RING_F_EVENT_IDX)
    assert "SET_MEM_TABLE" in " ".join(backend.trace)
    print(f"\nboot {boot_s:.1f} s; sizes {SIZES[0]}..{SIZES[-1]}: RTT ms "
          f"min {min(timed):.3f} avg {sum(timed) / len(timed):.3f} max {max(timed):.3f} "
          f"({len(timed)} timed); 20 x 56 B: min/avg/max {'/'.join(summary)} ms")
    print("device:", dev.stats.as_dict())
    print("vhost-user requests:", ", ".join(dict.fromkeys(line.split()[0]
                                                          for line in backend.trace)))


def test_qemu_second_front_end_on_same_socket_without_event_idx(backend):
    """A new QEMU on the socket the first one left; the device no longer offers EVENT_IDX. A
    VGA device makes QEMU 7.2 send RAM as two regions of one memfd (a hole at 0xA0000-0xBFFFF,
    file offset = GPA). An IPv4-fragmented ping (2000 bytes) gets no answer: the peer does not
    reassemble."""
    from cosim.guest.qemu import Guest, vhost_user_net
    image = _image()
    wait_for(lambda: not backend.server.connected, 10, "the first QEMU to disconnect")
    backend.device.offer_event_idx = False
    connections = backend.server.connections
    fragments = backend.peer.stats.fragments
    with Guest.start(image, netdev_args=vhost_user_net(backend.server.path),
                     ip=f"{GUEST_IP}/24", boot_timeout=120, extra_args=["-device", "VGA"]) as guest:
        guest.wait_ready()
        assert backend.server.connections == connections + 1
        ping_sizes(guest, [56, 1472, 1])
        regions = [(r.guest_phys_addr, r.mmap_offset) for r in backend.device.memory.regions]
        rc, out = guest.run(f"ping -c 1 -W 1 -s 2000 {PEER_IP}", timeout=20)
        assert rc != 0 and "1 packets transmitted, 0 packets received" in out, out
        guest.poweroff()
    assert regions == [(0, 0), (0xC0000, 0xC0000)]
    assert backend.peer.stats.fragments == fragments + 2
    assert not backend.device.features_acked & (1 << VIRTIO_RING_F_EVENT_IDX)
    assert backend.device.stats.ring_errors == 0


def test_qemu_standalone_backend(tmp_path):
    """``python -m cosim.vhost_soft``: serves a guest, logs the requests, ends on SIGTERM."""
    from cosim.guest.qemu import Guest, vhost_user_net
    image = _image()
    path = tmp_path / "cli.sock"
    stale = socket.socket(socket.AF_UNIX)         # a stale socket file: removed at start
    stale.bind(str(path))
    stale.close()
    log = open(tmp_path / "backend.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cosim.vhost_soft", "--socket", str(path),
                             "--peer-ip", PEER_IP, "--verbose"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "serving" in (tmp_path / "backend.log").read_text(), 20,
                 "the back-end to listen")
        with Guest.start(image, netdev_args=vhost_user_net(path), ip=f"{GUEST_IP}/24",
                         boot_timeout=120) as guest:
            guest.wait_ready()
            ping_sizes(guest, [1472, 64])
            guest.poweroff()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = (tmp_path / "backend.log").read_text()
    for word in ("GET_FEATURES", "SET_MEM_TABLE", "SET_VRING_KICK", "GET_VRING_BASE",
                 "front-end disconnected", "'echo_replies': 2"):
        assert word in text, text[-3000:]
    assert "ERROR" not in text and "Traceback" not in text, text[-3000:]
    assert not path.exists()
