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
entry (MemRd with the PF's requester ID through its host port,
:class:`hdl.pcie.host_port.HostPort`, tag ``HOST_TAGS["cq"]``; the FBQ and IOPF entries go out
through the same port) and tells the engine to resume the
function (``resume``): status 0 -- retry (the engine replays the staged payload through the
device TLB and frees the staging buffer with ``slot_free``); status 1 -- refused (the staging
buffer is freed here; the engine finishes the descriptor with a fault status). A CQ entry for a
function without an open fault is counted in ``CQ_BAD`` and ignored, and so is a fetch that
failed (the entry is fetched again). Registers: :class:`regmap.FaultRegs`; the entries are the
records ``FBQ_ENTRY``, ``IOPF_ENTRY`` and ``CQ_ENTRY`` of :mod:`regmap.records`.
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import FaultRegs as R, FBQ_ENTRY, IOPF_ENTRY, CQ_ENTRY

from ..config import CardConfig
from ..memmap import Staging, CARD_ADDR_BITS
from ..iface import (RegBusSignature, IrqRequestSignature, MemReadPort, MemWritePort,
                     FaultReqSignature, ReleaseSignature, ResumeSignature, SlotFreeSignature,
                     record_layout, LinkSignature)
from ..pcie.host_port import HostPort, HOST_TAGS
from ..pcie.regfile import RegisterFile
from ..pcie.tlp import tlp_stream

