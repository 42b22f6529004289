"""Unit tests of hdl.pcie.func_regs.FuncRegisters and hdl.pcie.msix.MsixController (register bus +
interrupt request in, MSI-X memory writes out)."""

import pytest
from hdl.config import CardConfig
from hdl.pcie.func_regs import FuncRegisters
from hdl.pcie.msix import MsixController
from hdl.pcie.tlp import TlpKind
from helpers import run_sim, RegBus, collect_beats, hdr_dws

from regmap import FuncRegs as R, Bar0Map

CFG = CardConfig(total_vfs=4, msix_vectors=4)
NF = CFG.num_functions
TBL, PBA = Bar0Map.MSIX_TABLE, Bar0Map.MSIX_PBA


# ---- FuncRegisters -----------------------------------------------------------------------

def run_fr(tb, cfg=CFG):
    dut = FuncRegisters(cfg)

    async def bench(ctx):
        await tb(ctx, dut, RegBus(ctx, dut.bus))
    run_sim(dut, bench)


def test_func_regs_id_and_version():
    async def tb(ctx, dut, bus):
        assert await bus.rd(0, R.ID) == 0xC0DE_0000
        assert await bus.rd(3, R.ID) == 0xC0DE_8003
        assert await bus.rd(4, R.VERSION) == R.VERSION_VALUE
        await bus.wr(3, R.ID, 0x1234_5678)                    # RO
        assert await bus.rd(3, R.ID) == 0xC0DE_8003
        assert await bus.rd(0, R.ID, bar=2) == 0              # other BAR: not addressed
        assert await bus.rd(0, 0x400 + R.ID) == 0             # beyond the first KiB
        assert await bus.rd(0, Bar0Map.MSIX_TABLE) == 0
    run_fr(tb)


def test_func_regs_scratch_per_function_with_byte_enables():
    async def tb(ctx, dut, bus):
        for f in range(NF):
            await bus.wr(f, R.SCRATCH, 0x1111_1111 * (f + 1))
        for f in range(NF):
            assert await bus.rd(f, R.SCRATCH) == 0x1111_1111 * (f + 1)
        await bus.wr(2, R.SCRATCH, 0xAABB_CCDD, be=0b0101)
        assert await bus.rd(2, R.SCRATCH) == 0x33BB_33DD
        assert await bus.rd(1, R.SCRATCH) == 0x2222_2222
        await bus.wr(2, R.SCRATCH, 0, bar=2)                  # wrong BAR: ignored
        await bus.wr(2, 0x400 + R.SCRATCH, 0)                 # alias outside window: ignored
        assert await bus.rd(2, R.SCRATCH) == 0x33BB_33DD
        # a read of another register right after a scratch read returns that register
        assert await bus.rd(2, R.VERSION) == R.VERSION_VALUE
    run_fr(tb)


def test_func_regs_irq_strobe():
    async def tb(ctx, dut, bus):
        b = dut.bus

        async def write_irq(fidx, value, be=0xF, bar=0, off=R.IRQ):
            ctx.set(b.fidx, fidx)
            ctx.set(b.bar, bar)
            ctx.set(b.addr, off >> 2)
            ctx.set(b.wdata, value)
            ctx.set(b.be, be)
            ctx.set(b.we, 1)
            seen = (ctx.get(dut.irq.valid), ctx.get(dut.irq.fidx), ctx.get(dut.irq.vector))
            await ctx.tick()
            ctx.set(b.we, 0)
            assert ctx.get(dut.irq.valid) == 0, "strobe longer than the write"
            return seen

        assert ctx.get(dut.irq.valid) == 0
        assert await write_irq(3, 2) == (1, 3, 2)
        assert await write_irq(0, CFG.msix_vectors - 1) == (1, 0, CFG.msix_vectors - 1)
        assert (await write_irq(1, CFG.msix_vectors))[0] == 0     # no such vector
        assert (await write_irq(1, 1, be=0b1110))[0] == 0          # byte 0 not written
        assert (await write_irq(1, 1, bar=2))[0] == 0
        assert (await write_irq(1, 1, off=R.SCRATCH))[0] == 0
        ctx.set(b.re, 1)                                          # reads never strobe
        ctx.set(b.addr, R.IRQ >> 2)
        assert ctx.get(dut.irq.valid) == 0
        await ctx.tick()
    run_fr(tb)


