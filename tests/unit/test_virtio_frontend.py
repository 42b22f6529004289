"""Unit tests of host_driver.virtio against an in-memory virtio-net device (no simulator).

:class:`VirtioFnTransport` holds host memory, the function's configuration space (MSI-X and the
virtio vendor capabilities) and its MSI-X table; BAR0 accesses to the virtio structures go to
:class:`FakeVirtioNet`, which implements the common configuration, ISR, notify and device
configuration semantics the RTL is written against and runs the two queues as a loopback:
every frame sent on the transmit queue comes back on the receive queue. It follows descriptor
chains and indirect tables, honours both event-index and flag suppression, and can reach guest
memory through an IOMMU page table. Register accesses must be exactly the field's size.
"""

import asyncio
import struct
import pytest
from collections import deque
from fakes import FakeTransport
from host_driver.iommu import IommuDomain
from host_driver.offcard import OffcardFunction
from host_driver.virtio import (DirectAccess, DomainMemory, HostMemory, TrappedAccess, VirtioError,
                                VirtioNetDriver, Virtqueue, vring_need_event, DRIVER_FEATURES,
                                RX_QUEUE, TX_QUEUE)

from regmap import PAGE_SHIFT, PTE_PRESENT, VirtioCaps, VirtioRegs as V

BAR0 = 0xE000_0000
HOST_BASE = 0x1_0000_0000         # above 4 GiB: the *_HI halves of ring addresses matter
RID = 0x0102
FIDX = 3
MSIX_CAP = 0x80
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000
NVEC = 4
F_ALL = V.FEATURES


def u16(b, off=0):
    return int.from_bytes(b[off:off + 2], "little")


