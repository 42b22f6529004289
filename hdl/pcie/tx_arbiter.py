"""Packet-granular round-robin arbiter for TLP streams, with a registered grant and output.

Every source's ``valid`` and ``payload`` end at a register here, so no path runs from one
source's logic through the arbiter into another's (the card's longest paths did, before):

* **grant**: a register, chosen round robin (starting after the current grant) from the
  sources' ``valid`` and effective the next cycle. It is held from the first beat to the
  ``eop`` beat, so TLPs from different sources never interleave. At the ``eop`` beat the next
  grant is chosen in the same cycle, so packets stream back to back without a bubble.
* **parking**: with no other source valid the grant stays where it is, so a source that pauses
  between its packets (or the last one to send) goes on without waiting for a new grant. A
  granted source that is not offering a first beat gives the grant up as soon as another source
  is valid (MSI-X withdraws a beat when the vector gets masked meanwhile); inside a packet a
  source may pause and keeps it.
* **output**: one pipeline register (``o.valid``/``o.p`` are flip-flops; ``o_src`` says which
  source the beat came from). A source sees
  ``ready`` when it holds the grant and the register is empty or moving; a held beat never
  changes. Latency: one cycle for the granted source, two for another one, then one beat per
  cycle.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream

__all__ = ["TlpArbiter"]


class TlpArbiter(wiring.Component):
    """``sources``: the names of the inputs (``i_<name>``), or their number (``i<k>``); the
    round robin follows their order."""

    def __init__(self, sources, data_width):
        if isinstance(sources, int):
            self.ports = tuple(f"i{k}" for k in range(sources))
        else:
            self.ports = tuple(f"i_{name}" for name in sources)
        self.n = len(self.ports)
        members = {name: In(tlp_stream(data_width)) for name in self.ports}
        members["o"] = Out(tlp_stream(data_width))
        members["tx_tlp"] = Out(1)        # strobe: a TLP went out (its first beat moved)
        members["o_src"] = Out(range(max(self.n, 2)))   # the source of the beat on ``o``
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        n = self.n
        ins = [getattr(self, name) for name in self.ports]
        grant = Signal(range(max(n, 2)))     # the granted source (parked when idle)
        in_pkt = Signal()                    # the granted packet's first beat has moved

        # round-robin choice among valid inputs, starting after the current grant: one
        # priority encoder per grant value, selected by the grant (not one long if-chain)
        pick = Signal.like(grant)
        any_valid = Signal()
        m.d.comb += any_valid.eq(Cat(i.valid for i in ins).any())
        with m.Switch(grant):
            for k in range(n):
                with m.Case(k):
                    for off in reversed(range(n)):
                        with m.If(ins[(k + 1 + off) % n].valid):
                            m.d.comb += pick.eq((k + 1 + off) % n)

        cur_valid = Signal()
        cur_p = Signal.like(self.o.p)
        out_free = Signal()
        take = Signal()
        m.d.comb += [out_free.eq(~self.o.valid | self.o.ready),
                     take.eq(cur_valid & out_free)]
        with m.Switch(grant):
            for k in range(n):
                with m.Case(k):
                    m.d.comb += [cur_valid.eq(ins[k].valid), cur_p.eq(ins[k].p),
                                 ins[k].ready.eq(out_free)]

        # the held beat is data: only o.valid is reset
        p_q = Signal.like(self.o.p, name="p_q", reset_less=True)
        m.d.comb += self.o.p.eq(p_q)
        with m.If(take):
            m.d.sync += [p_q.eq(cur_p), self.o.valid.eq(1), self.o_src.eq(grant),
                         in_pkt.eq(~cur_p.eop)]
        with m.Elif(self.o.ready):
            m.d.sync += self.o.valid.eq(0)

        # a new grant at the end of a packet, or away from a source not offering a first beat
        rearb = (take & cur_p.eop) | (~in_pkt & ~cur_valid)
        with m.If(rearb & any_valid):
            m.d.sync += grant.eq(pick)
        m.d.comb += self.tx_tlp.eq(self.o.valid & self.o.ready & self.o.p.sop)
        return m