def test_func_regs_irq_out_of_range_value_does_not_alias():
    """Writing N requests vector N: N = 0x100 or 0x8000_0002 is no vector of a 4-vector
    function and must be ignored like N = 4, not alias to vector 0 / 2 (only wdata[7:0] is
    compared today)."""
    async def tb(ctx, dut, bus):
        b = dut.bus
        got = []
        for value in (0x100, 0x8000_0002):
            ctx.set(b.fidx, 1)
            ctx.set(b.bar, 0)
            ctx.set(b.addr, R.IRQ >> 2)
            ctx.set(b.wdata, value)
            ctx.set(b.be, 0xF)
            ctx.set(b.we, 1)
            got.append((value, ctx.get(dut.irq.valid), ctx.get(dut.irq.vector)))
            await ctx.tick()
            ctx.set(b.we, 0)
        assert [g for g in got if g[1]] == [], f"out-of-range IRQ writes fired: {got}"
    run_fr(tb)


# ---- MsixController ----------------------------------------------------------------------

def entry(vec, dw):
    return TBL + 16 * vec + 4 * dw


class Msix:
    def __init__(self, ctx, dut):
        self.ctx, self.dut = ctx, dut
        self.bus = RegBus(ctx, dut.bus)

    def state(self, bme=None, en=None, fmask=None, bus_num=None):
        for sig, v in ((self.dut.fn.bme, bme), (self.dut.fn.msix_en, en),
                       (self.dut.fn.msix_fmask, fmask), (self.dut.link.bus_num, bus_num)):
            if v is not None:
                self.ctx.set(sig, v)

    async def irq(self, fidx, vector):
        ctx, d = self.ctx, self.dut
        ctx.set(d.irq_func.valid, 1)
        ctx.set(d.irq_func.fidx, fidx)
        ctx.set(d.irq_func.vector, vector)
        await ctx.tick()
        ctx.set(d.irq_func.valid, 0)

    async def program(self, fidx, vec, addr, data, masked=False):
        await self.bus.wr(fidx, entry(vec, 0), addr & 0xFFFF_FFFF)
        await self.bus.wr(fidx, entry(vec, 1), addr >> 32)
        await self.bus.wr(fidx, entry(vec, 2), data)
        await self.bus.wr(fidx, entry(vec, 3), int(masked))

    async def pba(self, fidx):
        return await self.bus.rd(fidx, PBA)


def run_mx(tb, cfg=CFG):
    dut = MsixController(cfg)

    async def bench(ctx):
        await tb(ctx, dut, Msix(ctx, dut))
    run_sim(dut, bench)


def check_msg(beat, fidx, bus_num, addr, data):
    d0, d1, d2, d3 = hdr_dws(beat["hdr"])
    is64 = (addr >> 32) != 0
    assert d0 >> 24 == (TlpKind.MWR64 if is64 else TlpKind.MWR32)
    assert d0 & 0x3FF == 1, "MSI-X message must be a 1-DW write"
    assert (d0 >> 10) & 0x3FFF == 0                       # TC, attr, TD, EP, tags all 0
    assert d1 & 0xFF == 0x0F, "first BE 0xF, last BE 0"
    assert d1 >> 16 == (bus_num << 8) | fidx, "requester ID must be {bus, function}"
    if is64:
        assert (d2, d3) == (addr >> 32, addr & 0xFFFF_FFFC)
    else:
        assert (d2, d3) == (addr & 0xFFFF_FFFC, 0)
    assert beat["data"] & 0xFFFF_FFFF == data and beat["strb"] == 1
    assert beat["sop"] == 1 and beat["eop"] == 1


def test_msix_table_reset_masked_and_rw_with_byte_enables():
    async def tb(ctx, dut, mx):
        for f in (0, NF - 1):
            for v in range(CFG.msix_vectors):
                got = [await mx.bus.rd(f, entry(v, dw)) for dw in range(4)]
                assert got == [0, 0, 0, 1], f"entry {f}/{v} not reset masked: {got}"
        await mx.bus.wr(1, entry(2, 0), 0xFEE0_1234)
        await mx.bus.wr(1, entry(2, 2), 0xAABB_CCDD, be=0b1001)
        await mx.bus.wr(1, entry(2, 2), 0x0011_2200, be=0b0110)
        assert await mx.bus.rd(1, entry(2, 0)) == 0xFEE0_1234
        assert await mx.bus.rd(1, entry(2, 2)) == 0xAA11_22DD
        assert await mx.bus.rd(2, entry(2, 0)) == 0, "tables of functions not independent"
        assert await mx.bus.rd(1, entry(1, 0)) == 0
        assert await mx.bus.rd(1, entry(2, 0), bar=2) == 0
        assert await mx.bus.rd(1, PBA) == 0
    run_mx(tb)


