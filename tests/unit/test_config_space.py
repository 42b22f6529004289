"""Unit tests of hdl.pcie.config_space.ConfigSpace, driven through its DW access port."""

import pytest
from hdl.config import CardConfig
from hdl.pcie.config_space import ConfigSpace, CapOffsets
from helpers import run_sim

CFG = CardConfig()                  # total_vfs 16, msix_vectors 4
TOTAL_VFS = CFG.total_vfs

# byte offsets
VENDOR, COMMAND, CLASS, BAR0, BAR1, BAR2 = 0x00, 0x04, 0x08, 0x10, 0x14, 0x18
SUBSYS, CAP_PTR = 0x2C, 0x34
PCIE, MSIX, ARI, SRIOV = CapOffsets.PCIE, CapOffsets.MSIX, CapOffsets.ARI, CapOffsets.SRIOV
DEVCAP, DEVCTL = PCIE + 0x04, PCIE + 0x08
SRIOV_CTL, SRIOV_TOTAL, SRIOV_NUMVFS = SRIOV + 0x08, SRIOV + 0x0C, SRIOV + 0x10
SRIOV_OFFSTRIDE, SRIOV_DEVID, SRIOV_VFBAR0 = SRIOV + 0x14, SRIOV + 0x18, SRIOV + 0x24


class Port:
    """Coroutine wrappers around the config access port."""

    def __init__(self, ctx, dut):
        self.ctx, self.dut = ctx, dut

    async def rd(self, fidx, off):
        ctx, p = self.ctx, self.dut.port
        ctx.set(p.fidx, fidx)
        ctx.set(p.reg, off >> 2)
        ctx.set(p.re, 1)
        await ctx.tick()
        ctx.set(p.re, 0)
        return ctx.get(p.rdata)

    async def wr(self, fidx, off, value, be=0xF):
        ctx, p = self.ctx, self.dut.port
        ctx.set(p.fidx, fidx)
        ctx.set(p.reg, off >> 2)
        ctx.set(p.wdata, value)
        ctx.set(p.be, be)
        ctx.set(p.we, 1)
        await ctx.tick()
        ctx.set(p.we, 0)
        await ctx.tick()        # let the VF-Enable edge logic settle

    def exists(self, fidx):
        self.ctx.set(self.dut.port.fidx, fidx)
        return self.ctx.get(self.dut.port.exists)

    async def enable_vfs(self, n, vf_mse=True):
        await self.wr(0, SRIOV_NUMVFS, n)
        await self.wr(0, SRIOV_CTL, 1 | (int(vf_mse) << 3) | (1 << 4))


def run(tb, cfg=CFG):
    dut = ConfigSpace(cfg)

    async def bench(ctx):
        await tb(ctx, dut, Port(ctx, dut))
    run_sim(dut, bench)


def test_pf_header_ids_and_class():
    async def tb(ctx, dut, port):
        assert await port.rd(0, VENDOR) == 0x1041_1AF4
        assert await port.rd(0, CLASS) == 0x0200_0001          # Ethernet, revision 1
        assert await port.rd(0, SUBSYS) == 0x0001_1AF4
        status = (await port.rd(0, COMMAND)) >> 16
        assert status & (1 << 4), "Capabilities List bit must be set"
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0           # Command resets to 0
        assert (await port.rd(0, 0x0C)) >> 16 & 0x7F == 0           # header type 0
    run(tb)


