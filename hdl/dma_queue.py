"""DMA descriptor queues: one ring per function in host memory, fetched and run by the card.

Per-function registers in BAR0 (byte offsets, :class:`hdl.params.DmaRegs`): ring base, ring
size, control (enable, MSI-X vector), producer index (the doorbell), consumer index (read
only), status. A descriptor is 32 bytes, little-endian:

====== ===== ================================================================================
0x00   u64   host (bus) address
0x08   u32   card memory address (its low two bits equal the host address's)
0x0C   u32   length in bytes, 1..65536
0x10   u32   flags: bit 0 direction (0 host->card, 1 card->host), bit 1 interrupt when done
0x14   u32   status, written by the card: 1 done, 0x8000_0001 bad descriptor,
             0x8000_0002 completion error (UR/CA from the host)
====== ===== ================================================================================

The engine visits the functions round robin, fetches one descriptor (MemRd with tag 0 and the
function's requester ID; only with Bus Master Enable), runs it on the read or write channel,
writes the status DW back into the descriptor (a posted write that follows the data writes on
the same path, so the host never sees the status before the data), advances the consumer index
and raises the function's MSI-X vector if asked.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .params import CardConfig, DmaRegs
from .regbus import RegBusSignature
from .func_regs import IrqRequestSignature
from .tlp import tlp_stream, make_hdr, TlpKind, Dw0, CplDw1, hdr_dw
from .dma_common import DmaCmd, DmaDone, DmaStatus, CARD_MEM_BYTES
from .dma_read import CPL_TIMEOUT

__all__ = ["DmaQueues", "DESC_TAG", "DescStatus"]

DESC_TAG = 0


class DescStatus:
    DONE = 0x0000_0001
    BAD_DESC = 0x8000_0001
    CPL_ERROR = 0x8000_0002


class DmaQueues(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        W = cfg.data_width
        super().__init__({
            "bus":     In(RegBusSignature()),
            "tx":      Out(tlp_stream(W)),
            "cpl":     In(tlp_stream(W)),          # completions with tag DESC_TAG
            "rd_cmd":  Out(stream.Signature(DmaCmd)),
            "rd_done": In(stream.Signature(DmaDone)),
            "wr_cmd":  Out(stream.Signature(DmaCmd)),
            "wr_done": In(stream.Signature(DmaDone)),
            "irq":     Out(IrqRequestSignature()),
            "bus_num": In(8),
            "bme":     In(cfg.num_functions),
            "unexp":   Out(1),
            "flr":     In(1),          # function level reset of ``flr_fidx``: its queue stops
            "flr_fidx": In(8),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        W = cfg.data_width
        DPB = W // 32
        b = self.bus

        ring = Array(Signal(64, name=f"ring{i}") for i in range(nf))
        rlog = Array(Signal(4, name=f"rlog{i}") for i in range(nf))
        prod = Array(Signal(16, name=f"prod{i}") for i in range(nf))
        cons = Array(Signal(16, name=f"cons{i}") for i in range(nf))
        vec = Array(Signal(5, name=f"vec{i}") for i in range(nf))
        en = Signal(nf)
        err = Signal(nf)

        # ---- registers ----------------------------------------------------------------------
        base = DmaRegs.BASE // 4
        sel = (b.bar == 0) & (b.addr >= base) & (b.addr < base + 8)
        reg = b.addr - base
        f = b.fidx
        with m.If(b.we & sel & (b.be == 0xF)):
            with m.Switch(reg):
                with m.Case(DmaRegs.RING_LO // 4 - base):
                    m.d.sync += ring[f][:32].eq(Cat(C(0, 5), b.wdata[5:]))
                with m.Case(DmaRegs.RING_HI // 4 - base):
                    m.d.sync += ring[f][32:].eq(b.wdata)
                with m.Case(DmaRegs.RING_LOG2 // 4 - base):
                    m.d.sync += rlog[f].eq(Mux(b.wdata[:4] > 8, 8, b.wdata[:4]))
                with m.Case(DmaRegs.CTRL // 4 - base):
                    m.d.sync += [en.bit_select(f, 1).eq(b.wdata[0]), vec[f].eq(b.wdata[8:13])]
                    with m.If(~b.wdata[0]):
                        m.d.sync += [prod[f].eq(0), cons[f].eq(0), err.bit_select(f, 1).eq(0)]
                with m.Case(DmaRegs.PROD // 4 - base):
                    m.d.sync += prod[f].eq(b.wdata[:16])
        with m.If(self.flr):
            g = self.flr_fidx
            m.d.sync += [en.bit_select(g, 1).eq(0), err.bit_select(g, 1).eq(0),
                         prod[g].eq(0), cons[g].eq(0)]
        rdata = Signal(32)
        busy = Signal()
        cur = Signal(8)
        with m.If(b.re):
            m.d.sync += rdata.eq(0)
            with m.If(sel):
                with m.Switch(reg):
                    with m.Case(DmaRegs.RING_LO // 4 - base):
                        m.d.sync += rdata.eq(ring[f][:32])
                    with m.Case(DmaRegs.RING_HI // 4 - base):
                        m.d.sync += rdata.eq(ring[f][32:])
                    with m.Case(DmaRegs.RING_LOG2 // 4 - base):
                        m.d.sync += rdata.eq(rlog[f])
                    with m.Case(DmaRegs.CTRL // 4 - base):
                        m.d.sync += rdata.eq(Cat(en.bit_select(f, 1), C(0, 7), vec[f]))
                    with m.Case(DmaRegs.PROD // 4 - base):
                        m.d.sync += rdata.eq(prod[f])
                    with m.Case(DmaRegs.CONS // 4 - base):
                        m.d.sync += rdata.eq(cons[f])
                    with m.Case(DmaRegs.STATUS // 4 - base):
                        m.d.sync += rdata.eq(Cat(busy & (cur == f), err.bit_select(f, 1)))
        m.d.comb += b.rdata.eq(rdata)

        # ---- engine -------------------------------------------------------------------------
        ptr = Signal(range(nf))
        desc_addr = Signal(64)
        desc = Signal(256)
        dcount = Signal(range(9))
        status = Signal(32)
        is_write = Signal()

        d_host = desc[0:64]
        d_card = desc[64:96]
        d_len = desc[96:128]
        d_flags = desc[128:160]
        bad = ((d_len == 0) | (d_len > CARD_MEM_BYTES) | (d_card >= CARD_MEM_BYTES)
               | ((d_card + d_len) > CARD_MEM_BYTES) | (d_card[:2] != d_host[:2]))

        cmd_p = [self.rd_cmd.p, self.wr_cmd.p]
        for p in cmd_p:
            m.d.comb += [p.fidx.eq(cur), p.host.eq(d_host), p.card.eq(d_card), p.length.eq(d_len)]

        # outgoing TLPs: descriptor fetch (MemRd 8 DW) and status write (MemWr 1 DW)
        send_status = Signal()
        is64 = desc_addr[32:] != 0
        st_addr = Signal(64)
        m.d.comb += st_addr.eq(desc_addr + 0x14)
        st64 = st_addr[32:] != 0
        rid = Cat(cur, self.bus_num)
        rd_dw0 = Cat(C(8, 10), C(0, 14), Mux(is64, TlpKind.MRD64, TlpKind.MRD32))
        rd_dw1 = Cat(C(0xF, 4), C(0xF, 4), C(DESC_TAG, 8), rid)
        wr_dw0 = Cat(C(1, 10), C(0, 14), Mux(st64, TlpKind.MWR64, TlpKind.MWR32))
        wr_dw1 = Cat(C(0xF, 4), C(0, 4), C(0, 8), rid)
        a_lo = Cat(C(0, 2), desc_addr[2:32])
        s_lo = Cat(C(0, 2), st_addr[2:32])
        m.d.comb += [
            self.tx.p.hdr.eq(Mux(send_status,
                                 make_hdr(wr_dw0, wr_dw1, Mux(st64, st_addr[32:], s_lo), Mux(st64, s_lo, 0)),
                                 make_hdr(rd_dw0, rd_dw1, Mux(is64, desc_addr[32:], a_lo), Mux(is64, a_lo, 0)))),
            self.tx.p.data.eq(status),
            self.tx.p.strb.eq(Mux(send_status, 1, 0)),
            self.tx.p.sop.eq(1), self.tx.p.eop.eq(1), self.tx.p.func.eq(cur),
        ]

        c = self.cpl
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        waiting = Signal()
        wait_cnt = Signal(range(CPL_TIMEOUT + 1))

        with m.FSM() as fsm:
            m.d.comb += busy.eq(~fsm.ongoing("SCAN"))
            with m.State("SCAN"):
                pending = en.bit_select(ptr, 1) & ~err.bit_select(ptr, 1) & \
                    self.bme.bit_select(ptr, 1) & (prod[ptr] != cons[ptr])
                with m.If(pending):
                    mask = (C(1, 16) << rlog[ptr]) - 1
                    m.d.sync += [cur.eq(ptr),
                                 desc_addr.eq(ring[ptr] + ((cons[ptr] & mask) << 5)),
                                 dcount.eq(0)]
                    m.next = "FETCH"
                with m.Else():
                    m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
            with m.State("FETCH"):
                m.d.sync += wait_cnt.eq(0)
                m.d.comb += self.tx.valid.eq(1)
                with m.If(self.tx.ready):
                    m.next = "WAITD"
            with m.State("WAITD"):
                m.d.comb += [c.ready.eq(1), waiting.eq(1)]
                m.d.sync += wait_cnt.eq(wait_cnt + 1)
                with m.If(~c.valid & (wait_cnt == CPL_TIMEOUT)):
                    m.d.sync += err.bit_select(cur, 1).eq(1)    # completion timeout
                    m.next = "NEXT"
                with m.If(c.valid):
                    with m.If(c.p.sop & ((cd1.status != 0) | (cd0.fmt != 0b010))):
                        m.d.sync += err.bit_select(cur, 1).eq(1)
                        with m.If(c.p.eop):
                            m.next = "NEXT"
                        with m.Else():
                            m.next = "DRAIN"
                    with m.Else():
                        for j in range(DPB):
                            with m.If(c.p.strb[j] & (dcount + j < 8)):
                                m.d.sync += desc.word_select(dcount + j, 32).eq(c.p.data[32 * j:32 * j + 32])
                        m.d.sync += dcount.eq(dcount + sum(c.p.strb[j] for j in range(DPB)))
                        with m.If(c.p.eop):
                            m.next = "DECODE"
            with m.State("DRAIN"):
                m.d.comb += c.ready.eq(~c.p.sop)
                with m.If(c.valid & (c.p.eop | c.p.sop)):
                    m.next = "NEXT"
            with m.State("DECODE"):
                with m.If((dcount != 8) | bad):
                    m.d.sync += status.eq(DescStatus.BAD_DESC)
                    m.next = "STATUS"
                with m.Else():
                    m.d.sync += is_write.eq(d_flags[0])
                    m.next = "RUN"
            with m.State("RUN"):
                m.d.comb += [self.rd_cmd.valid.eq(~is_write), self.wr_cmd.valid.eq(is_write)]
                with m.If(Mux(is_write, self.wr_cmd.ready, self.rd_cmd.ready)):
                    m.next = "WAITX"
            with m.State("WAITX"):
                m.d.comb += [self.rd_done.ready.eq(~is_write), self.wr_done.ready.eq(is_write)]
                done_v = Mux(is_write, self.wr_done.valid, self.rd_done.valid)
                done_s = Mux(is_write, self.wr_done.p.status, self.rd_done.p.status)
                with m.If(done_v):
                    m.d.sync += status.eq(Mux(done_s == DmaStatus.OK, DescStatus.DONE,
                                              DescStatus.CPL_ERROR))
                    m.next = "STATUS"
            with m.State("STATUS"):
                m.d.comb += [send_status.eq(1), self.tx.valid.eq(1)]
                with m.If(self.tx.ready):
                    m.d.sync += cons[cur].eq(cons[cur] + 1)
                    with m.If(d_flags[1]):
                        m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(cur),
                                     self.irq.vector.eq(vec[cur])]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
                m.next = "SCAN"

        # a completion for tag 0 that arrives when no fetch is outstanding
        with m.If(~waiting & c.valid):
            m.d.comb += c.ready.eq(1)
            with m.If(c.p.sop):
                m.d.comb += self.unexp.eq(1)
        return m
