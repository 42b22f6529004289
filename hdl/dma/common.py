"""Shared pieces of the DMA engine: the card memory and the helpers that size TLPs."""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In

from ..memmap import CARD_MEM_TOTAL
from ..iface import MemReadPort, MemWritePort

__all__ = ["CardMemory", "size_bytes", "be_first_last", "next_chunk"]


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


def size_bytes(code):
    """128 << code, for the MPS / MRRS fields of Device Control (code 0..5)."""
    return C(128, 13) << code


def be_first_last(addr_lo2, nbytes_end_lo2, ndw):
    """First/last DW byte enables of a request of ``ndw`` DWs starting at byte offset
    ``addr_lo2`` and ending at byte offset ``nbytes_end_lo2`` (exclusive, 0 means 4)."""
    first = Mux(addr_lo2 == 0, 0xF, Mux(addr_lo2 == 1, 0xE, Mux(addr_lo2 == 2, 0xC, 0x8)))
    last = Mux(nbytes_end_lo2 == 0, 0xF, Mux(nbytes_end_lo2 == 1, 0x1,
                                             Mux(nbytes_end_lo2 == 2, 0x3, 0x7)))
    return Mux(ndw == 1, first & last, first), Mux(ndw == 1, 0, last)


def next_chunk(m, host, rem, size_code):
    """The next TLP of a transfer at ``host`` with ``rem`` bytes left, limited to
    ``128 << size_code`` bytes (MPS or MRRS) and ending on a boundary of that size (so never
    crossing 4 KiB). Returns ``(chunk_bytes, ndw)`` as combinational signals."""
    limit = Signal(13)
    room = Signal(13)
    chunk = Signal(13)
    ndw = Signal(11)
    m.d.comb += [
        limit.eq(size_bytes(size_code)),
        room.eq(limit - (host[:12] & (limit - 1))),
        chunk.eq(Mux(rem < room, rem, room)),
        ndw.eq((host[:2] + chunk + 3) >> 2),
    ]
    return chunk, ndw
