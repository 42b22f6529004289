"""Enumeration, SR-IOV, MSI-X and error paths, with cocotbext-pcie's RootComplex as the host."""

import cocotb
from cocotb.triggers import ClockCycles

from cocotbext.pcie.core.utils import PcieId

from hdl.config import CardConfig
from regmap import FuncRegs, MgmtRegs, DmaRegs, MigRegs as MG, VirtioRegs as V
from host_driver.pci import CAP_PCIE, CAP_MSIX, ECAP_ARI, ECAP_SRIOV
from host_driver.transport import CplError
from cosim.harness import CardHarness



async def _probe(dut):
    h = CardHarness(dut)
    await h.start()
    pf = await h.drv.probe()
    return h, pf


@cocotb.test()
async def test_enumerate_pf(dut):
    """The RC enumerates the PF; IDs, capability lists and both BAR kinds are right."""
    h, pf = await _probe(dut)
    assert await pf.read32(0x00) == 0x1041_1AF4
    assert (await pf.read32(0x08)) >> 8 == 0x020000
    assert pf.caps == {CAP_PCIE: 0x40, CAP_MSIX: 0x80, 0x01: 0x90, 0x09: 0xA0}, pf.caps
    assert pf.ext_caps == {ECAP_ARI: 0x100, ECAP_SRIOV: 0x110}, pf.ext_caps
    b0, b2 = pf.bars[0], pf.bars[2]
    assert (b0.is64, b0.prefetchable, b0.size) == (True, True, 0x4000), b0
    assert (b2.is64, b2.prefetchable, b2.size) == (False, False, 0x1000), b2
    assert b0.addr % b0.size == 0 and b2.addr % b2.size == 0
    # the root complex's own view (its Linux-like PciDevice) agrees with ours
    dev = h.rc.find_device(PcieId.from_int(pf.rid))
    assert dev.bar_addr[0] == b0.addr and dev.bar_size[0] == b0.size
    assert dev.bar_addr[2] == b2.addr and dev.bar_size[2] == b2.size
    # BAR registers of the PF's function block and BAR2
    assert await pf.func_id() == FuncRegs.ID_MAGIC << 16
    assert await pf.reg_read(FuncRegs.VERSION) == FuncRegs.VERSION_VALUE
    await pf.reg_write(FuncRegs.SCRATCH, 0x1234_5678)
    assert await pf.reg_read(FuncRegs.SCRATCH) == 0x1234_5678
    assert await h.drv.mgmt_read(MgmtRegs.CARD_ID) == MgmtRegs.CARD_ID_VALUE
    cc = await h.drv.mgmt_read(MgmtRegs.CARD_CONFIG)
    assert cc & 0xFFFF == await pf.read16(pf.ext_caps[ECAP_SRIOV] + 0x0E)
    assert (cc >> 16) & 0xFF == h.data_width // 32
    # partial (byte) accesses and a multi-DW MMIO read
    await pf.reg_write(FuncRegs.SCRATCH, 0xA5A5_A5A5)
    assert await h.t.mmio_read(pf.bar0 + FuncRegs.SCRATCH + 1, 1) == 0xA5
    await h.t.mmio_write(pf.bar0 + FuncRegs.SCRATCH + 2, 0x3C, 1)
    assert await pf.reg_read(FuncRegs.SCRATCH) == 0xA53C_A5A5
    both = await h.t.mmio_read(pf.bar0 + FuncRegs.VERSION, 8)
    assert both == FuncRegs.VERSION_VALUE | (0xA53C_A5A5 << 32)


