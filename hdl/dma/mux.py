"""Shares one request/response server (a DMA channel, the translator) between two clients.

A client owns the server from the request it issued until it has taken that request's
response; the other client's request waits. Both clients have one request outstanding at a
time, so a lock is all the arbitration needed; when both ask in the same cycle, the one that did
not go last goes first.
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..iface import DmaCmd, DmaDone

__all__ = ["LockMux", "DmaChannelMux"]


class LockMux(wiring.Component):
    """Requests (``cmd*``) of layout ``req``, responses (``done*``) of layout ``resp``."""

    def __init__(self, req, resp):
        super().__init__({
            "cmd0":  In(stream.Signature(req)),
            "done0": Out(stream.Signature(resp)),
            "cmd1":  In(stream.Signature(req)),
            "done1": Out(stream.Signature(resp)),
            "cmd":   Out(stream.Signature(req)),
            "done":  In(stream.Signature(resp)),
            "owner": Out(1),       # the client the server works for (valid while ``busy``)
            "busy":  Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        owner = Signal()
        busy = Signal()
        last = Signal()
        pick = Mux(self.cmd0.valid & self.cmd1.valid, ~last, self.cmd1.valid)
        sel = Mux(busy, owner, pick)
        cmds = [self.cmd0, self.cmd1]
        dones = [self.done0, self.done1]
        m.d.comb += [
            self.cmd.p.eq(Mux(sel, self.cmd1.p, self.cmd0.p)),
            self.cmd.valid.eq(~busy & (self.cmd0.valid | self.cmd1.valid)),
            self.owner.eq(owner), self.busy.eq(busy),
        ]
        for k in range(2):
            m.d.comb += [
                cmds[k].ready.eq(~busy & (sel == k) & self.cmd.ready),
                dones[k].p.eq(self.done.p),
                dones[k].valid.eq(busy & (owner == k) & self.done.valid),
            ]
        m.d.comb += self.done.ready.eq(busy & Mux(owner, self.done1.ready, self.done0.ready))
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [busy.eq(1), owner.eq(sel), last.eq(sel)]
        with m.If(self.done.valid & self.done.ready):
            m.d.sync += busy.eq(0)
        return m


class DmaChannelMux(LockMux):
    """A DMA channel (:class:`hdl.iface.DmaCmd` in, :class:`DmaDone` out) for two engines."""

    def __init__(self):
        super().__init__(DmaCmd, DmaDone)
