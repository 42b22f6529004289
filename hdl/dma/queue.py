"""DMA descriptor queues: one ring per function in host memory, fetched and run by the card.

Per-function registers in BAR0 (byte offsets, :class:`regmap.DmaRegs`): ring base, ring
size, control (enable, MSI-X vector), producer index (the doorbell), consumer index (read
only), status. A descriptor is the record :data:`regmap.records.DESCRIPTOR` (32 bytes: host
address, card address, length, direction and interrupt flags, and the status the card writes
back: :class:`regmap.DescStatus`, 1 done, 0x8000_0001 bad descriptor (a length of 0 or over
64 KiB, card range beyond card memory, host range past 2**64), 0x8000_0002 completion error
(UR / CA from the host, or none in time, while the data moved), 0x8000_0003 page fault refused, 0x8000_0004
blocked (outside the domain)).

The host address is an I/O virtual address of the function's domain when the PF driver gave
the function one (:mod:`hdl.iommu.translate`); the engine then cuts the transfer at 4 KiB pages and
translates each piece. A descriptor that does not fit in the domain ends as blocked, before
anything moves. A piece whose page is not present goes to the fault unit (:mod:`hdl.iommu.fault`):
a write's payload is staged, the fault is queued to the host, and the function is parked while
the engine serves the others. When the host resolves it the engine fetches the descriptor again
and goes on at the piece that faulted: a staged write is replayed from the staging buffer, a
read is simply retried. When the fault unit has no room, the function waits (parked) for room:
nothing is dropped.

The engine visits the functions round robin, fetches one descriptor through its host port
(:class:`hdl.pcie.host_port.HostPort`, tag ``HOST_TAGS["desc"]``, the function's requester ID;
only with Bus Master Enable), runs it on the read or write channel, writes the status DW back
into the descriptor (a posted write that follows the data writes on the same path, so the host
never sees the status before the data), and once that write has left advances the consumer
index and raises the function's MSI-X vector if asked. A fetch that fails sets the queue's
error bit (``STATUS``) and the queue stops until it is disabled.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import DmaRegs, DescStatus, PAGE_SHIFT, DESCRIPTOR

from ..config import CardConfig
from ..memmap import Staging, CARD_MEM_BYTES, CARD_ADDR_BITS
from ..iface import (RegBusSignature, IrqRequestSignature, DmaCmd, DmaDone, DmaStatus, XlateReq,
                     XlateResp, XlateStatus, FaultReqSignature, ResumeSignature, SlotFreeSignature,
                     ReleaseSignature, record_layout, LinkSignature, FunctionStateSignature,
                     EventSignature, OccupancySignature)
from ..pcie.host_port import HostPort, HOST_TAGS
from ..pcie.regfile import RegisterFile
from ..pcie.tlp import tlp_stream

__all__ = ["DmaQueues"]


class DmaQueues(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        W = cfg.data_width
        super().__init__({
            "bus":     In(RegBusSignature()),
            "tx":      Out(tlp_stream(W)),
            "cpl":     In(tlp_stream(W)),          # completions of its descriptor fetches
            "rd_cmd":  Out(stream.Signature(DmaCmd)),
            "rd_done": In(stream.Signature(DmaDone)),
            "wr_cmd":  Out(stream.Signature(DmaCmd)),
            "wr_done": In(stream.Signature(DmaDone)),
            "irq":     Out(IrqRequestSignature()),
            "link":     In(LinkSignature()),
            "fn":       In(FunctionStateSignature(cfg.num_functions)),
            "unexp":   Out(1),
            "xreq":    Out(stream.Signature(XlateReq)),
            "xresp":   In(stream.Signature(XlateResp)),
            "fault":   Out(FaultReqSignature()),
            "resume":  In(ResumeSignature()),
            "slot_free": Out(SlotFreeSignature()),
            "release": Out(ReleaseSignature()),
            # telemetry: the function being served, and one function's ring occupancy
            "busy_ev":  Out(EventSignature()),     # a cycle serving function ``fidx``
            "fault_ev": Out(EventSignature()),     # function ``fidx`` raised a page fault
            "occ":      In(OccupancySignature()),  # a function's ring occupancy, for telemetry
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        W = cfg.data_width
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
        busy = Signal()
        cur = Signal(8)              # the function whose descriptor is under way
        rf = RegisterFile(m, b, "dma_queue")
        f = rf.fidx
        reset_f = Signal()           # a function's queue is reset (disable or FLR)
        reset_g = Signal(8)
        with m.If(rf.we(DmaRegs.RING_LO)):
            m.d.sync += ring[f][:32].eq(Cat(C(0, 5), rf.wdata[5:]))
        with m.If(rf.we(DmaRegs.RING_HI)):
            m.d.sync += ring[f][32:].eq(rf.wdata)
        with m.If(rf.we(DmaRegs.RING_LOG2)):
            m.d.sync += rlog[f].eq(Mux(rf.wdata[:4] > 8, 8, rf.wdata[:4]))
        with m.If(rf.we(DmaRegs.CTRL)):
            m.d.sync += [en.bit_select(f, 1).eq(rf.wdata[0]), vec[f].eq(rf.wdata[8:13])]
            with m.If(~rf.wdata[0]):
                m.d.comb += [reset_f.eq(1), reset_g.eq(f)]
        with m.If(rf.we(DmaRegs.PROD)):
            m.d.sync += prod[f].eq(rf.wdata[:16])
        with m.If(self.fn.flr):
            m.d.comb += [reset_f.eq(1), reset_g.eq(self.fn.flr_fidx)]
            m.d.sync += en.bit_select(self.fn.flr_fidx, 1).eq(0)
        # (also when a descriptor under way is given up: see ``aborted`` below)
        abort_release = Signal()
        m.d.comb += [self.release.stb.eq(reset_f | abort_release),
                     self.release.fidx.eq(Mux(reset_f, reset_g, cur))]
        vf_mask = ((1 << nf) - 1) & ~1
        with m.If(self.fn.vf_reset):
            m.d.sync += en.eq(en & ~vf_mask)
            m.d.comb += self.release.vfs.eq(1)
        rf.read(DmaRegs.RING_LO, ring[f][:32])
        rf.read(DmaRegs.RING_HI, ring[f][32:])
        rf.read(DmaRegs.RING_LOG2, rlog[f])
        rf.read(DmaRegs.CTRL, Cat(en.bit_select(f, 1), C(0, 7), vec[f]))
        rf.read(DmaRegs.PROD, prod[f])
        rf.read(DmaRegs.CONS, cons[f])
        rf.read(DmaRegs.STATUS, Cat(busy & (cur == f), err.bit_select(f, 1),
                                    parked.bit_select(f, 1) | wroom.bit_select(f, 1)))
        rf.finish()
        m.d.comb += [self.busy_ev.stb.eq(busy), self.busy_ev.fidx.eq(cur),
                     self.busy_ev.amount.eq(1),
                     self.fault_ev.stb.eq(self.fault.stb), self.fault_ev.fidx.eq(self.fault.fidx),
                     self.fault_ev.amount.eq(1)]
        with m.If(self.occ.fidx < nf):
            m.d.comb += self.occ.occ.eq(prod[self.occ.fidx] - cons[self.occ.fidx])

        # ---- engine -------------------------------------------------------------------------
        ptr = Signal(range(nf))
        desc_addr = Signal(64)
        # the host port: descriptor fetches (8 DW) and status writes (1 DW)
        m.submodules.hport = hp = HostPort(W, HOST_TAGS["desc"], max_dw=8)
        wiring.connect(m, hp.tx, wiring.flipped(self.tx))
        wiring.connect(m, wiring.flipped(self.cpl), hp.cpl)
        m.d.comb += [hp.bus_num.eq(self.link.bus_num), self.unexp.eq(hp.unexp)]
        d = data.View(record_layout(DESCRIPTOR), hp.rdata)   # the fetched descriptor
        status = Signal(32)
        is_write = Signal()
        off = Signal(17)             # bytes of the descriptor done
        seg = Signal(17)             # the piece being moved
        phys = Signal(64)
        vm = Signal(8)
        iova = Signal(64)

        d_host = d.host
        d_card = d.card
        d_len = d.length
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

        # the host port's request: the descriptor fetch, or the status write into its slot
        send_status = Signal()
        m.d.comb += [
            hp.req.p.fidx.eq(cur),
            hp.req.p.write.eq(send_status),
            hp.req.p.addr.eq(Mux(send_status, desc_addr + DESCRIPTOR.byte_offset("status"),
                                 desc_addr)),
            hp.req.p.ndw.eq(Mux(send_status, 1, DESCRIPTOR.size // 4)),
            hp.req.p.fbe.eq(0xF),
            hp.req.p.lbe.eq(Mux(send_status, 0, 0xF)),
            hp.req.p.wdata.eq(status),
        ]

        def clear_fault_state(g):
            return [parked.bit_select(g, 1).eq(0), wroom.bit_select(g, 1).eq(0),
                    replay.bit_select(g, 1).eq(0), refused.bit_select(g, 1).eq(0),
                    roff[g].eq(0)]

        # A reset of the function whose descriptor is under way (FLR, its queue disabled, VF
        # Enable cleared) gives the descriptor up: what is moving finishes, nothing more moves,
        # no status is written and the (reset) indices stay as they are.
        aborted = Signal()
        target = Mux(busy, cur, ptr)
        kill = (reset_f & (reset_g == target)) | (self.fn.vf_reset & (target != 0))
        with m.If(busy & kill):
            m.d.sync += aborted.eq(1)
        with m.FSM() as fsm:
            m.d.comb += busy.eq(~fsm.ongoing("SCAN"))
            with m.State("SCAN"):
                room_ok = Mux(wroom_w.bit_select(ptr, 1), fq.ok_w, fq.ok_r)
                pending = en.bit_select(ptr, 1) & ~err.bit_select(ptr, 1) & \
                    self.fn.bme.bit_select(ptr, 1) & (prod[ptr] != cons[ptr]) & \
                    ~parked.bit_select(ptr, 1) & (~wroom.bit_select(ptr, 1) | room_ok)
                with m.If(pending):
                    mask = (C(1, 16) << rlog[ptr]) - 1
                    m.d.sync += [cur.eq(ptr), aborted.eq(kill),
                                 desc_addr.eq(ring[ptr] + ((cons[ptr] & mask) << 5))]
                    m.next = "FETCH"
                with m.Else():
                    m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
            with m.State("FETCH"):
                m.d.comb += hp.req.valid.eq(1)
                with m.If(hp.req.ready):
                    m.next = "WAITD"
            with m.State("WAITD"):
                with m.If(hp.done):
                    with m.If(aborted):
                        m.next = "NEXT"
                    with m.Elif(hp.err):           # UR / CA, short, or timed out
                        m.d.sync += err.bit_select(cur, 1).eq(1)
                        m.next = "NEXT"
                    with m.Else():
                        m.next = "DECODE"
            with m.State("DECODE"):
                m.d.sync += [is_write.eq(d.to_host), off.eq(roff[cur]),
                             wroom.bit_select(cur, 1).eq(0)]
                with m.If(aborted):
                    m.next = "NEXT"
                with m.Elif(bad):
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
                with m.If(self.xresp.valid & aborted):
                    m.next = "NEXT"
                with m.Elif(self.xresp.valid):
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
                with m.If(fq.done & aborted):
                    m.next = "FABORT"
                with m.Elif(fq.done):
                    m.d.sync += [parked.bit_select(cur, 1).eq(1), roff[cur].eq(off),
                                 replay.bit_select(cur, 1).eq(is_write), slot[cur].eq(fq.slot)]
                    m.next = "NEXT"
            with m.State("FABORT"):
                # the fault was raised for a function reset meanwhile: release it again (its
                # open fault and staging buffer), in a cycle no other reset releases one
                with m.If(~reset_f):
                    m.d.comb += abort_release.eq(1)
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
                    with m.If(aborted):
                        m.next = "NEXT"
                    with m.Elif(done_s != DmaStatus.OK):
                        m.d.sync += status.eq(DescStatus.CPL_ERROR)
                        m.next = "STATUS"
                    with m.Elif(off + seg == d_len[:17]):
                        m.d.sync += status.eq(DescStatus.DONE)
                        m.next = "STATUS"
                    with m.Else():
                        m.next = "XLATE"
            with m.State("STATUS"):
                # (a posted write behind the data writes: the host never sees the status first)
                with m.If(aborted):
                    with m.If(replay.bit_select(cur, 1)):
                        m.d.comb += self.slot_free.stb.eq(1)
                        m.d.sync += replay.bit_select(cur, 1).eq(0)
                    m.next = "NEXT"
                with m.Else():
                    m.d.comb += [send_status.eq(1), hp.req.valid.eq(1)]
                    with m.If(hp.req.ready):
                        m.next = "STATUS_SENT"
            with m.State("STATUS_SENT"):
                with m.If(hp.done & aborted):
                    m.next = "NEXT"                  # (reset while the status write left)
                with m.Elif(hp.done):
                    m.d.sync += [cons[cur].eq(cons[cur] + 1), roff[cur].eq(0)]
                    with m.If(replay.bit_select(cur, 1)):    # blocked / failed during a replay
                        m.d.comb += self.slot_free.stb.eq(1)
                        m.d.sync += replay.bit_select(cur, 1).eq(0)
                    with m.If(d.irq):
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
        with m.If(self.fn.vf_reset):
            for g in range(1, nf):
                m.d.sync += clear_queue(g)

        return m
