"""Unit tests of host_driver.iommu against an in-memory transport (no simulator): domain
programming, page tables, host-side translation and the page fault service's ring protocol."""

import asyncio
import struct
import pytest
from fakes import FakeTransport
from host_driver.offcard import OffcardDriver
from host_driver.iommu import Fault, FaultService, Iommu, MAPPED, PRESENT, REFUSED, TranslationError

from regmap import FaultRegs, IommuRegs, MgmtRegs, PTE_PRESENT

HOST_BASE = 0x2_0000_0000 + 8        # above 4 GiB and unaligned: exercises *_HI and alignment
BAR2 = 0xF000_0000
TOTAL_VFS = 16


class Bar2Transport(FakeTransport):
    """The shared fake host (:class:`fakes.FakeTransport`: host memory at an unaligned base, an
    exact bump allocator, MSIs counted, time moving in ``sleep_ns`` only) with a PF's BAR2 at
    ``BAR2``: a register dict that reads back what was written (0 if never written;
    ``CARD_CONFIG`` says ``TOTAL_VFS``) and records every write in :attr:`writes`. The card's
    side of the fault rings is :class:`Card` below."""

    def __init__(self, size=4 << 20):
        super().__init__(base=HOST_BASE, size=size)
        self.regs = {MgmtRegs.CARD_CONFIG: TOTAL_VFS}
        self.writes = []

    async def mmio_read(self, addr, size=4):
        return self.regs.get(addr - BAR2, 0)

    async def mmio_write(self, addr, value, size=4):
        self.writes.append((addr - BAR2, value))
        self.regs[addr - BAR2] = value


class FakePf:
    """The PF as :class:`host_driver.iommu.FaultService` uses it (an ``OffcardFunction``):
    its MSI-X vectors, and ``msix_mask`` recording each vector's mask in :attr:`masks`."""
    index = 0

    def __init__(self, t, nvec=4):
        self.msix_vectors = t.alloc_msi_vectors(nvec)
        self.masks = {}

    async def msix_mask(self, vector, masked):
        self.masks[vector] = masked


class FakeDriver(OffcardDriver):
    """The PF driver as :mod:`host_driver.iommu` uses it (an ``OffcardDriver``): PF BAR2
    through ``mgmt_read`` / ``mgmt_write`` on the transport, and the PF (none with
    ``msix=False``: its MSI-X is not set up)."""

    def __init__(self, t, msix=True):
        super().__init__(t)
        self.bar2 = BAR2
        self.pf = FakePf(t) if msix else None

    async def mgmt_read(self, off):
        return await self.t.mmio_read(self.bar2 + off)

    async def mgmt_write(self, off, value):
        await self.t.mmio_write(self.bar2 + off, value)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def t():
    return Bar2Transport()


@pytest.fixture
def iommu(t):
    return Iommu(FakeDriver(t))


def pte(t, dom, vpn):
    return struct.unpack("<Q", t.peek(dom.pte_addr(vpn), 8))[0]


def dom_writes(t):
    return [(o, v) for o, v in t.writes if IommuRegs.DOM_SEL <= o <= IommuRegs.BLOCKED]


# ---- domains -----------------------------------------------------------------------------

def test_attach_programs_domain_last_and_zeroes_table(t, iommu):
    # dirty the memory the page table will land in: attach must clear it
    t.mem[:] = b"\xA5" * len(t.mem)
    dom = run(iommu.attach(3, vm=7, pages=1000))
    assert dom.pt_base % 4096 == 0 and dom.pt_base > 0xFFFF_FFFF
    assert t.peek(dom.pt_base, 8 * 1000) == bytes(8 * 1000)
    assert dom_writes(t) == [
        (IommuRegs.DOM_SEL, 3),
        (IommuRegs.DOM_PAGES, 0),
        (IommuRegs.DOM_PT_LO, dom.pt_base & 0xFFFF_FFFF),
        (IommuRegs.DOM_PT_HI, dom.pt_base >> 32),
        (IommuRegs.DOM_VM, 7),
        (IommuRegs.DOM_PAGES, 1000),
    ]
    assert (dom.fidx, dom.vm, dom.pages) == (3, 7, 1000)
    assert iommu.domains[3] is dom


