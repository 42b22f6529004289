"""The offcard driver: probe the PF, set up MSI-X, enable SR-IOV and find the VFs.

Register offsets come from :mod:`regmap` (the one definition of the card's address map);
the driver imports only those constants, never the gateware.
"""

from dataclasses import dataclass

from regmap import Bar0Map, FuncRegs, MgmtRegs, MigRegs, NetRegs, VirtioRegs

from .pci import PciFunction, CAP_PCIE, CAP_MSIX, ECAP_ARI, ECAP_SRIOV
from .transport import Transport, MsiVector

__all__ = ["OffcardFunction", "OffcardDriver", "ProbeError", "VENDOR_ID", "DEVICE_ID",
           "VF_DEVICE_ID"]

VENDOR_ID = 0x1AF4
DEVICE_ID = 0x1041
VF_DEVICE_ID = 0x1041       # SR-IOV VF Device ID: VFs are virtio-net devices too

# SR-IOV capability register offsets
SRIOV_CTRL = 0x08
SRIOV_TOTAL_VFS = 0x0E
SRIOV_NUM_VFS = 0x10
SRIOV_VF_OFFSET = 0x14
SRIOV_VF_STRIDE = 0x16
SRIOV_VF_DID = 0x1A
SRIOV_SUPPORTED_PAGES = 0x1C
SRIOV_PAGE_SIZE = 0x20
SRIOV_VF_BAR0 = 0x24
CTRL_VF_ENABLE = 1 << 0
CTRL_VF_MSE = 1 << 3
CTRL_ARI_HIER = 1 << 4


class ProbeError(Exception):
    pass


class OffcardFunction(PciFunction):
    """A PF or VF of the card with its BAR0 mapped."""

    def __init__(self, transport, rid, index, bar0=None):
        super().__init__(transport, rid)
        self.index = index            # function index: 0 = PF, n = VF n
        self.bar0 = bar0
        self.msix_vectors: list[MsiVector] = []
        self._msix_cap = None

    @property
    def is_vf(self):
        return self.index != 0

    async def reg_read(self, off):
        return await self.t.mmio_read(self.bar0 + off, 4)

    async def reg_write(self, off, value):
        await self.t.mmio_write(self.bar0 + off, value, 4)

    async def func_id(self):
        return await self.reg_read(FuncRegs.ID)

    async def trigger_irq(self, vector):
        await self.reg_write(FuncRegs.IRQ, vector)

    # ---- MSI-X ----
    async def setup_msix(self, nvec=None):
        """Program the MSI-X table with fresh vectors and enable MSI-X (function unmasked).
        Every vector stays masked until :meth:`msix_unmask`, unless ``unmask=True`` below."""
        if CAP_MSIX not in self.caps:
            await self.walk_capabilities()
        cap = self.caps[CAP_MSIX]
        self._msix_cap = cap
        ctrl = await self.read16(cap + 2)
        size = (ctrl & 0x7FF) + 1
        nvec = size if nvec is None else min(nvec, size)
        table = await self.read32(cap + 4)
        if table & 7 != 0:
            raise ProbeError(f"{self}: MSI-X table in BAR{table & 7}, expected BAR0")
        self.msix_table_off = table & ~7
        pba = await self.read32(cap + 8)
        self.msix_pba_off = pba & ~7
        self.msix_vectors = self.t.alloc_msi_vectors(nvec)
        # function-mask while programming, then enable
        await self.write16(cap + 2, (ctrl | 0x4000) & ~0x8000)
        await self.write16(cap + 2, ctrl | 0xC000)
        for k, v in enumerate(self.msix_vectors):
            e = self.bar0 + self.msix_table_off + 16 * k
            await self.t.mmio_write(e + 0, v.addr & 0xFFFFFFFF)
            await self.t.mmio_write(e + 4, v.addr >> 32)
            await self.t.mmio_write(e + 8, v.data)
        await self.write16(cap + 2, (ctrl | 0x8000) & ~0x4000)
        return self.msix_vectors

    async def msix_mask(self, vector, masked):
        await self.t.mmio_write(self.bar0 + self.msix_table_off + 16 * vector + 12, int(masked))

    async def msix_function_mask(self, masked):
        ctrl = await self.read16(self._msix_cap + 2)
        await self.write16(self._msix_cap + 2, (ctrl | 0x4000) if masked else (ctrl & ~0x4000))

    async def msix_pba(self):
        return await self.t.mmio_read(self.bar0 + self.msix_pba_off, 4)