def need_event(event, new, old):
    """The device's copy of the event-index test (kept apart from the driver's on purpose)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def config_space(skip_type=None):
    """Type-0 header with a capability list: MSI-X at 0x80, then the four virtio vendor
    capabilities at the VirtioCaps offsets (``skip_type`` left out of the chain)."""
    cfg = bytearray(256)
    cfg[0:4] = (0x1AF4 | 0x1041 << 16).to_bytes(4, "little")
    cfg[0x06] = 0x10
    cfg[0x34] = MSIX_CAP
    caps = [(VirtioCaps.COMMON, VirtioCaps.CFG_TYPE_COMMON, V.COMMON, V.COMMON_LEN),
            (VirtioCaps.NOTIFY, VirtioCaps.CFG_TYPE_NOTIFY, V.NOTIFY, V.NOTIFY_LEN),
            (VirtioCaps.ISR, VirtioCaps.CFG_TYPE_ISR, V.ISR, V.ISR_LEN),
            (VirtioCaps.DEVICE, VirtioCaps.CFG_TYPE_DEVICE, V.DEVICE, V.DEVICE_LEN)]
    caps = [c for c in caps if c[1] != skip_type]
    struct.pack_into("<BBHII", cfg, MSIX_CAP, 0x11, caps[0][0], NVEC - 1, MSIX_TABLE, MSIX_PBA)
    for k, (off, typ, bar_off, length) in enumerate(caps):
        nxt = caps[k + 1][0] if k + 1 < len(caps) else 0
        cap_len = 20 if typ == VirtioCaps.CFG_TYPE_NOTIFY else 16
        struct.pack_into("<BBBBBBxxII", cfg, off, 0x09, nxt, cap_len, typ, 0, 0, bar_off, length)
        if typ == VirtioCaps.CFG_TYPE_NOTIFY:
            struct.pack_into("<I", cfg, off + 16, V.NOTIFY_MULT)
    return cfg


class VirtioFnTransport(FakeTransport):
    """The shared fake host (:class:`fakes.FakeTransport`: host memory at ``HOST_BASE`` with a
    bump allocator of 8-byte granules, MSIs counted, time moving in ``sleep_ns`` only) with one
    function behind it: its configuration space (``cfg``), its MSI-X table (every vector masked
    at reset) and BAR0, whose other accesses go to the device :attr:`dev`
    (:class:`FakeVirtioNet`), which also polls its queues whenever time moves."""

    def __init__(self, cfg=None, mem_size=8 << 20):
        super().__init__(base=HOST_BASE, size=mem_size, granule=8)
        self.cfg = config_space() if cfg is None else cfg
        self.msix = bytearray(16 * NVEC)
        for k in range(NVEC):
            self.msix[16 * k + 12] = 1                   # vector control: masked
        self.dev = None
        self.cfg_reads = 0
        self.virtio_accesses = 0

    # configuration space
    async def cfg_read(self, rid, offset, size=4):
        assert rid == RID and offset % size == 0
        self.cfg_reads += 1
        return int.from_bytes(self.cfg[offset:offset + size], "little")

    async def cfg_write(self, rid, offset, value, size=4):
        assert rid == RID
        if offset in (0x04, MSIX_CAP + 2):               # command, MSI-X message control
            self.cfg[offset:offset + size] = value.to_bytes(size, "little")

    async def enumerate(self):
        return [RID]

    # BAR0
    async def mmio_read(self, addr, size=4):
        off = addr - BAR0
        if MSIX_TABLE <= off < MSIX_TABLE + len(self.msix):
            k = off - MSIX_TABLE
            return int.from_bytes(self.msix[k:k + size], "little")
        self.virtio_accesses += 1
        return self.dev.read(off, size)

    async def mmio_write(self, addr, value, size=4):
        off = addr - BAR0
        if MSIX_TABLE <= off < MSIX_TABLE + len(self.msix):
            k = off - MSIX_TABLE
            self.msix[k:k + size] = value.to_bytes(size, "little")
            return
        self.virtio_accesses += 1
        self.dev.write(off, value, size)

    # interrupts
    def fire(self, k):
        """The function signals MSI-X vector ``k`` with the message its table holds."""
        _, _, data, ctrl = struct.unpack_from("<IIII", self.msix, 16 * k)
        assert not ctrl & 1, f"vector {k} fired while masked"
        self.signal_msi(data)

    # time
    async def sleep_ns(self, ns):
        await super().sleep_ns(ns)
        if self.dev is not None:
            self.dev.service()


class FakeQueue:
    def __init__(self, max_size):
        self.max_size = max_size
        self.size = max_size
        self.vector = V.NO_VECTOR
        self.enabled = 0
        self.addr = {V.Q_DESC: 0, V.Q_DRIVER: 0, V.Q_DEVICE: 0}
        self.last_avail = 0
        self.used_idx = 0


COMMON_SIZES = {V.DFSELECT: 4, V.DF: 4, V.GFSELECT: 4, V.GF: 4, V.MSIX_CONFIG: 2,
                V.NUM_QUEUES: 2, V.STATUS: 1, V.CFG_GENERATION: 1, V.Q_SELECT: 2, V.Q_SIZE: 2,
                V.Q_MSIX: 2, V.Q_ENABLE: 2, V.Q_NOTIFY_OFF: 2}
for _f in (V.Q_DESC, V.Q_DRIVER, V.Q_DEVICE):
    COMMON_SIZES[_f] = COMMON_SIZES[_f + 4] = 4


class FakeVirtioNet:
    """The device side of one function.

    ``tx_batch``: with EVENT_IDX the device asks to be notified only every ``tx_batch``
    transmit buffers (and picks up the rest when it polls). ``no_notify``: without EVENT_IDX
    it sets NO_NOTIFY on both used rings when it goes live. ``pt``: (page-table base, pages)
    of an IOMMU domain to translate the device's DMA through."""

    def __init__(self, t, offered=F_ALL, nvec=NVEC, queue_max=(256, 256), tx_batch=1,
                 no_notify=False, pt=None):
        self.t = t
        t.dev = self
        self.offered = offered
        self.nvec = nvec
        self.queue_max = queue_max
        self.tx_batch = tx_batch
        self.no_notify = no_notify
        self.pt = pt
        self.mac = V.MAC_PREFIX + bytes([FIDX])
        self.status_writes = []
        self.notifies = [0, 0]
        self.queue_msis = [0, 0]
        self.reset()

    def reset(self):
        self.status = 0
        self.dfsel = self.gfsel = 0
        self.driver_features = 0
        self.cfg_vector = V.NO_VECTOR
        self.qsel = 0
        self.isr = 0
        self.queues = [FakeQueue(m) for m in self.queue_max]
        self.backlog = deque()

    @property
    def live(self):
        s = self.status
        return bool(s & V.S_DRIVER_OK and s & V.S_FEATURES_OK
                    and not s & (V.S_NEEDS_RESET | V.S_FAILED))

    def has(self, bit):
        return bool(self.driver_features >> bit & 1)

    def _queue(self):
        return self.queues[self.qsel] if self.qsel < len(self.queues) else None

    # ---- registers ----
    def read(self, off, size):
        if V.COMMON <= off < V.COMMON + V.COMMON_LEN:
            return self._read_common(off - V.COMMON, size)
        if off == V.ISR:
            assert size == 1
            value, self.isr = self.isr, 0
            return value
        if V.DEVICE <= off < V.DEVICE + V.DEVICE_LEN:
            rel = off - V.DEVICE
            if rel < 6:
                assert size == 1
                return self.mac[rel]
            assert size == 2 and rel in (V.NET_STATUS, V.NET_MAX_PAIRS)
            return 1                                        # link up; one queue pair
        raise AssertionError(f"read of BAR0 {off:#x}")

    def _read_common(self, rel, size):
        assert COMMON_SIZES.get(rel) == size, f"common cfg read {rel:#x} of {size} bytes"
        q = self._queue()
        if rel == V.DFSELECT:
            return self.dfsel
        if rel == V.DF:
            return self.offered >> 32 * self.dfsel & 0xFFFF_FFFF if self.dfsel < 2 else 0
        if rel == V.GFSELECT:
            return self.gfsel
        if rel == V.GF:
            return self.driver_features >> 32 * self.gfsel & 0xFFFF_FFFF if self.gfsel < 2 else 0
        if rel == V.MSIX_CONFIG:
            return self.cfg_vector
        if rel == V.NUM_QUEUES:
            return len(self.queues)
        if rel == V.STATUS:
            return self.status
        if rel == V.CFG_GENERATION:
            return 0
        if rel == V.Q_SELECT:
            return self.qsel
        if q is None:
            return 0
        if rel == V.Q_SIZE:
            return q.size
        if rel == V.Q_MSIX:
            return q.vector
        if rel == V.Q_ENABLE:
            return q.enabled
        if rel == V.Q_NOTIFY_OFF:
            return self.qsel
        field = rel & ~7
        return q.addr[field] >> 32 * (rel & 4 != 0) & 0xFFFF_FFFF

    def write(self, off, value, size):
        if V.COMMON <= off < V.COMMON + V.COMMON_LEN:
            self._write_common(off - V.COMMON, value, size)
        elif V.NOTIFY <= off < V.NOTIFY + V.NOTIFY_LEN:
            q = (off - V.NOTIFY) // V.NOTIFY_MULT
            assert size == 2 and value == q, f"notify {value} of {size} bytes at queue {q}'s"
            self.notifies[q] += 1
            self.service()
        else:
            raise AssertionError(f"write of BAR0 {off:#x}")

    def _write_common(self, rel, value, size):
        assert COMMON_SIZES.get(rel) == size, f"common cfg write {rel:#x} of {size} bytes"
        q = self._queue()
        if rel == V.DFSELECT:
            self.dfsel = value
        elif rel == V.GFSELECT:
            self.gfsel = value
        elif rel == V.GF:
            if not self.status & V.S_FEATURES_OK and self.gfsel < 2:
                shift = 32 * self.gfsel
                self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)
                                        | value << shift)
        elif rel == V.MSIX_CONFIG:
            self.cfg_vector = value if value < self.nvec else V.NO_VECTOR
        elif rel == V.STATUS:
            self._write_status(value)
        elif rel == V.Q_SELECT:
            self.qsel = value
        elif q is None:
            pass
        elif rel == V.Q_SIZE:
            if value and value & (value - 1) == 0 and value <= q.max_size and not q.enabled:
                q.size = value
        elif rel == V.Q_MSIX:
            q.vector = value if value < self.nvec else V.NO_VECTOR
        elif rel == V.Q_ENABLE:
            assert value == 1, "the driver must only write 1 to queue_enable"
            q.enabled = 1
        elif rel in (V.NUM_QUEUES, V.DF, V.CFG_GENERATION, V.Q_NOTIFY_OFF):
            raise AssertionError(f"write to read-only field {rel:#x}")
        elif not q.enabled:
            field, hi = rel & ~7, rel & 4
            keep = 0xFFFF_FFFF if hi else 0xFFFF_FFFF << 32
            q.addr[field] = q.addr[field] & keep | value << (32 if hi else 0)

    def _write_status(self, value):
        self.status_writes.append(value)
        if value == 0:
            self.reset()
            return
        ok = (not self.driver_features & ~self.offered) and self.has(V.F_VERSION_1)
        fo = value & V.S_FEATURES_OK if ok or self.status & V.S_FEATURES_OK else 0
        self.status = (value & ~(V.S_FEATURES_OK | V.S_NEEDS_RESET) | fo
                       | self.status & V.S_NEEDS_RESET)
        if self.live and self.no_notify and not self.has(V.F_RING_EVENT_IDX):
            for q in self.queues:
                self.dma_write(q.addr[V.Q_DEVICE], b"\x01\x00")

    def needs_reset(self):
        self.status |= V.S_NEEDS_RESET
        self.isr |= 2
        if self.cfg_vector != V.NO_VECTOR:
            self.t.fire(self.cfg_vector)

    # ---- DMA ----
    def _bus(self, addr):
        if self.pt is None:
            return addr
        base, pages = self.pt
        vpn = addr >> PAGE_SHIFT
        assert vpn < pages, f"IOVA {addr:#x} outside the domain"
        pte = int.from_bytes(self.t.peek(base + 8 * vpn, 8), "little")
        assert pte & PTE_PRESENT, f"IOVA {addr:#x} not present"
        return pte & ~0xFFF | addr & 0xFFF

    def dma_read(self, addr, n):
        out = b""
        while len(out) < n:
            a = addr + len(out)
            chunk = min(n - len(out), 0x1000 - (a & 0xFFF))
            out += self.t.peek(self._bus(a), chunk)
        return out

    def dma_write(self, addr, data):
        done = 0
        while done < len(data):
            a = addr + done
            chunk = min(len(data) - done, 0x1000 - (a & 0xFFF))
            self.t.poke(self._bus(a), data[done:done + chunk])
            done += chunk

    # ---- queues ----
    def _pop_avail(self, q):
        """The next available head id, or None."""
        avail = q.addr[V.Q_DRIVER]
        if q.last_avail == u16(self.dma_read(avail + 2, 2)):
            return None
        head = u16(self.dma_read(avail + 4 + 2 * (q.last_avail % q.size), 2))
        q.last_avail = (q.last_avail + 1) & 0xFFFF
        return head

    def _chain(self, q, head):
        """The (address, length, writable) parts of the buffer at ``head``, or None after
        setting NEEDS_RESET for an indirect descriptor that was not negotiated."""
        table, count, idx, parts = q.addr[V.Q_DESC], q.size, head, []
        while True:
            addr, length, flags, nxt = struct.unpack("<QIHH", self.dma_read(table + 16 * idx, 16))
            if flags & 4:
                if not self.has(V.F_RING_INDIRECT_DESC) or table != q.addr[V.Q_DESC]:
                    self.needs_reset()
                    return None
                assert not flags & 1 and length % 16 == 0
                table, count, idx = addr, length // 16, 0
                continue
            parts.append((addr, length, bool(flags & 2)))
            if not flags & 1:
                return parts
            assert nxt < count and len(parts) < count, "descriptor chain loops"
            idx = nxt

    def _push_used(self, q, head, length):
        used = q.addr[V.Q_DEVICE]
        self.dma_write(used + 4 + 8 * (q.used_idx % q.size), struct.pack("<II", head, length))
        q.used_idx = (q.used_idx + 1) & 0xFFFF
        self.dma_write(used + 2, struct.pack("<H", q.used_idx))

    def _finish(self, k, old_used, notify_after):
        """After a batch: publish avail_event and interrupt if the driver wants it."""
        q = self.queues[k]
        if self.has(V.F_RING_EVENT_IDX):
            event = (q.last_avail + notify_after - 1) & 0xFFFF
            self.dma_write(q.addr[V.Q_DEVICE] + 4 + 8 * q.size, struct.pack("<H", event))
        if q.used_idx == old_used:
            return
        avail = q.addr[V.Q_DRIVER]
        if self.has(V.F_RING_EVENT_IDX):
            want = need_event(u16(self.dma_read(avail + 4 + 2 * q.size, 2)), q.used_idx, old_used)
        else:
            want = not u16(self.dma_read(avail, 2)) & 1
        if want:
            self.isr |= 1
            if q.vector != V.NO_VECTOR:
                self.t.fire(q.vector)
                self.queue_msis[k] += 1

    def service(self):
        """Transmit everything available into the backlog, then receive the backlog."""
        if not self.live:
            return
        tx, rx = self.queues[TX_QUEUE], self.queues[RX_QUEUE]
        if tx.enabled:
            old = tx.used_idx
            while (head := self._pop_avail(tx)) is not None:
                parts = self._chain(tx, head)
                if parts is None:
                    return
                assert not any(w for _, _, w in parts), "writable part in a transmit buffer"
                data = b"".join(self.dma_read(a, n) for a, n, _ in parts)
                assert data[:12] == bytes(12), "virtio-net header not zero"
                self.backlog.append(data[12:])
                self._push_used(tx, head, 0)
            self._finish(TX_QUEUE, old, self.tx_batch)
        if rx.enabled:
            old = rx.used_idx
            while self.backlog and (head := self._pop_avail(rx)) is not None:
                parts = self._chain(rx, head)
                if parts is None:
                    return
                data = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 1) + self.backlog.popleft()
                assert all(w for _, _, w in parts), "read-only part in a receive buffer"
                assert sum(n for _, n, _ in parts) >= len(data), "receive buffer too small"
                done = 0
                for a, n, _ in parts:
                    self.dma_write(a, data[done:done + n])
                    done += n
                self._push_used(rx, head, len(data))
            self._finish(RX_QUEUE, old, 1)


