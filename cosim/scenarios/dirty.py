"""Dirty-page logging seen on the wire: which pages each function's memory writes touch, and
the card's marking writes (:mod:`hdl.dma.dirty_log`), for checking a log against the traffic."""

from cocotb.utils import get_sim_time

__all__ = ["WireWrites"]


class WireWrites:
    """The pages each function's MemWr TLPs touch on the wire (``tx_hook``), and the card's
    marking writes (one byte of 0xFF from the PF) apart. ``timed`` lists every page written
    as ``(simulated ns, fidx, page address)`` in order."""

    def __init__(self, h):
        self.pages = {}                  # fidx -> set of page addresses
        self.timed = []                  # (ns, fidx, page)
        self.marks = []                  # (byte address, data byte)
        h.bridge.tx_hook = self.on_tx

    def written(self, fidx, since_ns=0, until_ns=float("inf")):
        """The pages ``fidx`` wrote between two simulated times."""
        return {p for t, f, p in self.timed if f == fidx and since_ns <= t <= until_ns}

    def on_tx(self, hdr, payload, t0, t1):
        if hdr[0] not in (0x40, 0x60):
            return
        addr = int.from_bytes(hdr[8:16] if hdr[0] & 0x20 else hdr[8:12], "big") & ~3
        fidx = hdr[5]                    # requester ID: bus, function (ARI)
        ndw = int.from_bytes(hdr[2:4], "big") & 0x3FF
        first_be, last_be = hdr[7] & 0xF, hdr[7] >> 4
        if addr >> 20 in (0xFEE, 0x800):  # an MSI-X message (x86; the RootComplex's MSI region)
            return
        if fidx == 0 and ndw == 1 and first_be in (1, 2, 4, 8) and last_be == 0:
            lane = first_be.bit_length() - 1
            self.marks.append((addr + lane, payload[lane]))
            return
        lo = addr + (first_be & -first_be).bit_length() - 1
        hi = addr + 4 * ndw - 1 - (4 - (last_be if ndw > 1 else first_be).bit_length())
        pages = range(lo >> 12 << 12, hi + 1, 4096)
        self.pages.setdefault(fidx, set()).update(pages)
        now = get_sim_time("ns")
        self.timed += [(now, fidx, p) for p in pages]
