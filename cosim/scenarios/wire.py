"""What the card puts on the link, recorded from the bridge: every memory write, so that
"nothing was written" is checked against the wire, not inferred."""


class WireLog:
    """Every MemWr the card sends: (address, payload length, first-beat time in ns)."""

    def __init__(self, h):
        self.writes = []
        self.msi = {v.addr for v in h.pf.msix_vectors}
        h.bridge.tx_hook = self.hook

    def hook(self, hdr, payload, t0, t1):
        fmt, typ = hdr[0] >> 5, hdr[0] & 0x1F
        if typ != 0 or fmt not in (0b010, 0b011):
            return
        if fmt & 1:
            addr = int.from_bytes(hdr[8:16], "big")
        else:
            addr = int.from_bytes(hdr[8:12], "big")
        first_be, last_be = hdr[7] & 0xF, hdr[7] >> 4
        ndw = len(payload) // 4
        head = (first_be & -first_be).bit_length() - 1 if first_be else 0
        tail_be = first_be if ndw == 1 else last_be
        tail = 4 - tail_be.bit_length() if tail_be else 0
        self.writes.append((addr + head, max(4 * ndw - head - tail, 0), t0))

    def outside(self, allowed):
        """Writes that fall in no range of ``allowed`` [(base, size), ...] (MSI-X messages
        excepted)."""
        bad = []
        for addr, n, _ in self.writes:
            if addr in self.msi:
                continue
            if not any(b <= addr and addr + n <= b + s for b, s in allowed):
                bad.append((hex(addr), n))
        return bad
