"""Address translation and I/O page faults through cocotbext-pcie's RootComplex.

The host driver gives functions domains (host-owned page tables the card walks), runs the
page-fault service, and checks every byte the card writes: each memory write the card sends is
recorded from the link, so "nothing was written" is checked against the wire, not inferred.
"""

import random

import cocotb
from cocotb.triggers import ClockCycles

from regmap import DescStatus, DmaRegs, FaultRegs
from hdl.memmap import Staging
from host_driver.dma import DmaQueue
from host_driver.iommu import Iommu, FaultService, PAGE_SIZE, MAPPED, REFUSED
from cosim.harness import CardHarness, CLOCK_NS
from cosim.scenarios.wire import WireLog


async def bring_up(dut, num_vfs=4, **fs_kwargs):
    h = CardHarness(dut)
    await h.start()
    pf = h.pf = await h.drv.probe()
    await pf.setup_msix()
    vfs = await h.drv.enable_sriov(num_vfs) if num_vfs else []
    iommu = Iommu(h.drv)
    fs = FaultService(iommu, **fs_kwargs)
    await fs.setup(0)
    h.pfq = await DmaQueue(pf, entries=16).setup()     # the PF has no domain: loads card memory
    h.scratch = (h.t.alloc_host_mem(0x12000) + 0xFFF) & ~0xFFF
    return h, pf, vfs, iommu, fs


def pattern(rnd, n):
    return bytes(rnd.getrandbits(8) for _ in range(n))


async def load_card(h, card, data):
    """Put ``data`` into card memory at ``card`` through the PF's untranslated queue."""
    await h.t.host_write(h.scratch + (card & 3), data)
    await h.pfq.transfer(h.scratch + (card & 3), card, len(data), to_host=False)