def test_map_writes_ptes_and_translate_agrees(t, iommu):
    dom = run(iommu.attach(1, vm=1, pages=64))
    bus = run(dom.map(0x3000, 0x2001))             # pages 3, 4 and 5
    assert bus % 4096 == 0
    for k, vpn in enumerate((3, 4, 5)):
        assert pte(t, dom, vpn) == (bus + k * 4096) | PTE_PRESENT
        assert dom.translate((vpn << 12) + 0x123) == bus + k * 4096 + 0x123
    for vpn in (2, 6):
        assert pte(t, dom, vpn) == 0 and dom.translate(vpn << 12) is None
    assert {3, 4, 5} <= dom.allowed
    # fresh backing pages are zeroed
    assert t.peek(bus, 3 * 4096) == bytes(3 * 4096)


def test_map_at_given_bus_address(t, iommu):
    dom = run(iommu.attach(0, vm=0, pages=16))
    run(dom.map(0x1000, 0x2000, bus=0x1234_5000))
    assert pte(t, dom, 1) == 0x1234_5000 | PTE_PRESENT
    assert pte(t, dom, 2) == 0x1234_6000 | PTE_PRESENT
    with pytest.raises(ValueError, match="aligned"):
        run(dom.map(0x4000, 0x1000, bus=0x1234_5800))
    with pytest.raises(ValueError, match="already mapped"):
        run(dom.map(0x2000, 0x1000))


def test_unmap_clears_pte_and_invalidates(t, iommu):
    dom = run(iommu.attach(2, vm=0, pages=16))
    run(dom.map(0, 4 * 4096))
    t.writes.clear()
    run(iommu.unmap(2, 0x1000, 0x2000))
    assert pte(t, dom, 0) & PTE_PRESENT and pte(t, dom, 3) & PTE_PRESENT
    assert pte(t, dom, 1) == 0 and pte(t, dom, 2) == 0
    assert dom.translate(0x1000) is None and dom.translate(0x2FFF) is None
    assert dom.is_allowed(0x1000)                      # still allowed: faults back in
    assert t.writes == [(IommuRegs.ATC_INV, 2)]


def test_detach_and_invalidate_all(t, iommu):
    run(iommu.attach(5, vm=0, pages=4))
    t.writes.clear()
    run(iommu.detach(5))
    assert t.writes == [(IommuRegs.DOM_SEL, 5), (IommuRegs.DOM_PAGES, 0), (IommuRegs.ATC_INV, 5)]
    assert 5 not in iommu.domains
    run(iommu.attach(5, vm=1, pages=4))                # can be attached again
    t.writes.clear()
    run(iommu.invalidate())
    assert t.writes == [(IommuRegs.ATC_INV, 1 << 31)]


def test_counters(t, iommu):
    t.regs.update({IommuRegs.ATC_HITS: 10, IommuRegs.ATC_MISSES: 3, IommuRegs.BLOCKED: 1})
    assert run(iommu.counters()) == {"atc_hits": 10, "atc_misses": 3, "blocked": 1}


def test_domain_read_write_cross_pages(t, iommu):
    dom = run(iommu.attach(1, vm=0, pages=8))
    # two IOVA pages backed by bus pages in reverse order: a copy must follow the PTEs
    b2 = run(dom.map(0x2000, 0x1000))
    b1 = run(dom.map(0x1000, 0x1000))
    assert b1 > b2
    data = bytes(range(256)) * 2
    run(dom.write(0x1F00, data))
    assert t.peek(b1 + 0xF00, 256) == data[:256]
    assert t.peek(b2, 256) == data[256:]
    assert run(dom.read(0x1F00, 512)) == data
    assert run(dom.read(0x1FFF, 2)) == data[255:257]


def test_domain_access_to_missing_page_raises_before_writing(t, iommu):
    dom = run(iommu.attach(1, vm=0, pages=8))
    bus = run(dom.map(0x1000, 0x1000))
    with pytest.raises(TranslationError, match="0x2000"):
        run(dom.write(0x1F00, b"\xFF" * 512))
    assert t.peek(bus, 4096) == bytes(4096)
    with pytest.raises(TranslationError):
        run(dom.read(0x0FFF, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(fidx=1, vm=0, pages=0), "pages"),
    (dict(fidx=1, vm=0, pages=-4), "pages"),
    (dict(fidx=1, vm=0, pages=(1 << 20) + 1), "pages"),
    (dict(fidx=1, vm=256, pages=4), "vm"),
    (dict(fidx=TOTAL_VFS + 1, vm=0, pages=4), "function index"),
    (dict(fidx=-1, vm=0, pages=4), "function index"),
])
def test_attach_bad_arguments(iommu, kwargs, match):
    with pytest.raises(ValueError, match=match):
        run(iommu.attach(**kwargs))


