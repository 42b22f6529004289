"""The virtio-net engine's notification unit: whether a queue's driver wants an interrupt.

After the engine has published used elements (the used index written, and ``avail_event`` with
VIRTIO_F_EVENT_IDX), whether the driver is to be interrupted depends on a field the driver
writes: ``used_event`` with EVENT_IDX (``vring_need_event``, virtio 1.2, 2.7.10), else the
available ring's NO_INTERRUPT flag. That field must be read after the used index is written
(the driver re-enables interrupts, then checks the used index again: read earlier, an update
in between is missed and both sides wait). The read is a round trip to host memory; the
engine used to wait for it twice a frame (the receiver's queue and the sender's).

This unit takes the decision off the engine's path: the engine hands it an *ask* (function,
vector, where the field is, the new used index and how many elements it added) once the
writes have left, and goes on with the next frame while the unit reads the field through its
own host port (tag :data:`hdl.pcie.host_port.HOST_TAGS` ``"vqe"``, the function's requester ID,
translated in the function's domain) and raises the interrupt (MSI-X vector and ISR bit) or
counts it suppressed. Its read follows the engine's writes on the same TLP stream, so it is
never reordered before them.

Asks are served in order; the unit holds two (the one being read and one waiting), and
``ask.ready`` is low while both are taken. ``holds`` names the functions of the asks it holds:
the engine reports them with its own, so a driver's reset of such a function waits until the
interrupt has gone (nothing reaches a function after its driver saw the reset complete), and a
migration's save of the function waits likewise. A read that fails (a completion error, a
timeout, a translation fault) raises no interrupt and is counted suppressed.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..iface import IrqRequestSignature
from ..pcie.host_port import HOST_TAGS, embed_host_port, host_port_members

__all__ = ["NotifyUnit", "NotifyAsk"]

NotifyAsk = data.StructLayout({
    "fidx":   8,
    "vector": 16,            # the queue's MSI-X vector (>= the vectors the card has: none)
    "ev_idx": 1,             # read used_event (else avail.flags)
    "addr":   64,            # the u16 field's IOVA (2-byte aligned)
    "new":    16,            # the used index just published
    "added":  16,            # elements it added (new - old)
})


class NotifyUnit(wiring.Component):
    def __init__(self, data_width, num_functions, msix_vectors):
        self._w = data_width
        self._nf = num_functions
        self._nvec = msix_vectors
        super().__init__({
            "ask":        In(stream.Signature(NotifyAsk)),
            **host_port_members(data_width),      # its own host port's link side
            "irq":        Out(IrqRequestSignature()),
            "isr_set":    Out(1),
            "isr_fidx":   Out(8),
            "fired":      Out(1),     # strobes: an interrupt was raised / suppressed
            "suppressed": Out(1),
            "holds":      Out(num_functions),
        })

    def elaborate(self, platform):
        m = Module()
        nf = self._nf
        hp = embed_host_port(m, self, self._w, HOST_TAGS["vqe"], max_dw=1)

        # two asks: ``a`` (being served) and ``b`` (waiting)
        a = Signal(NotifyAsk)
        b = Signal(NotifyAsk)
        a_v = Signal()
        b_v = Signal()
        pop = Signal()
        m.d.comb += self.ask.ready.eq(~b_v)
        take = self.ask.valid & self.ask.ready
        with m.If(pop):
            with m.If(b_v):
                m.d.sync += [a.eq(b), b.eq(self.ask.p), b_v.eq(take)]
            with m.Else():
                m.d.sync += [a.eq(self.ask.p), a_v.eq(take)]
        with m.Elif(take):
            with m.If(a_v):
                m.d.sync += [b.eq(self.ask.p), b_v.eq(1)]
            with m.Else():
                m.d.sync += [a.eq(self.ask.p), a_v.eq(1)]
        one = C(1, nf)
        m.d.comb += self.holds.eq(Mux(a_v, (one << a.fidx)[:nf], 0)
                                  | Mux(b_v, (one << b.fidx)[:nf], 0))

        hi = Signal()              # the field is the DW's upper half
        m.d.comb += [hp.req.p.write.eq(0), hp.req.p.fidx.eq(a.fidx), hp.req.p.ndw.eq(1),
                     hp.req.p.addr.eq(Cat(C(0, 2), a.addr[2:])),
                     hp.req.p.fbe.eq(Mux(a.addr[1], 0xC, 0x3)), hp.req.p.lbe.eq(0)]
        field = Signal(16)
        m.d.comb += field.eq(Mux(hi, hp.rdata[16:32], hp.rdata[0:16]))
        # vring_need_event(used_event, new, old): (new - used_event - 1) < (new - old)
        need = Signal()
        m.d.comb += need.eq(Mux(a.ev_idx, (a.new - field - 1)[:16] < a.added, ~field[0]))
        with m.FSM():
            with m.State("IDLE"):
                with m.If(a_v):
                    m.d.comb += hp.req.valid.eq(1)       # (the port is idle: taken at once)
                    m.d.sync += hi.eq(a.addr[1])
                    m.next = "READ"
            with m.State("READ"):
                with m.If(hp.done):
                    fire = need & ~hp.err
                    m.d.comb += [pop.eq(1), self.fired.eq(fire), self.suppressed.eq(~fire),
                                 self.irq.valid.eq(fire & (a.vector < self._nvec)),
                                 self.irq.fidx.eq(a.fidx), self.irq.vector.eq(a.vector[:5]),
                                 self.isr_set.eq(fire), self.isr_fidx.eq(a.fidx)]
                    m.next = "IDLE"
        return m