@cocotb.test()
async def test_sriov_vfs(dut):
    """Every VF (16 by default, TotalVFs of the build) answers at the routing ID the SR-IOV
    capability computes, with its own BAR."""
    h, pf = await _probe(dut)
    nvf = await pf.read16(pf.ext_caps[ECAP_SRIOV] + 0x0E)
    # before VF Enable no VF exists
    st, _ = await h.t.cfg_read_status(pf.rid + 1, 0)
    assert st == "UR", st
    vfs = await h.drv.enable_sriov(nvf)
    s = h.drv.sriov
    assert (s.first_offset, s.stride) == (1, 1)
    assert s.vf_device_id == 0x1041
    assert [vf.rid for vf in vfs] == [pf.rid + 1 + k for k in range(nvf)]
    for n, vf in enumerate(vfs, 1):
        # VF vendor/device read all-ones (SR-IOV), but the read completes successfully
        assert await vf.read32(0) == 0xFFFF_FFFF
        assert vf.caps == {CAP_PCIE: 0x40, CAP_MSIX: 0x80, 0x09: 0xA0}, vf.caps
        assert vf.ext_caps == {ECAP_ARI: 0x100}, vf.ext_caps
        assert await vf.func_id() == (FuncRegs.ID_MAGIC << 16) | (1 << 15) | n
    for n, vf in enumerate(vfs, 1):
        await vf.reg_write(FuncRegs.SCRATCH, 0x5C00_0000 | n)
    await pf.reg_write(FuncRegs.SCRATCH, 0x5C00_0000)
    for n, vf in enumerate(vfs, 1):
        assert await vf.reg_read(FuncRegs.SCRATCH) == 0x5C00_0000 | n
    assert await pf.reg_read(FuncRegs.SCRATCH) == 0x5C00_0000
    # one past the last VF does not exist
    st, _ = await h.t.cfg_read_status(pf.rid + nvf + 1, 0)
    assert st == "UR", st
    # the VF aperture ends with the last VF: one past it hits no BAR
    with_err = False
    try:
        await h.t.mmio_read(s.vf_bar_base + nvf * s.vf_bar_size, 4)
    except CplError as e:
        with_err = e.status == "UR"
    assert with_err
    # VF Enable off: the VFs disappear
    await h.drv.disable_sriov()
    st, _ = await h.t.cfg_read_status(pf.rid + 1, 0)
    assert st == "UR", st


@cocotb.test()
async def test_sriov_system_page_size(dut):
    """With a 64 KiB System Page Size every VF's BAR0 grows to a page, page aligned."""
    h, pf = await _probe(dut)
    vfs = await h.drv.enable_sriov(4, page_size=65536)
    s = h.drv.sriov
    assert s.vf_bar_size == 65536, hex(s.vf_bar_size)
    assert s.vf_bar_base % 65536 == 0
    for n, vf in enumerate(vfs, 1):
        assert vf.bar0 == s.vf_bar_base + (n - 1) * 65536
        assert await vf.func_id() == (FuncRegs.ID_MAGIC << 16) | (1 << 15) | n
    # an unsupported page size is refused by the card (the register keeps 64 KiB)
    await h.drv.disable_sriov()
    await pf.write32(s.cap + 0x20, 0x2 | 0x10)
    assert await pf.read32(s.cap + 0x20) == 0x10


@cocotb.test()
async def test_vf_flr_and_pf_d3hot(dut):
    """FLR of one VF resets its config, MSI-X and DMA queue state, and no other VF's;
    the PF in D3hot decodes no memory (UR) until it is back in D0."""
    h, pf = await _probe(dut)
    vfs = await h.drv.enable_sriov(4)
    a, b = vfs[1], vfs[2]
    for vf in (a, b):
        vecs = await vf.setup_msix()
        await vf.msix_mask(0, False)
        await vf.msix_mask(1, True)
        await vf.trigger_irq(1)                       # pending while masked
        await vf.reg_write(DmaRegs.RING_LO, 0x1000)
        await vf.reg_write(DmaRegs.CTRL, 1)
        await vf.reg_write(DmaRegs.PROD, 5)
    await ClockCycles(dut.clk, 100)
    cap = a.caps[CAP_PCIE]
    assert (await a.read32(cap + 4)) >> 28 & 1, "VF does not report FLR capability"
    await a.write16(cap + 8, 1 << 15)                 # Initiate Function Level Reset
    assert (await a.read16(0x04)) & 0x4 == 0          # Bus Master Enable cleared
    assert (await a.read16(a.caps[CAP_MSIX] + 2)) & 0xC000 == 0
    assert await a.msix_pba() == 0
    assert await h.t.mmio_read(a.bar0 + 0x2000 + 12) & 1 == 1     # vector 0 masked again
    assert await a.reg_read(DmaRegs.CTRL) & 1 == 0 and await a.reg_read(DmaRegs.PROD) == 0
    # the neighbour kept everything
    assert (await b.read16(0x04)) & 0x4
    assert (await b.read16(b.caps[CAP_MSIX] + 2)) & 0x8000
    assert await b.msix_pba() == 0b10
    assert await h.t.mmio_read(b.bar0 + 0x2000 + 12) & 1 == 0
    assert await b.reg_read(DmaRegs.PROD) == 5
    # PF power management: D3hot stops memory decode, D0 restores it
    pm = pf.caps[0x01]
    assert (await pf.read16(pm + 4)) & 0x8 == 0x8                 # No_Soft_Reset
    await pf.write16(pm + 4, 3)
    try:
        await pf.func_id()
        raise AssertionError("memory read completed in D3hot")
    except CplError as e:
        assert e.status == "UR"
    await pf.write16(pm + 4, 0)
    assert await pf.func_id() == FuncRegs.ID_MAGIC << 16


