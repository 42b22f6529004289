"""Address translation: per-function domains, the device TLB and the page-table walker.

The translation structure is owned by the host: for each function a flat table of u64
page-table entries in host memory (see :class:`regmap.IommuRegs`), programmed only through
PF BAR2. The card walks it itself -- one MemRd of 2 DW with the PF's requester ID and tag
:data:`WALK_TAG` -- instead of sending ATS translation requests; the effect for the design is
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

from regmap import IommuRegs as R, PAGE_SHIFT

from ..config import CardConfig
from ..iface import RegBusSignature, CPL_TIMEOUT, XlateReq, XlateResp, XlateStatus
from ..pcie.tlp import tlp_stream, mem_hdr, Dw0, CplDw1, hdr_dw
from .atc import AddressTranslationCache, VPN_BITS

__all__ = ["Translator", "WALK_TAG"]

WALK_TAG = 1


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
            "cpl":      In(tlp_stream(W)),      # completions with tag WALK_TAG
            "bus_num":  In(8),
            "flr":      In(1),                  # the function's domain stays, its TLB goes
            "flr_fidx": In(8),
            "vf_reset": In(1),                  # VF Enable cleared: the whole TLB goes
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
        sel = (b.fidx == 0) & (b.bar == 2) & (b.addr >= R.DOM_SEL // 4) & (b.addr <= R.BLOCKED // 4)
        dsel_ok = dsel < nf
        with m.If(b.we & sel & (b.be == 0xF)):
            with m.Switch(b.addr):
                with m.Case(R.DOM_SEL // 4):
                    m.d.sync += dsel.eq(b.wdata[:8])
                with m.Case(R.DOM_PT_LO // 4):
                    with m.If(dsel_ok):
                        m.d.sync += pt[dsel][:32 - PAGE_SHIFT].eq(b.wdata[PAGE_SHIFT:])
                        m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
                with m.Case(R.DOM_PT_HI // 4):
                    with m.If(dsel_ok):
                        m.d.sync += pt[dsel][32 - PAGE_SHIFT:].eq(b.wdata)
                        m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
                with m.Case(R.DOM_PAGES // 4):
                    with m.If(dsel_ok):
                        lim = 1 << VPN_BITS
                        m.d.sync += pages[dsel].eq(Mux(b.wdata > lim, lim, b.wdata))
                        m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(dsel)]
                with m.Case(R.DOM_VM // 4):
                    with m.If(dsel_ok):
                        m.d.sync += vm[dsel].eq(b.wdata[:8])
                with m.Case(R.ATC_INV // 4):
                    m.d.comb += [inv_reg.eq(1), inv_reg_fidx.eq(b.wdata[:8]),
                                 inv_reg_all.eq(b.wdata[31])]
        rdata = Signal(32)
        with m.If(b.re):
            m.d.sync += rdata.eq(0)
            with m.If(sel):
                with m.Switch(b.addr):
                    with m.Case(R.DOM_SEL // 4):
                        m.d.sync += rdata.eq(dsel)
                    with m.Case(R.DOM_PT_LO // 4):
                        m.d.sync += rdata.eq(Mux(dsel_ok, Cat(C(0, PAGE_SHIFT), pt[dsel][:32 - PAGE_SHIFT]), 0))
                    with m.Case(R.DOM_PT_HI // 4):
                        m.d.sync += rdata.eq(Mux(dsel_ok, pt[dsel][32 - PAGE_SHIFT:], 0))
                    with m.Case(R.DOM_PAGES // 4):
                        m.d.sync += rdata.eq(Mux(dsel_ok, pages[dsel], 0))
                    with m.Case(R.DOM_VM // 4):
                        m.d.sync += rdata.eq(Mux(dsel_ok, vm[dsel], 0))
                    with m.Case(R.ATC_HITS // 4):
                        m.d.sync += rdata.eq(hits)
                    with m.Case(R.ATC_MISSES // 4):
                        m.d.sync += rdata.eq(misses)
                    with m.Case(R.BLOCKED // 4):
                        m.d.sync += rdata.eq(blocked)
        m.d.comb += b.rdata.eq(rdata)

        # invalidations: the host's (register), FLR's and VF Enable's (every VF: the whole
        # TLB goes, the PF's entries are walked again)
        m.d.comb += [
            atc.inv_en.eq(inv_reg | self.flr | self.vf_reset),
            atc.inv_fidx.eq(Mux(inv_reg, inv_reg_fidx, self.flr_fidx)),
            # (two in one cycle: a register invalidation made by the management UART can meet
            # a host's FLR; then every entry goes, which is safe)
            atc.inv_all.eq((inv_reg & (inv_reg_all | self.flr)) | self.vf_reset),
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
        rid = Cat(C(0, 8), self.bus_num)
        m.d.comb += [
            self.tx.p.hdr.eq(mem_hdr(m, False, pte_addr, 2, rid, tag=WALK_TAG)),
            self.tx.p.sop.eq(1), self.tx.p.eop.eq(1),
        ]
        m.d.comb += [atc.lk_fidx.eq(f), atc.lk_vpn.eq(vpn[:VPN_BITS]),
                     atc.fill_fidx.eq(f), atc.fill_vpn.eq(vpn[:VPN_BITS])]
        m.d.comb += self.resp.p.eq(res)

        c = self.cpl
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        pte = c.p.data[:64]
        wait_cnt = Signal(range(CPL_TIMEOUT + 1))
        waiting = Signal()

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
                m.d.sync += wait_cnt.eq(0)
                m.d.comb += self.tx.valid.eq(1)
                with m.If(self.tx.ready):
                    m.next = "WAITW"
            with m.State("WAITW"):
                m.d.comb += [c.ready.eq(1), waiting.eq(1)]
                m.d.sync += wait_cnt.eq(wait_cnt + 1)
                with m.If(c.valid & c.p.sop):
                    good = (cd1.status == 0) & (cd0.fmt == 0b010) & (c.p.strb[:2] == 0b11)
                    with m.If(~good):
                        m.d.sync += res.status.eq(XlateStatus.ERROR)
                    with m.Elif(pte[0]):
                        m.d.sync += [res.status.eq(XlateStatus.OK),
                                     res.phys.eq(Cat(iova[:PAGE_SHIFT], pte[PAGE_SHIFT:]))]
                        m.d.comb += [atc.fill_en.eq(~stale), atc.fill_ppn.eq(pte[PAGE_SHIFT:])]
                    with m.Else():
                        m.d.sync += res.status.eq(XlateStatus.NOT_PRESENT)
                    m.next = "RESP"
                    with m.If(~c.p.eop):
                        m.next = "DRAIN"
                with m.Elif(wait_cnt == CPL_TIMEOUT):
                    m.d.sync += res.status.eq(XlateStatus.ERROR)
                    m.next = "RESP"
            with m.State("DRAIN"):
                m.d.comb += [c.ready.eq(~c.p.sop), waiting.eq(1)]
                with m.If(c.valid & (c.p.eop | c.p.sop)):
                    m.next = "RESP"
            with m.State("RESP"):
                m.d.comb += self.resp.valid.eq(1)
                with m.If(self.resp.ready):
                    m.next = "IDLE"

        with m.If(atc.inv_en & (atc.inv_all | (atc.inv_fidx == f))):
            m.d.sync += stale.eq(1)

        # a walk completion nobody waits for
        with m.If(~waiting & c.valid):
            m.d.comb += c.ready.eq(1)
            with m.If(c.p.sop):
                m.d.comb += self.unexp.eq(1)
        return m