def test_capability_chain():
    async def tb(ctx, dut, port):
        ptr = (await port.rd(0, CAP_PTR)) & 0xFF
        assert ptr == 0x40
        chain = []
        while ptr:
            hdr = await port.rd(0, ptr)
            chain.append((ptr, hdr & 0xFF))
            ptr = (hdr >> 8) & 0xFF
            assert len(chain) < 8, "capability list loops"
        virtio = [(0xA0, 0x09), (0xB0, 0x09), (0xC4, 0x09), (0xD4, 0x09)]
        assert chain == [(0x40, 0x10), (0x80, 0x11), (0x90, 0x01)] + virtio   # PM: PF only
        pcie = await port.rd(0, PCIE)
        assert (pcie >> 16) & 0xF == 2                  # capability version 2
        assert (pcie >> 20) & 0xF == 0                  # device/port type: PCIe endpoint
        msix = await port.rd(0, MSIX)
        assert (msix >> 16) & 0x7FF == CFG.msix_vectors - 1   # table size N-1
        assert await port.rd(0, MSIX + 4) == 0x2000     # table: BIR 0, offset 0x2000
        assert await port.rd(0, MSIX + 8) == 0x3000     # PBA: BIR 0, offset 0x3000
        # a VF has the same chain
        await port.enable_vfs(1)
        assert (await port.rd(1, CAP_PTR)) & 0xFF == 0x40
        assert (await port.rd(1, 0x40)) & 0xFFFF == 0x8010
        assert (await port.rd(1, 0x80)) & 0xFFFF == 0xA011
        # the virtio structures: type, BAR 0, offset, length; the notify multiplier
        for off, typ, where, length in ((0xA0, 1, 0x1000, 0x38), (0xB0, 2, 0x1100, 0x100),
                                        (0xC4, 3, 0x1200, 4), (0xD4, 4, 0x1300, 0x10)):
            for fn in (0, 1):
                hdr = await port.rd(fn, off)
                assert (hdr >> 24, hdr >> 16 & 0xFF) == (typ, 20 if typ == 2 else 16)
                assert await port.rd(fn, off + 4) & 0xFF == 0
                assert await port.rd(fn, off + 8) == where and await port.rd(fn, off + 12) == length
        assert await port.rd(1, 0xB0 + 16) == 4
    run(tb)


def test_extended_capability_chain():
    async def tb(ctx, dut, port):
        ptr, chain = 0x100, []
        while ptr:
            hdr = await port.rd(0, ptr)
            chain.append((ptr, hdr & 0xFFFF, (hdr >> 16) & 0xF))
            ptr = hdr >> 20
            assert len(chain) < 8, "extended capability list loops"
        assert chain == [(0x100, 0x000E, 1), (0x110, 0x0010, 1)]
        await port.enable_vfs(2)
        vf_ari = await port.rd(2, 0x100)
        assert vf_ari & 0xFFFF == 0x000E and vf_ari >> 20 == 0     # VF: ARI only, end of list
    run(tb)


@pytest.mark.parametrize("bar0_size", [0x4000, 0x10000])
def test_bar0_64bit_sizing(bar0_size):
    cfg = CardConfig(bar0_size=bar0_size)

    async def tb(ctx, dut, port):
        assert await port.rd(0, BAR0) == 0x0000_000C    # 64-bit prefetchable, unassigned
        await port.wr(0, BAR0, 0xFFFF_FFFF)
        await port.wr(0, BAR1, 0xFFFF_FFFF)
        assert await port.rd(0, BAR0) == ((~(bar0_size - 1)) & 0xFFFF_FFFF) | 0xC
        assert await port.rd(0, BAR1) == 0xFFFF_FFFF
        await port.wr(0, BAR0, 0xFEDC_BA98)
        await port.wr(0, BAR1, 0x0000_0012)
        base = 0xFEDC_BA98 & ~(bar0_size - 1) & 0xFFFF_FFF0
        assert await port.rd(0, BAR0) == base | 0xC
        assert await port.rd(0, BAR1) == 0x12
        assert ctx.get(dut.bars.pf_bar0) == (0x12 << 32) | base
    run(tb, cfg)


