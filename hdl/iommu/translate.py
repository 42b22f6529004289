"""Address translation: per-function domains, the device TLB and the page-table walker.

The translation structure is owned by the host: for each function a flat table of u64
page-table entries in host memory (see :class:`regmap.IommuRegs`), programmed only through
PF BAR2. The card walks it itself -- one MemRd of 2 DW with the PF's requester ID, through its
host port (:class:`hdl.pcie.host_port.HostPort`, tag ``HOST_TAGS["walk"]``) -- instead of sending ATS translation requests; the effect for the design is
the same (the host decides every mapping, the card caches what it was told) and it needs no
ATS support in the root complex model.

A request (function, IOVA) gets one response:

* ``OK`` with the bus address (``bypass`` set when the function has no domain: the IOVA is
  the bus address, and the whole transfer may go in one piece);
* ``BLOCKED`` when the IOVA, or the last IOVA of the transfer, is beyond the domain (counted;
  nothing may be moved);
* ``NOT_PRESENT`` when the page-table entry's present bit is clear (a page fault);
* ``ERROR`` when the walk's completion failed or timed out.

Present translations go into the device TLB (:class:`hdl.iommu.atc.AddressTranslationCache`). A
domain change or the host's ``ATC_INV`` drops the function's entries, and a walk that was in
flight across such an invalidation does not fill the cache with what it read.
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from regmap import IommuRegs as R, PAGE_SHIFT, PTE

from ..config import CardConfig
from ..iface import (RegBusSignature, XlateReq, XlateResp, XlateStatus, record_layout,
                     LinkSignature, FunctionStateSignature)
from ..pcie.host_port import HostPort, HOST_TAGS
from ..pcie.regfile import RegisterFile
from ..pcie.tlp import tlp_stream
from .atc import AddressTranslationCache, VPN_BITS

__all__ = ["Translator"]


class Translator(wiring.Component):
    def __init__(self, cfg: CardConfig, atc_sets=8):
        self._card = cfg
        self.atc_sets = atc_sets
        W = cfg.data_width
        super().__init__({
            "bus":      In(RegBusSignature()),
            "req":      In(stream.Signature(XlateReq)),
            "resp":     Out(stream.Signature(XlateResp)),
            "tx":       Out(tlp_stream(W)),
            "cpl":      In(tlp_stream(W)),      # completions of its walks
            "link":     In(LinkSignature()),
            "fn":       In(FunctionStateSignature(cfg.num_functions)),
            "unexp":    Out(1),
            "blocked":  Out(1),                 # one-cycle strobe per blocked request
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        b = self.bus
        m.submodules.atc = atc = AddressTranslationCache(nf, self.atc_sets)

        pt = Array(Signal(64 - PAGE_SHIFT, name=f"pt{i}") for i in range(nf))
        pages = Array(Signal(VPN_BITS + 1, name=f"pages{i}") for i in range(nf))
        vm = Array(Signal(8, name=f"vm{i}") for i in range(nf))
        dsel = Signal(8)
        hits = Signal(32)
        misses = Signal(32)
        blocked = Signal(32)

        # ---- registers (PF BAR2) ------------------------------------------------------------
        inv_reg = Signal()
        inv_reg_fidx = Signal(8)
        inv_reg_all = Signal()
        rf = RegisterFile(m, b, "iommu")
        dsel_ok = dsel < nf
        with m.If(rf.we(R.DOM_SEL)):
            m.d.sync += dsel.eq(rf.wdata[:8])
        with m.If(rf.we(R.DOM_PT_LO) & dsel_ok):
            m.d.sync += pt[dsel][:32 - PAGE_SHIFT].eq(rf.wdata[PAGE_SHIFT:])
            m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
        with m.If(rf.we(R.DOM_PT_HI) & dsel_ok):
            m.d.sync += pt[dsel][32 - PAGE_SHIFT:].eq(rf.wdata)
            m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
        with m.If(rf.we(R.DOM_PAGES) & dsel_ok):
            lim = 1 << VPN_BITS
            m.d.sync += pages[dsel].eq(Mux(rf.wdata > lim, lim, rf.wdata))
            m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
        with m.If(rf.we(R.DOM_VM) & dsel_ok):
            m.d.sync += vm[dsel].eq(rf.wdata[:8])
        with m.If(rf.we(R.ATC_INV)):
            m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(rf.wdata[:8]),
                         inv_reg_all.eq(rf.wdata[31])]
        rf.read(R.DOM_SEL, dsel)
        rf.read(R.DOM_PT_LO, Mux(dsel_ok, Cat(C(0, PAGE_SHIFT), pt[dsel][:32 - PAGE_SHIFT]), 0))
        rf.read(R.DOM_PT_HI, Mux(dsel_ok, pt[dsel][32 - PAGE_SHIFT:], 0))
        rf.read(R.DOM_PAGES, Mux(dsel_ok, pages[dsel], 0))
        rf.read(R.DOM_VM, Mux(dsel_ok, vm[dsel], 0))
        rf.read(R.ATC_HITS, hits)
        rf.read(R.ATC_MISSES, misses)
        rf.read(R.BLOCKED, blocked)
        rf.finish()

        # invalidations: the host's (register), FLR's and VF Enable's (every VF: the whole
        # TLB goes, the PF's entries are walked again)
        m.d.comb += [
            atc.inv_en.eq(inv_reg | self.fn.flr | self.fn.vf_reset),
            atc.inv_fidx.eq(Mux(inv_reg, inv_reg_fidx, self.fn.flr_fidx)),
            # (two in one cycle: a register invalidation made by the management UART can meet
            # a host's FLR; then every entry goes, which is safe)
            atc.inv_all.eq((inv_reg & (inv_reg_all | self.fn.flr)) | self.fn.vf_reset),
        ]

        # ---- lookup / walk ------------------------------------------------------------------
        f = Signal(8)
        iova = Signal(64)
        last = Signal(64)
        vpn = iova[PAGE_SHIFT:]
        res = Signal(XlateResp)
        stale = Signal()                 # an invalidation of ``f`` happened during the walk
        pte_addr = Signal(64)
        m.d.comb += pte_addr.eq(Cat(C(0, PAGE_SHIFT), pt[f]) + (vpn[:VPN_BITS] << 3))
        # the walker's reads: the PTE, 2 DW, with the PF's requester ID
        m.submodules.hport = hp = HostPort(self._card.data_width, HOST_TAGS["walk"], max_dw=2)
        wiring.connect(m, hp.tx, wiring.flipped(self.tx))
        wiring.connect(m, wiring.flipped(self.cpl), hp.cpl)
        m.d.comb += [hp.bus_num.eq(self.link.bus_num), self.unexp.eq(hp.unexp),
                     hp.req.p.fidx.eq(0), hp.req.p.addr.eq(pte_addr), hp.req.p.ndw.eq(2),
                     hp.req.p.fbe.eq(0xF), hp.req.p.lbe.eq(0xF)]
        pte = data.View(record_layout(PTE), hp.rdata)
        m.d.comb += [atc.lk_fidx.eq(f), atc.lk_vpn.eq(vpn[:VPN_BITS]),
                     atc.fill_fidx.eq(f), atc.fill_vpn.eq(vpn[:VPN_BITS])]
        m.d.comb += self.resp.p.eq(res)

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.req.ready.eq(1)
                with m.If(self.req.valid):
                    m.d.sync += [f.eq(self.req.p.fidx), iova.eq(self.req.p.iova),
                                 last.eq(self.req.p.last)]
                    m.next = "CHECK"
            with m.State("CHECK"):
                m.d.sync += [res.vm.eq(vm[f]), res.bypass.eq(0), res.phys.eq(iova), stale.eq(0)]
                with m.If((f >= nf) | (pages[f] == 0)):
                    m.d.sync += [res.status.eq(XlateStatus.OK), res.bypass.eq(f < nf)]
                    with m.If(f >= nf):
                        m.d.sync += res.status.eq(XlateStatus.BLOCKED)
                    m.next = "RESP"
                with m.Elif((vpn >= pages[f]) | (last[PAGE_SHIFT:] >= pages[f]) | (last < iova)):
                    m.d.sync += [res.status.eq(XlateStatus.BLOCKED), blocked.eq(blocked + 1)]
                    m.d.comb += self.blocked.eq(1)
                    m.next = "RESP"
                with m.Else():
                    m.d.comb += atc.lk_en.eq(1)
                    m.next = "LOOK"
            with m.State("LOOK"):
                with m.If(atc.hit):
                    m.d.sync += [res.status.eq(XlateStatus.OK),
                                 res.phys.eq(Cat(iova[:PAGE_SHIFT], atc.ppn)), hits.eq(hits + 1)]
                    m.next = "RESP"
                with m.Else():
                    m.d.sync += misses.eq(misses + 1)
                    m.next = "WALK"
            with m.State("WALK"):
                m.d.comb += hp.req.valid.eq(1)
                with m.If(hp.req.ready):
                    m.next = "WAITW"
            with m.State("WAITW"):
                with m.If(hp.done):
                    with m.If(hp.err):                  # UR / CA, short, or timed out
                        m.d.sync += res.status.eq(XlateStatus.ERROR)
                    with m.Elif(pte.present):
                        m.d.sync += [res.status.eq(XlateStatus.OK),
                                     res.phys.eq(Cat(iova[:PAGE_SHIFT], pte.page))]
                        m.d.comb += [atc.fill_en.eq(~stale), atc.fill_ppn.eq(pte.page)]
                    with m.Else():
                        m.d.sync += res.status.eq(XlateStatus.NOT_PRESENT)
                    m.next = "RESP"
            with m.State("RESP"):
                m.d.comb += self.resp.valid.eq(1)
                with m.If(self.resp.ready):
                    m.next = "IDLE"

        with m.If(atc.inv_en & (atc.inv_all | (atc.inv_fidx == f))):
            m.d.sync += stale.eq(1)

        return m
