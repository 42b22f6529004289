"""MSI-X: per-function vector tables, the Pending Bit Array and the message generator.

Every function (PF and VFs) has ``msix_vectors`` table entries at BAR0+0x2000 (16 bytes each:
address low, address high, data, vector control) and its PBA at BAR0+0x3000. All tables live
in one block RAM indexed by ``{function, vector, dword}``.

An interrupt request (one port per requester, ``irq_<name>`` for each name of ``sources``: the
function registers, the DMA queues, the fault unit, the virtio transport and the virtio engine)
sets the vector's pending bit if the function has MSI-X enabled. A scanner visits one
function per cycle; when it finds a pending vector that is deliverable (MSI-X enabled, function
not masked, vector not masked, Bus Master Enable set) it reads the entry and sends a one-DW
memory write with the function's requester ID, then clears the pending bit. A masked vector
therefore keeps its PBA bit set until software unmasks it, and the message then goes out.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import Bar0Map

from ..config import CardConfig
from ..iface import RegBusSignature, IrqRequestSignature, LinkSignature, FunctionStateSignature
from .regfile import RegisterFile
from .tlp import tlp_stream, mem_hdr

__all__ = ["MsixController", "SOURCES"]


#: The card's interrupt requesters, in the order the card connects them.
SOURCES = ("func", "dma", "fault", "virtio_cfg", "virtio_queue")


class MsixController(wiring.Component):
    def __init__(self, cfg: CardConfig, sources=SOURCES):
        self.cfg = cfg
        self.sources = tuple(sources)
        nf = cfg.num_functions
        super().__init__({
            "bus":        In(RegBusSignature()),
            **{f"irq_{name}": In(IrqRequestSignature()) for name in sources},
            "link":     In(LinkSignature()),
            "fn":       In(FunctionStateSignature(nf)),
            "tx":         Out(tlp_stream(cfg.data_width)),
            "sent":       Out(1),      # one-cycle strobe per message sent
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        b = self.bus
        nf = cfg.num_functions
        nvec = cfg.msix_vectors
        vbits = exact_log2(nvec)
        nent = nf * nvec

        # table RAM, entries reset masked (vector control bit 0 = 1)
        init = []
        for _ in range(nent):
            init += [0, 0, 0, 1]
        m.submodules.table = table = Memory(shape=32, depth=nent * 4, init=init)
        host_rd = table.read_port()
        gen_rd = table.read_port()
        wp = table.write_port(granularity=8)

        mask = Signal(nent, init=(1 << nent) - 1)   # shadow of the vector-control mask bits
        pending = Signal(nent)

        # ---- register bus ------------------------------------------------------------------
        rf = RegisterFile(m, b, "msix_table", "msix_pba")
        tbl_base = Bar0Map.MSIX_TABLE // 4
        in_tbl = rf.sel & (b.addr >= tbl_base) & (b.addr < tbl_base + nvec * 4)
        vec = b.addr[2:2 + vbits] if vbits else C(0, 1)
        ent_addr = Cat(b.addr[:2], b.addr[2:2 + vbits], b.fidx) if vbits else Cat(b.addr[:2], b.fidx)
        m.d.comb += [
            host_rd.addr.eq(ent_addr), host_rd.en.eq(b.re),
            wp.addr.eq(ent_addr), wp.data.eq(b.wdata),
        ]
        with m.If(b.we & in_tbl):
            m.d.comb += wp.en.eq(b.be)
            with m.If((b.addr[:2] == 3) & b.be[0]):
                m.d.sync += mask.bit_select(b.fidx * nvec + vec if vbits else b.fidx, 1).eq(b.wdata[0])

        # a table entry reads from the RAM (a cycle later); its Vector Control word takes the
        # mask bit from the shadow, which VF reset sets
        rd_ctl = Signal()
        rd_mask = Signal()
        with m.If(b.re):
            m.d.sync += [rd_ctl.eq(b.addr[:2] == 3),
                         rd_mask.eq(mask.bit_select(b.fidx * nvec + vec if vbits else b.fidx, 1))]
        rf.read_late(in_tbl, Mux(rd_ctl, Cat(rd_mask, host_rd.data[1:]), host_rd.data))
        rf.read(Bar0Map.MSIX_PBA, pending.word_select(b.fidx, nvec))
        rf.finish()

        # ---- interrupt requests ------------------------------------------------------------
        set_pend = Signal(nent)
        clr_pend = Signal(nent)
        for n, rq in enumerate(getattr(self, f"irq_{name}") for name in self.sources):
            irq_idx = Signal(range(nent), name=f"irq_idx{n}")
            m.d.comb += irq_idx.eq(rq.fidx * nvec + rq.vector)
            irq_take = rq.valid & self.fn.msix_en.bit_select(rq.fidx, 1) & (rq.vector < nvec)
            for k in range(nent):
                with m.If(irq_take & (irq_idx == k)):
                    m.d.comb += set_pend[k].eq(1)
        m.d.sync += pending.eq((pending & ~clr_pend) | set_pend)
        with m.If(self.fn.vf_reset):
            m.d.sync += [pending[nvec:].eq(0), mask[nvec:].eq(-1)]
        with m.Elif(self.fn.flr):
            m.d.sync += [pending.word_select(self.fn.flr_fidx, nvec).eq(0),
                         mask.word_select(self.fn.flr_fidx, nvec).eq(-1)]

        # ---- scanner and message generator -------------------------------------------------
        ptr = Signal(range(nf))
        f_pend = pending.word_select(ptr, nvec) & ~mask.word_select(ptr, nvec)
        f_ok = (self.fn.msix_en.bit_select(ptr, 1) & ~self.fn.msix_fmask.bit_select(ptr, 1)
                & self.fn.bme.bit_select(ptr, 1))
        sel_vec = Signal(max(vbits, 1))
        for i in reversed(range(nvec)):
            with m.If(f_pend[i]):
                m.d.comb += sel_vec.eq(i)

        cur_f = Signal(8)
        cur_v = Signal(max(vbits, 1))
        cnt = Signal(3)
        addr_lo = Signal(32)
        addr_hi = Signal(32)
        msg_data = Signal(32)
        m.d.comb += gen_rd.en.eq(1)
        if vbits:
            m.d.comb += gen_rd.addr.eq(Cat(cnt[:2], cur_v, cur_f))
        else:
            m.d.comb += gen_rd.addr.eq(Cat(cnt[:2], cur_f))

        rid = Cat(cur_f, self.link.bus_num)
        tx = self.tx
        m.d.comb += [
            # one DW (the message data): all four bytes, and last_be must be 0
            tx.p.hdr.eq(mem_hdr(m, True, Cat(addr_lo, addr_hi), 1, rid, last_be=0)),
            tx.p.data.eq(msg_data),
            tx.p.strb.eq(1),
            tx.p.sop.eq(1),
            tx.p.eop.eq(1),
            tx.p.func.eq(cur_f),
        ]

        cur_idx = Signal(range(nent))
        m.d.comb += cur_idx.eq(cur_f * nvec + cur_v)
        for k in range(nent):
            m.d.comb += clr_pend[k].eq(self.sent & (cur_idx == k))

        with m.FSM():
            with m.State("SCAN"):
                with m.If((f_pend != 0) & f_ok):
                    m.d.sync += [cur_f.eq(ptr), cur_v.eq(sel_vec), cnt.eq(0)]
                    m.next = "READ"
                with m.Else():
                    m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
            with m.State("READ"):
                # address cnt is presented this cycle; data of cnt-1 arrives now
                m.d.sync += cnt.eq(cnt + 1)
                with m.Switch(cnt):
                    with m.Case(1):
                        m.d.sync += addr_lo.eq(gen_rd.data)
                    with m.Case(2):
                        m.d.sync += addr_hi.eq(gen_rd.data)
                    with m.Case(3):
                        m.d.sync += msg_data.eq(gen_rd.data)
                        m.next = "SEND"
            with m.State("SEND"):
                still_ok = (self.fn.msix_en.bit_select(cur_f, 1) & ~self.fn.msix_fmask.bit_select(cur_f, 1)
                            & self.fn.bme.bit_select(cur_f, 1) & ~mask.bit_select(cur_idx, 1)
                            & pending.bit_select(cur_idx, 1))
                m.d.comb += tx.valid.eq(still_ok)
                with m.If(~still_ok):
                    m.next = "SCAN"           # masked or disabled meanwhile: stays pending
                with m.Elif(tx.ready):
                    m.d.comb += self.sent.eq(1)
                    m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))
                    m.next = "SCAN"
        return m
