"""PF BAR2: card identification and the card's error and traffic counters.

Counters are 32-bit and wrap; the byte offsets are in :class:`regmap.MgmtRegs`. The errors are
the completer's (``completer``: malformed, unsupported and poisoned requests, Completer Aborts,
completions that reached it) and the completions that reached one of the card's requesters
without a request of its waiting (``unexp``, one bit per requester); ``errors`` passes all of
them on to the PF's status bits (:mod:`hdl.pcie.config_space`). ``rx_tlp`` / ``tx_tlp`` count
the TLPs in each direction.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from regmap import MgmtRegs as R

from ..config import CardConfig
from ..iface import RegBusSignature, ErrorEvents
from ..pcie.regfile import RegisterFile

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
    def __init__(self, cfg: CardConfig, requesters=1):
        self.cfg = cfg
        super().__init__({
            "bus":       In(RegBusSignature()),
            "completer": In(ErrorEvents()),
            "unexp":     In(requesters),
            "rx_tlp":    In(1),
            "tx_tlp":    In(1),
            "errors":    Out(ErrorEvents()),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        b = self.bus
        for name in ("malformed", "unsupported", "ca", "poisoned"):
            m.d.comb += getattr(self.errors, name).eq(getattr(self.completer, name))
        m.d.comb += self.errors.unexp_cpl.eq(self.completer.unexp_cpl | self.unexp.any())
        events = {**{n: getattr(self.errors, n) for n in ("malformed", "unsupported", "ca",
                                                           "unexp_cpl", "poisoned")},
                  "rx_tlp": self.rx_tlp, "tx_tlp": self.tx_tlp}
        counters = {}
        for name in COUNTERS:
            ctr = counters[name] = Signal(32, name=name)
            with m.If(events[name]):
                m.d.sync += ctr.eq(ctr + 1)

        rf = RegisterFile(m, b, "card")
        rf.read(R.CARD_ID, R.CARD_ID_VALUE)
        rf.read(R.CARD_CONFIG, cfg.total_vfs | ((cfg.data_width // 32) << 16)
                | (cfg.msix_vectors << 24))
        for name, off in COUNTERS.items():
            rf.read(off, counters[name])
        rf.finish()
        return m
