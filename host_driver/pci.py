"""Generic PCI(e) function access on top of a :class:`Transport`: capabilities and BARs."""

from dataclasses import dataclass, field

from .transport import Transport, rid_str

__all__ = ["PciFunction", "Bar", "CAP_PCIE", "CAP_MSIX", "ECAP_ARI", "ECAP_SRIOV"]

CAP_PCIE = 0x10
CAP_MSIX = 0x11
ECAP_ARI = 0x000E
ECAP_SRIOV = 0x0010


@dataclass
class Bar:
    index: int
    addr: int
    size: int
    is64: bool
    prefetchable: bool


class PciFunction:
    """One function (PF or VF) reached by routing ID."""

    def __init__(self, transport: Transport, rid: int):
        self.t = transport
        self.rid = rid
        self.caps: dict[int, int] = {}
        self.ext_caps: dict[int, int] = {}
        self.bars: dict[int, Bar] = {}

    def __repr__(self):
        return f"<{type(self).__name__} {rid_str(self.rid)}>"

    async def read8(self, off):
        return await self.t.cfg_read(self.rid, off, 1)

    async def read16(self, off):
        return await self.t.cfg_read(self.rid, off, 2)

    async def read32(self, off):
        return await self.t.cfg_read(self.rid, off, 4)

    async def write8(self, off, v):
        await self.t.cfg_write(self.rid, off, v, 1)

    async def write16(self, off, v):
        await self.t.cfg_write(self.rid, off, v, 2)

    async def write32(self, off, v):
        await self.t.cfg_write(self.rid, off, v, 4)

    async def walk_capabilities(self):
        """Walk the capability list and the extended capability list (loop-safe)."""
        self.caps, self.ext_caps = {}, {}
        status = await self.read16(0x06)
        if status & (1 << 4):
            ptr = (await self.read8(0x34)) & 0xFC
            seen = set()
            while ptr and ptr not in seen:
                seen.add(ptr)
                hdr = await self.read16(ptr)
                self.caps.setdefault(hdr & 0xFF, ptr)
                ptr = (hdr >> 8) & 0xFC
        ptr = 0x100
        seen = set()
        while ptr and ptr not in seen:
            seen.add(ptr)
            hdr = await self.read32(ptr)
            if hdr in (0, 0xFFFFFFFF):
                break
            self.ext_caps.setdefault(hdr & 0xFFFF, ptr)
            ptr = (hdr >> 20) & 0xFFC
        return self.caps, self.ext_caps

    async def size_bar_regs(self, base_off, count=6):
        """Size BAR registers at ``base_off`` the way real software does (decode off, write
        all ones, read back, restore). Returns {index: Bar} with the current addresses."""
        cmd = await self.read16(0x04)
        await self.write16(0x04, cmd & ~0x3)
        bars = {}
        i = 0
        try:
            while i < count:
                off = base_off + 4 * i
                orig = await self.read32(off)
                await self.write32(off, 0xFFFFFFFF)
                val = await self.read32(off)
                await self.write32(off, orig)
                if val == 0 or val & 1:         # unimplemented (or I/O, which we never use)
                    i += 1
                    continue
                is64 = (val >> 1) & 3 == 2
                pref = bool(val & 8)
                mask = val & 0xFFFFFFF0
                addr = orig & 0xFFFFFFF0
                if is64:
                    orig_hi = await self.read32(off + 4)
                    await self.write32(off + 4, 0xFFFFFFFF)
                    hi = await self.read32(off + 4)
                    await self.write32(off + 4, orig_hi)
                    mask |= hi << 32
                    addr |= orig_hi << 32
                    size = (~mask & 0xFFFFFFFFFFFFFFFF) + 1
                else:
                    size = (~mask & 0xFFFFFFFF) + 1
                bars[i] = Bar(i, addr, size, is64, pref)
                i += 2 if is64 else 1
        finally:
            await self.write16(0x04, cmd)
        return bars

    async def set_command(self, mem=None, master=None):
        cmd = await self.read16(0x04)
        if mem is not None:
            cmd = (cmd | 2) if mem else (cmd & ~2)
        if master is not None:
            cmd = (cmd | 4) if master else (cmd & ~4)
        await self.write16(0x04, cmd)