# ---- helpers -------------------------------------------------------------------------------

def make(access=DirectAccess, cfg=None, queue_size=64, **dev_kw):
    t = VirtioFnTransport(cfg)
    dev = FakeVirtioNet(t, **dev_kw)
    fn = OffcardFunction(t, RID, FIDX, BAR0)
    drv = VirtioNetDriver(access(fn), fn, HostMemory(t), queue_size=queue_size)
    return t, dev, fn, drv


def frame(n, seq):
    return bytes((seq * 7 + k) & 0xFF for k in range(n))


async def collect(drv, count, timeout_ns=2_000_000):
    got = []
    while len(got) < count:
        more = await drv.receive(timeout_ns)
        assert more, f"only {len(got)} of {count} frames came back"
        got += more
    return got


# ---- discovery and bring-up --------------------------------------------------------------

def test_need_event_wraps():
    assert vring_need_event(0, 1, 0)
    assert not vring_need_event(5, 5, 0)
    assert vring_need_event(5, 6, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)           # crossing the 16-bit wrap
    assert not vring_need_event(2, 1, 0xFFFE)
    assert not vring_need_event(0, 3, 3)


def test_probe_finds_the_structures():
    async def run():
        t, dev, fn, drv = make()
        s = await drv.probe()
        assert {k: (v.cap, v.offset, v.length) for k, v in s.items()} == {
            VirtioCaps.CFG_TYPE_COMMON: (VirtioCaps.COMMON, V.COMMON, V.COMMON_LEN),
            VirtioCaps.CFG_TYPE_NOTIFY: (VirtioCaps.NOTIFY, V.NOTIFY, V.NOTIFY_LEN),
            VirtioCaps.CFG_TYPE_ISR: (VirtioCaps.ISR, V.ISR, V.ISR_LEN),
            VirtioCaps.CFG_TYPE_DEVICE: (VirtioCaps.DEVICE, V.DEVICE, V.DEVICE_LEN)}
        assert s[VirtioCaps.CFG_TYPE_NOTIFY].notify_mult == V.NOTIFY_MULT
    asyncio.run(run())