async def wait_parked(fn, timeout_ns=200_000):
    """Until the function's queue reports a parked descriptor (DmaRegs.STATUS bit 2)."""
    for _ in range(timeout_ns // 500):
        if await fn.reg_read(DmaRegs.STATUS) & 4:
            return
        await fn.t.sleep_ns(500)
    raise TimeoutError(f"{fn}: no parked descriptor")


async def wait_faults(h, n, timeout_ns=200_000):
    for _ in range(timeout_ns // 500):
        if await h.drv.mgmt_read(FaultRegs.FAULTS) >= n:
            return
        await h.t.sleep_ns(500)
    raise TimeoutError(f"fewer than {n} faults raised")


@cocotb.test()
async def test_present_pages_translate(dut):
    """Reads and writes through present pages: byte exact, no fault queue entries, the device
    TLB serves repeats, pages physically scattered."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 2)
    rnd = random.Random(1)
    vf = vfs[0]
    dom = await iommu.attach(vf.index, vm=7, pages=32)
    # map IOVA pages 2..5 to scattered bus pages, in reverse order
    bus = [(h.t.alloc_host_mem(2 * PAGE_SIZE) + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1) for _ in range(4)]
    for k, b in enumerate(reversed(bus)):
        await dom.map((2 + k) * PAGE_SIZE, PAGE_SIZE, bus=b)
    q = await DmaQueue(vf, entries=16).setup()
    wire = WireLog(h)
    for length, iova in ((1, 0x2000), (4096, 0x3000), (5000, 0x2F01), (16384, 0x2000),
                         (777, 0x5C8D)):
        data = pattern(rnd, length)
        await dom.write(iova, data)
        card = 0x4000 + (iova & 3)
        await q.transfer(iova, card, length, to_host=False)
        await dom.write(iova, bytes(length))
        await q.transfer(iova, card, length, to_host=True)
        assert await dom.read(iova, length) == data, f"{length} B at IOVA {iova:#x}"
    c = await iommu.counters()
    f = await fs.counters()
    assert f["faults"] == 0 and await h.drv.mgmt_read(FaultRegs.IOPF_PROD) == 0
    assert await h.drv.mgmt_read(FaultRegs.FBQ_PROD) == 0
    assert c["atc_misses"] == 4 and c["atc_hits"] > 10, c
    allowed = [(b, PAGE_SIZE) for b in bus] + [(q.ring, 16 * 32)]
    assert wire.outside(allowed) == []
    dut._log.info("translate: ATC %s", c)


@cocotb.test()
async def test_write_fault_resolved(dut):
    """A write to a non-present page: one FBQ then one IOPF entry, an MSI-X, the descriptor
    waits; the host backs the page; the payload lands byte exact; the page does not fault
    again; the staging buffer is free afterwards."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 2)
    rnd = random.Random(2)
    vf = vfs[1]
    dom = await iommu.attach(vf.index, vm=3, pages=16)
    dom.allow(0, 16 * PAGE_SIZE)
    q = await DmaQueue(vf, entries=16).setup()
    data = pattern(rnd, 1500)
    await load_card(h, 0x2103, data)
    wire = WireLog(h)
    msi0 = h.t.msi_count(fs.vector)
    t0 = h.t.now_ns()
    idx = await q.post(0x5123, 0x2103, 1500, to_host=True, irq=False)
    assert await h.t.wait_msi(fs.vector, msi0 + 1, 200_000), "no fault interrupt"
    faults = await fs.poll()
    assert len(faults) == 1, faults
    flt = faults[0]
    assert (flt.fidx, flt.vm, flt.iova, flt.write) == (vf.index, 3, 0x5123, True)
    assert flt.fbq_index == 0 and flt.length == 1500 and flt.slot is not None
    assert flt.buffer == Staging.BASE + flt.slot * Staging.STRIDE + (0x2103 % (h.data_width // 8))
    fbq_w = [t for a, n, t in wire.writes if fs.fbq.base <= a < fs.fbq.base + 16 * fs.fbq.entries]
    iopf_w = [t for a, n, t in wire.writes if fs.iopf.base <= a < fs.iopf.base + 16 * fs.iopf.entries]
    assert len(fbq_w) == 1 and len(iopf_w) == 1 and fbq_w[0] < iopf_w[0], (fbq_w, iopf_w)
    assert await q.status(idx) == 0, "descriptor finished before the fault was resolved"
    assert (await fs.counters())["stage_busy"] == 1 << flt.slot
    t_res = h.t.now_ns()
    assert await fs.resolve(flt) == MAPPED
    assert await q.wait(idx) == DescStatus.DONE
    t_done = h.t.now_ns()
    assert await dom.read(0x5123, 1500) == data
    c = await fs.counters()
    assert c["faults"] == 1 and c["stage_busy"] == 0 and c["cq_bad"] == 0, c
    # the same page again: no fault, the device TLB has it
    hits = (await iommu.counters())["atc_hits"]
    data2 = pattern(rnd, 200)
    await load_card(h, 0x3000, data2)
    await q.transfer(0x5400, 0x3000, 200, to_host=True)
    assert await dom.read(0x5400, 200) == data2
    assert (await fs.counters())["faults"] == 1
    assert (await iommu.counters())["atc_hits"] > hits
    dut._log.info("write fault: raised after %.0f ns, resolved %.0f ns after the CQ doorbell",
                  iopf_w[0] - t0, t_done - t_res)


@cocotb.test()
async def test_read_fault_and_multipage(dut):
    """A read from a non-present page faults (IOPF entry, no FBQ entry) and is retried once
    the host backs it; a write spanning five pages, three of them absent, faults once per
    absent page and lands byte exact with the service running on its own."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 1)
    rnd = random.Random(3)
    vf = vfs[0]
    dom = await iommu.attach(vf.index, vm=1, pages=64)
    q = await DmaQueue(vf, entries=16).setup()
    # read fault: the test backs the page with known contents, then answers the fault
    idx = await q.post(0x7010, 0x100, 64, to_host=False)
    await wait_faults(h, 1)
    (flt,) = await fs.poll()
    assert (flt.write, flt.fbq_index, flt.iova) == (False, None, 0x7010)
    assert await h.drv.mgmt_read(FaultRegs.FBQ_PROD) == 0
    await dom.map(0x7000, PAGE_SIZE)
    src = pattern(rnd, 64)
    await dom.write(0x7010, src)
    dom.allow(0x7000, PAGE_SIZE)
    await fs.resolve(flt)
    assert await q.wait(idx) == DescStatus.DONE
    await q.transfer(0x7400, 0x100, 64, to_host=True)
    assert await dom.read(0x7400, 64) == src
    # five pages, pages 0x11, 0x13, 0x14 absent
    dom.allow(0x10000, 5 * PAGE_SIZE)
    await dom.map(0x10000, PAGE_SIZE)
    await dom.map(0x12000, PAGE_SIZE)
    data = pattern(rnd, 4 * PAGE_SIZE + 100)
    await load_card(h, 0x8000, data)
    stop = [False]
    svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=5_000))
    before = (await fs.counters())["faults"]
    await q.transfer(0x10F00, 0x8000, len(data), to_host=True, timeout_ns=5_000_000)
    stop[0] = True
    await svc
    assert await dom.read(0x10F00, len(data)) == data
    assert (await fs.counters())["faults"] - before == 3
    assert {r.fault.iova >> 12 for r in fs.log[-3:]} == {0x11, 0x13, 0x14}


@cocotb.test()
async def test_two_vfs_fault_third_flows(dut):
    """Two VFs fault at once through the same queues; while both faults are open a third
    function's DMA keeps flowing; each payload lands in its own VM."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 3)
    rnd = random.Random(4)
    qs = [await DmaQueue(vf, entries=16).setup() for vf in vfs]
    payload = {}
    for n, vf in enumerate(vfs[:2]):
        payload[vf.index] = pattern(rnd, 3000 + n)
        await load_card(h, 0x1000 * (n + 1), payload[vf.index])
    doms = {}
    for n, vf in enumerate(vfs[:2]):
        doms[vf.index] = await iommu.attach(vf.index, vm=10 + n, pages=8)
        doms[vf.index].allow(0, 8 * PAGE_SIZE)
    fs.hold = True
    idx = [await qs[n].post(0x2800, 0x1000 * (n + 1), 3000 + n, to_host=True)
           for n in range(2)]
    await wait_faults(h, 2)
    faults = await fs.poll()
    assert sorted((f.fidx, f.vm) for f in faults) == [(vfs[0].index, 10), (vfs[1].index, 11)]
    assert len({f.slot for f in faults}) == 2
    # the third function moves data while both faults are open
    q3 = qs[2]
    src = (h.t.alloc_host_mem(0x3000) + 0xFFF) & ~0xFFF
    dst = (h.t.alloc_host_mem(0x3000) + 0xFFF) & ~0xFFF
    for k in range(6):
        d = pattern(rnd, 512 + 97 * k)
        await h.t.host_write(src, d)
        await q3.transfer(src, 0x6000, len(d), to_host=False)
        await q3.transfer(dst, 0x6000, len(d), to_host=True)
        assert await h.t.host_read(dst, len(d)) == d
    for n in range(2):
        assert await qs[n].status(idx[n]) == 0
    fs.hold = False
    # the write spans pages 2 and 3: resolving page 2 lets the VF reach page 3 and fault again
    for f in faults:
        await fs.resolve(f)
    stop = [False]
    svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=5_000))
    for n, vf in enumerate(vfs[:2]):
        assert await qs[n].wait(idx[n]) == DescStatus.DONE
    stop[0] = True
    await svc
    for n, vf in enumerate(vfs[:2]):
        assert await doms[vf.index].read(0x2800, 3000 + n) == payload[vf.index]
    assert doms[vfs[0].index].present.keys() == doms[vfs[1].index].present.keys() == {2, 3}
    assert set(doms[vfs[0].index].present.values()).isdisjoint(doms[vfs[1].index].present.values())


@cocotb.test()
async def test_security(dut):
    """Outside the domain: blocked by the card, nothing on the wire but the status. In the
    domain but not the VM's: faulted, refused by the host, nothing written. The VF cannot
    reprogram its own domain (BAR2 is the PF's)."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 2)
    vf = vfs[0]
    q = await DmaQueue(vf, entries=16).setup()
    dom = await iommu.attach(vf.index, vm=5, pages=4)
    await dom.map(0, PAGE_SIZE)
    victim = (h.t.alloc_host_mem(0x2000) + 0xFFF) & ~0xFFF
    await h.t.host_write(victim, bytes([0x5A]) * 0x1000)
    wire = WireLog(h)
    ring = [(q.ring, 16 * 32)]
    # 1. beyond the domain (IOVA = a real bus address of someone else's memory)
    for iova, length, to_host in ((victim, 64, True), (4 * PAGE_SIZE, 8, True),
                                  (3 * PAGE_SIZE + 0xFF0, 32, True), (victim, 64, False)):
        idx = await q.post(iova, 0x100 + (iova & 3), length, to_host=to_host)
        assert await q.wait(idx) == DescStatus.BLOCKED, hex(iova)
    assert (await iommu.counters())["blocked"] == 4
    assert await h.t.host_read(victim, 0x1000) == bytes([0x5A]) * 0x1000
    assert wire.outside(ring) == [], wire.outside(ring)
    # 2. inside the domain, not allowed: the host refuses, the descriptor fails
    idx = await q.post(2 * PAGE_SIZE + 4, 0x200, 100, to_host=True)
    await wait_faults(h, 1)
    (flt,) = await fs.poll()
    assert await fs.resolve(flt) == REFUSED
    assert await q.wait(idx) == DescStatus.FAULT
    allowed = ring + [(fs.fbq.base, 16 * fs.fbq.entries), (fs.iopf.base, 16 * fs.iopf.entries)]
    assert wire.outside(allowed) == [], wire.outside(allowed)
    assert (await fs.counters())["stage_busy"] == 0
    assert 2 not in dom.present


async def overflow(dut, rings, nvf, expect_open):
    """``nvf`` VFs each write to a non-present page while the host holds the faults: only
    ``expect_open`` can be raised; the rest wait parked and go once the host catches up."""
    if True:
        h, pf, vfs, iommu, fs = await bring_up(dut, nvf, entries=16, fbq_entries=rings,
                                               iopf_entries=rings)
        rnd = random.Random(rings)
        qs = [await DmaQueue(vf, entries=8).setup() for vf in vfs]
        data = {}
        for n, vf in enumerate(vfs):
            data[n] = pattern(rnd, 700 + n)
            await load_card(h, 0x800 * n + 0x100, data[n])
        doms = []
        for n, vf in enumerate(vfs):
            d = await iommu.attach(vf.index, vm=n, pages=4)
            d.allow(0, 4 * PAGE_SIZE)
            doms.append(d)
        fs.hold = True
        idx = [await qs[n].post(0x1100, 0x800 * n + 0x100, 700 + n, to_host=True)
               for n in range(nvf)]
        await wait_faults(h, expect_open)
        await ClockCycles(dut.clk, 2000)
        c = await fs.counters()
        assert c["faults"] == expect_open, (rings, c)
        if rings == 16:
            assert c["stage_busy"] == (1 << Staging.SLOTS) - 1
        parked = [n for n in range(nvf) if await vfs[n].reg_read(DmaRegs.STATUS) & 4]
        assert len(parked) == nvf, parked
        fs.hold = False
        stop = [False]
        svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=5_000))
        for n in range(nvf):
            assert await qs[n].wait(idx[n], timeout_ns=5_000_000) == DescStatus.DONE
        stop[0] = True
        await svc
        for n in range(nvf):
            assert await doms[n].read(0x1100, 700 + n) == data[n], n
        c = await fs.counters()
        assert c["faults"] == nvf and c["stage_busy"] == 0 and c["cq_bad"] == 0, c


@cocotb.test()
async def test_fault_queues_full(dut):
    """FBQ and IOPF rings of 2 entries, 5 faulting VFs: 2 raised, 3 wait, none dropped."""
    await overflow(dut, rings=2, nvf=5, expect_open=2)


@cocotb.test()
async def test_staging_exhausted(dut):
    """6 faulting writes, 4 staging buffers: 4 raised, 2 wait, none dropped."""
    await overflow(dut, rings=16, nvf=6, expect_open=Staging.SLOTS)


@cocotb.test()
async def test_random_transfers_with_faults(dut):
    """Random lengths (1 B .. 9 KiB), IOVA and card alignments over a domain with half its
    pages absent, the fault service running on its own: every write lands byte exact and reads
    back through translation byte exact; the card writes no byte outside the buffers (checked
    on the wire against the translated ranges, the rings and the fault queues)."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 2)
    rnd = random.Random(5)
    vf = vfs[1]
    pages = 24
    dom = await iommu.attach(vf.index, vm=9, pages=pages)
    dom.allow(0, pages * PAGE_SIZE)
    for vpn in rnd.sample(range(pages), pages // 2):
        await dom.map(vpn * PAGE_SIZE, PAGE_SIZE)
    q = await DmaQueue(vf, entries=16).setup()
    stop = [False]
    svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=5_000))
    n = 12 if h.data_width > 64 else 20
    for k in range(n):
        length = rnd.choice([1, 2, 3, 5, 64, 100, 4095, 4096, 4097, 9000, rnd.randrange(1, 9000)])
        iova = rnd.randrange(16, (pages - 3) * PAGE_SIZE)
        card = (rnd.randrange(0, 0x10000 - length - 8) & ~3) | (iova & 3)
        data = pattern(rnd, length)
        await load_card(h, card, data)
        wire = WireLog(h)
        await q.transfer(iova, card, length, to_host=True, timeout_ns=5_000_000)
        h.bridge.tx_hook = None
        assert await dom.read(iova, length) == data, f"#{k}: {length} B at IOVA {iova:#x}"
        allowed = [(q.ring, 16 * 32), (fs.fbq.base, 16 * fs.fbq.entries),
                   (fs.iopf.base, 16 * fs.iopf.entries)]
        a = iova
        while a < iova + length:
            end = min((a | (PAGE_SIZE - 1)) + 1, iova + length)
            allowed.append((dom.translate(a), end - a))
            a = end
        assert wire.outside(allowed) == [], (k, wire.outside(allowed))
        # and back: IOVA -> card (another place) -> PF scratch
        card2 = (rnd.randrange(0, 0x10000 - length - 8) & ~3) | (iova & 3)
        await q.transfer(iova, card2, length, to_host=False, timeout_ns=5_000_000)
        await h.pfq.transfer(h.scratch + 0x100 + (iova & 3), card2, length, to_host=True)
        assert await h.t.host_read(h.scratch + 0x100 + (iova & 3), length) == data, f"#{k} read"
    stop[0] = True
    await svc
    c = await fs.counters()
    assert c["stage_busy"] == 0 and c["cq_bad"] == 0 and c["faults"] == len(fs.log), c
    assert all(r.decision != REFUSED for r in fs.log)
    dut._log.info("random: %d transfers, %d faults, ATC %s", 2 * n, c["faults"],
                  await iommu.counters())


@cocotb.test()
async def test_reset_with_fault_open(dut):
    """A function reset while its fault is open (queue disabled, or FLR) frees its staging
    buffer; the host's late answer is counted as a stray CQ entry and writes nothing; the
    function works again afterwards; another function's open fault is untouched."""
    h, pf, vfs, iommu, fs = await bring_up(dut, 2)
    rnd = random.Random(6)
    fs.hold = True
    qs, doms = [], []
    for n, vf in enumerate(vfs):
        d = await iommu.attach(vf.index, vm=20 + n, pages=8)
        d.allow(0, 8 * PAGE_SIZE)
        doms.append(d)
        qs.append(await DmaQueue(vf, entries=8).setup())
    data = pattern(rnd, 300)
    await load_card(h, 0x400, data)
    for q in qs:
        await q.post(0x1000, 0x400, 300, to_host=True)
    await wait_faults(h, 2)
    faults = {f.fidx: f for f in await fs.poll()}
    assert (await fs.counters())["stage_busy"] == 0b11
    a, b = vfs
    # 1. VF a's queue disabled: its buffer goes, b's stays
    await a.reg_write(DmaRegs.CTRL, 0)
    c = await fs.counters()
    assert c["stage_busy"] == 1 << faults[b.index].slot, c
    assert await a.reg_read(DmaRegs.STATUS) & 4 == 0
    wire = WireLog(h)
    await fs.resolve(faults[a.index])                  # too late: the card ignores it
    await ClockCycles(dut.clk, 500)
    assert (await fs.counters())["cq_bad"] == 1
    assert wire.outside([(fs.cq.base, 16 * fs.cq.entries)]) == []
    assert await doms[0].read(0x1000, 300) == bytes(300)
    # 2. VF b reset by FLR: same
    cap = b.caps[0x10]
    await b.write16(cap + 8, 1 << 15)
    assert (await fs.counters())["stage_busy"] == 0
    # both work again (the page of a is present now; b faults afresh)
    await b.set_command(master=True)
    fs.hold = False
    stop = [False]
    svc = cocotb.start_soon(fs.run(lambda: stop[0], timeout_ns=5_000))
    for n, q in enumerate(qs):
        await q.setup()
        await q.transfer(0x1000, 0x400, 300, to_host=True)
        assert await doms[n].read(0x1000, 300) == data
    stop[0] = True
    await svc
    c = await fs.counters()
    assert c["faults"] == 3 and c["stage_busy"] == 0, c
