"""Records the card and the host exchange through host memory, each defined once as a field table.

A :class:`Record` is a fixed-size little-endian structure whose fields are bit ranges. The host
packs and unpacks it (:meth:`Record.pack`, :meth:`Record.unpack`); the RTL takes an Amaranth
layout derived from the same table (:func:`hdl.iface.record_layout`), so a field can never sit
at one offset in the gateware and at another in the driver.

================ ===== ====================================================================
record           bytes written by
================ ===== ====================================================================
DESCRIPTOR       32    the host (the card writes back ``status``), :mod:`hdl.dma.queue`
FBQ_ENTRY        16    the card: a staged write payload (:mod:`hdl.iommu.fault`)
IOPF_ENTRY       16    the card: an I/O page fault
CQ_ENTRY         16    the host: a fault resolved
PTE              8     the host: one page of a function's translation domain
================ ===== ====================================================================
"""

from dataclasses import dataclass

__all__ = ["Field", "Record", "DESCRIPTOR", "FBQ_ENTRY", "IOPF_ENTRY", "CQ_ENTRY", "PTE",
           "DescStatus", "PAGE_SHIFT", "PTE_PRESENT", "RECORDS"]


@dataclass(frozen=True)
class Field:
    """``width`` bits at bit ``offset`` of the record (bit 0 = bit 0 of byte 0)."""
    name: str
    offset: int
    width: int
    doc: str = ""

    @property
    def mask(self):
        return (1 << self.width) - 1


def u(name, byte, bits, doc="", bit=0):
    """A field at byte ``byte`` (plus ``bit``), ``bits`` wide."""
    return Field(name, byte * 8 + bit, bits, doc)


class Record:
    """A fixed-size record of named bit fields; what no field covers is zero."""

    def __init__(self, name, size, fields, doc=""):
        self.name = name
        self.size = size
        self.fields = tuple(fields)
        self.doc = doc
        self._by_name = {}
        taken = 0
        for f in self.fields:
            if f.name in self._by_name:
                raise ValueError(f"record {name}: field {f.name!r} twice")
            if f.width < 1 or f.offset < 0 or f.offset + f.width > size * 8:
                raise ValueError(f"record {name}: field {f.name!r} outside {size} bytes")
            bits = f.mask << f.offset
            if taken & bits:
                raise ValueError(f"record {name}: field {f.name!r} overlaps another")
            taken |= bits
            self._by_name[f.name] = f

    def __repr__(self):
        return f"Record({self.name!r}, {self.size} bytes)"

    def __getitem__(self, name) -> Field:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"record {self.name} has no field {name!r}") from None

    def __contains__(self, name):
        return name in self._by_name

    def byte_offset(self, name):
        """Byte offset of a byte-aligned field (for a host that writes only that field)."""
        f = self[name]
        if f.offset % 8:
            raise ValueError(f"record {self.name}: field {name!r} is not byte aligned")
        return f.offset // 8

    def pack(self, **values) -> bytes:
        """The record's bytes; fields not given are 0. An unknown field or a value that does
        not fit its field is a ``ValueError``."""
        word = 0
        for name, value in values.items():
            if name not in self._by_name:
                raise ValueError(f"record {self.name} has no field {name!r}")
            f = self._by_name[name]
            value = int(value)
            if not 0 <= value <= f.mask:
                raise ValueError(f"record {self.name}: {name}={value:#x} does not fit "
                                 f"{f.width} bits")
            word |= value << f.offset
        return word.to_bytes(self.size, "little")

    def unpack(self, raw) -> dict:
        """Every field's value from the record's bytes (``raw`` may be longer)."""
        if len(raw) < self.size:
            raise ValueError(f"record {self.name}: {len(raw)} bytes, needs {self.size}")
        word = int.from_bytes(bytes(raw[:self.size]), "little")
        return {f.name: (word >> f.offset) & f.mask for f in self.fields}


PAGE_SHIFT = 12          # translation granule: 4 KiB
PTE_PRESENT = 1 << 0     # page-table entry bit 0; bits [63:12] are the page's bus address


class DescStatus:
    """The status word the card writes into a finished DMA descriptor (see hdl.dma.queue)."""
    DONE = 0x0000_0001
    BAD_DESC = 0x8000_0001      # length, card range or byte lanes invalid
    CPL_ERROR = 0x8000_0002     # the host answered UR / CA (or timed out)
    FAULT = 0x8000_0003         # a page was not present and the host refused (or no fault queues)
    BLOCKED = 0x8000_0004       # an IOVA outside the function's domain: nothing was moved


DESCRIPTOR = Record("descriptor", 32, [
    u("host", 0x00, 64, "host address: bus address, or IOVA of the function's domain"),
    u("card", 0x08, 32, "card memory byte address"),
    u("length", 0x0C, 32, "bytes, 1..65536"),
    u("to_host", 0x10, 1, "direction: 0 host -> card, 1 card -> host"),
    u("irq", 0x10, 1, "raise the queue's MSI-X vector when done", bit=1),
    u("status", 0x14, 32, "written by the card: DescStatus"),
], "a DMA descriptor, one slot of a function's ring (hdl.dma.queue)")

FBQ_ENTRY = Record("fbq_entry", 16, [
    u("staging", 0, 32, "card address of the staged payload"),
    u("length", 4, 32, "payload bytes"),
    u("function", 8, 16),
    u("slot", 10, 16, "staging slot"),
], "fault buffer queue entry: a write payload staged for a page that was not present")

IOPF_ENTRY = Record("iopf_entry", 16, [
    u("iova", 0, 64, "the faulting IOVA"),
    u("function", 8, 8),
    u("vm", 9, 8, "the domain's VM id"),
    u("write", 10, 1, "flags bit 0: a write"),
    u("has_fbq", 10, 1, "flags bit 1: an FBQ entry holds its payload", bit=1),
    u("fbq_index", 12, 16, "0xFFFF: none"),
    u("seq", 14, 16, "IOPF index + 1"),
], "I/O page fault queue entry")

CQ_ENTRY = Record("cq_entry", 16, [
    u("function", 0, 8),
    u("status", 1, 8, "0 page mapped: retry, 1 refused"),
    u("iopf_index", 4, 32),
], "completion queue entry: the host's answer to a fault")

PTE = Record("pte", 8, [
    u("present", 0, 1),
    u("page", 0, 52, "bus address >> 12", bit=PAGE_SHIFT),
], "page-table entry of a translation domain (a flat table, one per 4 KiB page)")

RECORDS = (DESCRIPTOR, FBQ_ENTRY, IOPF_ENTRY, CQ_ENTRY, PTE)