def test_probe_missing_capability():
    async def run():
        t, dev, fn, drv = make(cfg=config_space(skip_type=VirtioCaps.CFG_TYPE_ISR))
        with pytest.raises(VirtioError, match="ISR capability"):
            await drv.probe()
    asyncio.run(run())


def test_bring_up_follows_the_spec():
    async def run():
        t, dev, fn, drv = make()
        features = await drv.bring_up()
        assert dev.status_writes == [0, 1, 3, 11, 15]
        assert features == drv.features == dev.driver_features == F_ALL & DRIVER_FEATURES
        assert dev.live
        assert dev.cfg_vector == 0
        for k, vq in ((RX_QUEUE, drv.rx), (TX_QUEUE, drv.tx)):
            q = dev.queues[k]
            assert (q.size, q.vector, q.enabled) == (64, k + 1, 1)
            assert (q.addr[V.Q_DESC], q.addr[V.Q_DRIVER], q.addr[V.Q_DEVICE]) == \
                (vq.desc, vq.avail, vq.used)
            assert vq.desc % 16 == 0 and vq.avail % 2 == 0 and vq.used % 4 == 0
        assert drv.mac == V.MAC_PREFIX + bytes([FIDX])
        assert await drv.link_up()
        for k in range(3):                               # the vectors in use are unmasked
            assert t.msix[16 * k + 12] == 0
    asyncio.run(run())