@pytest.mark.parametrize("addr", [0xFEE0_1004, 0x0000_0012_3456_7800])
def test_msix_message_after_unmask(addr):
    async def tb(ctx, dut, mx):
        mx.state(bme=0b00100, en=0b00100, fmask=0, bus_num=0x3C)
        await mx.program(2, 1, addr, 0xDEAD_0001, masked=True)
        await mx.irq(2, 1)
        assert await mx.pba(2) == 0b0010, "PBA bit not set for a masked vector"
        assert await collect_beats(ctx, dut.tx, 30) == [], "message sent while masked"
        assert await mx.pba(2) == 0b0010
        await mx.bus.wr(2, entry(1, 3), 0)                      # unmask
        beats = await collect_beats(ctx, dut.tx, 30)
        assert len(beats) == 1
        check_msg(beats[0], 2, 0x3C, addr, 0xDEAD_0001)
        assert await mx.pba(2) == 0, "PBA bit not cleared after the message"
        assert await collect_beats(ctx, dut.tx, 30) == []
    run_mx(tb)


def test_msix_unmasked_vector_sends_once_per_request_with_sent_strobe():
    async def tb(ctx, dut, mx):
        mx.state(bme=0b1, en=0b1, fmask=0, bus_num=0x01)
        await mx.program(0, 0, 0xFEE0_0000, 0x40)
        await mx.program(0, 3, 0xFEE0_0010, 0x43)
        await mx.irq(0, 3)
        await mx.irq(0, 0)
        ctx.set(dut.tx.ready, 1)
        beats, sent = [], 0
        for _ in range(60):
            if ctx.get(dut.tx.valid):
                beats.append(ctx.get(dut.tx.p.data) & 0xFFFF_FFFF)
            sent += ctx.get(dut.sent)
            await ctx.tick()
        assert sorted(beats) == [0x40, 0x43] and sent == 2
        check_ok = await mx.pba(0)
        assert check_ok == 0
    run_mx(tb)


def test_msix_no_message_when_disabled_or_no_bus_master():
    async def tb(ctx, dut, mx):
        await mx.program(1, 0, 0xFEE0_0000, 0x11)
        await mx.program(3, 0, 0xFEE0_0000, 0x33)
        # MSI-X disabled: the request is dropped, not even pending
        mx.state(bme=0b11111, en=0b00000, fmask=0, bus_num=0)
        await mx.irq(1, 0)
        assert await mx.pba(1) == 0
        mx.state(en=0b11111)
        assert await collect_beats(ctx, dut.tx, 30) == []
        # BME clear: pending, held until Bus Master Enable is set
        mx.state(bme=0b10111)
        await mx.irq(3, 0)
        assert await collect_beats(ctx, dut.tx, 30) == []
        assert await mx.pba(3) == 1
        # function mask: same
        mx.state(fmask=0b01000, bme=0b11111)
        assert await collect_beats(ctx, dut.tx, 30) == []
        mx.state(fmask=0)
        beats = await collect_beats(ctx, dut.tx, 30)
        assert len(beats) == 1
        check_msg(beats[0], 3, 0, 0xFEE0_0000, 0x33)
    run_mx(tb)


def test_msix_backpressure_holds_message():
    async def tb(ctx, dut, mx):
        mx.state(bme=0b10, en=0b10, fmask=0, bus_num=0x7)
        await mx.program(1, 2, 0xFEE0_0ABC, 0x5555)
        await mx.irq(1, 2)
        ctx.set(dut.tx.ready, 0)
        await ctx.tick().repeat(20)
        assert ctx.get(dut.tx.valid) == 1
        assert await mx.pba(1) == 0b100, "pending cleared before the message moved"
        beats = await collect_beats(ctx, dut.tx, 20)
        assert len(beats) == 1
        check_msg(beats[0], 1, 0x7, 0xFEE0_0ABC, 0x5555)
    run_mx(tb)