def test_bar2_32bit_sizing_and_vf_bar0_sizing():
    async def tb(ctx, dut, port):
        assert await port.rd(0, BAR2) == 0               # 32-bit, non-prefetchable
        await port.wr(0, BAR2, 0xFFFF_FFFF)
        assert await port.rd(0, BAR2) == 0xFFFF_F000      # 4 KiB
        await port.wr(0, BAR2, 0x8765_4321)
        assert await port.rd(0, BAR2) == 0x8765_4000
        assert ctx.get(dut.bars.pf_bar2) == 0x8765_4000
        # SR-IOV VF BAR0 (0x134/0x138): 64-bit prefetchable, 16 KiB per VF
        await port.wr(0, SRIOV_VFBAR0, 0xFFFF_FFFF)
        await port.wr(0, SRIOV_VFBAR0 + 4, 0xFFFF_FFFF)
        assert await port.rd(0, SRIOV_VFBAR0) == 0xFFFF_C00C
        assert await port.rd(0, SRIOV_VFBAR0 + 4) == 0xFFFF_FFFF
        await port.wr(0, SRIOV_VFBAR0, 0x0010_0000)
        await port.wr(0, SRIOV_VFBAR0 + 4, 0x2)
        assert ctx.get(dut.bars.vf_bar0) == 0x2_0010_0000
        # VF BARs in the type-0 header read zero
        await port.enable_vfs(1)
        for off in (BAR0, BAR1, BAR2):
            assert await port.rd(1, off) == 0
    run(tb)


def test_read_only_registers_ignore_writes():
    ro = [VENDOR, CLASS, SUBSYS, CAP_PTR, DEVCAP, PCIE, SRIOV, SRIOV_TOTAL, SRIOV_OFFSTRIDE,
          SRIOV_DEVID, MSIX + 4, MSIX + 8]
    expect = {VENDOR: 0x1041_1AF4, CLASS: 0x0200_0001, SRIOV_TOTAL: TOTAL_VFS | TOTAL_VFS << 16,
              SRIOV_OFFSTRIDE: 0x0001_0001, SRIOV_DEVID: 0x1041_0000}

    async def tb(ctx, dut, port):
        before = {off: await port.rd(0, off) for off in ro}
        for off, v in expect.items():
            assert before[off] == v, hex(off)
        assert before[DEVCAP] != 0
        for off in ro:
            for value in (0xFFFF_FFFF, 0):
                await port.wr(0, off, value)
                assert await port.rd(0, off) == before[off], f"RO register {off:#x} changed"
    run(tb)


def test_byte_enable_partial_writes():
    async def tb(ctx, dut, port):
        # byte 0 only: MSE/BME (and parity) set, byte 1 (SERR, INTx disable) untouched
        await port.wr(0, COMMAND, 0xFFFF_FFFF, be=0b0001)
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0x0046
        assert ctx.get(dut.bars.pf_mse) == 1 and ctx.get(dut.fn.bme) & 1 == 1
        await port.wr(0, COMMAND, 0xFFFF_FFFF, be=0b0010)
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0x0546
        await port.wr(0, COMMAND, 0, be=0b0010)
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0x0046
        await port.wr(0, COMMAND, 0, be=0b0000)                # no byte enabled: no change
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0x0046
        # Device Control: clear only the low byte, MRRS in the high byte stays 512 B
        devctl = (await port.rd(0, DEVCTL)) & 0xFFFF
        assert devctl == 0x2810
        assert ctx.get(dut.link.mrrs) == 2
        await port.wr(0, DEVCTL, 0x0000_0020, be=0b0001)        # MPS = 256 B
        assert (await port.rd(0, DEVCTL)) & 0xFFFF == 0x2820
        assert ctx.get(dut.link.mps) == 1 and ctx.get(dut.link.mrrs) == 2
        # BAR0 byte 1 only
        await port.wr(0, BAR0, 0xFFFF_FFFF, be=0b0100)
        assert await port.rd(0, BAR0) == 0x00FF_000C
    run(tb)


def test_num_vfs_limits():
    async def tb(ctx, dut, port):
        await port.wr(0, SRIOV_NUMVFS, TOTAL_VFS + 1)
        assert await port.rd(0, SRIOV_NUMVFS) == 0, "NumVFs above TotalVFs accepted"
        await port.wr(0, SRIOV_NUMVFS, TOTAL_VFS)
        assert await port.rd(0, SRIOV_NUMVFS) == TOTAL_VFS
        await port.wr(0, SRIOV_NUMVFS, 0x0100, be=0b0010)        # high byte would make 0x110
        assert await port.rd(0, SRIOV_NUMVFS) == TOTAL_VFS
        await port.wr(0, SRIOV_NUMVFS, 3)
        await port.wr(0, SRIOV_CTL, 1)
        assert (await port.rd(0, SRIOV_CTL)) & 1 == 1
        await port.wr(0, SRIOV_NUMVFS, 5)
        assert await port.rd(0, SRIOV_NUMVFS) == 3, "NumVFs changed while VF Enable set"
        assert ctx.get(dut.bars.num_vfs) == 3
        await port.wr(0, SRIOV_CTL, 0)
        await port.wr(0, SRIOV_NUMVFS, 5)
        assert await port.rd(0, SRIOV_NUMVFS) == 5
    run(tb)


