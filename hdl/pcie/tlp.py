"""The transaction-layer stream and TLP header helpers.

Stream convention (the one engineers know from verilog-pcie's generic ``pcie_if`` buses):

* ``hdr``   -- 128 bits, the TLP header as sent on the wire: DW0 in bits [127:96], DW1 in
  [95:64], DW2 in [63:32], DW3 in [31:0] (zero for 3-DW headers). Each DW keeps the bit
  numbering of the PCIe specification (DW0[31:29] is Fmt, DW0[9:0] is Length, ...).
  Valid on the beat that has ``sop`` set.
* ``data``  -- payload, DW-aligned, first DW in bits [31:0]; within a DW, byte 0 (the lowest
  address) is bits [7:0].
* ``strb``  -- one bit per payload DW of this beat.
* ``sop`` / ``eop`` -- first / last beat of the TLP. A TLP without payload is one beat with
  ``sop``, ``eop`` and ``strb == 0``.
* ``func``  -- on the receive side: the function index the TLP was routed to (0 = PF, n = VF n);
  on the transmit side: the requesting function (informational).
* ``bar``   -- on the receive side: the BAR that matched (informational).

``valid`` / ``ready`` follow :mod:`amaranth.lib.stream` rules: a beat moves when both are high
on a clock edge; once ``valid`` is high the payload holds until it moves.
"""

from amaranth import *
from amaranth.lib import data, stream, enum

__all__ = ["TlpBeat", "tlp_stream", "Fmt", "TlpKind", "CplStatus", "Dw0", "ReqDw1", "CplDw1",
           "CplDw2", "CfgDw2", "hdr_dw", "make_hdr", "fmt_type", "mem_hdr"]


def TlpBeat(data_width):
    """Payload layout of one beat of the TLP stream."""
    return data.StructLayout({
        "hdr":  128,
        "data": data_width,
        "strb": data_width // 32,
        "sop":  1,
        "eop":  1,
        "func": 8,
        "bar":  3,
    })


def tlp_stream(data_width):
    """`lib.stream` signature of a TLP stream (source side)."""
    return stream.Signature(TlpBeat(data_width))


class Fmt(enum.Enum, shape=3):
    DW3        = 0b000
    DW4        = 0b001
    DW3_DATA   = 0b010
    DW4_DATA   = 0b011
    PREFIX     = 0b100


def fmt_type(fmt, type_):
    return (fmt << 5) | type_


class TlpKind:
    """8-bit {Fmt, Type} codes of the TLPs the card knows."""
    MRD32    = fmt_type(0b000, 0b00000)
    MRD64    = fmt_type(0b001, 0b00000)
    MRDLK32  = fmt_type(0b000, 0b00001)
    MRDLK64  = fmt_type(0b001, 0b00001)
    MWR32    = fmt_type(0b010, 0b00000)
    MWR64    = fmt_type(0b011, 0b00000)
    IORD     = fmt_type(0b000, 0b00010)
    IOWR     = fmt_type(0b010, 0b00010)
    CFGRD0   = fmt_type(0b000, 0b00100)
    CFGWR0   = fmt_type(0b010, 0b00100)
    CFGRD1   = fmt_type(0b000, 0b00101)
    CFGWR1   = fmt_type(0b010, 0b00101)
    CPL      = fmt_type(0b000, 0b01010)
    CPLD     = fmt_type(0b010, 0b01010)
    CPLLK    = fmt_type(0b000, 0b01011)
    CPLDLK   = fmt_type(0b010, 0b01011)
    FETCHADD32 = fmt_type(0b010, 0b01100)
    FETCHADD64 = fmt_type(0b011, 0b01100)
    SWAP32   = fmt_type(0b010, 0b01101)
    SWAP64   = fmt_type(0b011, 0b01101)
    CAS32    = fmt_type(0b010, 0b01110)
    CAS64    = fmt_type(0b011, 0b01110)
    # messages: type 0b10rrr, fmt 001 (no data) or 011 (data)

    NON_POSTED = (MRD32, MRD64, MRDLK32, MRDLK64, IORD, IOWR, CFGRD0, CFGWR0, CFGRD1, CFGWR1,
                  FETCHADD32, FETCHADD64, SWAP32, SWAP64, CAS32, CAS64)


class CplStatus(enum.Enum, shape=3):
    SC  = 0b000
    UR  = 0b001
    CRS = 0b010
    CA  = 0b100


# Header DWs as Amaranth layouts (LSB first, spec bit numbering).
Dw0 = data.StructLayout({
    "length": 10, "at": 2, "attr_lo": 2, "ep": 1, "td": 1, "th": 1, "ln": 1, "attr_hi": 1,
    "tag8": 1, "tc": 3, "tag9": 1, "type": 5, "fmt": 3,
})
ReqDw1 = data.StructLayout({"first_be": 4, "last_be": 4, "tag": 8, "requester_id": 16})
CfgDw2 = data.StructLayout({"rsvd0": 2, "reg": 10, "rsvd1": 4, "completer_id": 16})
CplDw1 = data.StructLayout({"byte_count": 12, "bcm": 1, "status": 3, "completer_id": 16})
CplDw2 = data.StructLayout({"lower_addr": 7, "rsvd": 1, "tag": 8, "requester_id": 16})


def hdr_dw(hdr, n):
    """DW *n* (0..3) of a 128-bit header value."""
    return hdr[32 * (3 - n):32 * (4 - n)]


def make_hdr(dw0, dw1, dw2, dw3=0):
    """Concatenate four DWs into the 128-bit ``hdr`` field."""
    return Cat(C(0, 32) if isinstance(dw3, int) and dw3 == 0 else dw3, dw2, dw1, dw0)


def mem_hdr(m, write, addr, ndw, rid, tag=0, first_be=0xF, last_be=0xF):
    """Header of a memory request the card sends: MemRd / MemWr of ``ndw`` DWs at ``addr``
    (a 64-bit value; the 3-DW form when the upper half is zero, as the specification asks),
    from requester ``rid``. ``addr``'s low two bits are ignored (the byte enables say which
    bytes). Adds a combinational helper signal to ``m``."""
    a = Signal(64, name="req_addr")
    m.d.comb += a.eq(addr)
    is64 = a[32:] != 0
    lo = Cat(C(0, 2), a[2:32])
    if write:
        kind = Mux(is64, C(TlpKind.MWR64, 8), C(TlpKind.MWR32, 8))
    else:
        kind = Mux(is64, C(TlpKind.MRD64, 8), C(TlpKind.MRD32, 8))
    length = Signal(10, name="req_len")          # 1024 DW is encoded as 0
    m.d.comb += length.eq(ndw)
    dw0 = Cat(length, C(0, 14), kind)
    dw1 = Cat(C(first_be, 4) if isinstance(first_be, int) else first_be,
              C(last_be, 4) if isinstance(last_be, int) else last_be,
              C(tag, 8) if isinstance(tag, int) else tag, rid)
    return make_hdr(dw0, dw1, Mux(is64, a[32:], lo), Mux(is64, lo, 0))
