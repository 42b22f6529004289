"""Helpers of the DMA channels: the sizes and byte enables of the TLPs they cut."""

from amaranth import *

__all__ = ["size_bytes", "be_first_last", "next_chunk"]


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