def test_bad_domain_arguments(t, iommu):
    run(iommu.attach(1, vm=0, pages=4))
    with pytest.raises(ValueError, match="already attached"):
        run(iommu.attach(1, vm=0, pages=4))
    with pytest.raises(ValueError, match="no domain"):
        run(iommu.detach(2))
    dom = iommu.domains[1]
    with pytest.raises(ValueError, match="outside"):
        dom.allow(0x3000, 0x1001)
    with pytest.raises(ValueError, match="length"):
        run(dom.map(0, 0))


# ---- fault service -----------------------------------------------------------------------

def make_service(t, iommu, **kw):
    svc = FaultService(iommu, **kw)
    run(svc.setup(vector_index=2))
    t.writes.clear()
    return svc


def iopf_entry(iova, fidx, vm, write, fbq_index, seq):
    flags = (FaultRegs.FLAG_WRITE | FaultRegs.FLAG_FBQ) if write else 0
    return struct.pack("<QBBBBHH", iova, fidx, vm, flags, 0,
                       fbq_index if write else FaultRegs.NO_FBQ, seq)


class Card:
    """The card's side of the rings, written by hand: raise faults, read CQ entries."""

    def __init__(self, t, svc):
        self.t = t
        self.svc = svc
        self.iopf_prod = 0
        self.fbq_prod = 0

    def fault(self, fidx, iova, write=False, vm=0, staging=0x10020, length=64, slot=0):
        fbq_index = self.fbq_prod & (self.svc.fbq_entries - 1)
        if write:
            self.t.poke(self.svc.fbq.addr(self.fbq_prod),
                        struct.pack("<IIHHI", staging, length, fidx, slot, 0))
            self.fbq_prod = (self.fbq_prod + 1) & 0xFFFF
        self.t.poke(self.svc.iopf.addr(self.iopf_prod),
                    iopf_entry(iova, fidx, vm, write, fbq_index, (self.iopf_prod + 1) & 0xFFFF))
        self.iopf_prod = (self.iopf_prod + 1) & 0xFFFF
        self.t.regs[FaultRegs.FBQ_PROD] = self.fbq_prod
        self.t.regs[FaultRegs.IOPF_PROD] = self.iopf_prod

    def cq(self, index):
        fidx, status, z, iopf, z2 = struct.unpack("<BBHIQ", self.t.peek(self.svc.cq.addr(index), 16))
        assert z == 0 and z2 == 0
        return fidx, status, iopf


def test_setup_programs_rings_and_ctrl_last(t, iommu):
    svc = FaultService(iommu, entries=16, fbq_entries=4, cq_entries=8)
    run(svc.setup(vector_index=2))
    rings = [(svc.fbq, FaultRegs.FBQ_LO, 2), (svc.iopf, FaultRegs.IOPF_LO, 4),
             (svc.cq, FaultRegs.CQ_LO, 3)]
    expect = [(FaultRegs.CTRL, 0)]
    for ring, lo, log2 in rings:
        assert ring.base % 16 == 0 and ring.base > 0xFFFF_FFFF
        expect += [(lo, ring.base & 0xFFFF_FFFF), (lo + 4, ring.base >> 32), (lo + 8, log2)]
    expect.append((FaultRegs.CTRL, 1 | (2 << 8)))
    assert t.writes == expect
    assert iommu.driver.pf.masks == {2: False}          # the fault vector is unmasked
    assert svc.vector is iommu.driver.pf.msix_vectors[2]
    # a second setup reuses the pinned rings
    bases = [svc.fbq.base, svc.iopf.base, svc.cq.base]
    run(svc.setup(vector_index=2))
    assert [svc.fbq.base, svc.iopf.base, svc.cq.base] == bases


def test_setup_needs_msix(t):
    svc = FaultService(Iommu(FakeDriver(t, msix=False)))
    with pytest.raises(RuntimeError, match="setup_msix"):
        run(svc.setup())


@pytest.mark.parametrize("kwargs, match", [
    (dict(entries=12), "^entries must be a power of two"),
    (dict(entries=0), "^entries"),
    (dict(entries=512), "^entries"),
    (dict(fbq_entries=3), "fbq_entries"),
    (dict(iopf_entries=1024), "iopf_entries"),
    (dict(cq_entries=6), "cq_entries"),
])
def test_service_bad_ring_sizes(iommu, kwargs, match):
    with pytest.raises(ValueError, match=match):
        FaultService(iommu, **kwargs)