def test_vf_existence():
    async def tb(ctx, dut, port):
        await port.wr(0, SRIOV_NUMVFS, 3)
        assert [port.exists(f) for f in range(6)] == [1, 0, 0, 0, 0, 0]   # VF Enable = 0
        await port.wr(0, SRIOV_CTL, 1)
        assert [port.exists(f) for f in range(6)] == [1, 1, 1, 1, 0, 0]
        assert port.exists(TOTAL_VFS) == 0 and port.exists(255) == 0
        await port.wr(0, SRIOV_CTL, 0)
        await port.wr(0, SRIOV_NUMVFS, TOTAL_VFS)
        await port.wr(0, SRIOV_CTL, 1)
        assert port.exists(TOTAL_VFS) == 1 and port.exists(TOTAL_VFS + 1) == 0
    run(tb)


def test_vf_ids_and_command():
    async def tb(ctx, dut, port):
        await port.enable_vfs(4)
        assert await port.rd(2, VENDOR) == 0xFFFF_FFFF
        assert await port.rd(2, CLASS) == 0x0200_0001
        assert (await port.rd(2, COMMAND)) & 0xFFFF == 0
        await port.wr(2, COMMAND, 0xFFFF_FFFF)
        cmd = await port.rd(2, COMMAND)
        assert cmd & 0xFFFF == 0x0004, "only Bus Master Enable is writable in a VF"
        assert (cmd >> 16) & (1 << 4)
        assert (ctx.get(dut.fn.bme) >> 2) & 1 == 1
        assert ctx.get(dut.fn.bme) == 0b00100                    # PF and other VFs untouched
        assert (await port.rd(0, COMMAND)) & 0xFFFF == 0
        await port.wr(2, COMMAND, 0x0000, be=0b0010)           # BME lives in byte 0
        assert (await port.rd(2, COMMAND)) & 0xFFFF == 0x0004
        await port.wr(2, COMMAND, 0x0000)
        assert (await port.rd(2, COMMAND)) & 0xFFFF == 0
        # writes to a VF beyond NumVFs go nowhere
        await port.wr(5, COMMAND, 0x4)
        assert ctx.get(dut.fn.bme) == 0
    run(tb)


def test_vf_msix_enable_and_mask_independent():
    async def tb(ctx, dut, port):
        await port.enable_vfs(4)
        await port.wr(2, MSIX, 1 << 31)                         # VF2: enable
        await port.wr(3, MSIX, 1 << 30)                         # VF3: function mask
        await port.wr(1, MSIX, 0xC000_0000, be=0b0111)          # byte 3 not enabled: no-op
        assert (await port.rd(2, MSIX)) >> 30 == 0b10
        assert (await port.rd(3, MSIX)) >> 30 == 0b01
        assert (await port.rd(1, MSIX)) >> 30 == 0b00
        assert (await port.rd(4, MSIX)) >> 30 == 0b00
        assert (await port.rd(0, MSIX)) >> 30 == 0b00
        assert ctx.get(dut.fn.msix_en) == 0b00100
        assert ctx.get(dut.fn.msix_fmask) == 0b01000
        await port.wr(0, MSIX, 0xC000_0000)                     # PF: both
        assert (await port.rd(0, MSIX)) >> 30 == 0b11
        assert ctx.get(dut.fn.msix_en) == 0b00101
        assert ctx.get(dut.fn.msix_fmask) == 0b01001
    run(tb)


