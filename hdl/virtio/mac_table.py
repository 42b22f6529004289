"""The switch's station table: one unicast MAC address per function.

Each function (the PF and every VF) owns one MAC address. At reset function *n* has
``02:0f:fc:00:00:<n>`` (:data:`regmap.VirtioRegs.MAC_PREFIX`); the PF's driver may give it
another through PF BAR2 (:class:`regmap.MigRegs` ``MAC_LO`` / ``MAC_HI`` of the selected
function), as ``ip link set <pf> vf <n> mac`` does on a real SR-IOV NIC. A live migration
moves a guest's address with it: the source function's entry is retired, the target's set.

* **lookup**: the destination MAC of the frame in the engine is compared with every entry at
  once; ``hit`` and ``hit_fidx`` (the lowest matching function) follow ``dst`` one clock
  later. A multicast destination never hits; an entry holding a multicast address (bit 0 of its
  first byte set, e.g. ``ff:ff:ff:ff:ff:ff``) is therefore a retired entry.
* **read ports**: the entry of ``sel`` (the register view) and of ``show.fidx`` (the virtio
  device configuration's ``mac`` field), both combinational.

Three ports, one per user: ``program`` (the PF's registers, :mod:`hdl.virtio.net_regs`),
``lookup`` (the engine) and ``show`` (the transport's device configuration).

The address is held as the bytes appear on the wire and in the virtio config, first byte in
bits 7:0: ``MAC_LO`` holds bytes 0..3, ``MAC_HI`` bytes 4 and 5.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from regmap import VirtioRegs as V

__all__ = ["MacTable", "default_mac", "MacProgramSignature", "MacLookupSignature",
           "MacShowSignature"]


def default_mac(fidx: int) -> int:
    """Function ``fidx``'s reset address, as the 48-bit little-endian integer the table holds."""
    return int.from_bytes(V.MAC_PREFIX + bytes([fidx & 0xFF]), "little")


def MacProgramSignature():
    """The register view (the registers' side): the entry of ``sel``, written a half at a time."""
    return wiring.Signature({"sel": Out(8), "we_lo": Out(1), "we_hi": Out(1), "wdata": Out(32),
                             "rd_mac": In(48)})


def MacLookupSignature():
    """A frame's destination (the engine's side); the answer follows a clock later."""
    return wiring.Signature({"dst": Out(48), "hit": In(1), "hit_fidx": In(8)})


def MacShowSignature():
    """The device configuration's ``mac`` field of function ``fidx`` (the transport's side)."""
    return wiring.Signature({"fidx": Out(8), "mac": In(48)})


class MacTable(wiring.Component):
    def __init__(self, num_functions: int):
        self._nf = num_functions
        super().__init__({
            "program": In(MacProgramSignature()),
            "lookup":  In(MacLookupSignature()),
            "show":    In(MacShowSignature()),
        })

    def elaborate(self, platform):
        m = Module()
        nf = self._nf
        entry = Array(Signal(48, init=default_mac(f), name=f"mac{f}") for f in range(nf))

        p, lk, sh = self.program, self.lookup, self.show
        ok = p.sel < nf
        with m.If(p.we_lo & ok):
            m.d.sync += entry[p.sel][:32].eq(p.wdata)
        with m.If(p.we_hi & ok):
            m.d.sync += entry[p.sel][32:].eq(p.wdata[:16])
        m.d.comb += [
            p.rd_mac.eq(Mux(ok, entry[p.sel], 0)),
            sh.mac.eq(Mux(sh.fidx < nf, entry[sh.fidx], 0)),
        ]

        match = Signal(nf)
        m.d.comb += match.eq(Cat(entry[f] == lk.dst for f in range(nf)))
        unicast = ~lk.dst[0]
        m.d.sync += lk.hit.eq(unicast & match.any())
        # the lowest matching function (a duplicate address is the PF driver's mistake; the
        # lower function wins, deterministically)
        with m.If(unicast):
            for f in reversed(range(nf)):
                with m.If(match[f]):
                    m.d.sync += lk.hit_fidx.eq(f)
        return m
