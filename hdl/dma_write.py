"""DMA write channel: card memory -> host memory.

A command becomes MemWr TLPs with the function's requester ID, each at most Max Payload Size
and never crossing an MPS (hence a 4 KiB) boundary, sent back to back. The next TLP's size is
computed into a register (``n_chunk``, ready a cycle after the previous TLP was set up), so the
MPS field, the boundary arithmetic and the header never share a clock. A command's first TLP
waits one cycle for it; after that it is always ready when a TLP ends (the first TLP spends a
cycle loading its word, every later one but the last is a full MPS of 8 beats or more), and
the end-of-TLP check that waits for it is a guard, not a path the data takes.

All card memory words of the command stream through a small FIFO (the block RAM has one cycle
of read latency); a DW pointer runs through them, and each payload beat takes its DWs from the
current word and, when the pointer is not word aligned, from the next one.
"""

from amaranth import *
from amaranth.utils import exact_log2
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream, mem_hdr
from .dma_common import (DmaCmd, DmaDone, DmaStatus, MemReadPort, next_chunk, be_first_last,
                         CARD_ADDR_BITS, CARD_MEM_TOTAL)

__all__ = ["DmaWriteChannel"]

FIFO_DEPTH = 8
CARD_MEM_WORDS = CARD_MEM_TOTAL // 4


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
        chunk, ndw = next_chunk(m, host, rem, self.mps)
        # the next TLP's size, registered; n_ok: it belongs to the current host / rem
        n_chunk = Signal.like(chunk)
        n_ndw = Signal.like(ndw)
        n_ok = Signal()
        m.d.sync += [n_chunk.eq(chunk), n_ndw.eq(ndw), n_ok.eq(1)]

        # per-TLP registers
        t_host = Signal(64)
        t_ndw = Signal(11)
        t_fbe = Signal(4)
        t_lbe = Signal(4)
        nbeats = Signal(range(1024 // DPB + 2))
        k = Signal(range(1024 // DPB + 2))       # beat index in the TLP

        # ---- word reader: every word of the command, in order -------------------------------
        rd_addr = Signal(DWB - LB)
        rd_left = Signal(range(CARD_MEM_WORDS + 2))
        inflight = Signal()
        issue = (rd_left != 0) & (fifo.level + inflight < FIFO_DEPTH - 1)
        m.d.comb += [self.mem.addr.eq(rd_addr), self.mem.en.eq(issue),
                     fifo.w_data.eq(self.mem.data), fifo.w_en.eq(inflight)]
        m.d.sync += inflight.eq(issue)
        with m.If(issue):
            m.d.sync += [rd_addr.eq(rd_addr + 1), rd_left.eq(rd_left - 1)]

        # ---- beat builder: a DW pointer (rot) into the current word -------------------------
        # Consecutive TLPs take consecutive card DWs, so the pointer simply runs on; a beat
        # takes DWs rot.. of ``cur`` and, past the word's end, from the next word (FIFO head).
        cur = Signal(W)
        cur_ok = Signal()
        rot = Signal(max(LB, 1))
        nxt = fifo.r_data
        n_here = Signal(range(DPB + 1))          # DWs this beat carries
        m.d.comb += n_here.eq(Mux(k == nbeats - 1, t_ndw - k * DPB, DPB))
        spill = Signal()                         # the beat reaches into the next word
        m.d.comb += spill.eq(rot + n_here > DPB)
        done_word = Signal()                     # the beat uses up the current word
        m.d.comb += done_word.eq(rot + n_here >= DPB)
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
        rid = Cat(fidx, self.bus_num)
        tx = self.tx
        m.d.comb += [
            tx.p.hdr.eq(mem_hdr(m, True, t_host, t_ndw, rid, 0, t_fbe, t_lbe)),
            tx.p.data.eq(Cat(*lanes)),
            tx.p.sop.eq(k == 0),
            tx.p.eop.eq(k == nbeats - 1),
            tx.p.func.eq(fidx),
        ]
        for i in range(DPB):
            m.d.comb += tx.p.strb[i].eq(i < n_here)
        m.d.comb += self.busy.eq(rem != 0)

        def setup_tlp():
            """Take the next chunk (``n_ok`` must be set): its header fields, and advance
            host/card/rem past it."""
            fbe, lbe = be_first_last(host[:2], (host[:2] + n_chunk)[:2], n_ndw)
            m.d.sync += [
                t_host.eq(host), t_ndw.eq(n_ndw), t_fbe.eq(fbe), t_lbe.eq(lbe),
                nbeats.eq((n_ndw + DPB - 1) >> LB), k.eq(0),
                host.eq(host + n_chunk), card.eq(card + n_chunk), rem.eq(rem - n_chunk),
                n_ok.eq(0),
            ]

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    p = self.cmd.p
                    first_dw = p.card[2:]
                    last_dw = (p.card + p.length - 1)[2:CARD_ADDR_BITS]
                    m.d.sync += [fidx.eq(p.fidx), host.eq(p.host), card.eq(p.card),
                                 rem.eq(p.length), cur_ok.eq(0),
                                 rot.eq(first_dw[:LB] if LB else 0),
                                 rd_addr.eq(first_dw[LB:]),
                                 rd_left.eq(last_dw[LB:] - first_dw[LB:] + 1),
                                 n_ok.eq(0)]
                    m.next = "SETUP"
            with m.State("SETUP"):
                with m.If(n_ok):
                    setup_tlp()
                    m.next = "BEAT"
            with m.State("BEAT"):
                # the current word must be loaded, and the next one too if the beat spills
                with m.If(~cur_ok):
                    m.d.comb += fifo.r_en.eq(1)
                    with m.If(fifo.r_rdy):
                        m.d.sync += [cur.eq(nxt), cur_ok.eq(1)]
                with m.Else():
                    ok = ~spill | fifo.r_rdy
                    m.d.comb += tx.valid.eq(ok)
                    with m.If(ok & tx.ready):
                        m.d.sync += [k.eq(k + 1), rot.eq(rot + n_here)]
                        with m.If(done_word):
                            # move to the next word if it is there (else load it later)
                            m.d.comb += fifo.r_en.eq(1)
                            m.d.sync += [cur.eq(nxt), cur_ok.eq(fifo.r_rdy)]
                        with m.If(tx.p.eop):
                            with m.If(rem == 0):
                                m.next = "DONE"
                            with m.Elif(n_ok):
                                setup_tlp()     # back to back: the next TLP starts next cycle
                            with m.Else():
                                m.next = "SETUP"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.p.status.eq(DmaStatus.OK)]
                with m.If(self.done.ready):
                    m.next = "IDLE"
        return m
