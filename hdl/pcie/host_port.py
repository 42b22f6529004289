"""The host port: one small host-memory access at a time, for the engines that fetch and write
their own structures (descriptors, page-table entries, fault queue entries, virtqueue rings).

A request (:func:`HostReq`) is a MemRd or MemWr of 1..``max_dw`` DWs with its first / last byte
enables, sent with the requester ID of function ``fidx``. The port owns one tag
(:data:`HOST_TAGS`: each engine has its own, so the RX router hands it exactly the completions
of its own reads) and reports the access with a one-cycle ``done`` strobe:

* a write is done once its last beat has left;
* a read is done when its completion has arrived: ``rdata`` holds the DWs (first DW in bits
  [31:0]) until the next request; ``err`` is set when the completion's status was not SC, it
  carried no data or fewer DWs than asked, or none came within :data:`hdl.iface.CPL_TIMEOUT`
  cycles (a completion that arrives after that is unexpected);
* with ``translate``, the address is first translated in the function's domain
  (``xreq`` / ``xresp``); a translation that fails, or an access that would cross a page inside
  a domain, ends the access with ``err`` and ``xerr`` set before anything is sent.

``req.ready`` is high while the port is idle and in the cycle it reports ``done``, so an engine
may ask again in the very cycle its previous access finishes. A completion for this tag while
no read waits is taken and reported on ``unexp``; a completion that carries more beats than it
should is drained to its end.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..iface import CPL_TIMEOUT, XlateReq, XlateResp, XlateStatus
from .tlp import tlp_stream, mem_hdr, Dw0, CplDw1, hdr_dw

__all__ = ["HostPort", "HostReq", "HOST_TAGS", "CPL_ROUTES", "DMA_READ_TAGS", "embed_host_port",
           "host_port_members"]

#: The tag of every engine that reads host memory one request at a time, by route name. The
#: RX router (:class:`hdl.pcie.rx_router.RxRouter`) sends each its completions; every other
#: completion goes to the DMA read channel, which owns :data:`DMA_READ_TAGS`.
HOST_TAGS = {
    "desc": 0,     # the DMA descriptor queues (hdl.dma.queue)
    "walk": 1,     # the page-table walker (hdl.iommu.translate)
    "cq":   2,     # the fault unit's completion-queue fetch (hdl.iommu.fault)
    "vq":   3,     # the virtio-net engine's rings (hdl.virtio)
    "vqe":  4,     # ... its notification unit's used_event / avail.flags reads
    "vqp":  5,     # ... and its receive descriptors read ahead
}
#: The RX router's completion routes: a block's name and the tags of its host ports.
CPL_ROUTES = {"desc": HOST_TAGS["desc"], "walk": HOST_TAGS["walk"], "cq": HOST_TAGS["cq"],
              "vq": (HOST_TAGS["vq"], HOST_TAGS["vqe"], HOST_TAGS["vqp"])}
#: The DMA read channel's tag pool (hdl.dma.read).
DMA_READ_TAGS = range(32, 64)


def HostReq(max_dw):
    return data.StructLayout({
        "write": 1,
        "fidx":  8,                      # the requesting function (its requester ID)
        "addr":  64,                     # byte address; bits [1:0] are ignored (byte enables)
        "ndw":   range(1, max_dw + 1),
        "fbe":   4,
        "lbe":   4,                      # 0 for a one-DW access
        "wdata": 32 * max_dw,
    })


class HostPort(wiring.Component):
    def __init__(self, data_width, tag, max_dw=4, translate=False):
        assert max_dw >= 1 and data_width >= 64
        self.data_width = data_width
        self.tag = tag
        self.max_dw = max_dw
        self.translate = translate
        members = {
            "req":     In(stream.Signature(HostReq(max_dw))),
            "done":    Out(1),
            "err":     Out(1),                 # with ``done``; held until the next request
            "xerr":    Out(1),                 # ``err`` came from the translation
            "rdata":   Out(32 * max_dw),
            "tx":      Out(tlp_stream(data_width)),
            "cpl":     In(tlp_stream(data_width)),
            "bus_num": In(8),
            "unexp":   Out(1),
        }
        if translate:
            members["xreq"] = Out(stream.Signature(XlateReq))
            members["xresp"] = In(stream.Signature(XlateResp))
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        DPB = W // 32
        MD = self.max_dw
        MB = max(1, -(-MD // DPB))             # beats of the longest write

        r = Signal(HostReq(MD))                # the request being served
        beat = Signal(range(MB + 1))
        dcount = Signal(range(MD + DPB + 1))
        wait_cnt = Signal(range(CPL_TIMEOUT + 1))
        waiting = Signal()
        rdata = Signal(32 * MD)
        err = Signal()
        xerr = Signal()
        m.d.comb += [self.rdata.eq(rdata), self.err.eq(err), self.xerr.eq(xerr)]

        # ---- the request's TLP --------------------------------------------------------------
        nbeats = Signal(range(MB + 1))
        if DPB > 1:
            m.d.comb += nbeats.eq(Mux(r.write, (r.ndw + DPB - 1) >> exact_log2(DPB), 1))
        else:
            m.d.comb += nbeats.eq(Mux(r.write, r.ndw, 1))
        rid = Cat(r.fidx, self.bus_num)
        m.d.comb += [
            self.tx.p.hdr.eq(Mux(r.write, mem_hdr(m, True, r.addr, r.ndw, rid, 0, r.fbe, r.lbe),
                                 mem_hdr(m, False, r.addr, r.ndw, rid, self.tag, r.fbe, r.lbe))),
            self.tx.p.sop.eq(beat == 0),
            self.tx.p.eop.eq(beat == nbeats - 1),
            self.tx.p.func.eq(r.fidx),
        ]
        if MB > 1:
            m.d.comb += self.tx.p.data.eq(r.wdata.word_select(beat, W))
        else:
            m.d.comb += self.tx.p.data.eq(r.wdata)
        left = Signal(range(MD + 1))
        m.d.comb += left.eq(r.ndw - beat * DPB)
        m.d.comb += self.tx.p.strb.eq(Mux(r.write, Mux(left >= DPB, (1 << DPB) - 1,
                                                       (C(1, DPB + 1) << left) - 1), 0))

        # ---- the completion -----------------------------------------------------------------
        c = self.cpl
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        bad_head = c.p.sop & ((cd1.status != 0) | (cd0.fmt != 0b010))

        def accept():
            """Take a new request (also in the cycle the previous one reports done)."""
            m.d.comb += self.req.ready.eq(1)
            with m.If(self.req.valid):
                m.d.sync += [r.eq(self.req.p), beat.eq(0), dcount.eq(0), wait_cnt.eq(0),
                             err.eq(0), xerr.eq(0)]
                m.next = "XLATE" if self.translate else "SEND"
            with m.Else():
                m.next = "IDLE"

        if self.translate:
            last = Signal(64)
            m.d.comb += [last.eq(r.addr + (r.ndw << 2) - 1),
                         self.xreq.p.fidx.eq(r.fidx), self.xreq.p.iova.eq(r.addr),
                         self.xreq.p.last.eq(last)]

        with m.FSM():
            with m.State("IDLE"):
                accept()
            if self.translate:
                with m.State("XLATE"):
                    m.d.comb += self.xreq.valid.eq(1)
                    with m.If(self.xreq.ready):
                        m.next = "XWAIT"
                with m.State("XWAIT"):
                    x = self.xresp.p
                    m.d.comb += self.xresp.ready.eq(1)
                    with m.If(self.xresp.valid):
                        # (without a domain the access may cross a page; inside one it may not)
                        with m.If((x.status != XlateStatus.OK)
                                  | (~x.bypass & (r.addr[12:] != last[12:]))):
                            m.d.sync += [err.eq(1), xerr.eq(1)]
                            m.next = "DONE"
                        with m.Else():
                            m.d.sync += r.addr.eq(x.phys)
                            m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += self.tx.valid.eq(1)
                with m.If(self.tx.ready):
                    m.d.sync += beat.eq(beat + 1)
                    with m.If(beat == nbeats - 1):
                        with m.If(r.write):
                            m.next = "DONE"
                        with m.Else():
                            m.next = "WAIT"
            with m.State("WAIT"):
                m.d.comb += [c.ready.eq(1), waiting.eq(1)]
                m.d.sync += wait_cnt.eq(wait_cnt + 1)
                got = Signal(range(MD + DPB + 1))
                m.d.comb += got.eq(dcount + sum(c.p.strb[j] for j in range(DPB)))
                with m.If(c.valid):
                    with m.If(bad_head):
                        m.d.sync += err.eq(1)
                    with m.Else():
                        for j in range(DPB):
                            with m.If(c.p.strb[j] & (dcount + j < MD)):
                                m.d.sync += rdata.word_select(dcount + j, 32).eq(
                                    c.p.data[32 * j:32 * j + 32])
                        m.d.sync += dcount.eq(got)
                        # (fewer DWs than asked for is an error too)
                        with m.If(c.p.eop & (got < r.ndw)):
                            m.d.sync += err.eq(1)
                    with m.If(c.p.eop):
                        m.next = "DONE"
                with m.Elif(wait_cnt == CPL_TIMEOUT):
                    m.d.sync += err.eq(1)
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += self.done.eq(1)
                accept()

        with m.If(~waiting & c.valid):
            m.d.comb += c.ready.eq(1)
            with m.If(c.p.sop):
                m.d.comb += self.unexp.eq(1)
        return m


def host_port_members(data_width):
    """The signature members of a block with its own host port (see :func:`embed_host_port`)."""
    return {"tx": Out(tlp_stream(data_width)), "cpl": In(tlp_stream(data_width)),
            "xreq": Out(stream.Signature(XlateReq)), "xresp": In(stream.Signature(XlateResp)),
            "bus_num": In(8), "unexp": Out(1)}


def embed_host_port(m, block, data_width, tag, max_dw):
    """A translating :class:`HostPort` in module ``m`` whose link side is ``block``'s own
    ``tx`` / ``cpl`` / ``xreq`` / ``xresp`` / ``bus_num`` / ``unexp`` (a small unit that reads
    host memory beside an engine, e.g. :mod:`hdl.virtio.notify`); returns the port."""
    m.submodules.hport = hp = HostPort(data_width, tag, max_dw=max_dw, translate=True)
    wiring.connect(m, hp.tx, wiring.flipped(block.tx))
    wiring.connect(m, wiring.flipped(block.cpl), hp.cpl)
    wiring.connect(m, hp.xreq, wiring.flipped(block.xreq))
    wiring.connect(m, wiring.flipped(block.xresp), hp.xresp)
    m.d.comb += [hp.bus_num.eq(block.bus_num), block.unexp.eq(hp.unexp)]
    return hp
