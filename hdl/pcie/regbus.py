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

__all__ = ["RegBusSlice", "RegBusInterconnect"]


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


class RegBusInterconnect(wiring.Component):
    """The register bus from its two masters to every register file.

    Masters: ``host`` (the PCIe completer) and ``uart`` (the management UART's frame engine),
    which gets the bus in cycles the host leaves free (``uart_gnt``). The chosen request goes
    through one :class:`RegBusSlice` and then through one more per target (``slice_<name>``,
    placed next to it), so neither the master mux nor the broadcast to every target shares a
    cycle with a target's address decode. The targets (``t_<name>`` for each name of
    ``targets``) drive zero on ``rdata`` unless addressed, so their data is ORed back to both
    masters, :data:`hdl.iface.READ_LATENCY` cycles after the strobe. For each name of
    ``tagged``, ``<name>_uart`` says, with the request the target sees, that the UART made it.
    """

    def __init__(self, targets, tagged=()):
        self.targets = tuple(targets)
        self.tagged = tuple(tagged)
        assert set(self.tagged) <= set(self.targets)
        members = {"host": In(RegBusSignature()), "uart": In(RegBusSignature()),
                   "uart_gnt": Out(1)}
        for name in self.targets:
            members[f"t_{name}"] = Out(RegBusSignature())
        for name in self.tagged:
            members[f"{name}_uart"] = Out(1)
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        host, uart = self.host, self.uart
        m.submodules.slice = rs = RegBusSlice()
        uart_turn = Signal()
        m.d.comb += [self.uart_gnt.eq(~host.we & ~host.re),
                     uart_turn.eq(self.uart_gnt & (uart.we | uart.re))]
        for name in REQUEST_FIELDS:
            m.d.comb += getattr(rs.i, name).eq(Mux(uart_turn, getattr(uart, name),
                                                   getattr(host, name)))
        rdata = 0
        for tname in self.targets:
            m.submodules[f"slice_{tname}"] = ts = RegBusSlice()
            t = getattr(self, f"t_{tname}")
            for name in REQUEST_FIELDS:
                m.d.comb += [getattr(ts.i, name).eq(getattr(rs.o, name)),
                             getattr(t, name).eq(getattr(ts.o, name))]
            m.d.comb += ts.o.rdata.eq(t.rdata)
            rdata = rdata | ts.i.rdata
            if tname in self.tagged:
                m.d.comb += [ts.tag_i.eq(rs.tag_o), getattr(self, f"{tname}_uart").eq(ts.tag_o)]
        m.d.comb += [rs.tag_i.eq(uart_turn), rs.o.rdata.eq(rdata),
                     host.rdata.eq(rs.i.rdata), uart.rdata.eq(rs.i.rdata)]
        return m
