"""Top level of the card: the PCIe transaction-layer endpoint and what hangs off it.

::

    rx ──► Completer ──┬─► ConfigSpace (PF + VFs)         ┌───────────┐
                       ├─► BarDecoder                     │ TlpArbiter├──► tx
                       ├─► register bus ─┬─ FuncRegisters ─ irq ─► MsixController ─┤
                       │                 ├─ MsixController (tables, PBA)           │
                       │                 └─ MgmtRegisters (PF BAR2)                │
                       └─► completions ─────────────────────────────────────────────┘
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .params import CardConfig
from .tlp import tlp_stream
from .config_space import ConfigSpace
from .bar_decode import BarDecoder
from .request import Completer
from .func_regs import FuncRegisters
from .msix import MsixController
from .mgmt_regs import MgmtRegisters
from .arbiter import TlpArbiter

__all__ = ["Card"]


class Card(wiring.Component):
    """The offload card. Ports: ``rx`` (TLPs from the host), ``tx`` (TLPs to the host)."""

    def __init__(self, cfg: CardConfig = CardConfig()):
        self.cfg = cfg
        super().__init__({
            "rx": In(tlp_stream(cfg.data_width)),
            "tx": Out(tlp_stream(cfg.data_width)),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        m.submodules.cfgspace = cs = ConfigSpace(cfg)
        m.submodules.bardec = bd = BarDecoder(cfg)
        m.submodules.completer = cp = Completer(cfg)
        m.submodules.funcregs = fr = FuncRegisters(cfg)
        m.submodules.msix = mx = MsixController(cfg)
        m.submodules.mgmt = mg = MgmtRegisters(cfg)
        m.submodules.txarb = arb = TlpArbiter(2, cfg.data_width)

        wiring.connect(m, wiring.flipped(self.rx), cp.rx)
        wiring.connect(m, cp.cfg, cs.port)
        wiring.connect(m, cp.bar, bd.lookup)
        m.d.comb += [
            cs.cap_bus_stb.eq(cp.cap_bus_stb),
            cs.cap_bus.eq(cp.cap_bus),
            cp.bus_num.eq(cs.bus_num),
            bd.pf_mse.eq(cs.pf_mse),
            bd.pf_bar0.eq(cs.pf_bar0),
            bd.pf_bar2.eq(cs.pf_bar2),
            bd.vf_enable.eq(cs.vf_enable),
            bd.vf_mse.eq(cs.vf_mse),
            bd.num_vfs.eq(cs.num_vfs),
            bd.vf_bar0.eq(cs.vf_bar0),
            bd.vf_shift.eq(cs.vf_shift),
            mx.bus_num.eq(cs.bus_num),
            mx.bme.eq(cs.bme),
            mx.msix_en.eq(cs.msix_en),
            mx.msix_fmask.eq(cs.msix_fmask),
        ]

        # register bus: broadcast the request, OR the read data
        targets = [fr.bus, mx.bus, mg.bus]
        for t in targets:
            m.d.comb += [t.fidx.eq(cp.regs.fidx), t.bar.eq(cp.regs.bar), t.addr.eq(cp.regs.addr),
                         t.wdata.eq(cp.regs.wdata), t.be.eq(cp.regs.be), t.we.eq(cp.regs.we),
                         t.re.eq(cp.regs.re)]
        rdata = 0
        for t in targets:
            rdata = rdata | t.rdata
        m.d.comb += cp.regs.rdata.eq(rdata)

        wiring.connect(m, fr.irq, mx.irq)
        wiring.connect(m, cp.events, mg.events)
        m.d.comb += mg.events.tx_tlp.eq(self.tx.valid & self.tx.ready & self.tx.p.sop)

        wiring.connect(m, cp.tx, arb.i0)
        wiring.connect(m, mx.tx, arb.i1)
        wiring.connect(m, arb.o, wiring.flipped(self.tx))
        return m
