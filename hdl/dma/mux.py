"""Shares one request/response server (a DMA channel, the translator) between named clients.

A client owns the server from the request it issued until it has taken that request's
response; the others' requests wait. Every client has one request outstanding at a time, so a
lock is all the arbitration needed; when several ask in the same cycle, they go round robin,
starting after the one that went last.

Ports, per client ``<name>`` of ``clients``: ``<name>_cmd`` (requests in) and ``<name>_done``
(its responses out); towards the server: ``cmd`` and ``done``.
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..iface import DmaCmd, DmaDone

__all__ = ["LockMux", "DmaChannelMux"]


class LockMux(wiring.Component):
    """Requests of layout ``req``, responses of layout ``resp``, for ``clients`` (names)."""

    def __init__(self, req, resp, clients=("a", "b")):
        self.clients = tuple(clients)
        if len(self.clients) < 2 or len(set(self.clients)) != len(self.clients):
            raise ValueError(f"LockMux needs two or more distinct client names, got {clients}")
        members = {}
        for name in self.clients:
            members[f"{name}_cmd"] = In(stream.Signature(req))
            members[f"{name}_done"] = Out(stream.Signature(resp))
        members.update({
            "cmd":   Out(stream.Signature(req)),
            "done":  In(stream.Signature(resp)),
            "owner": Out(range(len(self.clients))),   # whom the server works for (while busy)
            "busy":  Out(1),
        })
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        n = len(self.clients)
        cmds = [getattr(self, f"{c}_cmd") for c in self.clients]
        dones = [getattr(self, f"{c}_done") for c in self.clients]
        owner = Signal(range(n))
        busy = Signal()
        last = Signal(range(n))
        # round robin: the first asking client after ``last``
        pick = Signal(range(n))
        for start in range(n):
            with m.If(last == start):
                for k in reversed(range(n)):
                    c = (start + 1 + k) % n
                    with m.If(cmds[c].valid):
                        m.d.comb += pick.eq(c)
        sel = Mux(busy, owner, pick)
        m.d.comb += [
            self.cmd.p.eq(Array(c.p for c in cmds)[sel]),
            self.cmd.valid.eq(~busy & Cat(c.valid for c in cmds).any()),
            self.owner.eq(owner), self.busy.eq(busy),
        ]
        for k in range(n):
            m.d.comb += [
                cmds[k].ready.eq(~busy & (sel == k) & self.cmd.ready),
                dones[k].p.eq(self.done.p),
                dones[k].valid.eq(busy & (owner == k) & self.done.valid),
            ]
        m.d.comb += self.done.ready.eq(busy & Array(d.ready for d in dones)[owner])
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [busy.eq(1), owner.eq(sel), last.eq(sel)]
        with m.If(self.done.valid & self.done.ready):
            m.d.sync += busy.eq(0)
        return m


class DmaChannelMux(LockMux):
    """A DMA channel (:class:`hdl.iface.DmaCmd` in, :class:`DmaDone` out) for named engines."""

    def __init__(self, clients=("queue", "virtio")):
        super().__init__(DmaCmd, DmaDone, clients)
