"""BAR address decode for the PF (BAR0 64-bit, BAR2 32-bit) and the VF BAR0 aperture.

Combinational: given a memory request address and the configuration state, tells which
function index and BAR the address hits and the DW offset inside that BAR. The PF decodes
only with Memory Space Enable; VFs decode with VF Enable and VF MSE, VF *n* at
``VF_BAR0 + (n - 1) * vf_bar0_size`` for ``1 <= n <= NumVFs``.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..config import CardConfig
from ..iface import OFFSET_DW_BITS

__all__ = ["BarDecoder", "BarConfigSignature", "BarLookupSignature"]


def BarConfigSignature():
    """The configuration state the decoder needs (configuration space -> decoder)."""
    return wiring.Signature({
        "pf_mse":    Out(1),
        "pf_bar0":   Out(64),
        "pf_bar2":   Out(32),
        "vf_enable": Out(1),
        "vf_mse":    Out(1),
        "num_vfs":   Out(16),
        "vf_bar0":   Out(64),
        "vf_shift":  Out(range(64)),        # log2 of the per-VF aperture
    })


def BarLookupSignature():
    """Address lookup, seen from the requester (the completer logic)."""
    return wiring.Signature({
        "addr":   Out(64),
        "hit":    In(1),
        "fidx":   In(8),
        "bar":    In(3),
        "offset": In(OFFSET_DW_BITS),   # DW offset inside the BAR
    })


class BarDecoder(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self.cfg = cfg
        super().__init__({
            "lookup":    In(BarLookupSignature()),
            "bars":     In(BarConfigSignature()),
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        a = self.lookup.addr
        lk = self.lookup
        s0 = exact_log2(cfg.bar0_size)
        s2 = exact_log2(cfg.bar2_size)
        sv = exact_log2(cfg.vf_bar0_size)
        assert max(s0, s2, sv) - 2 <= OFFSET_DW_BITS

        pf0_hit = self.bars.pf_mse & (a[s0:] == self.bars.pf_bar0[s0:])
        pf2_hit = self.bars.pf_mse & (a[32:] == 0) & (a[s2:32] == self.bars.pf_bar2[s2:])

        # VF aperture: index = (addr - VF_BAR0) >> vf_shift, valid when 0 <= index < NumVFs.
        # vf_shift is log2 of max(vf_bar0_size, System Page Size): one of a few constants.
        diff = Signal(65)
        m.d.comb += diff.eq(a - self.bars.vf_bar0)
        borrow = diff[64]
        vf_idx = Signal(64 - sv)
        vf_off = Signal(OFFSET_DW_BITS)
        with m.Switch(self.bars.vf_shift):
            for sh in range(sv, 2 + OFFSET_DW_BITS + 1):
                with m.Case(sh):
                    m.d.comb += [vf_idx.eq(diff[sh:64]), vf_off.eq(diff[2:sh])]
            with m.Default():
                m.d.comb += vf_idx.eq(C(-1, 64 - sv))    # unsupported aperture: never hits
        vf_hit = self.bars.vf_enable & self.bars.vf_mse & ~borrow & (vf_idx < self.bars.num_vfs)

        with m.If(pf0_hit):
            m.d.comb += [lk.hit.eq(1), lk.fidx.eq(0), lk.bar.eq(0), lk.offset.eq(a[2:s0])]
        with m.Elif(pf2_hit):
            m.d.comb += [lk.hit.eq(1), lk.fidx.eq(0), lk.bar.eq(2), lk.offset.eq(a[2:s2])]
        with m.Elif(vf_hit):
            m.d.comb += [lk.hit.eq(1), lk.fidx.eq(vf_idx[:8] + 1), lk.bar.eq(0),
                         lk.offset.eq(vf_off)]
        return m
