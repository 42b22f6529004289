"""DMA descriptor queues: one ring per function in host memory, fetched and run by the card.

Per-function registers in BAR0 (byte offsets, :class:`regmap.DmaRegs`): ring base, ring
size, control (enable, MSI-X vector), producer index (the doorbell), consumer index (read
only), status. A descriptor is 32 bytes, little-endian:

====== ===== ================================================================================
0x00   u64   host (bus) address
0x08   u32   card memory address (any byte, like the host address)
0x0C   u32   length in bytes, 1..65536
0x10   u32   flags: bit 0 direction (0 host->card, 1 card->host), bit 1 interrupt when done
0x14   u32   status, written by the card (:class:`regmap.DescStatus`): 1 done,
             0x8000_0001 bad descriptor (a length of 0 or over 64 KiB, card range beyond
             card memory, host range past 2**64), 0x8000_0002 completion error (UR/CA from
             the host),
             0x8000_0003 page fault refused, 0x8000_0004 blocked (outside the domain)
====== ===== ================================================================================

The host address is an I/O virtual address of the function's domain when the PF driver gave
the function one (:mod:`hdl.iommu.translate`); the engine then cuts the transfer at 4 KiB pages and
translates each piece. A descriptor that does not fit in the domain ends as blocked, before
anything moves. A piece whose page is not present goes to the fault unit (:mod:`hdl.iommu.fault`):
a write's payload is staged, the fault is queued to the host, and the function is parked while
the engine serves the others. When the host resolves it the engine fetches the descriptor again
and goes on at the piece that faulted: a staged write is replayed from the staging buffer, a
read is simply retried. When the fault unit has no room, the function waits (parked) for room:
nothing is dropped.

The engine visits the functions round robin, fetches one descriptor (MemRd with tag 0 and the
function's requester ID; only with Bus Master Enable), runs it on the read or write channel,
writes the status DW back into the descriptor (a posted write that follows the data writes on
the same path, so the host never sees the status before the data), advances the consumer index
and raises the function's MSI-X vector if asked.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import DmaRegs, DescStatus, PAGE_SHIFT

from ..config import CardConfig
from ..memmap import Staging, CARD_MEM_BYTES, CARD_ADDR_BITS
from ..iface import (RegBusSignature, IrqRequestSignature, DmaCmd, DmaDone, DmaStatus, CPL_TIMEOUT,
                     XlateReq, XlateResp, XlateStatus, FaultReqSignature, ResumeSignature,
                     SlotFreeSignature, ReleaseSignature)
from ..pcie.tlp import tlp_stream, mem_hdr, Dw0, CplDw1, hdr_dw

__all__ = ["DmaQueues", "DESC_TAG", "DescStatus"]

DESC_TAG = 0


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
            "vf_reset": In(1),         # VF Enable was cleared: every VF's queue stops
            "xreq":    Out(stream.Signature(XlateReq)),
            "xresp":   In(stream.Signature(XlateResp)),
            "fault":   Out(FaultReqSignature()),
            "resume":  In(ResumeSignature()),
            "slot_free": Out(SlotFreeSignature()),
            "release": Out(ReleaseSignature()),
            # telemetry: the function being served, and one function's ring occupancy
            "busy":    Out(1),
            "busy_fidx": Out(8),
            "occ_fidx": In(8),
            "occ":     Out(16),
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
        # fault state per function
        parked = Signal(nf)          # a fault is open: wait for the host's resolution
        wroom = Signal(nf)           # a fault found no room in the fault unit: wait for room
        wroom_w = Signal(nf)         # ... for a write fault (needs a staging buffer)
        replay = Signal(nf)          # resume by replaying the staged payload of ``slot``
        refused = Signal(nf)         # the host refused the fault: finish with DescStatus.FAULT
        slot = Array(Signal(range(Staging.SLOTS), name=f"slot{i}") for i in range(nf))
        roff = Array(Signal(17, name=f"roff{i}") for i in range(nf))   # where to resume

        # ---- registers ----------------------------------------------------------------------
        base = DmaRegs.BASE // 4
        sel = (b.bar == 0) & (b.addr >= base) & (b.addr < base + 8)
        reg = b.addr - base
        f = b.fidx
        reset_f = Signal()           # a function's queue is reset (disable or FLR)
        reset_g = Signal(8)
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
                        m.d.comb += [reset_f.eq(1), reset_g.eq(f)]
                with m.Case(DmaRegs.PROD // 4 - base):
                    m.d.sync += prod[f].eq(b.wdata[:16])
        with m.If(self.flr):
            m.d.comb += [reset_f.eq(1), reset_g.eq(self.flr_fidx)]
            m.d.sync += en.bit_select(self.flr_fidx, 1).eq(0)
        m.d.comb += [self.release.stb.eq(reset_f), self.release.fidx.eq(reset_g)]
        vf_mask = ((1 << nf) - 1) & ~1
        with m.If(self.vf_reset):
            m.d.sync += en.eq(en & ~vf_mask)
            m.d.comb += self.release.vfs.eq(1)
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
                        m.d.sync += rdata.eq(Cat(busy & (cur == f), err.bit_select(f, 1),
                                                 parked.bit_select(f, 1) | wroom.bit_select(f, 1)))
        m.d.comb += b.rdata.eq(rdata)
        m.d.comb += [self.busy.eq(busy), self.busy_fidx.eq(cur)]
        with m.If(self.occ_fidx < nf):
            m.d.comb += self.occ.eq(prod[self.occ_fidx] - cons[self.occ_fidx])

        # ---- engine -------------------------------------------------------------------------
        ptr = Signal(range(nf))
        desc_addr = Signal(64)
        desc = Signal(256)
        dcount = Signal(range(9))
        status = Signal(32)
        is_write = Signal()
        off = Signal(17)             # bytes of the descriptor done
        seg = Signal(17)             # the piece being moved
        phys = Signal(64)
        vm = Signal(8)
        iova = Signal(64)

        d_host = desc[0:64]
        d_card = desc[64:96]
        d_len = desc[96:128]
        d_flags = desc[128:160]
        # (host + length past 2**64 would wrap to bus address 0: refused before anything moves)
        d_end = Signal(65)
        m.d.comb += d_end.eq(d_host + d_len)
        bad = ((d_len == 0) | (d_len > CARD_MEM_BYTES) | (d_card >= CARD_MEM_BYTES)
               | ((d_card + d_len) > CARD_MEM_BYTES) | (d_end[64] & (d_end[:64] != 0)))
        m.d.comb += iova.eq(d_host + off)
        card_at = Signal(CARD_ADDR_BITS)
        m.d.comb += card_at.eq(d_card + off)
        lb = exact_log2(W // 8)
        stage_at = Signal(CARD_ADDR_BITS)
        m.d.comb += stage_at.eq(Staging.BASE + slot[cur] * Staging.STRIDE + card_at[:lb])

        cmd_p = [self.rd_cmd.p, self.wr_cmd.p]
        for p in cmd_p:
            m.d.comb += [p.fidx.eq(cur), p.host.eq(phys), p.length.eq(seg),
                         p.card.eq(Mux(replay.bit_select(cur, 1), stage_at, card_at))]
        m.d.comb += [self.xreq.p.fidx.eq(cur), self.xreq.p.iova.eq(iova),
                     self.xreq.p.last.eq(d_host + d_len - 1)]
        fq = self.fault
        m.d.comb += [fq.fidx.eq(cur), fq.vm.eq(vm), fq.iova.eq(iova), fq.write.eq(is_write),
                     fq.card.eq(card_at), fq.length.eq(seg)]
        m.d.comb += self.slot_free.slot.eq(slot[cur])

        # outgoing TLPs: descriptor fetch (MemRd 8 DW) and status write (MemWr 1 DW)
        send_status = Signal()
        st_addr = Signal(64)
        m.d.comb += st_addr.eq(desc_addr + 0x14)
        rid = Cat(cur, self.bus_num)
        m.d.comb += [
            self.tx.p.hdr.eq(Mux(send_status, mem_hdr(m, True, st_addr, 1, rid, last_be=0),
                                 mem_hdr(m, False, desc_addr, 8, rid, tag=DESC_TAG))),
            self.tx.p.data.eq(status),
            self.tx.p.strb.eq(Mux(send_status, 1, 0)),
            self.tx.p.sop.eq(1), self.tx.p.eop.eq(1), self.tx.p.func.eq(cur),
        ]

        c = self.cpl
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        waiting = Signal()
        wait_cnt = Signal(range(CPL_TIMEOUT + 1))

        def clear_fault_state(g):
            return [parked.bit_select(g, 1).eq(0), wroom.bit_select(g, 1).eq(0),
                    replay.bit_select(g, 1).eq(0), refused.bit_select(g, 1).eq(0),
                    roff[g].eq(0)]

        with m.FSM() as fsm:
            m.d.comb += busy.eq(~fsm.ongoing("SCAN"))
            with m.State("SCAN"):
                room_ok = Mux(wroom_w.bit_select(ptr, 1), fq.ok_w, fq.ok_r)
                pending = en.bit_select(ptr, 1) & ~err.bit_select(ptr, 1) & \
                    self.bme.bit_select(ptr, 1) & (prod[ptr] != cons[ptr]) & \
                    ~parked.bit_select(ptr, 1) & (~wroom.bit_select(ptr, 1) | room_ok)
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
                m.d.sync += [is_write.eq(d_flags[0]), off.eq(roff[cur]),
                             wroom.bit_select(cur, 1).eq(0)]
                with m.If((dcount != 8) | bad):
                    m.d.sync += status.eq(DescStatus.BAD_DESC)
                    m.next = "STATUS"
                with m.Elif(refused.bit_select(cur, 1)):
                    m.d.sync += [status.eq(DescStatus.FAULT), refused.bit_select(cur, 1).eq(0)]
                    m.next = "STATUS"
                with m.Else():
                    m.next = "XLATE"
            with m.State("XLATE"):
                m.d.comb += self.xreq.valid.eq(1)
                with m.If(self.xreq.ready):
                    m.next = "XWAIT"
            with m.State("XWAIT"):
                r = self.xresp.p
                rest = Signal(17)
                room = Signal(PAGE_SHIFT + 1)
                m.d.comb += [rest.eq(d_len[:17] - off), room.eq((1 << PAGE_SHIFT) - iova[:PAGE_SHIFT])]
                m.d.comb += self.xresp.ready.eq(1)
                with m.If(self.xresp.valid):
                    m.d.sync += [phys.eq(r.phys), vm.eq(r.vm),
                                 seg.eq(Mux(r.bypass | (rest < room), rest, room))]
                    with m.Switch(r.status):
                        with m.Case(XlateStatus.OK):
                            m.next = "RUN"
                        with m.Case(XlateStatus.NOT_PRESENT):
                            m.next = "FAULT"
                        with m.Case(XlateStatus.BLOCKED):
                            m.d.sync += status.eq(DescStatus.BLOCKED)
                            m.next = "STATUS"
                        with m.Default():
                            m.d.sync += status.eq(DescStatus.CPL_ERROR)
                            m.next = "STATUS"
            with m.State("FAULT"):
                with m.If(replay.bit_select(cur, 1)):
                    # the page went away again before the replay: stage afresh from card memory
                    m.d.comb += self.slot_free.stb.eq(1)
                    m.d.sync += replay.bit_select(cur, 1).eq(0)
                with m.Elif(Mux(is_write, fq.ok_w, fq.ok_r)):
                    m.d.comb += fq.stb.eq(1)
                    m.next = "FWAIT"
                with m.Else():
                    m.d.sync += [wroom.bit_select(cur, 1).eq(1),
                                 wroom_w.bit_select(cur, 1).eq(is_write), roff[cur].eq(off)]
                    m.next = "NEXT"
            with m.State("FWAIT"):
                with m.If(fq.done):
                    m.d.sync += [parked.bit_select(cur, 1).eq(1), roff[cur].eq(off),
                                 replay.bit_select(cur, 1).eq(is_write), slot[cur].eq(fq.slot)]
                    m.next = "NEXT"
            with m.State("RUN"):
                m.d.comb += [self.rd_cmd.valid.eq(~is_write), self.wr_cmd.valid.eq(is_write)]
                with m.If(Mux(is_write, self.wr_cmd.ready, self.rd_cmd.ready)):
                    m.next = "WAITX"
            with m.State("WAITX"):
                m.d.comb += [self.rd_done.ready.eq(~is_write), self.wr_done.ready.eq(is_write)]
                done_v = Mux(is_write, self.wr_done.valid, self.rd_done.valid)
                done_s = Mux(is_write, self.wr_done.p.status, self.rd_done.p.status)
                with m.If(done_v):
                    with m.If(replay.bit_select(cur, 1)):
                        m.d.comb += self.slot_free.stb.eq(1)
                        m.d.sync += replay.bit_select(cur, 1).eq(0)
                    m.d.sync += off.eq(off + seg)
                    with m.If(done_s != DmaStatus.OK):
                        m.d.sync += status.eq(DescStatus.CPL_ERROR)
                        m.next = "STATUS"
                    with m.Elif(off + seg == d_len[:17]):
                        m.d.sync += status.eq(DescStatus.DONE)
                        m.next = "STATUS"
                    with m.Else():
                        m.next = "XLATE"
            with m.State("STATUS"):
                m.d.comb += [send_status.eq(1), self.tx.valid.eq(1)]
                with m.If(self.tx.ready):
                    m.d.sync += [cons[cur].eq(cons[cur] + 1), roff[cur].eq(0)]
                    with m.If(replay.bit_select(cur, 1)):    # blocked / failed during a replay
                        m.d.comb += self.slot_free.stb.eq(1)
                        m.d.sync += replay.bit_select(cur, 1).eq(0)
                    with m.If(d_flags[1]):
                        m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(cur),
                                     self.irq.vector.eq(vec[cur])]
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
                m.next = "SCAN"

        # the host resolved a fault
        rs = self.resume
        with m.If(rs.stb):
            m.d.sync += parked.bit_select(rs.fidx, 1).eq(0)
            with m.If(~rs.ok):
                m.d.sync += [refused.bit_select(rs.fidx, 1).eq(1),
                             replay.bit_select(rs.fidx, 1).eq(0)]
        # a reset function forgets its queue and its faults (the fault unit frees its buffer)
        def clear_queue(g):
            """Function ``g``'s queue back to its reset state (indices, error, fault state)."""
            return [prod[g].eq(0), cons[g].eq(0), err.bit_select(g, 1).eq(0),
                    *clear_fault_state(g)]

        with m.If(reset_f):
            m.d.sync += clear_queue(reset_g)
        with m.If(self.vf_reset):
            for g in range(1, nf):
                m.d.sync += clear_queue(g)

        # a completion for tag 0 that arrives when no fetch is outstanding
        with m.If(~waiting & c.valid):
            m.d.comb += c.ready.eq(1)
            with m.If(c.p.sop):
                m.d.comb += self.unexp.eq(1)
        return m