def test_features_ok_refused():
    async def run():
        t, dev, fn, drv = make()
        with pytest.raises(VirtioError, match="FEATURES_OK"):
            await drv.bring_up(features=F_ALL | 1 << 40)        # not offered
        assert dev.status_writes[-1] & V.S_FAILED and not dev.live
        with pytest.raises(VirtioError, match="FEATURES_OK"):
            await drv.bring_up(refuse=["VERSION_1"])
        await drv.bring_up()
        assert dev.live
    asyncio.run(run())


def test_skip_features_ok_leaves_the_device_down():
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up(skip_features_ok=True)
        assert dev.status_writes == [0, 1, 3, 7]
        assert not dev.live
        await drv.post_rx(4)
        await drv.send(frame(60, 0))
        assert await drv.receive(10_000) == []
        assert dev.backlog == deque()
    asyncio.run(run())


def test_refuse_drops_features():
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up(refuse=["EVENT_IDX", "MAC", "STATUS"])
        dropped = 1 << V.F_RING_EVENT_IDX | 1 << V.F_NET_MAC | 1 << V.F_NET_STATUS
        assert dev.driver_features == F_ALL & DRIVER_FEATURES & ~dropped     # (one pair: no MQ)
        assert drv.mac is None
        assert await drv.link_up()
        assert not drv.rx.event_idx
        with pytest.raises(ValueError):
            await drv.bring_up(refuse=["NO_SUCH_FEATURE"])
    asyncio.run(run())


