"""Receive descriptors read ahead, per function: the virtio-net engine's prefetch unit.

A frame for a function needs the head descriptor of the function's next receive chain: a round
trip to host memory on the engine's path, once the frame's destination is known. When a
delivery ends and the queue's available-ring window holds the next entry (position ``pos``,
head ``head``), the engine hands this unit an *ask*; the unit reads that descriptor through
its own host port (tag :data:`hdl.pcie.host_port.HOST_TAGS` ``"vqp"``, the function's requester
ID, translated in its domain) while the engine goes on, and keeps it in a RAM of one record per
function, with the receive queue, position and head it belongs to. The next delivery to the
function, at that queue and position, takes it from there (virtio 1.2, 2.7.13: an available
chain's descriptors do not change until it is used), and forgets it.

The record is tied to its ring position, so it is never taken for a later chain that happens to
reuse the head index; the engine forgets a record that does not match the position it stands
at, and ``forget`` (one bit per function: a reset, a restore, NEEDS_RESET, a record taken)
clears a record and discards the answer of a read still out for that function. A read that
fails leaves no record (the engine's own read of the descriptor then reports the fault).
``holds`` names the function whose descriptor is being read: the engine reports it with its
own, so a driver's reset waits for the read (no read with the function's ID after its driver
saw the reset complete).

Ports: ``ask`` (taken while no read is out), ``rd_fidx`` / ``rd`` (the record of function
``rd_fidx`` one clock later; ``val`` says which functions have one), ``forget``, and the host
port's ``tx`` / ``cpl`` / ``xreq`` / ``xresp``.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..pcie.host_port import HOST_TAGS, embed_host_port, host_port_members

__all__ = ["RxPrefetch", "PrefetchAsk", "PrefetchRecord"]

PrefetchAsk = data.StructLayout({"fidx": 8, "q": 4, "pos": 16, "head": 16, "addr": 64})
PrefetchRecord = data.StructLayout({"desc": 128, "q": 4, "pos": 16, "head": 16})


class RxPrefetch(wiring.Component):
    def __init__(self, data_width, num_functions):
        self._w = data_width
        self._nf = num_functions
        super().__init__({
            "ask":     In(stream.Signature(PrefetchAsk)),
            "rd_fidx": In(8),
            "rd":      Out(PrefetchRecord),
            "val":     Out(num_functions),
            "forget":  In(num_functions),
            **host_port_members(data_width),      # its own host port's link side
            "holds":   Out(num_functions),    # the function whose descriptor is being read
        })

    def elaborate(self, platform):
        m = Module()
        nf = self._nf
        hp = embed_host_port(m, self, self._w, HOST_TAGS["vqp"], max_dw=4)

        m.submodules.records = mem = Memory(shape=PrefetchRecord, depth=nf, init=[])
        wp = mem.write_port()
        rp = mem.read_port(transparent_for=(wp,))   # (a record and its valid bit agree)
        m.d.comb += [rp.addr.eq(self.rd_fidx), self.rd.eq(rp.data)]

        val = Signal(nf)
        a = Signal(PrefetchAsk)          # the read out
        live = Signal()                  # ... and its answer is still wanted
        busy = Signal()
        m.d.comb += [self.val.eq(val), self.ask.ready.eq(~busy),
                     self.holds.eq(Mux(busy, (C(1, nf) << a.fidx)[:nf], 0)),
                     hp.req.p.write.eq(0), hp.req.p.fidx.eq(a.fidx), hp.req.p.addr.eq(a.addr),
                     hp.req.p.ndw.eq(4), hp.req.p.fbe.eq(0xF), hp.req.p.lbe.eq(0xF)]
        # a read out for a function that is forgotten is answered into nothing
        with m.If(self.forget.bit_select(a.fidx, 1)):
            m.d.sync += live.eq(0)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(self.ask.valid):
                    m.d.sync += [a.eq(self.ask.p), busy.eq(1),
                                 live.eq(~self.forget.bit_select(self.ask.p.fidx, 1))]
                    m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += hp.req.valid.eq(1)           # (the port is idle: taken at once)
                m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(hp.done):
                    keep = live & ~hp.err & ~self.forget.bit_select(a.fidx, 1)
                    m.d.comb += [wp.addr.eq(a.fidx), wp.en.eq(keep),
                                 wp.data.desc.eq(hp.rdata[:128]), wp.data.pos.eq(a.pos),
                                 wp.data.q.eq(a.q),
                                 wp.data.head.eq(a.head)]
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"
        # (forgetting wins over a record written in the same cycle)
        m.d.sync += val.eq((val | Mux(wp.en, (C(1, nf) << a.fidx)[:nf], 0)) & ~self.forget)
        return m
