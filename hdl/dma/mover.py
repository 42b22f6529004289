"""The piece mover: one buffer of a function's I/O virtual address space moved between host
and card memory, a translated piece at a time.

A command (:data:`MoveCmd`) names the function, the direction, the buffer's IOVA and length
and the card address. The mover translates the piece at the current IOVA (the whole buffer
must lie in the function's domain: the request's ``last`` is the buffer's last byte), cuts it at
the end of its 4 KiB page unless the function has no domain (``bypass``: the IOVA is the bus
address and the rest goes in one piece), hands it to the DMA read or write channel, and goes
on with the next piece until the buffer is done. ``done`` reports :class:`MoveStatus`:

* ``OK``: every byte moved;
* ``XLATE``: a translation failed (outside the domain, not present, or the walk failed); the
  pieces before it moved, nothing after it;
* ``DMA``: a channel reported an error (a completion error, or a host range past 2**64).

The engines that take addresses from a driver check the whole buffer against the top of the
64-bit space before they ask (nothing may move for such a buffer).
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..memmap import CARD_ADDR_BITS
from ..iface import DmaCmd, DmaDone, DmaStatus, XlateReq, XlateResp, XlateStatus

__all__ = ["PieceMover", "MoveCmd", "MoveDone", "MoveStatus", "MoveSignature"]

MoveCmd = data.StructLayout({
    "fidx":    8,
    "to_host": 1,                  # 1: card -> host (the write channel), 0: host -> card
    "iova":    64,
    "card":    CARD_ADDR_BITS,
    "length":  17,                 # 1..65536 bytes
})


class MoveStatus:
    OK = 0
    XLATE = 1
    DMA = 2


MoveDone = data.StructLayout({"status": 2})


def MoveSignature():
    """An engine's port to the mover (the engine's side)."""
    return wiring.Signature({
        "cmd":  Out(stream.Signature(MoveCmd)),
        "done": In(stream.Signature(MoveDone)),
    })


class PieceMover(wiring.Component):
    def __init__(self):
        super().__init__({
            "move":    In(MoveSignature()),
            "xreq":    Out(stream.Signature(XlateReq)),
            "xresp":   In(stream.Signature(XlateResp)),
            "rd_cmd":  Out(stream.Signature(DmaCmd)),
            "rd_done": In(stream.Signature(DmaDone)),
            "wr_cmd":  Out(stream.Signature(DmaCmd)),
            "wr_done": In(stream.Signature(DmaDone)),
        })

    def elaborate(self, platform):
        m = Module()
        c = Signal(MoveCmd)                  # the buffer being moved
        sub = Signal(17)                     # bytes of it done
        seg = Signal(17)                     # the piece under way (a page, or all of it)
        phys = Signal(64)
        status = Signal(2)
        iova = Signal(64)
        m.d.comb += iova.eq(c.iova + sub)
        rest = Signal(17)
        page_room = Signal(13)
        m.d.comb += [rest.eq(c.length - sub), page_room.eq(4096 - iova[:12])]

        m.d.comb += [self.xreq.p.fidx.eq(c.fidx), self.xreq.p.iova.eq(iova),
                     self.xreq.p.last.eq(c.iova + c.length - 1)]
        for cmd in (self.rd_cmd, self.wr_cmd):
            m.d.comb += [cmd.p.fidx.eq(c.fidx), cmd.p.host.eq(phys), cmd.p.card.eq(c.card + sub),
                         cmd.p.length.eq(seg)]
        m.d.comb += self.move.done.p.status.eq(status)
        x = self.xresp.p

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.move.cmd.ready.eq(1)
                with m.If(self.move.cmd.valid):
                    m.d.sync += [c.eq(self.move.cmd.p), sub.eq(0)]
                    m.next = "XLATE"
            with m.State("XLATE"):
                m.d.comb += self.xreq.valid.eq(1)
                with m.If(self.xreq.ready):
                    m.next = "XWAIT"
            with m.State("XWAIT"):
                m.d.comb += self.xresp.ready.eq(1)
                with m.If(self.xresp.valid):
                    with m.If(x.status != XlateStatus.OK):
                        m.d.sync += status.eq(MoveStatus.XLATE)
                        m.next = "DONE"
                    with m.Else():
                        m.d.sync += [phys.eq(x.phys),
                                     seg.eq(Mux(x.bypass | (rest < page_room), rest, page_room))]
                        m.next = "GO"
            with m.State("GO"):
                m.d.comb += [self.wr_cmd.valid.eq(c.to_host), self.rd_cmd.valid.eq(~c.to_host)]
                with m.If(Mux(c.to_host, self.wr_cmd.ready, self.rd_cmd.ready)):
                    m.next = "WAIT"
            with m.State("WAIT"):
                m.d.comb += [self.wr_done.ready.eq(c.to_host), self.rd_done.ready.eq(~c.to_host)]
                ok = Mux(c.to_host, self.wr_done.p.status, self.rd_done.p.status) == DmaStatus.OK
                with m.If(Mux(c.to_host, self.wr_done.valid, self.rd_done.valid)):
                    m.d.sync += sub.eq(sub + seg)
                    with m.If(~ok):
                        m.d.sync += status.eq(MoveStatus.DMA)
                        m.next = "DONE"
                    with m.Elif(sub + seg == c.length):
                        m.d.sync += status.eq(MoveStatus.OK)
                        m.next = "DONE"
                    with m.Else():
                        m.next = "XLATE"
            with m.State("DONE"):
                m.d.comb += self.move.done.valid.eq(1)
                with m.If(self.move.done.ready):
                    m.next = "IDLE"
        return m