def test_queue_unavailable():
    async def run():
        t, dev, fn, drv = make(queue_max=(256, 0))
        with pytest.raises(VirtioError, match="queue 1 is not available"):
            await drv.bring_up()
        assert dev.status & V.S_FAILED
    asyncio.run(run())


def test_vector_refused():
    async def run():
        t, dev, fn, drv = make(nvec=2)
        with pytest.raises(VirtioError, match="MSI-X vector 2"):
            await drv.bring_up()
    asyncio.run(run())


def test_small_device_queue():
    async def run():
        t, dev, fn, drv = make(queue_max=(16, 16))
        await drv.bring_up()
        assert drv.rx.size == drv.tx.size == dev.queues[0].size == 16
    asyncio.run(run())


# ---- virtqueue ---------------------------------------------------------------------------

def test_virtqueue_descriptors():
    async def run():
        t = VirtioFnTransport()
        vq = Virtqueue(HostMemory(t), 0, 8)
        await vq.init()
        head = await vq.add_buffer([(0x1000, 12), (0x2000, 100)], [(0x3000, 50)])
        d = [struct.unpack("<QIHH", t.peek(vq.desc + 16 * i, 16)) for i in range(3)]
        assert d == [(0x1000, 12, 1, 1), (0x2000, 100, 1, 2), (0x3000, 50, 2, 0)]
        assert head == 0 and u16(t.peek(vq.avail + 2, 2)) == 1
        head = await vq.add_buffer([(0x4000, 12)], [(0x5000, 64)], indirect=True)
        addr, length, flags, _ = struct.unpack("<QIHH", t.peek(vq.desc + 16 * head, 16))
        assert (length, flags) == (32, 4)
        table = [struct.unpack("<QIHH", t.peek(addr + 16 * i, 16)) for i in range(2)]
        assert table == [(0x4000, 12, 1, 1), (0x5000, 64, 2, 0)]
        assert vq.num_free == 4 and vq.in_flight == 2
        with pytest.raises(VirtioError, match="5 descriptors needed"):
            await vq.add_buffer([(0, 1)] * 5)
        # the device uses the indirect buffer first, then the chain
        for slot, (h, n) in enumerate(((3, 0), (0, 50))):
            t.poke(vq.used + 4 + 8 * slot, struct.pack("<II", h, n))
        t.poke(vq.used + 2, struct.pack("<H", 2))
        assert await vq.get_used() == [(3, 0), (0, 50)]
        assert vq.num_free == 8 and vq.in_flight == 0
        t.poke(vq.used + 4 + 8 * 2, struct.pack("<II", 5, 0))
        t.poke(vq.used + 2, struct.pack("<H", 3))
        with pytest.raises(VirtioError, match="not in flight"):
            await vq.get_used()
    asyncio.run(run())


def test_virtqueue_interrupt_suppression_fields():
    async def run():
        t = VirtioFnTransport()
        vq = Virtqueue(HostMemory(t), 1, 4)
        await vq.init(event_idx=False)
        await vq.disable_interrupts()
        assert u16(t.peek(vq.avail, 2)) == 1
        assert not await vq.enable_interrupts()
        assert u16(t.peek(vq.avail, 2)) == 0
        await vq.init(event_idx=True)
        await vq.disable_interrupts()
        assert u16(t.peek(vq.avail, 2)) == 0                     # flags stay 0 with EVENT_IDX
        assert u16(t.peek(vq.avail + 4 + 2 * 4, 2)) == 0xFFFF    # used_event behind the driver
        await vq.set_used_event(7)
        assert u16(t.peek(vq.avail + 4 + 2 * 4, 2)) == 7
    asyncio.run(run())


