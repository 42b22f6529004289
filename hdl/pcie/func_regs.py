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
from .regfile import RegisterFile

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

        rf = RegisterFile(m, b, "func")
        m.d.comb += [
            rd.addr.eq(b.fidx), rd.en.eq(b.re),
            wp.addr.eq(b.fidx), wp.data.eq(b.wdata),
        ]
        with m.If(rf.we(R.SCRATCH, full=False)):
            m.d.comb += wp.en.eq(b.be)

        with m.If(rf.we(R.IRQ, full=False) & b.be[0] & (b.wdata < cfg.msix_vectors)):
            m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(b.fidx),
                         self.irq.vector.eq(b.wdata[:5])]

        rf.read(R.ID, Cat(b.fidx, C(0, 7), b.fidx != 0, C(R.ID_MAGIC, 16)))
        rf.read(R.VERSION, R.VERSION_VALUE)
        rf.read_late(R.SCRATCH, rd.data)            # the scratch RAM's word, a cycle later
        rf.finish()
        return m
