"""PF BAR2: card identification and the completer's error / traffic counters.

Counters are 32-bit and wrap. The byte offsets are in :class:`regmap.MgmtRegs`.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from regmap import MgmtRegs as R

from ..config import CardConfig
from ..iface import RegBusSignature, CounterEvents

__all__ = ["MgmtRegisters", "COUNTERS"]

# event name -> register byte offset
COUNTERS = {
    "malformed":   R.ERR_MALFORMED,
    "unsupported": R.ERR_UNSUPPORTED,
    "ca":          R.ERR_CA,
    "unexp_cpl":   R.ERR_UNEXP_CPL,
    "poisoned":    R.ERR_POISONED,
    "rx_tlp":      R.RX_TLPS,
    "tx_tlp":      R.TX_TLPS,
}


class MgmtRegisters(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self.cfg = cfg
        super().__init__({
            "bus": In(RegBusSignature()),
            "events": In(CounterEvents()),
            "counters": Out(wiring.Signature({n: Out(32) for n in COUNTERS})),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        b = self.bus
        for name in COUNTERS:
            ctr = getattr(self.counters, name)
            with m.If(getattr(self.events, name)):
                m.d.sync += ctr.eq(ctr + 1)

        sel = (b.fidx == 0) & (b.bar == 2)
        rdata = Signal(32)
        with m.If(b.re):
            m.d.sync += rdata.eq(0)
            with m.If(sel):
                with m.Switch(b.addr):
                    with m.Case(R.CARD_ID // 4):
                        m.d.sync += rdata.eq(R.CARD_ID_VALUE)
                    with m.Case(R.CARD_CONFIG // 4):
                        m.d.sync += rdata.eq(cfg.total_vfs | ((cfg.data_width // 32) << 16)
                                             | (cfg.msix_vectors << 24))
                    for name, off in COUNTERS.items():
                        with m.Case(off // 4):
                            m.d.sync += rdata.eq(getattr(self.counters, name))
        m.d.comb += b.rdata.eq(rdata)
        return m