# ---- data path -----------------------------------------------------------------------------

def test_loopback_chained_and_indirect():
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up()
        await drv.post_rx(8)
        sent = [frame(n, k) for k, n in enumerate((60, 1518, 1, 300, 64, 1000))]
        for k, f in enumerate(sent):
            await drv.send(f, indirect=bool(k & 1))
        assert await collect(drv, len(sent)) == sent
        assert await drv.reap_tx() == len(sent)
        assert drv.tx.num_free == drv.tx.size
        assert drv.stats["sent"] == drv.stats["received"] == len(sent)
        assert drv.stats["interrupts"] > 0
        assert drv.notifies == sum(dev.notifies)
        with pytest.raises(ValueError):
            await drv.send(bytes(1519))
    asyncio.run(run())


@pytest.mark.parametrize("event_idx", [True, False])
def test_wraparound_small_queue(event_idx):
    async def run():
        t, dev, fn, drv = make(queue_size=4)
        await drv.bring_up(refuse=[] if event_idx else ["EVENT_IDX"])
        assert drv.rx.size == 4
        await drv.post_rx(4)
        sent, got = [], []
        for k in range(37):
            sent.append(frame(20 + 13 * k, k))
            await drv.send(sent[-1], indirect=k % 3 == 0)
            if k % 3 == 2:
                got += await collect(drv, len(sent) - len(got))
        got += await collect(drv, len(sent) - len(got))
        assert got == sent
        assert dev.queues[TX_QUEUE].used_idx == 37
    asyncio.run(run())


def test_ring_indices_cross_16_bits():
    """Both queues start just below 2**16 (driver and device moved there together) and
    carry frames across the wrap of the free-running indices."""
    async def run():
        t, dev, fn, drv = make(queue_size=4)
        await drv.bring_up()
        start = 0xFFFA
        for vq, q in ((drv.rx, dev.queues[RX_QUEUE]), (drv.tx, dev.queues[TX_QUEUE])):
            vq._avail_idx = vq._kicked = vq._last_used = start
            q.last_avail = q.used_idx = start
            t.poke(vq.avail + 2, struct.pack("<H", start))
            t.poke(vq.used + 2, struct.pack("<H", start))
            t.poke(vq.used + 4 + 8 * vq.size, struct.pack("<H", start))     # avail_event
            await vq.set_used_event(start)
        await drv.post_rx(4)
        sent = [frame(40 + k, k) for k in range(12)]
        got = []
        for f in sent:
            await drv.send(f)
            got += await collect(drv, 1)
        assert got == sent
        assert drv.rx._last_used == dev.queues[RX_QUEUE].used_idx == (start + 12) & 0xFFFF
    asyncio.run(run())


def test_event_idx_fewer_notifies():
    async def run(refuse):
        t, dev, fn, drv = make(tx_batch=4)
        await drv.bring_up(refuse=refuse)
        await drv.post_rx(32)
        sent = [frame(64, k) for k in range(16)]
        for f in sent:
            await drv.send(f)
        assert await collect(drv, 16) == sent
        return dev.notifies[TX_QUEUE]
    assert asyncio.run(run(["EVENT_IDX"])) == 16
    assert asyncio.run(run([])) == 4


def test_no_notify_flag():
    async def run():
        t, dev, fn, drv = make(no_notify=True)
        await drv.bring_up(refuse=["EVENT_IDX"])
        await drv.post_rx(8)
        sent = [frame(100, k) for k in range(6)]
        for f in sent:
            await drv.send(f)
        assert await collect(drv, 6) == sent       # the device polled them
        assert drv.notifies == 0 and dev.notifies == [0, 0]
    asyncio.run(run())


@pytest.mark.parametrize("event_idx", [True, False])
def test_receive_with_interrupts_suppressed(event_idx):
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up(refuse=[] if event_idx else ["EVENT_IDX"])
        await drv.post_rx(16)
        await drv.send(frame(80, 0))
        assert await collect(drv, 1) == [frame(80, 0)]
        assert dev.queue_msis == [1, 0]                 # transmit interrupts are off
        assert drv.stats["interrupts"] == 1
        await drv.rx.disable_interrupts()
        sent = [frame(80, k) for k in range(1, 9)]
        for f in sent:
            await drv.send(f)
        assert await collect(drv, 8) == sent
        assert dev.queue_msis == [1, 0]
        await drv.send(frame(80, 9))                    # delivered before interrupts return
        assert await drv.rx.enable_interrupts()
        assert await collect(drv, 1) == [frame(80, 9)]
        await drv.send(frame(80, 10))
        assert await collect(drv, 1) == [frame(80, 10)]
        assert dev.queue_msis == [2, 0]
        assert await drv.read_isr() == 1 and await drv.read_isr() == 0
    asyncio.run(run())


