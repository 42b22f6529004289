"""Packet-granular round-robin arbiter for TLP streams.

A grant is taken when a source first offers a beat and held until its ``eop`` beat has moved,
so TLPs from different sources never interleave and a stalled beat never changes. The output is combinational from the granted
input (no added latency); a source that is not granted sees ``ready`` low.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream

__all__ = ["TlpArbiter"]


class TlpArbiter(wiring.Component):
    def __init__(self, n, data_width):
        self.n = n
        members = {f"i{k}": In(tlp_stream(data_width)) for k in range(n)}
        members["o"] = Out(tlp_stream(data_width))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        n = self.n
        ins = [getattr(self, f"i{k}") for k in range(n)]
        locked = Signal()
        grant = Signal(range(max(n, 2)))
        last = Signal(range(max(n, 2)))

        # round-robin choice among valid inputs, starting after the last winner
        pick = Signal(range(max(n, 2)))
        any_valid = Signal()
        for off in reversed(range(n)):
            for k in range(n):
                cond = (last == k) & ins[(k + 1 + off) % n].valid
                with m.If(cond):
                    m.d.comb += [pick.eq((k + 1 + off) % n), any_valid.eq(1)]

        cur = Mux(locked, grant, pick)
        with m.Switch(cur):
            for k in range(n):
                with m.Case(k):
                    m.d.comb += [
                        self.o.p.eq(ins[k].p),
                        self.o.valid.eq(ins[k].valid),
                        ins[k].ready.eq(self.o.ready),
                    ]

        # The grant holds inside a packet (sop moved, eop not yet) and while an offered beat
        # is stalled, so TLPs never interleave and a stalled beat never changes. A source that
        # withdraws a beat before it moved (MSI-X does, when the vector gets masked meanwhile)
        # releases the grant.
        in_pkt = Signal()
        xfer = self.o.valid & self.o.ready
        in_pkt_next = Mux(xfer, ~self.o.p.eop, in_pkt)
        m.d.sync += [in_pkt.eq(in_pkt_next), locked.eq(in_pkt_next | (self.o.valid & ~self.o.ready)),
                     grant.eq(cur)]
        with m.If(xfer & self.o.p.eop):
            m.d.sync += last.eq(cur)
        return m
