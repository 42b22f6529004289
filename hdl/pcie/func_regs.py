"""Per-function register file at BAR0 + 0x000 of the PF and of every VF.

==== ======== ===========================================================================
0x00 ID       RO  ``0xC0DE << 16 | is_vf << 15 | function index``
0x04 VERSION  RO  design version
0x08 SCRATCH  RW  one word per function (block RAM), byte enables honoured
0x0C IRQ      WO  writing N asks the MSI-X block for vector N of this function
==== ======== ===========================================================================
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from regmap import FuncRegs as R

from ..config import CardConfig
from ..iface import RegBusSignature, IrqRequestSignature

__all__ = ["FuncRegisters"]


class FuncRegisters(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self.cfg = cfg
        super().__init__({
            "bus": In(RegBusSignature()),
            "irq": Out(IrqRequestSignature()),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        b = self.bus
        m.submodules.scratch = scratch = Memory(shape=32, depth=cfg.num_functions, init=[])
        rd = scratch.read_port()
        wp = scratch.write_port(granularity=8)

        sel = (b.bar == 0) & (b.addr[8:] == 0)      # first 1 KiB of BAR0
        reg = b.addr[:8]
        m.d.comb += [
            rd.addr.eq(b.fidx), rd.en.eq(b.re),
            wp.addr.eq(b.fidx), wp.data.eq(b.wdata),
        ]
        with m.If(b.we & sel & (reg == R.SCRATCH // 4)):
            m.d.comb += wp.en.eq(b.be)

        with m.If(b.we & sel & (reg == R.IRQ // 4) & b.be[0] & (b.wdata < cfg.msix_vectors)):
            m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(b.fidx),
                         self.irq.vector.eq(b.wdata[:5])]

        rd_const = Signal(32)
        rd_scratch = Signal()
        with m.If(b.re):
            m.d.sync += [rd_const.eq(0), rd_scratch.eq(0)]
            with m.If(sel):
                with m.Switch(reg):
                    with m.Case(R.ID // 4):
                        m.d.sync += rd_const.eq(Cat(b.fidx, C(0, 7), b.fidx != 0, C(R.ID_MAGIC, 16)))
                    with m.Case(R.VERSION // 4):
                        m.d.sync += rd_const.eq(R.VERSION_VALUE)
                    with m.Case(R.SCRATCH // 4):
                        m.d.sync += rd_scratch.eq(1)
        m.d.comb += b.rdata.eq(Mux(rd_scratch, rd.data, rd_const))
        return m