def test_reset_and_bring_up_again():
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up()
        await drv.post_rx(8)
        await drv.send(frame(70, 1))
        await drv.send(frame(70, 2))                     # left in the receive ring's used part
        desc = drv.tx.desc
        await drv.reset()
        assert dev.status == 0 and not dev.live
        assert all(not q.enabled for q in dev.queues)
        with pytest.raises(VirtioError, match="not brought up"):
            await drv.send(frame(70, 3))
        await drv.bring_up()
        assert drv.tx.desc == desc                       # rings reused, cleared
        assert dev.status_writes[-5:] == [0, 1, 3, 11, 15]
        await drv.post_rx(8)
        await drv.send(frame(70, 4))
        assert await collect(drv, 1) == [frame(70, 4)]
    asyncio.run(run())


def test_needs_reset_is_reported():
    async def run():
        t, dev, fn, drv = make()
        await drv.bring_up(refuse=["INDIRECT_DESC"])
        await drv.post_rx(4)
        with pytest.raises(VirtioError, match="INDIRECT_DESC"):
            await drv.send(frame(60, 0), indirect=True)
        # an indirect buffer the device did not agree to: it asks for a reset
        slot = await drv.mem.alloc(64)
        await drv.tx.add_buffer([(slot, 12), (slot + 16, 40)], indirect=True)
        await drv.notify(TX_QUEUE)
        assert dev.status & V.S_NEEDS_RESET
        with pytest.raises(VirtioError, match="NEEDS_RESET"):
            await drv.receive(10_000)
        await drv.bring_up()
        assert dev.live
    asyncio.run(run())


def test_domain_memory_behind_the_iommu():
    async def run():
        t = VirtioFnTransport()
        pages = 1024
        pt = t.alloc_host_mem(8 * pages + 0x1000)
        pt = (pt + 0xFFF) & ~0xFFF
        domain = IommuDomain(t, FIDX, 1, pages, pt)
        dev = FakeVirtioNet(t, pt=(pt, pages))
        fn = OffcardFunction(t, RID, FIDX, BAR0)
        base, size = 0x10_0000, 0x8_0000
        mem = DomainMemory(domain, base, size)
        drv = VirtioNetDriver(DirectAccess(fn), fn, mem, queue_size=64)
        await drv.bring_up()
        q = dev.queues[TX_QUEUE]
        assert base <= q.addr[V.Q_DESC] < base + size          # the device got an IOVA
        assert domain.translate(q.addr[V.Q_DESC]) != q.addr[V.Q_DESC]
        assert mem.mapped == (mem.next + 0xFFF) & ~0xFFF
        assert all(domain.translate(a) is not None for a in range(base, mem.mapped, 0x1000))
        await drv.post_rx(16)
        sent = [frame(n, k) for k, n in enumerate((60, 1500, 200, 1518))]
        for k, f in enumerate(sent):
            await drv.send(f, indirect=k % 2 == 1)
        assert await collect(drv, len(sent)) == sent
        with pytest.raises(MemoryError):
            await mem.alloc(size)
        with pytest.raises(ValueError):
            DomainMemory(domain, 0x123, 0x1000)
    asyncio.run(run())


def test_trapped_access_counts_every_exit():
    async def run(access):
        t, dev, fn, drv = make(access=access)
        await fn.setup_msix()
        t.cfg_reads = t.virtio_accesses = 0
        t0 = t.time
        await drv.bring_up()
        await drv.post_rx(8)
        for k in range(4):
            await drv.send(frame(64, k))
        assert len(await collect(drv, 4)) == 4
        return drv.access, t.cfg_reads + t.virtio_accesses, t.time - t0
    direct, accesses, _ = asyncio.run(run(DirectAccess))
    assert direct.traps == 0 and accesses > 0
    trapped, trapped_accesses, elapsed = asyncio.run(run(
        lambda fn: TrappedAccess(fn, exit_ns=500)))
    assert trapped.traps == trapped_accesses == accesses
    assert elapsed >= 500 * trapped.traps
