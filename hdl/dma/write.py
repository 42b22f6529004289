"""DMA write channel: card memory -> host memory.

A command becomes MemWr TLPs with the function's requester ID, each at most Max Payload Size
and never crossing an MPS (hence a 4 KiB) boundary, sent back to back. The next TLP's size is
computed into a register (``n_chunk``, ready a cycle after the previous TLP was set up), so the
MPS field, the boundary arithmetic and the header never share a clock. A command's first TLP
waits one cycle for it; after that it is always ready when a TLP ends (the first TLP spends a
cycle loading its word, every later one but the last is a full MPS of 8 beats or more), and
the end-of-TLP check that waits for it is a guard, not a path the data takes.

Host and card addresses are independent byte addresses. The TLPs' payload is one stream of
host DWs (every TLP but the first starts on an MPS boundary), so it is one stream of card bytes
too, starting ``host[1:0]`` bytes before the command's card address. All card memory words
that stream touches go through a small FIFO (the block RAM has one cycle of read latency); a
byte pointer runs through them, and each payload beat is the current word and the next one
shifted by the pointer (a barrel shift by bytes). Payload bytes outside the TLP's byte enables
are sent as zero (no card memory beyond the command leaks onto the link).

A command whose host range passes the top of the 64-bit space (host + length > 2**64) is
refused whole (``DmaStatus.RANGE``): no TLP goes out.
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..memmap import CARD_ADDR_BITS
from ..iface import DmaCmd, DmaDone, DmaStatus, MemReadPort, LinkSignature
from ..pcie.tlp import tlp_stream, mem_hdr
from .common import next_chunk, be_first_last

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
            "link":     In(LinkSignature()),
            "busy":    Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        WB = W // 8
        DPB = W // 32
        LB = exact_log2(DPB) if DPB > 1 else 0
        BLB = exact_log2(WB)                     # byte-lane bits of a card memory word
        WAB = CARD_ADDR_BITS - BLB               # card memory word-address bits

        m.submodules.fifo = fifo = SyncFIFOBuffered(width=W, depth=FIFO_DEPTH)

        fidx = Signal(8)
        host = Signal(64)
        rem = Signal(18)
        chunk, ndw = next_chunk(m, host, rem, self.link.mps)
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

        # ---- word reader: every word of the command's byte stream, in order -----------------
        rd_addr = Signal(WAB)
        rd_left = Signal(WAB + 1)
        inflight = Signal()
        issue = (rd_left != 0) & (fifo.level + inflight < FIFO_DEPTH - 1)
        m.d.comb += [self.mem.addr.eq(rd_addr), self.mem.en.eq(issue),
                     fifo.w_data.eq(self.mem.data), fifo.w_en.eq(inflight)]
        m.d.sync += inflight.eq(issue)
        with m.If(issue):
            m.d.sync += [rd_addr.eq(rd_addr + 1), rd_left.eq(rd_left - 1)]

        # ---- beat builder: a byte pointer (rot) into the current word -----------------------
        # Consecutive TLPs take consecutive card bytes, so the pointer simply runs on; a beat
        # is the current word and the next (FIFO head) shifted right by ``rot`` bytes. The
        # stream's last word has no next word: what a beat would take past it is beyond the
        # command, outside the byte enables.
        cur = Signal(W)
        cur_ok = Signal()
        cur_w = Signal(WAB)                      # card word of ``cur``
        last_w = Signal(WAB)                     # the command's last card word
        rot = Signal(BLB)
        nxt = fifo.r_data
        n_here = Signal(range(DPB + 1))          # DWs this beat carries
        m.d.comb += n_here.eq(Mux(k == nbeats - 1, t_ndw - k * DPB, DPB))
        used = Signal(BLB + 2)                   # bytes of cur and nxt the beat spans
        m.d.comb += used.eq(rot + (n_here << 2))
        spill = Signal()                         # the beat reaches into the next word
        m.d.comb += spill.eq((used > WB) & (cur_w != last_w))
        done_word = Signal()                     # the beat uses up the current word
        m.d.comb += done_word.eq(used >= WB)
        lanes = Signal(W)
        m.d.comb += lanes.eq((Cat(cur, nxt) >> Cat(C(0, 3), rot))[:W])
        # byte enables of the beat (first / last DW of the TLP), to zero the bytes outside them
        bmask = Signal(WB)
        for i in range(DPB):
            j = k * DPB + i
            be = Mux(j == 0, t_fbe, Mux(j == t_ndw - 1, t_lbe, 0xF))
            m.d.comb += bmask[4 * i:4 * i + 4].eq(Mux(i < n_here, be, 0))
        rid = Cat(fidx, self.link.bus_num)
        tx = self.tx
        m.d.comb += [
            tx.p.hdr.eq(mem_hdr(m, True, t_host, t_ndw, rid, 0, t_fbe, t_lbe)),
            tx.p.data.eq(lanes & Cat(bmask[i].replicate(8) for i in range(WB))),
            tx.p.sop.eq(k == 0),
            tx.p.eop.eq(k == nbeats - 1),
            tx.p.func.eq(fidx),
        ]
        for i in range(DPB):
            m.d.comb += tx.p.strb[i].eq(i < n_here)
        m.d.comb += self.busy.eq(rem != 0)

        def setup_tlp():
            """Take the next chunk (``n_ok`` must be set): its header fields, and advance
            host/rem past it (the card side is the byte pointer's)."""
            fbe, lbe = be_first_last(host[:2], (host[:2] + n_chunk)[:2], n_ndw)
            m.d.sync += [
                t_host.eq(host), t_ndw.eq(n_ndw), t_fbe.eq(fbe), t_lbe.eq(lbe),
                nbeats.eq((n_ndw + DPB - 1) >> LB), k.eq(0),
                host.eq(host + n_chunk), rem.eq(rem - n_chunk),
                n_ok.eq(0),
            ]

        past_top = Signal()
        end65 = Signal(65)
        m.d.comb += end65.eq(self.cmd.p.host + self.cmd.p.length)
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    p = self.cmd.p
                    # card byte of the payload stream's byte 0 (the first DW's byte 0)
                    start = Signal(CARD_ADDR_BITS)
                    end = Signal(CARD_ADDR_BITS)
                    m.d.comb += [start.eq(p.card - p.host[:2]), end.eq(p.card + p.length - 1)]
                    over = end65[64] & (end65[:64] != 0)
                    m.d.sync += [fidx.eq(p.fidx), host.eq(p.host),
                                 rem.eq(Mux(over, 0, p.length)), cur_ok.eq(0),
                                 rot.eq(start[:BLB]), cur_w.eq(start[BLB:]), last_w.eq(end[BLB:]),
                                 rd_addr.eq(start[BLB:]),
                                 rd_left.eq(Mux(over, 0, (end[BLB:] - start[BLB:])[:WAB] + 1)),
                                 n_ok.eq(0), past_top.eq(over)]
                    with m.If(over):
                        m.next = "DONE"
                    with m.Else():
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
                        m.d.sync += [k.eq(k + 1), rot.eq(used[:BLB])]
                        with m.If(done_word):
                            # move to the next word if it is there (else load it later); past
                            # the last word there is none
                            m.d.sync += cur_w.eq(cur_w + 1)
                            with m.If(cur_w != last_w):
                                m.d.comb += fifo.r_en.eq(1)
                            m.d.sync += [cur.eq(nxt), cur_ok.eq(fifo.r_rdy & (cur_w != last_w))]
                        with m.If(tx.p.eop):
                            with m.If(rem == 0):
                                m.next = "DONE"
                            with m.Elif(n_ok):
                                setup_tlp()     # back to back: the next TLP starts next cycle
                            with m.Else():
                                m.next = "SETUP"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1),
                             self.done.p.status.eq(Mux(past_top, DmaStatus.RANGE, DmaStatus.OK))]
                with m.If(self.done.ready):
                    m.next = "IDLE"
        return m
