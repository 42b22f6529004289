"""hdl.pcie.regfile.RegisterFile: window decode from regmap's table, registered and late reads,
write strobes, and the errors it gives for a register outside its windows."""

import pytest
from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In

from hdl.iface import RegBusSignature
from hdl.pcie.regfile import RegisterFile
from helpers import run_sim, RegBus
from regmap import FuncRegs as R, DmaRegs, IommuRegs


class Toy(wiring.Component):
    """A register file over the "func" window (every function) with a RAM-backed register."""

    def __init__(self):
        super().__init__({"bus": In(RegBusSignature())})

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        m.submodules.ram = ram = Memory(shape=32, depth=4, init=[0x100, 0x101, 0x102, 0x103])
        rd = ram.read_port()
        m.d.comb += [rd.addr.eq(b.fidx), rd.en.eq(b.re)]
        rf = RegisterFile(m, b, "func")
        reg = Signal(32)
        with m.If(rf.we(R.SCRATCH)):
            m.d.sync += reg.eq(rf.wdata)
        rf.read(R.SCRATCH, reg)
        rf.read(R.ID, Cat(b.fidx, C(0xAB, 8)))
        rf.read_late(R.VERSION, rd.data)
        rf.finish()
        return m


def test_reads_writes_and_decode():
    dut = Toy()

    async def tb(ctx):
        bus = RegBus(ctx, dut.bus)
        assert await bus.rd(2, R.ID) == 0xAB02
        assert ctx.get(dut.bus.rdata) == 0xAB02            # held until the next read
        await bus.wr(1, R.SCRATCH, 0xCAFE)
        assert await bus.rd(0, R.SCRATCH) == 0xCAFE
        await bus.wr(1, R.SCRATCH, 0x1111, be=0x3)        # partial write: not a full DW
        assert await bus.rd(0, R.SCRATCH) == 0xCAFE
        await bus.wr(1, R.SCRATCH, 0x2222, bar=2)         # another BAR: not ours
        assert await bus.rd(0, R.SCRATCH) == 0xCAFE
        assert await bus.rd(0, R.SCRATCH, bar=2) == 0
        assert await bus.rd(0, DmaRegs.PROD) == 0          # another window of BAR0
        # a late register: the RAM's word for the function, the cycle after re
        ctx.set(dut.bus.fidx, 3)
        ctx.set(dut.bus.addr, R.VERSION // 4)
        ctx.set(dut.bus.bar, 0)
        ctx.set(dut.bus.re, 1)
        await ctx.tick()
        ctx.set(dut.bus.re, 0)
        assert ctx.get(dut.bus.rdata) == 0x103
        await ctx.tick()
        assert ctx.get(dut.bus.rdata) == 0                 # only in the cycle after re
    run_sim(dut, tb)


def test_pf_only_window_ignores_vfs():
    class PfToy(wiring.Component):
        def __init__(self):
            super().__init__({"bus": In(RegBusSignature())})

        def elaborate(self, platform):
            m = Module()
            rf = RegisterFile(m, self.bus, "iommu")
            rf.read(IommuRegs.ATC_HITS, 0x55)
            rf.finish()
            return m
    dut = PfToy()

    async def tb(ctx):
        bus = RegBus(ctx, dut.bus)
        assert await bus.rd(0, IommuRegs.ATC_HITS, bar=2) == 0x55
        assert await bus.rd(1, IommuRegs.ATC_HITS, bar=2) == 0
    run_sim(dut, tb)


def test_errors_name_the_problem():
    m = Module()
    m._MustUse__silence = True             # (never elaborated: only the helper's checks run)
    bus = RegBusSignature().create()
    with pytest.raises(ValueError, match="one BAR"):
        RegisterFile(m, bus, "func", "iommu")
    with pytest.raises(KeyError, match="no register window"):
        RegisterFile(m, bus, "nowhere")
    rf = RegisterFile(m, bus, "func")
    with pytest.raises(ValueError, match="outside"):
        rf.read(DmaRegs.PROD, 0)
