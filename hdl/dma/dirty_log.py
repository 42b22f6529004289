"""Dirty-page logging: the card marks, in a bitmap in host memory, every page it writes for a
function whose log is on (live migration: the hypervisor copies the pages marked since its last
pass; seed 004, and what vDPA NICs do in silicon).

The logger sits on the card's transmit stream, after the TX arbiter, so it sees every memory
write the card sends, whichever engine sends it (DMA write channel, descriptor status, used
rings and received frames of virtio-net, fault records), with the requesting function on the
beat's ``func``. For a MemWr of a function whose log is on, it looks the function's log up
(block RAM, one read per TLP) and queues one mark: a one-byte MemWr of ``0xFF`` at
``BASE + (page - FIRST / 4096) / 8``, the byte of the bitmap that holds the page's bit
(:class:`regmap.DirtyLogRegs` has the layout). Marks go out between TLPs, never inside one, so
the marks of a write follow it on the link; a mark costs one beat. Interrupt messages are not
memory: TLPs from the sources named in ``skip`` (the MSI-X controller, by the arbiter's
``o_src``) are never logged, whatever address the host gave the vectors.

Nothing is missed: a write is let through only when its mark is sure to find room in the mark
FIFO (otherwise the stream waits, the marks drain), and the card never reads the bitmap, so a
host that harvests it with an atomic exchange at any moment sees every page written before the
exchange, in that harvest or the next. A page outside the function's bitmap sets its OVERFLOW
bit instead (the host then copies all of the function's memory).

Pipeline: the beat with ``sop`` moves (stage A: the function's log is read, the page kept);
next cycle the page becomes the bitmap byte (stage B), pushed into the FIFO; the FIFO's head
goes out as a TLP at the next packet boundary.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFOBuffered
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from regmap import DirtyLogRegs as R

from ..config import CardConfig
from ..iface import LinkSignature, RegBusSignature
from ..pcie.regfile import RegisterFile
from ..pcie.tlp import TlpKind, hdr_dw, mem_hdr, tlp_stream

__all__ = ["DirtyLogger", "MARK_FIFO_DEPTH"]

#: Marks waiting to go out. Marks leave first at every packet boundary, so a few at most wait;
#: a logged write still waits while fewer than three places are free (stage B may push one).
MARK_FIFO_DEPTH = 8


class DirtyLogger(wiring.Component):
    """``sources``: how many sources the arbiter in front has (``i_src`` is one of them);
    ``skip``: the source indices whose TLPs are not memory writes to log (MSI-X)."""

    def __init__(self, cfg: CardConfig, sources=1, skip=()):
        self._card = cfg
        self._skip = tuple(skip)
        W = cfg.data_width
        super().__init__({
            "i": In(tlp_stream(W)),            # from the TX arbiter
            "i_src": In(range(max(sources, 2))),   # ... and the source of its beat
            "o": Out(tlp_stream(W)),           # to the link
            "bus": In(RegBusSignature()),
            "link": In(LinkSignature()),
        })

    def elaborate(self, platform):
        nf = self._card.num_functions
        m = Module()
        i, o = self.i, self.o

        # ---- per-function log registers: the addresses in block RAM, the bits in flip-flops ----
        on = Signal(nf)
        overflow = Signal(nf)
        sel = Signal(8)
        marks = Signal(32)
        fields = ("base_lo", "base_hi", "first_lo", "first_hi", "pages")
        offsets = (R.BASE_LO, R.BASE_HI, R.FIRST_LO, R.FIRST_HI, R.PAGES)
        rf = RegisterFile(m, self.bus, "dirty_log")
        sel_next = Mux(rf.we(R.SEL, full=False), rf.wdata[:8], sel)
        m.d.sync += sel.eq(sel_next)
        log_rd, reg_rd = {}, {}
        for name, off in zip(fields, offsets):
            m.submodules[f"mem_{name}"] = mem = Memory(shape=32, depth=nf, init=[])
            wp = mem.write_port()
            log_rd[name] = mem.read_port(transparent_for=(wp,))
            reg_rd[name] = mem.read_port(transparent_for=(wp,))
            m.d.comb += [wp.addr.eq(sel), wp.data.eq(rf.wdata), wp.en.eq(rf.we(off) & (sel < nf)),
                         reg_rd[name].addr.eq(sel_next)]     # (read in the cycle after SEL)
            rf.read(off, Mux(sel < nf, reg_rd[name].data, 0))
        with m.If(rf.we(R.CTRL, full=False) & (sel < nf)):
            m.d.sync += on.bit_select(sel, 1).eq(rf.wdata[0])
        clear_ovf = Signal(nf)
        with m.If(rf.we(R.CTRL, full=False) & (sel < nf) & rf.wdata[1]):
            m.d.comb += clear_ovf.eq(1 << sel)
        rf.read(R.SEL, sel)
        rf.read(R.CTRL, Mux(sel < nf, Cat(on.bit_select(sel, 1), overflow.bit_select(sel, 1)), 0))
        rf.read(R.MARKS, marks)
        rf.finish()

        # ---- what goes by: packet boundaries and the writes to log ----------------------------
        in_pkt = Signal()                      # a packet's first beat has moved, not its last
        hdr = i.p.hdr
        kind = hdr_dw(hdr, 0)[24:32]
        is64 = kind == TlpKind.MWR64
        addr = Signal(64)
        m.d.comb += addr.eq(Mux(is64, Cat(hdr_dw(hdr, 3), hdr_dw(hdr, 2)), hdr_dw(hdr, 2)))
        fidx = i.p.func
        skipped = 0
        for k in self._skip:
            skipped = skipped | (self.i_src == k)
        loggable = (i.p.sop & ((kind == TlpKind.MWR32) | is64) & ~skipped
                    & (fidx < nf) & on.bit_select(fidx, 1))

        m.submodules.marks = fifo = SyncFIFOBuffered(width=64, depth=MARK_FIFO_DEPTH)
        room = fifo.level <= MARK_FIFO_DEPTH - 3      # stage B may still push one

        # the choice of what the output offers holds while it waits (stream rule)
        offer_mark = Signal()                   # the output offers a mark
        held = Signal()                         # ... a beat is offered and not taken yet
        held_mark = Signal()
        at_boundary = ~in_pkt
        pick_mark = Mux(held, held_mark, at_boundary & fifo.r_rdy)
        stall = ~held & ~pick_mark & i.valid & loggable & ~room   # (an offered beat stays offered)
        m.d.comb += [
            offer_mark.eq(pick_mark),
            o.valid.eq(Mux(pick_mark, 1, i.valid & ~stall)),
            i.ready.eq(o.ready & ~pick_mark & ~stall),
        ]
        m.d.sync += [held.eq(o.valid & ~o.ready), held_mark.eq(pick_mark)]

        moved = i.valid & i.ready
        with m.If(moved):
            with m.If(i.p.eop):
                m.d.sync += in_pkt.eq(0)
            with m.Elif(i.p.sop):
                m.d.sync += in_pkt.eq(1)

        # stage A: a logged write's first beat moves; its function's log is read
        a_valid = Signal()
        a_f = Signal(8)
        a_page = Signal(52)
        for rp in log_rd.values():
            m.d.comb += rp.addr.eq(fidx)
        m.d.sync += a_valid.eq(moved & loggable)
        with m.If(moved & loggable):
            m.d.sync += [a_f.eq(fidx), a_page.eq(addr[R.PAGE_SHIFT:])]

        # stage B: the page's byte in the bitmap, or the overflow bit
        first = Cat(log_rd["first_lo"].data, log_rd["first_hi"].data)[R.PAGE_SHIFT:]
        base = Cat(log_rd["base_lo"].data, log_rd["base_hi"].data)
        idx = Signal(53)
        m.d.comb += idx.eq(a_page - first)
        inside = (a_page >= first) & (idx < log_rd["pages"].data)
        m.d.comb += [fifo.w_data.eq(base + idx[3:]), fifo.w_en.eq(a_valid & inside)]
        set_ovf = Signal(nf)
        with m.If(a_valid & ~inside):
            m.d.comb += set_ovf.eq(1 << a_f)
        m.d.sync += overflow.eq((overflow & ~clear_ovf) | set_ovf)

        # the mark as a TLP: one byte, 0xFF, from the PF
        byte = fifo.r_data
        lane = byte[:2]
        with m.If(pick_mark):
            m.d.comb += [
                o.p.hdr.eq(mem_hdr(m, True, byte, 1, Cat(C(0, 8), self.link.bus_num),
                                   first_be=(C(1, 4) << lane)[:4], last_be=0)),
                o.p.data.eq(C(0xFF, 32) << (lane * 8)),
                o.p.strb.eq(1),
                o.p.sop.eq(1),
                o.p.eop.eq(1),
                o.p.func.eq(0),
            ]
        with m.Else():
            m.d.comb += o.p.eq(i.p)
        m.d.comb += fifo.r_en.eq(pick_mark & o.ready)
        with m.If(pick_mark & o.ready):
            m.d.sync += marks.eq(marks + 1)
        return m
