"""Packet-granular round-robin arbiter for TLP streams, with a registered grant and output.

Every source's ``valid`` and ``payload`` end at a register here, so no path runs from one
source's logic through the arbiter into another's (the card's longest paths did, before):

* **grant**: a register, chosen round robin (starting after the previous grant) from the
  sources' ``valid`` and effective the next cycle. It is held from the first beat to the
  ``eop`` beat, so TLPs from different sources never interleave. At the ``eop`` beat the next
  grant is chosen in the same cycle, so packets stream back to back without a bubble.
* **release**: a granted source that withdraws its beat before the first one moved (MSI-X does,
  when the vector gets masked meanwhile) gives the grant up; inside a packet a source may pause
  (``valid`` low) and keeps it.
* **output**: one pipeline register (``o.valid``/``o.p`` are flip-flops). A source sees
  ``ready`` when it holds the grant and the register is empty or moving; a held beat never
  changes. Latency: two cycles from a source's first ``valid`` to ``o.valid`` when idle, then
  one beat per cycle.
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
        grant = Signal(range(max(n, 2)))     # the granted source, or the last one when idle
        active = Signal()                    # ``grant`` holds a source now
        in_pkt = Signal()                    # the granted packet's first beat has moved

        # round-robin choice among valid inputs, starting after the current/last grant
        pick = Signal.like(grant)
        any_valid = Signal()
        for off in reversed(range(n)):
            for k in range(n):
                with m.If((grant == k) & ins[(k + 1 + off) % n].valid):
                    m.d.comb += [pick.eq((k + 1 + off) % n), any_valid.eq(1)]

        cur_valid = Signal()
        cur_p = Signal.like(self.o.p)
        out_free = Signal()
        take = Signal()
        m.d.comb += [out_free.eq(~self.o.valid | self.o.ready),
                     take.eq(active & cur_valid & out_free)]
        with m.Switch(grant):
            for k in range(n):
                with m.Case(k):
                    m.d.comb += [cur_valid.eq(ins[k].valid), cur_p.eq(ins[k].p),
                                 ins[k].ready.eq(active & out_free)]

        with m.If(take):
            m.d.sync += [self.o.p.eq(cur_p), self.o.valid.eq(1),
                         in_pkt.eq(~cur_p.eop)]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        rearb = ~active | (take & cur_p.eop) | (~in_pkt & ~cur_valid)
        with m.If(rearb):
            m.d.sync += [grant.eq(pick), active.eq(any_valid)]
        return m