def test_clearing_vf_enable_resets_vf_state():
    async def tb(ctx, dut, port):
        await port.enable_vfs(3)
        for f in (1, 2, 3):
            await port.wr(f, COMMAND, 0x4)
            await port.wr(f, MSIX, 0xC000_0000)
        assert ctx.get(dut.fn.bme) == 0b1110
        assert ctx.get(dut.fn.msix_en) == 0b1110
        await port.wr(0, SRIOV_CTL, 0b11000)                    # VF Enable off, VF MSE stays
        assert ctx.get(dut.bars.vf_enable) == 0 and ctx.get(dut.bars.vf_mse) == 1
        assert ctx.get(dut.fn.bme) == 0 and ctx.get(dut.fn.msix_en) == 0
        assert ctx.get(dut.fn.msix_fmask) == 0
        await port.wr(0, SRIOV_CTL, 0b11001)                    # back on: state is reset
        for f in (1, 2, 3):
            assert (await port.rd(f, COMMAND)) & 0xFFFF == 0
            assert (await port.rd(f, MSIX)) >> 30 == 0
        assert ctx.get(dut.fn.bme) == 0 and ctx.get(dut.fn.msix_en) == 0
    run(tb)


def test_reset_strobes_are_registered_one_cycle_pulses():
    """A VF's Initiate FLR gives one ``flr`` strobe the cycle after the config write, and the
    clearing of VF Enable one ``vf_reset`` strobe the cycle after VF Enable falls (both
    registered: the engines they reach sit all over the die)."""
    async def tb(ctx, dut, port):
        p = dut.port

        async def write_and_watch(fidx, off, value, be):
            ctx.set(p.fidx, fidx)
            ctx.set(p.reg, off >> 2)
            ctx.set(p.wdata, value)
            ctx.set(p.be, be)
            ctx.set(p.we, 1)
            seen = []
            for cyc in range(5):
                # sampled before the edge: cycle 0 is the write's own cycle
                seen.append((ctx.get(dut.fn.flr), ctx.get(dut.fn.flr_fidx), ctx.get(dut.fn.vf_reset)))
                await ctx.tick()
                ctx.set(p.we, 0)
            return seen

        await port.enable_vfs(3)
        seen = await write_and_watch(2, DEVCTL, 1 << 15, 0b0010)     # VF 2: Initiate FLR
        assert [s[0] for s in seen] == [0, 1, 0, 0, 0]
        assert seen[1][1] == 2 and not any(s[2] for s in seen)
        seen = await write_and_watch(3, DEVCTL, 1 << 15, 0b0001)     # wrong byte: no FLR
        assert not any(s[0] for s in seen)
        seen = await write_and_watch(0, DEVCTL, 1 << 15, 0b0010)     # the PF: no VF strobe
        assert not any(s[0] for s in seen)
        seen = await write_and_watch(0, SRIOV_CTL, 0b11000, 0b0001)  # VF Enable off
        assert [s[2] for s in seen] == [0, 0, 1, 0, 0]               # after the enable's edge
        assert not any(s[0] for s in seen)
    run(tb)


def test_sriov_control_and_pf_state_outputs():
    async def tb(ctx, dut, port):
        await port.wr(0, SRIOV_CTL, 0xFFFF_FFFF)
        assert (await port.rd(0, SRIOV_CTL)) & 0xFFFF == 0b11001     # VFE, VF MSE, ARI
        assert ctx.get(dut.bars.vf_enable) == 1 and ctx.get(dut.bars.vf_mse) == 1
        await port.wr(0, COMMAND, 0x2)
        assert ctx.get(dut.bars.pf_mse) == 1 and ctx.get(dut.fn.bme) & 1 == 0
    run(tb)


def test_bus_number_capture():
    async def tb(ctx, dut, port):
        assert ctx.get(dut.link.bus_num) == 0
        ctx.set(dut.cap_bus, 0x5A)
        await ctx.tick()
        assert ctx.get(dut.link.bus_num) == 0, "bus captured without the strobe"
        ctx.set(dut.cap_bus_stb, 1)
        await ctx.tick()
        ctx.set(dut.cap_bus_stb, 0)
        ctx.set(dut.cap_bus, 0x33)
        await ctx.tick()
        assert ctx.get(dut.link.bus_num) == 0x5A
    run(tb)
