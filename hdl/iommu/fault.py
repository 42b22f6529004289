"""The I/O page fault unit: staging buffers, the fault buffer queue (FBQ), the I/O page fault
queue (IOPF) and the host's completion queue (CQ). One unit serves every function.

A fault comes from the DMA queue engine (``fault`` port) when a page is not present:

* a **write** (card -> host): the segment's payload is copied from card memory into a free
  staging buffer (:class:`hdl.memmap.Staging`, keeping its byte lane), then an FBQ entry
  (staging address, length, function, slot) and an IOPF entry (IOVA, function, VM, write flag,
  FBQ index) are written to host memory, in that order, then the PF's fault MSI-X vector;
* a **read** (host -> card): only the IOPF entry (no FBQ entry, FBQ index 0xFFFF) and the MSI-X.

The engine only raises a fault when ``ok_w`` / ``ok_r`` say there is room (queue space, a
free staging buffer); otherwise it parks the function and retries later, so nothing is dropped.
After ``done`` it parks the function and goes on serving the others.

The host resolves a fault with a CQ entry and the ``CQ_PROD`` doorbell. The unit fetches the
entry (MemRd, tag :data:`CQ_TAG`, PF requester ID) and tells the engine to resume the
function (``resume``): status 0 -- retry (the engine replays the staged payload through the
device TLB and frees the staging buffer with ``slot_free``); status 1 -- refused (the staging
buffer is freed here; the engine finishes the descriptor with a fault status). A CQ entry for a
function without an open fault is counted in ``CQ_BAD`` and ignored. Formats and registers:
:class:`regmap.FaultRegs`.
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import FaultRegs as R

from ..config import CardConfig
from ..memmap import Staging, CARD_ADDR_BITS
from ..iface import (RegBusSignature, IrqRequestSignature, MemReadPort, MemWritePort, CPL_TIMEOUT,
                     FaultReqSignature, ReleaseSignature, ResumeSignature, SlotFreeSignature)
from ..pcie.tlp import tlp_stream, mem_hdr, Dw0, CplDw1, hdr_dw

__all__ = ["FaultUnit", "CQ_TAG"]

CQ_TAG = 2


class FaultUnit(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        W = cfg.data_width
        super().__init__({
            "bus":       In(RegBusSignature()),
            "fault":     In(FaultReqSignature()),
            "resume":    Out(ResumeSignature()),
            "slot_free": In(SlotFreeSignature()),
            "release":   In(ReleaseSignature()),
            "tx":        Out(tlp_stream(W)),
            "cpl":       In(tlp_stream(W)),        # completions with tag CQ_TAG
            "irq":       Out(IrqRequestSignature()),
            "mem_rd":    Out(MemReadPort(W)),
            "mem_wr":    Out(MemWritePort(W)),
            "mem_busy":  Out(1),                   # the copier owns card memory's ports
            "bus_num":   In(8),
            "unexp":     Out(1),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        W = cfg.data_width
        WB = W // 8
        LB = exact_log2(WB)
        DPB = W // 32
        NS = Staging.SLOTS
        b = self.bus

        # ---- registers ----------------------------------------------------------------------
        fbq_base = Signal(64)
        iopf_base = Signal(64)
        cq_base = Signal(64)
        fbq_log = Signal(4)
        iopf_log = Signal(4)
        cq_log = Signal(4)
        en = Signal()
        vec = Signal(5)
        fbq_prod = Signal(16)
        fbq_cons = Signal(16)
        iopf_prod = Signal(16)
        iopf_cons = Signal(16)
        cq_prod = Signal(16)
        cq_cons = Signal(16)
        faults = Signal(32)
        cq_bad = Signal(32)
        busy = Signal(NS)                        # staging slots in use
        owner = Array(Signal(8, name=f"owner{i}") for i in range(NS))
        open_ = Signal(nf)                       # functions with an unresolved fault

        sel = (b.fidx == 0) & (b.bar == 2) & (b.addr >= R.FBQ_LO // 4) & (b.addr <= R.CQ_BAD // 4)
        bases = {R.FBQ_LO: (fbq_base, fbq_log), R.IOPF_LO: (iopf_base, iopf_log),
                 R.CQ_LO: (cq_base, cq_log)}
        with m.If(b.we & sel & (b.be == 0xF)):
            with m.Switch(b.addr):
                for lo, (base, log) in bases.items():
                    with m.Case(lo // 4):
                        m.d.sync += base[:32].eq(Cat(C(0, 4), b.wdata[4:]))
                    with m.Case(lo // 4 + 1):
                        m.d.sync += base[32:].eq(b.wdata)
                    with m.Case(lo // 4 + 2):
                        m.d.sync += log.eq(Mux(b.wdata[:4] > 8, 8, b.wdata[:4]))
                with m.Case(R.CTRL // 4):
                    m.d.sync += [en.eq(b.wdata[0]), vec.eq(b.wdata[8:13])]
                    with m.If(~b.wdata[0]):
                        m.d.sync += [fbq_prod.eq(0), fbq_cons.eq(0), iopf_prod.eq(0),
                                     iopf_cons.eq(0), cq_prod.eq(0), cq_cons.eq(0)]
                with m.Case(R.FBQ_CONS // 4):
                    m.d.sync += fbq_cons.eq(b.wdata[:16])
                with m.Case(R.IOPF_CONS // 4):
                    m.d.sync += iopf_cons.eq(b.wdata[:16])
                with m.Case(R.CQ_PROD // 4):
                    m.d.sync += cq_prod.eq(b.wdata[:16])
        rdata = Signal(32)
        with m.If(b.re):
            m.d.sync += rdata.eq(0)
            with m.If(sel):
                with m.Switch(b.addr):
                    for lo, (base, log) in bases.items():
                        with m.Case(lo // 4):
                            m.d.sync += rdata.eq(base[:32])
                        with m.Case(lo // 4 + 1):
                            m.d.sync += rdata.eq(base[32:])
                        with m.Case(lo // 4 + 2):
                            m.d.sync += rdata.eq(log)
                    regs = {R.CTRL: Cat(en, C(0, 7), vec), R.FBQ_PROD: fbq_prod,
                            R.FBQ_CONS: fbq_cons, R.IOPF_PROD: iopf_prod,
                            R.IOPF_CONS: iopf_cons, R.CQ_PROD: cq_prod, R.CQ_CONS: cq_cons,
                            R.FAULTS: faults, R.STAGE_BUSY: busy, R.CQ_BAD: cq_bad}
                    for off, sig in regs.items():
                        with m.Case(off // 4):
                            m.d.sync += rdata.eq(sig)
        m.d.comb += b.rdata.eq(rdata)

        # ---- room for a fault ---------------------------------------------------------------
        def room(prod, cons, log):
            used = Signal(16)
            m.d.comb += used.eq(prod - cons)
            return used < (C(1, 9) << log)

        free_slot = Signal(range(NS))
        any_free = Signal()
        for i in reversed(range(NS)):
            with m.If(~busy[i]):
                m.d.comb += [free_slot.eq(i), any_free.eq(1)]
        idle = Signal()
        iopf_room = room(iopf_prod, iopf_cons, iopf_log)
        m.d.comb += [
            self.fault.ok_r.eq(en & idle & iopf_room),
            self.fault.ok_w.eq(en & idle & iopf_room & room(fbq_prod, fbq_cons, fbq_log) & any_free),
        ]

        # ---- the fault being raised ---------------------------------------------------------
        f_fidx = Signal(8)
        f_vm = Signal(8)
        f_iova = Signal(64)
        f_write = Signal()
        f_len = Signal(13)
        f_slot = Signal(range(NS))
        src_w = Signal(CARD_ADDR_BITS - LB)      # card memory words
        dst = Signal(CARD_ADDR_BITS)             # staging byte address
        words = Signal(range(4096 // WB + 3))
        k = Signal(range(4096 // WB + 3))
        wvalid = Signal()
        waddr = Signal(CARD_ADDR_BITS - LB)

        # slot bookkeeping: freed by the engine after a replay, by a refusal, by a reset
        take = Signal()
        free_by_cq = Signal(nf)                  # one-hot function whose slots a refusal frees
        with m.If(take & f_write):
            m.d.sync += [busy.bit_select(f_slot, 1).eq(1), owner[f_slot].eq(f_fidx)]
        for i in range(NS):
            with m.If((self.slot_free.stb & (self.slot_free.slot == i))
                      | (self.release.stb & (owner[i] == self.release.fidx))
                      | (self.release.vfs & (owner[i] != 0))
                      | free_by_cq.bit_select(owner[i], 1)):
                m.d.sync += busy[i].eq(0)

        # ---- TLPs out: FBQ / IOPF entries (MemWr 4 DW), CQ fetch (MemRd 4 DW) --------------
        rid = Cat(C(0, 8), self.bus_num)
        fbq_idx = Signal(16)
        m.d.comb += fbq_idx.eq(fbq_prod & ((C(1, 9) << fbq_log) - 1))
        iopf_idx = Signal(16)
        m.d.comb += iopf_idx.eq(iopf_prod & ((C(1, 9) << iopf_log) - 1))
        cq_idx = Signal(16)
        m.d.comb += cq_idx.eq(cq_cons & ((C(1, 9) << cq_log) - 1))
        flags = Cat(f_write, f_write, C(0, 6))
        fbq_entry = Cat(dst, C(0, 32 - len(dst)),
                        f_len, C(0, 19), f_fidx, C(0, 8), f_slot, C(0, 16 - len(f_slot)), C(0, 32))
        iopf_entry = Cat(f_iova, f_fidx, f_vm, flags, C(0, 8),
                         Mux(f_write, fbq_idx, R.NO_FBQ), (iopf_prod + 1)[:16])
        send = Signal(2)         # 0 none, 1 FBQ entry, 2 IOPF entry, 3 CQ fetch
        beat = Signal(range(max(128 // W, 1) + 1))
        nbeats = max(128 // W, 1)
        payload = Signal(128)
        addr = Signal(64)
        with m.Switch(send):
            with m.Case(1):
                m.d.comb += [payload.eq(fbq_entry), addr.eq(fbq_base + (fbq_idx << 4))]
            with m.Case(2):
                m.d.comb += [payload.eq(iopf_entry), addr.eq(iopf_base + (iopf_idx << 4))]
            with m.Case(3):
                m.d.comb += addr.eq(cq_base + (cq_idx << 4))
        is_rd = send == 3
        m.d.comb += [
            self.tx.p.hdr.eq(Mux(is_rd, mem_hdr(m, False, addr, 4, rid, tag=CQ_TAG),
                                 mem_hdr(m, True, addr, 4, rid))),
            self.tx.p.sop.eq(is_rd | (beat == 0)),
            self.tx.p.eop.eq(is_rd | (beat == nbeats - 1)),
        ]
        if W <= 128:
            m.d.comb += [self.tx.p.data.eq(payload.word_select(beat, W)),
                         self.tx.p.strb.eq(Mux(is_rd, 0, (1 << DPB) - 1))]
        else:
            m.d.comb += [self.tx.p.data.eq(payload), self.tx.p.strb.eq(Mux(is_rd, 0, 0xF))]

        # ---- CQ entry -----------------------------------------------------------------------
        c = self.cpl
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        cq_f = Signal(8)
        cq_st = Signal(8)
        cq_ok = Signal()
        waiting = Signal()
        wait_cnt = Signal(range(CPL_TIMEOUT + 1))

        with m.If(self.release.stb):
            m.d.sync += open_.bit_select(self.release.fidx, 1).eq(0)
        with m.If(self.release.vfs):
            m.d.sync += open_.eq(open_ & 1)          # the PF's (bit 0) stays

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += idle.eq(1)
                with m.If(self.fault.stb):
                    p = self.fault
                    m.d.sync += [f_fidx.eq(p.fidx), f_vm.eq(p.vm), f_iova.eq(p.iova),
                                 f_write.eq(p.write), f_len.eq(p.length), f_slot.eq(free_slot),
                                 src_w.eq(p.card[LB:]),
                                 dst.eq(Staging.BASE + free_slot * Staging.STRIDE + p.card[:LB]),
                                 words.eq((p.card[:LB] + p.length + WB - 1) >> LB),
                                 k.eq(0), wvalid.eq(0)]
                    m.next = "SETUP"
                with m.Elif(en & (cq_prod != cq_cons)):
                    m.next = "CQ_FETCH"
            with m.State("SETUP"):
                m.d.sync += waddr.eq(dst[LB:])
                m.next = "COPY"
                with m.If(~f_write):
                    m.next = "IOPF"
            with m.State("COPY"):
                # one word a cycle: read word k, write it a cycle later (read latency)
                m.d.comb += [self.mem_busy.eq(1),
                             self.mem_rd.addr.eq(src_w + k), self.mem_rd.en.eq(k < words),
                             self.mem_wr.addr.eq(waddr), self.mem_wr.data.eq(self.mem_rd.data),
                             self.mem_wr.en.eq(Mux(wvalid, (1 << WB) - 1, 0))]
                m.d.sync += [wvalid.eq(k < words), k.eq(Mux(k < words, k + 1, k))]
                with m.If(wvalid):
                    m.d.sync += waddr.eq(waddr + 1)
                with m.If((k == words) & ~wvalid):
                    m.next = "FBQ"
            with m.State("FBQ"):
                m.d.comb += [send.eq(1), self.tx.valid.eq(1)]
                with m.If(self.tx.ready):
                    m.d.sync += beat.eq(Mux(beat == nbeats - 1, 0, beat + 1))
                    with m.If(beat == nbeats - 1):
                        m.next = "IOPF"
            with m.State("IOPF"):
                m.d.comb += [send.eq(2), self.tx.valid.eq(1)]
                with m.If(self.tx.ready):
                    m.d.sync += beat.eq(Mux(beat == nbeats - 1, 0, beat + 1))
                    with m.If(beat == nbeats - 1):
                        m.next = "RAISED"
            with m.State("RAISED"):
                m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(0), self.irq.vector.eq(vec),
                             self.fault.done.eq(1), self.fault.slot.eq(f_slot), take.eq(1)]
                m.d.sync += [iopf_prod.eq(iopf_prod + 1), faults.eq(faults + 1),
                             open_.bit_select(f_fidx, 1).eq(1)]
                with m.If(f_write):
                    m.d.sync += fbq_prod.eq(fbq_prod + 1)
                m.next = "IDLE"
            with m.State("CQ_FETCH"):
                m.d.comb += [send.eq(3), self.tx.valid.eq(1)]
                m.d.sync += wait_cnt.eq(0)
                with m.If(self.tx.ready):
                    m.next = "CQ_WAIT"
            with m.State("CQ_WAIT"):
                m.d.comb += [c.ready.eq(1), waiting.eq(1)]
                m.d.sync += wait_cnt.eq(wait_cnt + 1)
                with m.If(c.valid & c.p.sop):
                    m.d.sync += [cq_f.eq(c.p.data[0:8]), cq_st.eq(c.p.data[8:16]),
                                 cq_ok.eq((cd1.status == 0) & (cd0.fmt == 0b010) & c.p.strb[0])]
                    m.next = "CQ_DO"
                    with m.If(~c.p.eop):
                        m.next = "CQ_DRAIN"
                with m.Elif(wait_cnt == CPL_TIMEOUT):
                    m.d.sync += cq_bad.eq(cq_bad + 1)        # fetched again later
                    m.next = "IDLE"
            with m.State("CQ_DRAIN"):
                m.d.comb += [c.ready.eq(~c.p.sop), waiting.eq(1)]
                with m.If(c.valid & (c.p.eop | c.p.sop)):
                    m.next = "CQ_DO"
            with m.State("CQ_DO"):
                with m.If(~cq_ok):
                    m.d.sync += cq_bad.eq(cq_bad + 1)        # the fetch failed: fetched again
                with m.Elif((cq_f < nf) & open_.bit_select(cq_f, 1)):
                    m.d.comb += [self.resume.stb.eq(1), self.resume.fidx.eq(cq_f),
                                 self.resume.ok.eq(cq_st == R.ST_MAPPED)]
                    m.d.sync += [open_.bit_select(cq_f, 1).eq(0), cq_cons.eq(cq_cons + 1)]
                    with m.If(cq_st != R.ST_MAPPED):
                        m.d.comb += free_by_cq.bit_select(cq_f, 1).eq(1)
                with m.Else():
                    m.d.sync += [cq_bad.eq(cq_bad + 1), cq_cons.eq(cq_cons + 1)]
                m.next = "IDLE"

        with m.If(~waiting & c.valid):
            m.d.comb += c.ready.eq(1)
            with m.If(c.p.sop):
                m.d.comb += self.unexp.eq(1)
        return m
