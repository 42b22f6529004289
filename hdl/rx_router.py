"""Receive-side router: requests to the completer, completions to the DMA engine by tag.

The decision is made on the ``sop`` beat and held until ``eop``. Completions with the
descriptor tag go to the queue engine, every other completion to the read channel (which
counts the ones that match no outstanding request of its own).
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream, Dw0, CplDw2, hdr_dw

__all__ = ["RxRouter"]


class RxRouter(wiring.Component):
    def __init__(self, data_width, desc_tag):
        self.desc_tag = desc_tag
        super().__init__({
            "i":     In(tlp_stream(data_width)),
            "req":   Out(tlp_stream(data_width)),
            "cpl_q": Out(tlp_stream(data_width)),
            "cpl_r": Out(tlp_stream(data_width)),
        })

    def elaborate(self, platform):
        m = Module()
        d0 = data.View(Dw0, hdr_dw(self.i.p.hdr, 0))
        d2 = data.View(CplDw2, hdr_dw(self.i.p.hdr, 2))
        is_cpl = (d0.type[1:] == 0b0101) & ((d0.fmt == 0b000) | (d0.fmt == 0b010))
        tag = Cat(d2.tag, d0.tag8, d0.tag9)
        # a beat without sop outside a packet goes to the completer, which counts it malformed;
        # a sop always decides anew (a TLP cut short by the next one ends there)
        dest_now = Mux(is_cpl & self.i.p.sop, Mux(tag == self.desc_tag, 1, 2), 0)
        in_pkt = Signal()
        dest_q = Signal(2)
        dest = Mux(in_pkt & ~self.i.p.sop, dest_q, dest_now)
        outs = [self.req, self.cpl_q, self.cpl_r]
        for k, o in enumerate(outs):
            m.d.comb += [o.p.eq(self.i.p), o.valid.eq(self.i.valid & (dest == k))]
        m.d.comb += self.i.ready.eq(Array(o.ready for o in outs)[dest])
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [in_pkt.eq(~self.i.p.eop), dest_q.eq(dest)]
        return m