__all__ = ["FaultUnit"]


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
            "cpl":       In(tlp_stream(W)),        # completions of its CQ fetches
            "irq":       Out(IrqRequestSignature()),
            "mem_rd":    Out(MemReadPort(W)),
            "mem_wr":    Out(MemWritePort(W)),
            "mem_busy":  Out(1),                   # the copier owns card memory's ports
            "link":     In(LinkSignature()),
            "unexp":     Out(1),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        W = cfg.data_width
        WB = W // 8
        LB = exact_log2(WB)
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

        rf = RegisterFile(m, b, "fault")
        bases = {R.FBQ_LO: (fbq_base, fbq_log), R.IOPF_LO: (iopf_base, iopf_log),
                 R.CQ_LO: (cq_base, cq_log)}
        for lo, (base, log) in bases.items():
            with m.If(rf.we(lo)):
                m.d.sync += base[:32].eq(Cat(C(0, 4), rf.wdata[4:]))
            with m.If(rf.we(lo + 4)):
                m.d.sync += base[32:].eq(rf.wdata)
            with m.If(rf.we(lo + 8)):
                m.d.sync += log.eq(Mux(rf.wdata[:4] > 8, 8, rf.wdata[:4]))
            rf.read(lo, base[:32])
            rf.read(lo + 4, base[32:])
            rf.read(lo + 8, log)
        with m.If(rf.we(R.CTRL)):
            m.d.sync += [en.eq(rf.wdata[0]), vec.eq(rf.wdata[8:13])]
            with m.If(~rf.wdata[0]):
                m.d.sync += [fbq_prod.eq(0), fbq_cons.eq(0), iopf_prod.eq(0),
                             iopf_cons.eq(0), cq_prod.eq(0), cq_cons.eq(0)]
        with m.If(rf.we(R.FBQ_CONS)):
            m.d.sync += fbq_cons.eq(rf.wdata[:16])
        with m.If(rf.we(R.IOPF_CONS)):
            m.d.sync += iopf_cons.eq(rf.wdata[:16])
        with m.If(rf.we(R.CQ_PROD)):
            m.d.sync += cq_prod.eq(rf.wdata[:16])
        regs = {R.CTRL: Cat(en, C(0, 7), vec), R.FBQ_PROD: fbq_prod,
                R.FBQ_CONS: fbq_cons, R.IOPF_PROD: iopf_prod,
                R.IOPF_CONS: iopf_cons, R.CQ_PROD: cq_prod, R.CQ_CONS: cq_cons,
                R.FAULTS: faults, R.STAGE_BUSY: busy, R.CQ_BAD: cq_bad}
        for off, sig in regs.items():
            rf.read(off, sig)
        rf.finish()

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

        # ---- the host port: FBQ / IOPF entries (MemWr 4 DW), CQ fetch (MemRd 4 DW) ---------
        m.submodules.hport = hp = HostPort(W, HOST_TAGS["cq"], max_dw=4)
        wiring.connect(m, hp.tx, wiring.flipped(self.tx))
        wiring.connect(m, wiring.flipped(self.cpl), hp.cpl)
        m.d.comb += [hp.bus_num.eq(self.link.bus_num), self.unexp.eq(hp.unexp)]
        fbq_idx = Signal(16)
        m.d.comb += fbq_idx.eq(fbq_prod & ((C(1, 9) << fbq_log) - 1))
        iopf_idx = Signal(16)
        m.d.comb += iopf_idx.eq(iopf_prod & ((C(1, 9) << iopf_log) - 1))
        cq_idx = Signal(16)
        m.d.comb += cq_idx.eq(cq_cons & ((C(1, 9) << cq_log) - 1))
        fbq_entry = Signal(record_layout(FBQ_ENTRY))
        m.d.comb += [fbq_entry.staging.eq(dst), fbq_entry.length.eq(f_len),
                     fbq_entry.function.eq(f_fidx), fbq_entry.slot.eq(f_slot)]
        iopf_entry = Signal(record_layout(IOPF_ENTRY))
        m.d.comb += [iopf_entry.iova.eq(f_iova), iopf_entry.function.eq(f_fidx),
                     iopf_entry.vm.eq(f_vm), iopf_entry.write.eq(f_write),
                     iopf_entry.has_fbq.eq(f_write),
                     iopf_entry.fbq_index.eq(Mux(f_write, fbq_idx, R.NO_FBQ)),
                     iopf_entry.seq.eq((iopf_prod + 1)[:16])]
        cq_entry = data.View(record_layout(CQ_ENTRY), hp.rdata)
        send = Signal(2)         # 0 none, 1 FBQ entry, 2 IOPF entry, 3 CQ fetch
        m.d.comb += [hp.req.p.write.eq(send != 3), hp.req.p.fidx.eq(0), hp.req.p.ndw.eq(4),
                     hp.req.p.fbe.eq(0xF), hp.req.p.lbe.eq(0xF)]
        with m.Switch(send):
            with m.Case(1):
                m.d.comb += [hp.req.p.wdata.eq(fbq_entry),
                             hp.req.p.addr.eq(fbq_base + (fbq_idx << 4))]
            with m.Case(2):
                m.d.comb += [hp.req.p.wdata.eq(iopf_entry),
                             hp.req.p.addr.eq(iopf_base + (iopf_idx << 4))]
            with m.Case(3):
                m.d.comb += hp.req.p.addr.eq(cq_base + (cq_idx << 4))

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
            # the FBQ entry (writes only), then the IOPF entry
            for state, which, then in (("FBQ", 1, "IOPF"), ("IOPF", 2, "RAISED")):
                with m.State(state):
                    m.d.comb += [send.eq(which), hp.req.valid.eq(1)]
                    with m.If(hp.req.ready):
                        m.next = f"{state}_SENT"
                with m.State(f"{state}_SENT"):
                    with m.If(hp.done):
                        m.next = then
            with m.State("RAISED"):
                m.d.comb += [self.irq.valid.eq(1), self.irq.fidx.eq(0), self.irq.vector.eq(vec),
                             self.fault.done.eq(1), self.fault.slot.eq(f_slot), take.eq(1)]
                m.d.sync += [iopf_prod.eq(iopf_prod + 1), faults.eq(faults + 1),
                             open_.bit_select(f_fidx, 1).eq(1)]
                with m.If(f_write):
                    m.d.sync += fbq_prod.eq(fbq_prod + 1)
                m.next = "IDLE"
            with m.State("CQ_FETCH"):
                m.d.comb += [send.eq(3), hp.req.valid.eq(1)]
                with m.If(hp.req.ready):
                    m.next = "CQ_WAIT"
            with m.State("CQ_WAIT"):
                with m.If(hp.done):
                    m.next = "CQ_DO"
            with m.State("CQ_DO"):
                cq_f = cq_entry.function
                cq_st = cq_entry.status
                with m.If(hp.err):
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

        return m