@dataclass
class SriovInfo:
    cap: int
    total_vfs: int
    num_vfs: int
    first_offset: int
    stride: int
    vf_device_id: int
    vf_bar_size: int
    vf_bar_base: int


class OffcardDriver:
    def __init__(self, transport: Transport):
        self.t = transport
        self.pf: OffcardFunction | None = None
        self.vfs: list[OffcardFunction] = []
        self.sriov: SriovInfo | None = None
        self.bar2 = None
        self._num_functions: int | None = None

    async def probe(self):
        """Find the card among the enumerated endpoints, check it, map its BARs, enable it."""
        for r in await self.t.enumerate():
            ids = await self.t.cfg_read(r, 0, 4)
            if ids == VENDOR_ID | (DEVICE_ID << 16):
                break
        else:
            raise ProbeError(f"no offcard ({VENDOR_ID:04x}:{DEVICE_ID:04x}) found")
        pf = OffcardFunction(self.t, r, 0)
        await pf.walk_capabilities()
        for need in (CAP_PCIE, CAP_MSIX):
            if need not in pf.caps:
                raise ProbeError(f"{pf}: capability {need:#04x} missing")
        for need in (ECAP_ARI, ECAP_SRIOV):
            if need not in pf.ext_caps:
                raise ProbeError(f"{pf}: extended capability {need:#06x} missing")
        pf.bars = await pf.size_bar_regs(0x10)
        if 0 not in pf.bars or 2 not in pf.bars:
            raise ProbeError(f"{pf}: BAR0 and BAR2 expected, found {sorted(pf.bars)}")
        for b in pf.bars.values():
            if b.addr == 0:
                raise ProbeError(f"{pf}: BAR{b.index} not assigned")
        pf.bar0 = pf.bars[0].addr
        self.bar2 = pf.bars[2].addr
        await pf.set_command(mem=True, master=True)
        self.pf = pf
        cid = await self.mgmt_read(MgmtRegs.CARD_ID)
        if cid != MgmtRegs.CARD_ID_VALUE:
            raise ProbeError(f"{pf}: BAR2 card ID {cid:#010x}, expected {MgmtRegs.CARD_ID_VALUE:#010x}")
        return pf

    async def mgmt_read(self, off):
        return await self.t.mmio_read(self.bar2 + off, 4)

    async def mgmt_write(self, off, value):
        await self.t.mmio_write(self.bar2 + off, value, 4)

    async def set_coalescing(self, count, clocks, fidx=None, queue=None):
        """Used-ring coalescing: a queue publishes its used elements (and interrupts) once
        ``count`` are due or the oldest has waited ``clocks`` card clocks (``count`` 0 or 1:
        every element at once). Without ``fidx`` the default of every queue
        (``NetRegs.COAL``); else queue ``queue`` of function ``fidx`` only (``COAL_Q``)."""
        if not 0 <= count <= 0xFF or not 0 <= clocks <= 0xFFFF:
            raise ValueError(f"coalescing count must be 0..255 and clocks 0..65535, "
                             f"got {count} and {clocks}")
        value = count | clocks << 16
        if fidx is None:
            await self.mgmt_write(NetRegs.COAL, value)
        else:
            await self._queue_coal(fidx, queue, value | NetRegs.COAL_Q_OWN)

    async def default_coalescing(self, fidx, queue):
        """Queue ``queue`` of function ``fidx`` goes back to the default (``NetRegs.COAL``)."""
        await self._queue_coal(fidx, queue, 0)

    async def _queue_coal(self, fidx, queue, value):
        nq, nf = VirtioRegs.NUM_QUEUES_VALUE, await self.num_functions()
        if queue is None or not 0 <= queue < nq or not 0 <= fidx < nf:
            raise ValueError(f"no queue {queue} of function {fidx} "
                             f"({nf} functions, {nq} queues each)")
        await self.mgmt_write(MigRegs.SEL, fidx)
        await self.mgmt_write(NetRegs.COAL_Q + 4 * queue, value)

    async def num_functions(self) -> int:
        """Functions the card has (the PF and TotalVFs), from ``CARD_CONFIG`` (read once)."""
        if self._num_functions is None:
            self._num_functions = 1 + (await self.mgmt_read(MgmtRegs.CARD_CONFIG) & 0xFFFF)
        return self._num_functions

    async def enable_sriov(self, num_vfs, page_size=4096):
        """Enable ``num_vfs`` VFs: System Page Size (the host's page size), NumVFs, VF BARs in
        a reserved window, VF Enable + VF MSE."""
        pf = self.pf
        cap = pf.ext_caps[ECAP_SRIOV]
        total = await pf.read16(cap + SRIOV_TOTAL_VFS)
        if not 0 < num_vfs <= total:
            raise ValueError(f"num_vfs must be 1..{total}, got {num_vfs}")
        ctrl = await pf.read16(cap + SRIOV_CTRL)
        if ctrl & CTRL_VF_ENABLE:
            raise RuntimeError("SR-IOV already enabled")
        # ARI: the card sits alone below a root port, so an ARI hierarchy is in effect
        await pf.write16(cap + SRIOV_CTRL, ctrl | CTRL_ARI_HIER)
        page_bit = page_size.bit_length() - 13
        supported = await pf.read32(cap + SRIOV_SUPPORTED_PAGES)
        if page_size & (page_size - 1) or page_bit < 0 or not supported >> page_bit & 1:
            raise ValueError(f"page size {page_size} not supported (mask {supported:#x})")
        await pf.write32(cap + SRIOV_PAGE_SIZE, 1 << page_bit)
        await pf.write16(cap + SRIOV_NUM_VFS, num_vfs)
        if await pf.read16(cap + SRIOV_NUM_VFS) != num_vfs:
            raise ProbeError(f"{pf}: NumVFs did not take {num_vfs}")
        offset = await pf.read16(cap + SRIOV_VF_OFFSET)
        stride = await pf.read16(cap + SRIOV_VF_STRIDE)
        vf_did = await pf.read16(cap + SRIOV_VF_DID)
        vf_bars = await pf.size_bar_regs(cap + SRIOV_VF_BAR0, 6)
        if 0 not in vf_bars:
            raise ProbeError(f"{pf}: VF BAR0 not implemented")
        b = vf_bars[0]
        base = await self.t.reserve_mmio(b.size * num_vfs, b.size, b.prefetchable,
                                          bus_num=pf.rid >> 8)
        await pf.write32(cap + SRIOV_VF_BAR0, (base & 0xFFFFFFFF) | 0xC)
        await pf.write32(cap + SRIOV_VF_BAR0 + 4, base >> 32)
        await pf.write16(cap + SRIOV_CTRL, ctrl | CTRL_ARI_HIER | CTRL_VF_ENABLE | CTRL_VF_MSE)
        self.sriov = SriovInfo(cap, total, num_vfs, offset, stride, vf_did, b.size, base)
        self.vfs = []
        for n in range(1, num_vfs + 1):
            r = pf.rid + offset + (n - 1) * stride
            vf = OffcardFunction(self.t, r, n, base + (n - 1) * b.size)
            # VFs report Vendor/Device ID 0xFFFF; the class code proves the function answers
            cc = await vf.read32(0x08)
            if cc >> 8 != (await pf.read32(0x08)) >> 8:
                raise ProbeError(f"VF{n} at {vf}: class code {cc >> 8:#08x} differs from the PF's")
            await vf.walk_capabilities()
            await vf.set_command(master=True)
            self.vfs.append(vf)
        return self.vfs

    async def disable_sriov(self):
        cap = self.sriov.cap
        ctrl = await self.pf.read16(cap + SRIOV_CTRL)
        await self.pf.write16(cap + SRIOV_CTRL, ctrl & ~(CTRL_VF_ENABLE | CTRL_VF_MSE))
        self.vfs = []
