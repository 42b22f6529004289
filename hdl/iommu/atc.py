"""The device TLB (address translation cache): recently used translations, per function.

Direct mapped, ``sets`` entries per function: the entry of IOVA page ``vpn`` of function ``f``
is ``f * sets + vpn % sets``. Tags and page numbers sit in one block RAM; the valid bits are
flip-flops so that a whole function (an FLR, a domain change, the host's invalidation) or the
whole cache is dropped in one cycle. Only present translations are cached.

A lookup is a one-cycle strobe; ``hit`` and ``ppn`` are valid the cycle after it.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import IommuRegs

__all__ = ["AddressTranslationCache", "VPN_BITS", "PPN_BITS"]

VPN_BITS = exact_log2(IommuRegs.MAX_PAGES)      # IOVA page numbers
PPN_BITS = 52          # bus page numbers: 64-bit bus addresses


class AddressTranslationCache(wiring.Component):
    def __init__(self, num_functions, sets=8):
        assert sets & (sets - 1) == 0 and sets >= 1
        self.nf = num_functions
        self.sets = sets
        super().__init__({
            "lk_en":     In(1),
            "lk_fidx":   In(8),
            "lk_vpn":    In(VPN_BITS),
            "hit":       Out(1),
            "ppn":       Out(PPN_BITS),
            "fill_en":   In(1),
            "fill_fidx": In(8),
            "fill_vpn":  In(VPN_BITS),
            "fill_ppn":  In(PPN_BITS),
            "inv_en":    In(1),     # drop every entry of ``inv_fidx`` (all: ``inv_all``)
            "inv_fidx":  In(8),
            "inv_all":   In(1),
        })

    def elaborate(self, platform):
        m = Module()
        S = self.sets
        SB = exact_log2(S)
        TAG = VPN_BITS - SB
        n = self.nf * S
        # index = fidx * S + vpn % S, i.e. the bits {fidx, vpn[SB-1:0]}
        m.submodules.mem = mem = Memory(shape=TAG + PPN_BITS, depth=n, init=[])
        rp = mem.read_port()
        wp = mem.write_port()
        valid = Signal(n)

        def index(fidx, vpn):
            return Cat(vpn[:SB], fidx) if SB else fidx

        lk_idx = Signal(range(n))
        lk_tag = Signal(TAG)
        m.d.comb += [rp.addr.eq(index(self.lk_fidx, self.lk_vpn)), rp.en.eq(self.lk_en)]
        with m.If(self.lk_en):
            m.d.sync += [lk_idx.eq(rp.addr), lk_tag.eq(self.lk_vpn[SB:])]
        m.d.comb += [
            self.hit.eq(valid.bit_select(lk_idx, 1) & (rp.data[:TAG] == lk_tag)),
            self.ppn.eq(rp.data[TAG:]),
        ]

        fill_idx = Signal(range(n))
        m.d.comb += [
            fill_idx.eq(index(self.fill_fidx, self.fill_vpn)),
            wp.addr.eq(fill_idx),
            wp.data.eq(Cat(self.fill_vpn[SB:], self.fill_ppn)),
            wp.en.eq(self.fill_en),
        ]
        with m.If(self.fill_en):
            m.d.sync += valid.bit_select(fill_idx, 1).eq(1)
        with m.If(self.inv_en):
            with m.If(self.inv_all):
                m.d.sync += valid.eq(0)
            with m.Else():
                for f in range(self.nf):
                    with m.If(self.inv_fidx == f):
                        m.d.sync += valid[f * S:(f + 1) * S].eq(0)
        return m
