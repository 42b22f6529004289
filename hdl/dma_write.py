"""DMA write channel: card memory -> host memory.

A command becomes MemWr TLPs with the function's requester ID, each at most Max Payload Size
and never crossing an MPS (hence a 4 KiB) boundary. Card memory words stream through a small
FIFO (the block RAM has one cycle of read latency); each payload beat takes its DWs from the
current word and, when the card address is not word aligned, from the next one.
"""

from amaranth import *
from amaranth.utils import exact_log2
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream, make_hdr, TlpKind
from .dma_common import (DmaCmd, DmaDone, DmaStatus, MemReadPort, size_bytes, be_first_last,
                         CARD_ADDR_BITS)

__all__ = ["DmaWriteChannel"]

FIFO_DEPTH = 8


class DmaWriteChannel(wiring.Component):
    def __init__(self, data_width):
        self.data_width = data_width
        super().__init__({
            "cmd":     In(stream.Signature(DmaCmd)),
            "done":    Out(stream.Signature(DmaDone)),
            "tx":      Out(tlp_stream(data_width)),
            "mem":     Out(MemReadPort(data_width)),
            "mps":     In(3),
            "bus_num": In(8),
            "busy":    Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        DPB = W // 32
        LB = exact_log2(DPB) if DPB > 1 else 0
        DWB = CARD_ADDR_BITS - 2

        m.submodules.fifo = fifo = SyncFIFOBuffered(width=W, depth=FIFO_DEPTH)

        fidx = Signal(8)
        host = Signal(64)
        card = Signal(CARD_ADDR_BITS)
        rem = Signal(18)
        mps_b = Signal(13)
        m.d.comb += mps_b.eq(size_bytes(self.mps))
        room = Signal(13)
        m.d.comb += room.eq(mps_b - (host[:12] & (mps_b - 1)))
        chunk = Signal(13)
        m.d.comb += chunk.eq(Mux(rem < room, rem, room))
        ndw = Signal(11)
        m.d.comb += ndw.eq((host[:2] + chunk + 3) >> 2)

        # per-TLP registers
        t_host = Signal(64)
        t_ndw = Signal(11)
        t_fbe = Signal(4)
        t_lbe = Signal(4)
        rot = Signal(max(LB, 1))
        nwords = Signal(range(1024 // DPB + 3))
        nbeats = Signal(range(1024 // DPB + 2))
        k = Signal(range(1024 // DPB + 2))       # beat index
        used = Signal(range(1024 // DPB + 3))    # words taken from the FIFO
        cur = Signal(W)

        # ---- word reader --------------------------------------------------------------------
        rd_addr = Signal(DWB - LB)
        rd_left = Signal(range(1024 // DPB + 3))
        inflight = Signal()
        issue = (rd_left != 0) & (fifo.level + inflight < FIFO_DEPTH - 1)
        m.d.comb += [self.mem.addr.eq(rd_addr), self.mem.en.eq(issue),
                     fifo.w_data.eq(self.mem.data), fifo.w_en.eq(inflight)]
        m.d.sync += inflight.eq(issue)
        with m.If(issue):
            m.d.sync += [rd_addr.eq(rd_addr + 1), rd_left.eq(rd_left - 1)]

        # ---- beat builder ----------------------------------------------------------------
        nxt = fifo.r_data
        need_nxt = used < nwords
        lanes = [Signal(32, name=f"lane{i}") for i in range(DPB)]
        with m.Switch(rot):
            for r in range(DPB):
                with m.Case(r):
                    for i in range(DPB):
                        src = r + i
                        if src < DPB:
                            m.d.comb += lanes[i].eq(cur[32 * src:32 * src + 32])
                        else:
                            m.d.comb += lanes[i].eq(nxt[32 * (src - DPB):32 * (src - DPB) + 32])
        is64 = t_host[32:] != 0
        dw0 = Cat(t_ndw[:10], C(0, 14), Mux(is64, TlpKind.MWR64, TlpKind.MWR32))
        dw1 = Cat(t_fbe, t_lbe, C(0, 8), fidx, self.bus_num)
        a_lo = Cat(C(0, 2), t_host[2:32])
        tx = self.tx
        m.d.comb += [
            tx.p.hdr.eq(make_hdr(dw0, dw1, Mux(is64, t_host[32:], a_lo), Mux(is64, a_lo, 0))),
            tx.p.data.eq(Cat(*lanes)),
            tx.p.sop.eq(k == 0),
            tx.p.eop.eq(k == nbeats - 1),
            tx.p.func.eq(fidx),
        ]
        for i in range(DPB):
            m.d.comb += tx.p.strb[i].eq(k * DPB + i < t_ndw)
        m.d.comb += self.busy.eq(rem != 0)

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [fidx.eq(self.cmd.p.fidx), host.eq(self.cmd.p.host),
                                 card.eq(self.cmd.p.card), rem.eq(self.cmd.p.length)]
                    m.next = "SETUP"
            with m.State("SETUP"):
                c0 = card[2:]
                r0 = c0[:LB] if LB else C(0, 1)
                fbe, lbe = be_first_last(host[:2], (host[:2] + chunk)[:2], ndw)
                m.d.sync += [
                    t_host.eq(host), t_ndw.eq(ndw), t_fbe.eq(fbe), t_lbe.eq(lbe),
                    rot.eq(r0),
                    nwords.eq((r0 + ndw + DPB - 1) >> LB),
                    nbeats.eq((ndw + DPB - 1) >> LB),
                    k.eq(0), used.eq(0),
                    rd_addr.eq(c0[LB:]), rd_left.eq((r0 + ndw + DPB - 1) >> LB),
                    host.eq(host + chunk), card.eq(card + chunk), rem.eq(rem - chunk),
                ]
                m.next = "LOAD"
            with m.State("LOAD"):
                m.d.comb += fifo.r_en.eq(1)
                with m.If(fifo.r_rdy):
                    m.d.sync += [cur.eq(fifo.r_data), used.eq(1)]
                    m.next = "BEAT"
            with m.State("BEAT"):
                ok = ~need_nxt | fifo.r_rdy
                m.d.comb += tx.valid.eq(ok)
                with m.If(ok & tx.ready):
                    m.d.sync += k.eq(k + 1)
                    with m.If(need_nxt):
                        m.d.comb += fifo.r_en.eq(1)
                        m.d.sync += [cur.eq(nxt), used.eq(used + 1)]
                    with m.If(tx.p.eop):
                        with m.If(rem == 0):
                            m.next = "DONE"
                        with m.Else():
                            m.next = "SETUP"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.p.status.eq(DmaStatus.OK)]
                with m.If(self.done.ready):
                    m.next = "IDLE"
        return m
