"""The card's memory, as the DMA channels and engines see it (:mod:`hdl.memmap`).

* :class:`CardMemory` -- the data memory: the 64 KiB that descriptors name and the page-fault
  staging buffers above it, one write port (host -> card DMA) and one read port (card -> host
  DMA), block RAM of ``data_width``-bit words.
* :class:`CardMemoryMap` -- the card's memory space behind the two DMA channels' ports: card
  memory, and above it the virtio-net switch's frame buffers (their own block RAM). The
  channels' ports are lent to the fault unit's staging copier while it copies (``copy_busy``:
  the queue engine waits for the copy, and the virtio engine never touches card memory); the
  frame buffers' ports belong to the virtio engine while it streams a frame to or from the
  uplink (``pkt_own``), else to whichever channel addresses them. ``snoop`` shows the engine
  what is written into the frame buffers (it catches a frame's destination address as it lands).
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from ..memmap import CARD_MEM_TOTAL, PKT_WORDS, PacketBuf
from ..iface import MemReadPort, MemWritePort, PktReadPort, PktWritePort

__all__ = ["CardMemory", "CardMemoryMap"]


class CardMemory(wiring.Component):
    """The card's data memory: 64 KiB that descriptors address plus the staging buffers, one
    write port (host->card DMA), one read port (card->host DMA). Block RAM, ``data_width``
    bits per word."""

    def __init__(self, data_width):
        self.data_width = data_width
        super().__init__({"wr": In(MemWritePort(data_width)), "rd": In(MemReadPort(data_width))})
        # (an attribute, so that a test bench can look at what it holds)
        self.storage = Memory(shape=data_width, depth=CARD_MEM_TOTAL * 8 // data_width, init=[])

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = self.storage
        wp = mem.write_port(granularity=8)
        rp = mem.read_port()
        m.d.comb += [wp.addr.eq(self.wr.addr), wp.data.eq(self.wr.data), wp.en.eq(self.wr.en),
                     rp.addr.eq(self.rd.addr), rp.en.eq(self.rd.en), self.rd.data.eq(rp.data)]
        # (the ports span the card's whole address space; the frame buffers above this
        # memory are another block RAM, decoded by the card)
        return m


class CardMemoryMap(wiring.Component):
    def __init__(self, data_width):
        self.data_width = data_width
        W = data_width
        super().__init__({
            "dma_wr":    In(MemWritePort(W)),     # the read channel's writes
            "dma_rd":    In(MemReadPort(W)),      # the write channel's reads
            "copy_wr":   In(MemWritePort(W)),     # the fault unit's staging copier
            "copy_rd":   In(MemReadPort(W)),
            "copy_busy": In(1),
            "pkt_wr":    In(PktWritePort(W)),     # the virtio engine's frame buffer ports
            "pkt_rd":    In(PktReadPort(W)),
            "pkt_own":   In(1),
            "snoop":     Out(PktWritePort(W)),    # every write into the frame buffers
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        m.submodules.cardmem = mem = CardMemory(W)
        m.submodules.pktmem = pmem = Memory(shape=W, depth=PKT_WORDS(W), init=[])
        pm_w = pmem.write_port(granularity=8)
        pm_r = pmem.read_port()
        dw, dr, cw, cr = self.dma_wr, self.dma_rd, self.copy_wr, self.copy_rd
        pw, pr, own = self.pkt_wr, self.pkt_rd, self.pkt_own

        pkt_w0 = PacketBuf.BASE * 8 // W
        wr_pkt = dw.addr >= pkt_w0
        rd_pkt = dr.addr >= pkt_w0
        rd_pkt_q = Signal()                       # the read a cycle ago was a frame buffer's
        with m.If(dr.en):
            m.d.sync += rd_pkt_q.eq(rd_pkt)
        lend = self.copy_busy
        m.d.comb += [
            mem.wr.addr.eq(Mux(lend, cw.addr, dw.addr)),
            mem.wr.data.eq(Mux(lend, cw.data, dw.data)),
            mem.wr.en.eq(Mux(lend, cw.en, Mux(wr_pkt, 0, dw.en))),
            mem.rd.addr.eq(Mux(lend, cr.addr, dr.addr)),
            mem.rd.en.eq(Mux(lend, cr.en, dr.en & ~rd_pkt)),
            dr.data.eq(Mux(rd_pkt_q, pm_r.data, mem.rd.data)),
            cr.data.eq(mem.rd.data),
            pm_w.addr.eq(Mux(own, pw.addr, dw.addr - pkt_w0)),
            pm_w.data.eq(Mux(own, pw.data, dw.data)),
            pm_w.en.eq(Mux(own, pw.en, Mux(wr_pkt, dw.en, 0))),
            pm_r.addr.eq(Mux(own, pr.addr, dr.addr - pkt_w0)),
            pm_r.en.eq(Mux(own, pr.en, dr.en & rd_pkt)),
            pr.data.eq(pm_r.data),
            self.snoop.addr.eq(pm_w.addr), self.snoop.data.eq(pm_w.data),
            self.snoop.en.eq(pm_w.en),
        ]
        return m