@cocotb.test()
async def test_vf_enable_off_resets_every_vf_engine_state(dut):
    """Clearing VF Enable resets what the engines keep per VF (DMA queue, virtio-net indices),
    so VFs enabled again start clean; the PF keeps its own."""
    h, pf = await _probe(dut)
    vfs = await h.drv.enable_sriov(3)
    for fn, prod in ((pf, 3), (vfs[1], 5)):           # no Bus Master Enable: nothing is served
        await fn.reg_write(DmaRegs.RING_LO, 0x1000)
        await fn.reg_write(DmaRegs.CTRL, 1)
        await fn.reg_write(DmaRegs.PROD, prod)
    # the virtio-net engine's indices of VF 2, set through the restore path (stopped, idle)
    await h.drv.mgmt_write(MG.SEL, vfs[1].index)
    await h.drv.mgmt_write(MG.CTRL, 1)
    for _ in range(100):
        if (await h.drv.mgmt_read(MG.STATUS)) & 2:
            break
    else:
        raise AssertionError("VF 2 never idle after the stop")
    # (receiveq1's last_avail, the control queue's used index, the pending notifications)
    idx = ((0, MG.Q_AVAIL, 7), (2 * V.MAX_PAIRS, MG.Q_USED, 9), (None, MG.TX_PEND, 1))
    for q, reg, v in idx:
        if q is not None:
            await h.drv.mgmt_write(MG.Q_SEL, q)
        await h.drv.mgmt_write(reg, v)
        assert await h.drv.mgmt_read(reg) == v
    await h.drv.mgmt_write(MG.CTRL, 0)
    await h.drv.disable_sriov()
    vfs = await h.drv.enable_sriov(3)
    assert await vfs[1].reg_read(DmaRegs.CTRL) & 1 == 0
    assert await vfs[1].reg_read(DmaRegs.PROD) == 0
    await h.drv.mgmt_write(MG.SEL, vfs[1].index)
    for q, reg, _ in idx:
        if q is not None:
            await h.drv.mgmt_write(MG.Q_SEL, q)
        assert await h.drv.mgmt_read(reg) == 0, f"VF 2's {hex(reg)} survived VF Enable off"
    # the PF's queue is untouched
    assert await pf.reg_read(DmaRegs.CTRL) & 1 == 1 and await pf.reg_read(DmaRegs.PROD) == 3


@cocotb.test()
async def test_msix_pf_and_vf(dut):
    """MSI-X from the PF and from a VF arrives with the programmed data; masking sets the PBA."""
    h, pf = await _probe(dut)
    vecs = await pf.setup_msix()
    for k in range(len(vecs)):
        await pf.msix_mask(k, False)
    await pf.trigger_irq(0)
    assert await h.t.wait_msi(vecs[0], 1, 20_000)
    await pf.trigger_irq(3)
    assert await h.t.wait_msi(vecs[3], 1, 20_000)
    assert h.t.msi_count(vecs[1]) == 0 and h.t.msi_count(vecs[2]) == 0

    # masked vector: the PBA bit is set, no message until unmasked
    await pf.msix_mask(1, True)
    await pf.trigger_irq(1)
    await ClockCycles(dut.clk, 400)
    assert h.t.msi_count(vecs[1]) == 0
    assert await pf.msix_pba() & 0b10
    await pf.msix_mask(1, False)
    assert await h.t.wait_msi(vecs[1], 1, 20_000)
    assert await pf.msix_pba() == 0

    # function mask holds every vector
    await pf.msix_function_mask(True)
    await pf.trigger_irq(2)
    await ClockCycles(dut.clk, 400)
    assert h.t.msi_count(vecs[2]) == 0 and await pf.msix_pba() & 0b100
    await pf.msix_function_mask(False)
    assert await h.t.wait_msi(vecs[2], 1, 20_000)

    # a VF's own table and vectors
    vfs = await h.drv.enable_sriov(4)
    vf = vfs[2]
    vvecs = await vf.setup_msix()
    for k in range(len(vvecs)):
        await vf.msix_mask(k, False)
    await vf.trigger_irq(2)
    assert await h.t.wait_msi(vvecs[2], 1, 20_000)
    assert h.t.msi_count(vvecs[0]) == 0
    # the PF's vectors did not fire again
    assert [h.t.msi_count(v) for v in vecs] == [1, 1, 1, 1]