def test_setup_bad_vector(t, iommu):
    with pytest.raises(ValueError, match="vector_index"):
        run(FaultService(iommu).setup(vector_index=4))


def test_poll_parses_entries_and_advances_cons(t, iommu):
    svc = make_service(t, iommu)
    card = Card(t, svc)
    t.time = 500
    card.fault(3, 0x5123, write=True, vm=9, staging=0x11060, length=200, slot=1)
    card.fault(4, 0x8000, write=False, vm=2)
    faults = run(svc.poll())
    assert faults == [
        Fault(index=0, seq=1, fidx=3, vm=9, iova=0x5123, write=True, fbq_index=0,
              buffer=0x11060, length=200, slot=1, seen_ns=500),
        Fault(index=1, seq=2, fidx=4, vm=2, iova=0x8000, write=False, fbq_index=None,
              buffer=None, length=None, slot=None, seen_ns=500),
    ]
    assert t.writes == [(FaultRegs.FBQ_CONS, 1), (FaultRegs.IOPF_CONS, 2)]
    t.writes.clear()
    assert run(svc.poll()) == [] and t.writes == []


def test_poll_wraps_the_ring(t, iommu):
    svc = make_service(t, iommu, entries=2)
    card = Card(t, svc)
    seen = []
    for k in range(5):
        card.fault(1, k << 12, write=True, slot=k % 4)
        seen += run(svc.poll())
    assert [f.iova for f in seen] == [k << 12 for k in range(5)]
    assert [f.fbq_index for f in seen] == [0, 1, 0, 1, 0]
    assert [f.slot for f in seen] == [0, 1, 2, 3, 0]
    assert (svc.iopf_cons, svc.fbq_cons) == (5, 5)


def test_poll_stops_at_an_entry_not_yet_written(t, iommu):
    svc = make_service(t, iommu)
    t.regs[FaultRegs.IOPF_PROD] = 1            # the index moved, the entry is still zero
    assert run(svc.poll()) == [] and t.writes == []
    Card(t, svc).fault(1, 0x1000)
    assert [f.index for f in run(svc.poll())] == [0]


def test_resolve_allowed_page_maps_it(t, iommu):
    dom = run(iommu.attach(3, vm=9, pages=16))
    dom.allow(0, 16 << 12)
    svc = make_service(t, iommu)
    card = Card(t, svc)
    card.fault(3, 0x5123, write=True, vm=9)
    [f] = run(svc.poll())
    t.writes.clear()
    t.time = 900
    assert run(svc.resolve(f)) == MAPPED
    bus = dom.translate(0x5000)
    assert bus is not None and pte(t, dom, 5) == bus | PTE_PRESENT
    assert card.cq(0) == (3, FaultRegs.ST_MAPPED, 0)
    assert t.writes == [(FaultRegs.CQ_PROD, 1)]
    assert svc.log == [(f, MAPPED, 900)]


def test_resolve_present_page_just_retries(t, iommu):
    dom = run(iommu.attach(1, vm=0, pages=4))
    bus = run(dom.map(0x1000, 0x1000))
    svc = make_service(t, iommu)
    card = Card(t, svc)
    card.fault(1, 0x1800)
    [f] = run(svc.poll())
    assert run(svc.resolve(f)) == PRESENT
    assert dom.translate(0x1000) == bus
    assert card.cq(0) == (1, FaultRegs.ST_MAPPED, 0)


def test_resolve_refuses_pages_outside_the_allowed_set(t, iommu):
    dom = run(iommu.attach(2, vm=0, pages=16))
    dom.allow(0, 0x4000)
    svc = make_service(t, iommu)
    card = Card(t, svc)
    card.fault(2, 0x8000, write=True)          # attached, not allowed
    card.fault(6, 0x1000)                      # no domain at all
    card.fault(2, 0x1000)                      # allowed, but refused by the caller
    faults = run(svc.poll())
    next_alloc = t.next
    decisions = [run(svc.resolve(faults[0])), run(svc.resolve(faults[1])),
                 run(svc.resolve(faults[2], refuse=True))]
    assert decisions == [REFUSED] * 3
    assert dom.present == {} and t.next == next_alloc          # nothing backed or allocated
    assert [card.cq(k) for k in range(3)] == [(2, FaultRegs.ST_REFUSED, 0),
                                              (6, FaultRegs.ST_REFUSED, 1),
                                              (2, FaultRegs.ST_REFUSED, 2)]
    assert t.regs[FaultRegs.CQ_PROD] == 3


