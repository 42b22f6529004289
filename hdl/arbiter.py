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

        # The grant holds from the first beat offered until the eop beat has moved: a stalled
        # beat keeps its source (stream rule: valid payload holds until it is taken).
        with m.If(self.o.valid & self.o.ready & self.o.p.eop):
            m.d.sync += [locked.eq(0), last.eq(cur)]
        with m.Elif(self.o.valid):
            m.d.sync += [locked.eq(1), grant.eq(cur)]
        return m
