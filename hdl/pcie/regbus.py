"""The DW register bus from the bus masters (completer, management UART) to the BAR targets.

One access at a time: ``we`` or ``re`` is a one-cycle strobe. Every target decodes its own
window (``fidx``, ``bar``, ``addr``), drives zero on ``rdata`` when it was not addressed, and
returns read data the cycle after the ``re`` it sees, so the card ORs the targets' data.

Between the masters and the targets the card puts two :class:`RegBusSlice` stages: one after
the master mux, and one in front of each target (a copy of the request per target, placed
next to it), so no path runs from a master's state machine through the mux into a
target's address decode, and none from the broadcast across the die into one. A master
therefore sees its read data :data:`READ_LATENCY` cycles after its ``re`` strobe.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ..iface import REQUEST_FIELDS, RegBusSignature

__all__ = ["RegBusSlice"]


class RegBusSlice(wiring.Component):
    """One register stage on the request path of the register bus (``rdata`` passes through).

    ``tag_i`` is a sideband bit that travels with the request (the card's "made by the UART"
    flag) and comes out on ``tag_o`` in the cycle the targets see the request. Only the
    strobes and the tag are reset; the request fields are data and mean nothing without a
    strobe.
    """

    def __init__(self):
        super().__init__({
            "i": In(RegBusSignature()),
            "o": Out(RegBusSignature()),
            "tag_i": In(1),
            "tag_o": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        for name in REQUEST_FIELDS[:-2]:            # the data fields; the strobes below
            q = Signal.like(getattr(self.o, name), name=f"{name}_q", reset_less=True)
            m.d.sync += q.eq(getattr(self.i, name))
            m.d.comb += getattr(self.o, name).eq(q)
        m.d.sync += [self.o.we.eq(self.i.we), self.o.re.eq(self.i.re),
                     self.tag_o.eq(self.tag_i & (self.i.we | self.i.re))]
        m.d.comb += self.i.rdata.eq(self.o.rdata)
        return m