@cocotb.test()
async def test_linux_style_api(dut):
    """The PF works with the RootComplex's Linux-like PciDevice API."""
    h, pf = await _probe(dut)
    dev = h.rc.find_device(PcieId.from_int(pf.rid))
    await dev.enable_device()
    await dev.set_master()
    n = await dev.alloc_irq_vectors(1, 4)
    assert n == 4, n
    for k in range(4):   # the API leaves vectors masked as the spec's reset state has them
        await dev.bar_window[0].write_dword(0x2000 + 16 * k + 12, 0)
    await dev.bar_window[0].write_dword(FuncRegs.IRQ, 1)
    ev = dev.msi_vectors[1].event
    ev.clear()
    await ev.wait()
    assert await dev.bar_window[0].read_dword(FuncRegs.ID) == FuncRegs.ID_MAGIC << 16


@cocotb.test()
async def test_bad_requests(dut):
    """UR for missing functions and BAR misses, read-only fields stay, counters move."""
    h, pf = await _probe(dut)
    unsup0 = await h.drv.mgmt_read(MgmtRegs.ERR_UNSUPPORTED)
    for r in (pf.rid + 1, pf.rid + 200, pf.rid + 255):
        st, _ = await h.t.cfg_read_status(r, 0)
        assert st == "UR", (hex(r), st)
    try:
        await h.t.cfg_write(pf.rid + 1, 0x04, 0x6)
        raise AssertionError("config write to a missing function completed")
    except CplError as e:
        assert e.status == "UR"
    # read-only fields
    sriov = pf.ext_caps[ECAP_SRIOV]
    ro = [0x00, 0x08, 0x2C, 0x34, 0x40, 0x44, 0x80 + 4, 0x100, sriov + 0x0C, sriov + 0x14,
          sriov + 0x18]
    before = [await pf.read32(o) for o in ro]
    for o in ro:
        await pf.write32(o, 0xFFFF_FFFF)
        await pf.write32(o, 0)
    after = [await pf.read32(o) for o in ro]
    assert before == after, [(hex(o), hex(a), hex(b)) for o, a, b in zip(ro, before, after) if a != b]
    # NumVFs above TotalVFs is refused
    total = await pf.read16(sriov + 0x0E)
    await pf.write16(sriov + 0x10, total + 1)
    assert await pf.read16(sriov + 0x10) != total + 1
    # a memory read inside the root port's window that hits no BAR
    rp = h.t._bridge_above(pf.rid >> 8)
    miss = rp.mem_base + 0x8000
    assert not (pf.bars[2].addr <= miss < pf.bars[2].addr + pf.bars[2].size)
    try:
        await h.t.mmio_read(miss, 4)
        raise AssertionError("read of an unmapped address completed")
    except CplError as e:
        assert e.status == "UR"
    # a read longer than the completer serves gets Completer Abort
    try:
        await h.t.mmio_read(pf.bar0, 128)
        raise AssertionError("oversized MMIO read completed")
    except CplError as e:
        assert e.status == "CA"
    # the PF's RW1C status bits saw it all: UR Detected, Signaled Target Abort
    devsta = pf.caps[CAP_PCIE] + 0x0A
    assert await pf.read16(devsta) & 0x8, hex(await pf.read16(devsta))
    assert await pf.read16(0x06) & (1 << 11)
    await pf.write16(devsta, 0x8)                  # write 1 to clear
    await pf.write16(0x06, 1 << 11)
    assert await pf.read16(devsta) & 0x8 == 0 and await pf.read16(0x06) & (1 << 11) == 0
    await h.settle()
    unsup1 = await h.drv.mgmt_read(MgmtRegs.ERR_UNSUPPORTED)
    assert unsup1 - unsup0 >= 5, (unsup0, unsup1)
    # after all that the card still answers normally
    assert await pf.read32(0) == 0x1041_1AF4
