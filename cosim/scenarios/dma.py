"""DMA set-up through the host driver."""

from host_driver.pci import CAP_PCIE


async def set_mps_mrrs(pf, mps, mrrs):
    off = pf.caps[CAP_PCIE] + 8
    v = await pf.read16(off)
    v = (v & ~0x70E0) | ((mps.bit_length() - 8) << 5) | ((mrrs.bit_length() - 8) << 12)
    await pf.write16(off, v)
