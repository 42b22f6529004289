"""Receive-side router: requests to the completer, completions to their requester by tag.

The decision is made on the ``sop`` beat and held until ``eop``. The card's engines that read
host memory one request at a time each own a fixed tag (``routes``, by name: the table is
:data:`hdl.pcie.host_port.CPL_ROUTES`; a block with several such ports owns a tuple of tags); a
completion with one of those tags goes to ``cpl_<name>``, every other completion to the DMA read
channel (``cpl_dma``, which counts the ones that match no outstanding request of its own).

The router is one pipeline register: the beat and its destination are registered, so every
consumer's logic starts at a flip-flop instead of at the header decode (one cycle of latency;
a full register moves on when its consumer is ready, so the stream runs at one beat a cycle).
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream, Dw0, CplDw2, hdr_dw

__all__ = ["RxRouter"]


class RxRouter(wiring.Component):
    def __init__(self, data_width, routes):
        self.routes = {name: (t,) if isinstance(t, int) else tuple(t)
                       for name, t in dict(routes).items()}
        tags = [t for ts in self.routes.values() for t in ts]
        if len(set(tags)) != len(tags) or not all(self.routes.values()):
            raise ValueError(f"two routes share a tag, or a route has none: {routes}")
        members = {"i": In(tlp_stream(data_width)), "req": Out(tlp_stream(data_width))}
        for name in self.routes:
            members[f"cpl_{name}"] = Out(tlp_stream(data_width))
        members["cpl_dma"] = Out(tlp_stream(data_width))
        members["rx_tlp"] = Out(1)        # strobe: a TLP came in (its first beat was taken)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        d0 = data.View(Dw0, hdr_dw(self.i.p.hdr, 0))
        d2 = data.View(CplDw2, hdr_dw(self.i.p.hdr, 2))
        is_cpl = (d0.type[1:] == 0b0101) & ((d0.fmt == 0b000) | (d0.fmt == 0b010))
        tag = Cat(d2.tag, d0.tag8, d0.tag9)
        outs = [self.req] + [getattr(self, f"cpl_{n}") for n in self.routes] + [self.cpl_dma]
        # a beat without sop outside a packet goes to the completer, which counts it malformed;
        # a sop always decides anew (a TLP cut short by the next one ends there)
        by_tag = len(outs) - 1
        for n, ts in reversed(list(enumerate(self.routes.values()))):
            for t in ts:
                by_tag = Mux(tag == t, n + 1, by_tag)
        dest_now = Signal(range(len(outs)))
        m.d.comb += dest_now.eq(Mux(is_cpl & self.i.p.sop, by_tag, 0))
        # the output register: one beat and its destination (inside a packet, the packet's)
        o_p = Signal.like(self.i.p, reset_less=True)
        o_valid = Signal()
        o_dest = Signal(range(len(outs)))
        in_pkt = Signal()
        dest = Mux(in_pkt & ~self.i.p.sop, o_dest, dest_now)
        o_ready = Signal()
        m.d.comb += o_ready.eq(Array(o.ready for o in outs)[o_dest])
        for k, o in enumerate(outs):
            m.d.comb += [o.p.eq(o_p), o.valid.eq(o_valid & (o_dest == k))]
        m.d.comb += self.i.ready.eq(~o_valid | o_ready)
        m.d.comb += self.rx_tlp.eq(self.i.valid & self.i.ready & self.i.p.sop)
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [in_pkt.eq(~self.i.p.eop), o_p.eq(self.i.p), o_valid.eq(1),
                         o_dest.eq(dest)]
        with m.Elif(o_ready):
            m.d.sync += o_valid.eq(0)
        return m