def test_resolve_forced_map_allows_the_page(t, iommu):
    dom = run(iommu.attach(2, vm=0, pages=16))
    svc = make_service(t, iommu)
    Card(t, svc).fault(2, 0x7000)
    [f] = run(svc.poll())
    assert run(svc.resolve(f, refuse=False)) == MAPPED
    assert dom.is_allowed(0x7000) and dom.translate(0x7000) is not None


def test_cq_full_waits_for_the_card(t, iommu):
    dom = run(iommu.attach(1, vm=0, pages=16))
    dom.allow(0, 16 << 12)
    svc = make_service(t, iommu, entries=2)
    card = Card(t, svc)
    faults = []
    for k in range(3):
        card.fault(1, k << 12)
        faults += run(svc.poll())
    run(svc.resolve(faults[0]))
    run(svc.resolve(faults[1]))
    sleeps = []

    def card_takes_one():
        sleeps.append(t.time)
        if len(sleeps) == 3:
            t.regs[FaultRegs.CQ_CONS] = 1

    t.on_sleep = card_takes_one
    t.writes.clear()
    run(svc.resolve(faults[2], poll_ns=100))
    assert len(sleeps) == 3
    assert t.writes == [(FaultRegs.CQ_PROD, 3)]
    assert card.cq(2) == (1, FaultRegs.ST_MAPPED, 2)   # in slot 0, taken by the card


def test_cq_full_times_out(t, iommu):
    svc = make_service(t, iommu, cq_entries=1)
    card = Card(t, svc)
    card.fault(1, 0)
    card.fault(1, 0x1000)
    faults = run(svc.poll())
    run(svc.resolve(faults[0]))
    with pytest.raises(TimeoutError, match="CQ full"):
        run(svc.resolve(faults[1], timeout_ns=1000, poll_ns=100))
    assert t.regs[FaultRegs.CQ_PROD] == 1


def test_hold_keeps_faults_pending(t, iommu):
    dom = run(iommu.attach(1, vm=0, pages=16))
    dom.allow(0, 16 << 12)
    svc = make_service(t, iommu)
    card = Card(t, svc)
    svc.hold = True
    card.fault(1, 0x1000)
    card.fault(1, 0x2000)
    assert run(svc.service_once()) == []
    assert [f.iova for f in svc.pending] == [0x1000, 0x2000] and svc.log == []
    assert dom.translate(0x1000) is None
    run(svc.resolve(svc.pending[1], refuse=True))
    assert [f.iova for f in svc.pending] == [0x1000]
    svc.hold = False
    done = run(svc.service_once())
    assert [f.iova for f in done] == [0x1000] and svc.pending == []
    assert [(r.fault.iova, r.decision) for r in svc.log] == [(0x2000, REFUSED), (0x1000, MAPPED)]


def test_run_services_without_interrupts(t, iommu):
    """No MSI ever arrives: the timed wait still polls, so the faults get resolved."""
    dom = run(iommu.attach(1, vm=0, pages=16))
    dom.allow(0, 16 << 12)
    svc = make_service(t, iommu)
    card = Card(t, svc)
    card.fault(1, 0x3000)
    card.fault(1, 0x4000)
    run(svc.run(lambda: len(svc.log) == 2, timeout_ns=1000))
    assert [r.decision for r in svc.log] == [MAPPED, MAPPED]
    assert t.time == 1000
    assert [r.time_ns - r.fault.seen_ns for r in svc.log] == [0, 0]


def test_run_stops_on_event(t, iommu):
    svc = make_service(t, iommu)
    stop = asyncio.Event()
    stop.set()
    run(svc.run(stop))
    assert t.writes == []


def test_service_counters(t, iommu):
    svc = make_service(t, iommu)
    t.regs.update({FaultRegs.FAULTS: 4, FaultRegs.STAGE_BUSY: 0b101, FaultRegs.CQ_BAD: 1})
    assert run(svc.counters()) == {"faults": 4, "stage_busy": 0b101, "cq_bad": 1}


def test_poll_before_setup_raises(iommu):
    with pytest.raises(RuntimeError, match="setup"):
        run(FaultService(iommu).poll())
