"""amaranth.sim unit tests of the device TLB (hdl.iommu.atc), the translator / page-table walker
(hdl.iommu.translate) and the I/O page fault unit (hdl.iommu.fault).

The walker's and the fault unit's TLPs are recorded by a background process that samples
``valid & ready`` on every clock edge (``tx.ready`` is held high), host memory answers are
played back on ``cpl`` by the testbench, and card memory is a Python model behind the fault
unit's ``mem_rd`` / ``mem_wr`` ports."""

import random
import pytest
from hdl.config import CardConfig
from hdl.iface import XlateStatus
from hdl.iommu.atc import AddressTranslationCache, PPN_BITS
from hdl.iommu.fault import FaultUnit
from hdl.iommu.translate import Translator
from hdl.memmap import CARD_MEM_TOTAL, Staging
from hdl.pcie.host_port import HOST_TAGS
from hdl.pcie.tlp import TlpKind, CplStatus
from helpers import run_sim, RegBus, beat_dict, cpl_hdr, pack_beats, hdr_dws

from regmap import IommuRegs as IR, FaultRegs as FR

WALK_TAG, CQ_TAG = HOST_TAGS["walk"], HOST_TAGS["cq"]

BUS = 0x3C
PF_RID = BUS << 8
SC, UR = CplStatus.SC.value, CplStatus.UR.value


@pytest.fixture(params=[64, 128], ids=lambda w: f"w{w}")
def width(request):
    return request.param


async def ticks(ctx, n):
    for _ in range(n):
        await ctx.tick()


def parse_req(hdr):
    """Fields of a memory request header (3 or 4 DW)."""
    d0, d1, d2, d3 = hdr_dws(hdr)
    fmt = d0 >> 29
    return {
        "fmt": fmt, "type": (d0 >> 24) & 0x1F, "fmt_type": d0 >> 24,
        "length": (d0 & 0x3FF) or 1024,
        "first_be": d1 & 0xF, "last_be": (d1 >> 4) & 0xF, "tag": (d1 >> 8) & 0xFF,
        "requester_id": d1 >> 16,
        "addr": ((d2 << 32) | d3) if fmt & 1 else d2,
        "dw3": d3,
    }


def tlps_of(beats, data_width):
    """Group recorded beats into TLPs: [(header fields, payload DWs)]."""
    out, cur = [], None
    for b in beats:
        if b["sop"]:
            assert cur is None, "sop inside a TLP"
            cur = (parse_req(b["hdr"]), [])
        assert cur is not None, "beat outside a TLP"
        for j in range(data_width // 32):
            if b["strb"] >> j & 1:
                cur[1].append((b["data"] >> (32 * j)) & 0xFFFF_FFFF)
        if b["eop"]:
            out.append(cur)
            cur = None
    assert cur is None, "TLP without eop"
    return out


def tx_recorder(tx, log):
    """Background process: every beat that moves on ``tx`` (valid & ready at the edge)."""
    async def proc(ctx):
        async for _, _, valid, ready, p in ctx.tick().sample(tx.valid, tx.ready, tx.p):
            if valid and ready:
                log.append(beat_dict(p))
    return proc


# ==== AddressTranslationCache ==============================================================

NF_ATC = 4
SETS = 8


def run_atc(tb):
    dut = AddressTranslationCache(NF_ATC, SETS)

    async def bench(ctx):
        await tb(ctx, dut)
    run_sim(dut, bench)


async def atc_lookup(ctx, a, fidx, vpn):
    ctx.set(a.lk_fidx, fidx)
    ctx.set(a.lk_vpn, vpn)
    ctx.set(a.lk_en, 1)
    await ctx.tick()
    ctx.set(a.lk_en, 0)
    # scramble the lookup inputs: the result must come from the strobed cycle
    ctx.set(a.lk_fidx, (fidx + 1) % NF_ATC)
    ctx.set(a.lk_vpn, vpn ^ 0x5A5A5)
    return ctx.get(a.hit), ctx.get(a.ppn)


async def atc_fill(ctx, a, fidx, vpn, ppn):
    ctx.set(a.fill_fidx, fidx)
    ctx.set(a.fill_vpn, vpn)
    ctx.set(a.fill_ppn, ppn)
    ctx.set(a.fill_en, 1)
    await ctx.tick()
    ctx.set(a.fill_en, 0)


async def atc_inv(ctx, a, fidx, all_=False):
    ctx.set(a.inv_fidx, fidx)
    ctx.set(a.inv_all, int(all_))
    ctx.set(a.inv_en, 1)
    await ctx.tick()
    ctx.set(a.inv_en, 0)
    ctx.set(a.inv_all, 0)


def test_atc_lookup_fill_hit_next_cycle():
    async def tb(ctx, a):
        for f in range(NF_ATC):
            for vpn in (0, 5, 0xFFFFF):
                hit, _ = await atc_lookup(ctx, a, f, vpn)
                assert not hit, (f, vpn)
        big = (1 << PPN_BITS) - 0x1235
        await atc_fill(ctx, a, 2, 0x12345, big)
        # no lookup strobe yet: hit stays low until the next strobed lookup
        assert await atc_lookup(ctx, a, 2, 0x12345) == (1, big)
        # the result holds while nothing is strobed
        await ticks(ctx, 3)
        assert (ctx.get(a.hit), ctx.get(a.ppn)) == (1, big)
        # other function, same page: no alias
        for f in (0, 1, 3):
            hit, _ = await atc_lookup(ctx, a, f, 0x12345)
            assert not hit, f
        # same function, other sets: miss
        for vpn in (0x12344, 0x12346, 0x12340):
            hit, _ = await atc_lookup(ctx, a, 2, vpn)
            assert not hit, hex(vpn)
        # same set, other tag: miss
        hit, _ = await atc_lookup(ctx, a, 2, 0x12345 + SETS)
        assert not hit
        hit, _ = await atc_lookup(ctx, a, 2, 0x12345 ^ 0x80000)
        assert not hit
    run_atc(tb)


def test_atc_functions_and_sets_do_not_alias():
    async def tb(ctx, a):
        want = {}
        for f in range(NF_ATC):
            for s in range(SETS):
                vpn = (0x100 * (f + 1) + 0x10 * s) * SETS + s
                ppn = (f << 40) | (s << 20) | 0xABC
                await atc_fill(ctx, a, f, vpn, ppn)
                want[(f, vpn)] = ppn
        for (f, vpn), ppn in want.items():
            assert await atc_lookup(ctx, a, f, vpn) == (1, ppn), (f, hex(vpn))
    run_atc(tb)


def test_atc_direct_mapped_replacement():
    async def tb(ctx, a):
        await atc_fill(ctx, a, 1, 0x00003, 0x111)
        await atc_fill(ctx, a, 1, 0x00004, 0x444)
        assert await atc_lookup(ctx, a, 1, 0x00003) == (1, 0x111)
        # 0x0000B sits in the same set as 0x00003: it replaces it
        await atc_fill(ctx, a, 1, 0x0000B, 0x222)
        assert (await atc_lookup(ctx, a, 1, 0x00003))[0] == 0
        assert await atc_lookup(ctx, a, 1, 0x0000B) == (1, 0x222)
        assert await atc_lookup(ctx, a, 1, 0x00004) == (1, 0x444)
        # refill the same entry with a new translation
        await atc_fill(ctx, a, 1, 0x0000B, 0x333)
        assert await atc_lookup(ctx, a, 1, 0x0000B) == (1, 0x333)
    run_atc(tb)


def test_atc_invalidate_function_and_all():
    async def tb(ctx, a):
        for f in range(NF_ATC):
            await atc_fill(ctx, a, f, 0x42, 0x1000 + f)
            await atc_fill(ctx, a, f, 0x47, 0x2000 + f)
        await atc_inv(ctx, a, 2)
        for f in range(NF_ATC):
            for vpn, base in ((0x42, 0x1000), (0x47, 0x2000)):
                hit, ppn = await atc_lookup(ctx, a, f, vpn)
                if f == 2:
                    assert not hit
                else:
                    assert (hit, ppn) == (1, base + f)
        # refill after the invalidation works
        await atc_fill(ctx, a, 2, 0x42, 0x9999)
        assert await atc_lookup(ctx, a, 2, 0x42) == (1, 0x9999)
        # all: inv_fidx is ignored
        await atc_inv(ctx, a, 0, all_=True)
        for f in range(NF_ATC):
            for vpn in (0x42, 0x47):
                hit, _ = await atc_lookup(ctx, a, f, vpn)
                assert not hit, (f, vpn)
    run_atc(tb)


# ==== Translator ===========================================================================

class XlateHarness:
    """Drives ``req`` / ``resp``, answers walks from ``ptes`` (address -> PTE or 'UR')."""

    def __init__(self, ctx, dut, width, txlog):
        self.ctx, self.t, self.w, self.txlog = ctx, dut, width, txlog
        self.rb = RegBus(ctx, dut.bus)
        self.ptes = {}
        self.walks = []          # every walk request seen: header fields

    async def wr(self, off, value):
        await self.rb.wr(0, off, value, bar=2)

    async def rd(self, off):
        return await self.rb.rd(0, off, bar=2)

    async def domain(self, fidx, pt_base, pages, vm=0):
        await self.wr(IR.DOM_SEL, fidx)
        await self.wr(IR.DOM_PT_LO, pt_base & 0xFFFF_FFFF)
        await self.wr(IR.DOM_PT_HI, pt_base >> 32)
        await self.wr(IR.DOM_VM, vm)
        await self.wr(IR.DOM_PAGES, pages)

    def answer(self, req):
        """Completion beats for a walk request."""
        assert req["addr"] in self.ptes, f"walk of an unexpected address {req['addr']:#x}"
        pte = self.ptes[req["addr"]]
        if pte == "UR":
            hdr = cpl_hdr(False, 0, UR, 0x0000, 8, PF_RID, WALK_TAG)
            return pack_beats(hdr, [], self.w)
        hdr = cpl_hdr(True, 2, SC, 0x0000, 8, PF_RID, WALK_TAG, lower_addr=req["addr"] & 0x7F)
        beats = pack_beats(hdr, [pte & 0xFFFF_FFFF, pte >> 32], self.w)
        assert len(beats) == 1 and beats[0]["strb"] == 0b11
        return beats

    async def xlate(self, fidx, iova, last=None, timeout=300):
        """One translation of the piece at ``iova`` of a transfer ending at ``last`` (default:
        ``iova``): returns (resp dict, [walk requests it made])."""
        ctx, t = self.ctx, self.t
        ctx.set(t.req.p, {"fidx": fidx, "iova": iova, "last": iova if last is None else last})
        ctx.set(t.req.valid, 1)
        for _ in range(timeout):
            rdy = ctx.get(t.req.ready)
            await ctx.tick()
            if rdy:
                break
        else:
            raise AssertionError("req never accepted")
        ctx.set(t.req.valid, 0)
        n0 = len(self.txlog)
        walks = []
        for _ in range(timeout):
            if len(self.txlog) > n0 + len(walks):
                b = self.txlog[n0 + len(walks)]
                assert b["sop"] and b["eop"] and b["strb"] == 0
                req = parse_req(b["hdr"])
                walks.append(req)
                for beat in self.answer(req):
                    ctx.set(t.cpl.p, beat)
                    ctx.set(t.cpl.valid, 1)
                    for _ in range(timeout):
                        rdy = ctx.get(t.cpl.ready)
                        await ctx.tick()
                        if rdy:
                            break
                    else:
                        raise AssertionError("cpl never accepted")
                ctx.set(t.cpl.valid, 0)
                continue
            if ctx.get(t.resp.valid):
                r = ctx.get(t.resp.p)
                res = {"status": int(r.status), "bypass": int(r.bypass), "phys": int(r.phys),
                       "vm": int(r.vm)}
                ctx.set(t.resp.ready, 1)
                await ctx.tick()
                ctx.set(t.resp.ready, 0)
                await ticks(ctx, 2)
                assert len(self.txlog) == n0 + len(walks), "TLP after the response"
                self.walks += walks
                return res, walks
            await ctx.tick()
        raise AssertionError("no response")


def run_xlate(tb, width=64, total_vfs=3):
    cfg = CardConfig(data_width=width, total_vfs=total_vfs)
    dut = Translator(cfg)
    txlog = []

    async def bench(ctx):
        ctx.set(dut.tx.ready, 1)
        ctx.set(dut.link.bus_num, BUS)
        h = XlateHarness(ctx, dut, width, txlog)
        await tb(ctx, dut, h)
    run_sim(dut, bench, processes=[tx_recorder(dut.tx, txlog)])


def test_translate_no_domain_bypass_and_blocked():
    async def tb(ctx, t, h):
        # function 1: no domain -> the IOVA is the bus address, no walk
        for iova in (0x0, 0x1234_5678_9ABC_DEF0, 0xFFFF_FFFF_FFFF_FFFF):
            r, walks = await h.xlate(1, iova)
            assert r["status"] == XlateStatus.OK and r["bypass"] == 1 and r["phys"] == iova
            assert walks == []
        # function 2: 4 pages -> IOVA 0x4000 and above are blocked, counted, no walk
        await h.domain(2, 0x8000_0000, 4, vm=3)
        assert await h.rd(IR.BLOCKED) == 0
        for n, iova in enumerate((0x4000, 0x4FFF, 0x1_0000_0000, 1 << 63), 1):
            r, walks = await h.xlate(2, iova)
            assert r["status"] == XlateStatus.BLOCKED and walks == []
            assert await h.rd(IR.BLOCKED) == n
        assert await h.rd(IR.ATC_MISSES) == 0
        assert await h.rd(IR.ATC_HITS) == 0
        assert h.txlog == []
    run_xlate(tb)


def test_translate_transfer_end_beyond_domain_blocked():
    """A piece whose transfer ends beyond the domain (or wraps) is blocked before any walk."""
    async def tb(ctx, t, h):
        pt = 0x5000_0000
        await h.domain(2, pt, 4)
        h.ptes[pt + 8] = 0x1_1000_0001
        n = 0
        for iova, last in ((0x1000, 0x4000), (0x1000, 0xFFFF_FFFF_FFFF_FFFF), (0x1800, 0x17FF),
                           (0x3FFF, 0x4000)):
            r, walks = await h.xlate(2, iova, last)
            n += 1
            assert r["status"] == XlateStatus.BLOCKED and walks == [], (hex(iova), hex(last))
            assert await h.rd(IR.BLOCKED) == n
        # ending on the domain's last byte is fine
        r, walks = await h.xlate(2, 0x1010, 0x3FFF)
        assert r["status"] == XlateStatus.OK and r["phys"] == 0x1_1000_0010 and len(walks) == 1
        r, walks = await h.xlate(2, 0x1020, 0x1020)
        assert r["status"] == XlateStatus.OK and walks == []
        # without a domain the transfer's end does not matter
        r, walks = await h.xlate(1, 0x1000, 0xFFFF_FFFF_FFFF_FFFF)
        assert (r["status"], r["bypass"], r["phys"]) == (XlateStatus.OK, 1, 0x1000)
        assert await h.rd(IR.BLOCKED) == n
    run_xlate(tb)


def test_translate_blocked_strobe():
    async def tb(ctx, t, h):
        await h.domain(1, 0x5000_0000, 1)
        seen = []

        ctx.set(t.req.p, {"fidx": 1, "iova": 0x1000, "last": 0x1000})
        ctx.set(t.req.valid, 1)
        for _ in range(20):
            seen.append((ctx.get(t.blocked), ctx.get(t.resp.valid)))
            ctx.set(t.resp.ready, ctx.get(t.resp.valid))
            await ctx.tick()
            ctx.set(t.req.valid, 0)
        assert sum(b for b, _ in seen) == 1
        assert sum(v for _, v in seen) == 1
    run_xlate(tb)


def test_translate_walk_fill_and_hit(width):
    async def tb(ctx, t, h):
        pt = 0x8765_4000
        await h.domain(2, pt, 16, vm=9)
        await h.domain(1, 0x4000_0000, 16, vm=1)
        assert await h.rd(IR.DOM_PT_LO) == 0x4000_0000
        await h.wr(IR.DOM_SEL, 2)
        assert await h.rd(IR.DOM_PT_LO) == pt
        assert await h.rd(IR.DOM_PT_HI) == 0
        assert await h.rd(IR.DOM_PAGES) == 16
        assert await h.rd(IR.DOM_VM) == 9
        h.ptes[pt + 8 * 3] = 0x1_2345_6000 | 1
        h.ptes[pt + 8 * 15] = 0xFFFF_FFFF_FFFF_F000 | 0x0F01     # flag bits below 12 ignored
        h.ptes[0x4000_0000 + 8 * 3] = 0x0000_7777_0000_0001
        r, walks = await h.xlate(2, 0x3456)
        assert r == {"status": XlateStatus.OK, "bypass": 0, "phys": 0x1_2345_6456, "vm": 9}
        assert len(walks) == 1
        w = walks[0]
        assert w["fmt_type"] == TlpKind.MRD32 and w["length"] == 2
        assert (w["first_be"], w["last_be"]) == (0xF, 0xF)
        assert w["tag"] == WALK_TAG and w["requester_id"] == PF_RID
        assert w["addr"] == pt + 8 * 3 and w["dw3"] == 0
        assert (await h.rd(IR.ATC_MISSES), await h.rd(IR.ATC_HITS)) == (1, 0)
        # same page again: device TLB, no TLP
        r, walks = await h.xlate(2, 0x3FF8)
        assert r == {"status": XlateStatus.OK, "bypass": 0, "phys": 0x1_2345_6FF8, "vm": 9}
        assert walks == []
        assert (await h.rd(IR.ATC_MISSES), await h.rd(IR.ATC_HITS)) == (1, 1)
        # last page of the domain, a 64-bit bus address
        r, walks = await h.xlate(2, 0xF00C)
        assert r["status"] == XlateStatus.OK and r["phys"] == 0xFFFF_FFFF_FFFF_F00C
        assert [w["addr"] for w in walks] == [pt + 8 * 15]
        # the same page number of another function is its own translation
        r, walks = await h.xlate(1, 0x3010)
        assert r == {"status": XlateStatus.OK, "bypass": 0, "phys": 0x7777_0000_0010, "vm": 1}
        assert [w["addr"] for w in walks] == [0x4000_0000 + 8 * 3]
        r, walks = await h.xlate(2, 0x3000)
        assert r["phys"] == 0x1_2345_6000 and walks == []
        r, walks = await h.xlate(1, 0x3000)
        assert r["phys"] == 0x7777_0000_0000 and walks == []
        assert (await h.rd(IR.ATC_MISSES), await h.rd(IR.ATC_HITS)) == (3, 3)
    run_xlate(tb, width)


def test_translate_not_present_is_not_cached():
    async def tb(ctx, t, h):
        pt = 0x1000_0000
        await h.domain(3, pt, 8, vm=0x44)
        h.ptes[pt + 8 * 5] = 0x1_0000_5000          # present bit clear
        for n in (1, 2):
            r, walks = await h.xlate(3, 0x5123)
            assert r["status"] == XlateStatus.NOT_PRESENT and r["vm"] == 0x44
            assert [w["addr"] for w in walks] == [pt + 8 * 5]
            assert await h.rd(IR.ATC_MISSES) == n
        # the host maps the page: the next lookup walks and finds it
        h.ptes[pt + 8 * 5] = 0x1_0000_5001
        r, walks = await h.xlate(3, 0x5123)
        assert r["status"] == XlateStatus.OK and r["phys"] == 0x1_0000_5123 and len(walks) == 1
        r, walks = await h.xlate(3, 0x5000)
        assert r["status"] == XlateStatus.OK and walks == []
        assert await h.rd(IR.ATC_HITS) == 1
    run_xlate(tb)


def test_translate_ur_completion_is_error(width):
    async def tb(ctx, t, h):
        pt = 0x2000_0000
        await h.domain(1, pt, 4)
        h.ptes[pt + 8] = "UR"
        r, walks = await h.xlate(1, 0x1800)
        assert r["status"] == XlateStatus.ERROR and len(walks) == 1
        assert ctx.get(t.unexp) == 0
        # not cached: walks again, now successfully
        h.ptes[pt + 8] = 0xABC_D000 | 1
        r, walks = await h.xlate(1, 0x1800)
        assert r["status"] == XlateStatus.OK and r["phys"] == 0xABC_D800 and len(walks) == 1
    run_xlate(tb, width)


def test_translate_atc_inv_register():
    async def tb(ctx, t, h):
        pt1, pt2 = 0x1000_0000, 0x2000_0000
        await h.domain(1, pt1, 4)
        await h.domain(2, pt2, 4)
        h.ptes[pt1] = 0x11_0000_0001
        h.ptes[pt2] = 0x22_0000_0001

        async def walked(f, phys_page):
            r, walks = await h.xlate(f, 0x10)
            assert r["status"] == XlateStatus.OK and r["phys"] == phys_page | 0x10
            return len(walks)

        assert await walked(1, 0x11_0000_0000) == 1
        assert await walked(2, 0x22_0000_0000) == 1
        assert await walked(1, 0x11_0000_0000) == 0
        assert await walked(2, 0x22_0000_0000) == 0
        # function 1 only
        await h.wr(IR.ATC_INV, 1)
        assert await h.rd(IR.ATC_INV) == 0                  # write-only
        h.ptes[pt1] = 0x33_0000_0001                        # the host changed the mapping
        assert await walked(1, 0x33_0000_0000) == 1
        assert await walked(2, 0x22_0000_0000) == 0
        assert await walked(1, 0x33_0000_0000) == 0
        # bit 31: every function
        await h.wr(IR.ATC_INV, (1 << 31) | 3)
        assert await walked(1, 0x33_0000_0000) == 1
        assert await walked(2, 0x22_0000_0000) == 1
        # a partial write (byte enables) is ignored
        await h.rb.wr(0, IR.ATC_INV, 1, be=0x1, bar=2)
        assert await walked(1, 0x33_0000_0000) == 0
        # an access through another BAR / function does not reach the registers
        await h.rb.wr(0, IR.ATC_INV, 1, bar=0)
        await h.rb.wr(1, IR.ATC_INV, 1, bar=2)
        assert await walked(1, 0x33_0000_0000) == 0
    run_xlate(tb)


def test_translate_domain_change_invalidates():
    async def tb(ctx, t, h):
        pt = 0x3000_0000
        await h.domain(2, pt, 4)
        await h.domain(1, 0x4000_0000, 4)
        h.ptes[pt + 16] = 0x5_5000_0001
        h.ptes[0x4000_0000 + 16] = 0x6_6000_0001
        for f in (1, 2):
            r, walks = await h.xlate(f, 0x2004)
            assert len(walks) == 1
            r, walks = await h.xlate(f, 0x2004)
            assert walks == []
        # rewriting DOM_PAGES of function 2 (even to the same value) drops its TLB entries
        await h.wr(IR.DOM_SEL, 2)
        await h.wr(IR.DOM_PAGES, 4)
        r, walks = await h.xlate(2, 0x2004)
        assert r["phys"] == 0x5_5000_0004 and len(walks) == 1
        r, walks = await h.xlate(1, 0x2004)
        assert r["phys"] == 0x6_6000_0004 and walks == []
        # shrinking the domain: the page is now blocked, not served from the TLB
        await h.wr(IR.DOM_PAGES, 2)
        r, walks = await h.xlate(2, 0x2004)
        assert r["status"] == XlateStatus.BLOCKED and walks == []
        # a new page-table base drops them too
        await h.wr(IR.DOM_PAGES, 4)
        r, walks = await h.xlate(2, 0x2004)
        assert len(walks) == 1
        await h.wr(IR.DOM_PT_LO, 0x3100_0000)
        h.ptes[0x3100_0000 + 16] = 0x7_7000_0001
        r, walks = await h.xlate(2, 0x2004)
        assert r["phys"] == 0x7_7000_0004 and [w["addr"] for w in walks] == [0x3100_0010]
        # DOM_PAGES 0: translation off -> bypass
        await h.wr(IR.DOM_PAGES, 0)
        r, walks = await h.xlate(2, 0x2004)
        assert (r["status"], r["bypass"], r["phys"]) == (XlateStatus.OK, 1, 0x2004)
        assert walks == []
    run_xlate(tb)


async def _two_cached_domains(h, fa, fb):
    """Domains for functions ``fa`` (VM 5) and ``fb`` (VM 6), each with page 0 translated
    and in the TLB."""
    await h.domain(fa, 0x1000_0000, 4, vm=5)
    await h.domain(fb, 0x2000_0000, 4, vm=6)
    h.ptes[0x1000_0000] = 0x11_0000_0001
    h.ptes[0x2000_0000] = 0x22_0000_0001
    for f in (fa, fb, fa, fb):
        await h.xlate(f, 0x8)
    assert await h.rd(IR.ATC_MISSES) == 2


def test_translate_flr_drops_tlb_keeps_domain():
    async def tb(ctx, t, h):
        await _two_cached_domains(h, 1, 2)
        ctx.set(t.fn.flr_fidx, 1)
        ctx.set(t.fn.flr, 1)
        await ctx.tick()
        ctx.set(t.fn.flr, 0)
        r, walks = await h.xlate(1, 0x8)
        assert (r["status"], r["phys"], r["vm"]) == (XlateStatus.OK, 0x11_0000_0008, 5)
        assert len(walks) == 1                          # the domain stays, the TLB went
        r, walks = await h.xlate(2, 0x8)
        assert r["phys"] == 0x22_0000_0008 and walks == []
        await h.wr(IR.DOM_SEL, 1)
        assert await h.rd(IR.DOM_PAGES) == 4
    run_xlate(tb)


def test_translate_vf_reset_drops_whole_tlb_keeps_domains():
    async def tb(ctx, t, h):
        await _two_cached_domains(h, 0, 2)
        ctx.set(t.fn.vf_reset, 1)                          # VF Enable was cleared
        await ctx.tick()
        ctx.set(t.fn.vf_reset, 0)
        for f, phys in ((0, 0x11_0000_0008), (2, 0x22_0000_0008)):
            r, walks = await h.xlate(f, 0x8)
            assert (r["status"], r["phys"]) == (XlateStatus.OK, phys)
            assert len(walks) == 1, f"function {f}: its TLB entry survived"
        await h.wr(IR.DOM_SEL, 2)
        assert await h.rd(IR.DOM_PAGES) == 4            # the host's domain stays
    run_xlate(tb)


def test_translate_invalidation_during_walk_does_not_fill():
    async def tb(ctx, t, h):
        pt = 0x3000_0000
        await h.domain(1, pt, 4)
        h.ptes[pt] = 0x9_9000_0001
        # issue the request, then invalidate while the walk waits for its completion
        ctx.set(t.req.p, {"fidx": 1, "iova": 0x44, "last": 0x44})
        ctx.set(t.req.valid, 1)
        for _ in range(50):
            rdy = ctx.get(t.req.ready)
            await ctx.tick()
            if rdy:
                break
        else:
            raise AssertionError("req never accepted")
        ctx.set(t.req.valid, 0)
        for _ in range(50):
            if h.txlog:
                break
            await ctx.tick()
        else:
            raise AssertionError("no walk")
        await h.wr(IR.ATC_INV, 1)
        await ticks(ctx, 3)
        beat = h.answer(parse_req(h.txlog[0]["hdr"]))[0]
        ctx.set(t.cpl.p, beat)
        ctx.set(t.cpl.valid, 1)
        for _ in range(50):
            rdy = ctx.get(t.cpl.ready)
            await ctx.tick()
            if rdy:
                break
        else:
            raise AssertionError("cpl never accepted")
        ctx.set(t.cpl.valid, 0)
        for _ in range(50):
            if ctx.get(t.resp.valid):
                break
            await ctx.tick()
        else:
            raise AssertionError("no response")
        assert ctx.get(t.resp.p.status) == XlateStatus.OK
        assert ctx.get(t.resp.p.phys) == 0x9_9000_0044
        ctx.set(t.resp.ready, 1)
        await ctx.tick()
        ctx.set(t.resp.ready, 0)
        await ticks(ctx, 2)
        assert len(h.txlog) == 1
        # the translation read across the invalidation was not cached
        r, walks = await h.xlate(1, 0x44)
        assert r["phys"] == 0x9_9000_0044 and len(walks) == 1
        r, walks = await h.xlate(1, 0x44)
        assert walks == []
    run_xlate(tb)


def test_translate_64bit_page_table(width):
    async def tb(ctx, t, h):
        pt = 0x2_0000_3000
        await h.domain(3, pt, 1 << 20)
        assert await h.rd(IR.DOM_PT_LO) == 0x3000
        assert await h.rd(IR.DOM_PT_HI) == 2
        # DOM_PAGES saturates at MAX_PAGES (4 GiB)
        await h.wr(IR.DOM_PAGES, 0xFFFF_FFFF)
        assert await h.rd(IR.DOM_PAGES) == IR.MAX_PAGES
        vpn = 0xF_FFFF
        h.ptes[pt + 8 * vpn] = 0x4_5678_9000 | 1
        r, walks = await h.xlate(3, (vpn << 12) | 0xABC)
        assert r["status"] == XlateStatus.OK and r["phys"] == 0x4_5678_9ABC
        w = walks[0]
        assert w["fmt"] == 0b001 and w["fmt_type"] == TlpKind.MRD64 and w["length"] == 2
        dws = hdr_dws(h.txlog[0]["hdr"])
        assert dws[2] == (pt + 8 * vpn) >> 32 and dws[3] == (pt + 8 * vpn) & 0xFFFF_FFFF
        assert w["tag"] == WALK_TAG and w["requester_id"] == PF_RID
        r, walks = await h.xlate(3, 1 << 32)          # beyond 4 GiB: blocked
        assert r["status"] == XlateStatus.BLOCKED and walks == []
    run_xlate(tb, width)


# ==== FaultUnit ============================================================================

FBQ_BASE = 0x1_2340_0000          # 64-bit: 4-DW MemWr headers
IOPF_BASE = 0x8000_1000           # 32-bit: 3-DW MemWr headers
CQ_BASE = 0x9000_0200
VEC = 5


class FaultHarness:
    def __init__(self, ctx, dut, width, ev, mem):
        self.ctx, self.u, self.w, self.ev, self.mem = ctx, dut, width, ev, mem
        self.rb = RegBus(ctx, dut.bus)
        self.host = {}                  # host memory: byte address -> byte (CQ entries)

    async def wr(self, off, value):
        await self.rb.wr(0, off, value, bar=2)

    async def rd(self, off):
        return await self.rb.rd(0, off, bar=2)

    async def setup(self, fbq_log=3, iopf_log=3, cq_log=2, enable=True):
        for lo, base, log in ((FR.FBQ_LO, FBQ_BASE, fbq_log), (FR.IOPF_LO, IOPF_BASE, iopf_log),
                              (FR.CQ_LO, CQ_BASE, cq_log)):
            await self.wr(lo, base & 0xFFFF_FFFF)
            await self.wr(lo + 4, base >> 32)
            await self.wr(lo + 8, log)
        if enable:
            await self.wr(FR.CTRL, 1 | (VEC << 8))

    async def fault(self, fidx, iova, write, card=0, length=0, vm=0, timeout=3000):
        """Raise one fault; returns the events from the strobe up to ``done`` (inclusive)."""
        ctx, f = self.ctx, self.u.fault
        assert ctx.get(f.ok_w if write else f.ok_r), "fault raised without room"
        n0 = len(self.ev)
        for name, v in (("fidx", fidx), ("vm", vm), ("iova", iova), ("write", write),
                        ("card", card), ("length", length)):
            ctx.set(getattr(f, name), v)
        ctx.set(f.stb, 1)
        await ctx.tick()
        ctx.set(f.stb, 0)
        # the engine must not raise another fault until this one is done
        assert ctx.get(f.ok_w) == 0 and ctx.get(f.ok_r) == 0
        for _ in range(timeout):
            evs = self.ev[n0:]
            if any(e[0] == "done" for e in evs):
                await ticks(ctx, 3)
                evs = self.ev[n0:]
                i = next(i for i, e in enumerate(evs) if e[0] == "done")
                assert all(e[0] == "mem" for e in evs[i + 1:]), evs[i + 1:]
                return evs
            await ctx.tick()
        raise AssertionError("fault never done")

    async def cq_post(self, index, fidx, status, iopf_index=0):
        """Write CQ entry ``index`` in host memory and ring the doorbell (CQ_PROD)."""
        entry = bytes([fidx, status, 0, 0]) + iopf_index.to_bytes(4, "little") + bytes(8)
        a = CQ_BASE + 16 * (index % 4)
        for i, byte in enumerate(entry):
            self.host[a + i] = byte
        await self.wr(FR.CQ_PROD, index + 1)

    async def cq_serve(self, timeout=300):
        """Answer the CQ fetch MemRd; returns (request, events during the fetch)."""
        ctx, u = self.ctx, self.u
        n0 = len(self.ev)
        for _ in range(timeout):
            txs = [e for e in self.ev[n0:] if e[0] == "tx"]
            if txs:
                break
            await ctx.tick()
        else:
            raise AssertionError("no CQ fetch")
        tlps = tlps_of([e[2] for e in txs], self.w)
        assert len(tlps) == 1
        req, payload = tlps[0]
        assert payload == []
        dws = [int.from_bytes(bytes(self.host[req["addr"] + 4 * j + i] for i in range(4)),
                              "little") for j in range(4)]
        hdr = cpl_hdr(True, 4, SC, 0x0000, 16, PF_RID, CQ_TAG, lower_addr=req["addr"] & 0x7F)
        for beat in pack_beats(hdr, dws, self.w):
            ctx.set(u.cpl.p, beat)
            ctx.set(u.cpl.valid, 1)
            for _ in range(timeout):
                rdy = ctx.get(u.cpl.ready)
                await ctx.tick()
                if rdy:
                    break
            else:
                raise AssertionError("cpl not accepted")
        ctx.set(u.cpl.valid, 0)
        await ticks(ctx, 5)
        assert ctx.get(u.unexp) == 0
        return req, self.ev[n0:]


def ctx_get2(ctx, u):
    return ctx.get(u.fault.ok_w), ctx.get(u.fault.ok_r)


def fault_recorder(u, ev, mem, width):
    """Background process: the card memory model (read data a cycle after ``en``; byte
    enables) and an event log of TLP beats, interrupts, ``done`` and ``resume`` strobes."""
    WB = width // 8

    async def proc(ctx):
        cyc = 0
        async for (_, _, tv, tr, tp, iv, ifx, ivec, dn, slot, rs, rf, rok,
                   rd_en, rd_addr, wr_en, wr_addr, wr_data) in ctx.tick().sample(
                u.tx.valid, u.tx.ready, u.tx.p, u.irq.valid, u.irq.fidx, u.irq.vector,
                u.fault.done, u.fault.slot, u.resume.stb, u.resume.fidx, u.resume.ok,
                u.mem_rd.en, u.mem_rd.addr, u.mem_wr.en, u.mem_wr.addr, u.mem_wr.data):
            cyc += 1
            if tv and tr:
                ev.append(("tx", cyc, beat_dict(tp)))
            if iv:
                ev.append(("irq", cyc, ifx, ivec))
            if dn:
                ev.append(("done", cyc, slot))
            if rs:
                ev.append(("resume", cyc, rf, rok))
            # card memory: read (old data) before write
            if rd_en:
                ctx.set(u.mem_rd.data, int.from_bytes(mem[rd_addr * WB:(rd_addr + 1) * WB],
                                                      "little"))
            if wr_en:
                ev.append(("mem", cyc, wr_addr))
                for i in range(WB):
                    if wr_en >> i & 1:
                        mem[wr_addr * WB + i] = (wr_data >> (8 * i)) & 0xFF
    return proc


def pattern():
    rnd = random.Random(1234)
    return bytearray(rnd.getrandbits(8) for _ in range(CARD_MEM_TOTAL))


def run_fault(tb, width=64, total_vfs=7):
    cfg = CardConfig(data_width=width, total_vfs=total_vfs)
    dut = FaultUnit(cfg)
    ev = []
    mem = pattern()

    async def bench(ctx):
        ctx.set(dut.tx.ready, 1)
        ctx.set(dut.link.bus_num, BUS)
        await tb(ctx, dut, FaultHarness(ctx, dut, width, ev, mem))
    run_sim(dut, bench, processes=[fault_recorder(dut, ev, mem, width)])


def split(evs, width):
    """(TLPs in order, the other events) of an event list."""
    tlps = tlps_of([e[2] for e in evs if e[0] == "tx"], width)
    return tlps, [e for e in evs if e[0] not in ("tx", "mem")]


def stage_addr(slot, card, width):
    return Staging.BASE + slot * Staging.STRIDE + card % (width // 8)


def check_fbq(tlp, index, dst, length, fidx, slot):
    req, payload = tlp
    assert req["fmt_type"] == TlpKind.MWR64 and req["length"] == 4
    assert req["addr"] == FBQ_BASE + 16 * index
    assert (req["first_be"], req["last_be"]) == (0xF, 0xF)
    assert req["requester_id"] == PF_RID
    assert payload == [dst, length, fidx | (slot << 16), 0]


def check_iopf(tlp, index, iova, fidx, vm, write, fbq_index, seq):
    req, payload = tlp
    assert req["fmt_type"] == TlpKind.MWR32 and req["length"] == 4 and req["dw3"] == 0
    assert req["addr"] == IOPF_BASE + 16 * index
    assert (req["first_be"], req["last_be"]) == (0xF, 0xF)
    assert req["requester_id"] == PF_RID
    flags = (FR.FLAG_WRITE | FR.FLAG_FBQ) if write else 0
    assert payload == [iova & 0xFFFF_FFFF, iova >> 32, fidx | (vm << 8) | (flags << 16),
                       fbq_index | (seq << 16)]


def test_fault_disabled_no_room(width):
    async def tb(ctx, u, h):
        assert ctx_get2(ctx, u) == (0, 0)
        await h.setup(enable=False)
        await ticks(ctx, 3)
        assert ctx_get2(ctx, u) == (0, 0)
        await h.wr(FR.CTRL, 1 | (VEC << 8))
        await ticks(ctx, 1)
        assert ctx_get2(ctx, u) == (1, 1)
        assert await h.rd(FR.CTRL) == 1 | (VEC << 8)
        assert await h.rd(FR.FBQ_LO) == FBQ_BASE & 0xFFFF_FFFF
        assert await h.rd(FR.FBQ_HI) == FBQ_BASE >> 32
        assert await h.rd(FR.IOPF_LOG2) == 3
        await h.wr(FR.CQ_LOG2, 12)                      # clamps at 8
        assert await h.rd(FR.CQ_LOG2) == 8
        await h.wr(FR.CTRL, 0)
        await ticks(ctx, 1)
        assert ctx_get2(ctx, u) == (0, 0)
        assert [e for e in h.ev if e[0] != "mem"] == []
    run_fault(tb, width)


def test_fault_write_stages_and_queues(width):
    W = width

    async def tb(ctx, u, h):
        await h.setup()
        orig = bytes(h.mem)
        cases = [  # fidx, vm, iova, card, length
            (2, 7, 0xDEAD_B123, 0x1235, 300),
            (5, 0x81, 0x1_0000_0FFC, 0x0008, 1),
            (3, 0, 0x7_FFFF_F000, 0xE003, 4096),
        ]
        for n, (fidx, vm, iova, card, length) in enumerate(cases):
            evs = await h.fault(fidx, iova, 1, card=card, length=length, vm=vm)
            tlps, other = split(evs, W)
            slot = n
            dst = stage_addr(slot, card, W)
            # the payload is staged, keeping its byte lane
            assert bytes(h.mem[dst:dst + length]) == orig[card:card + length], (n, hex(dst))
            # nothing outside the staging slot was touched
            assert h.mem[:Staging.BASE] == orig[:Staging.BASE]
            # copy first, then FBQ entry, then IOPF entry, then the interrupt with done
            mem_cycles = [e[1] for e in evs if e[0] == "mem"]
            tx_cycles = [e[1] for e in evs if e[0] == "tx"]
            assert mem_cycles and max(mem_cycles) < min(tx_cycles)
            assert len(tlps) == 2
            check_fbq(tlps[0], n, dst, length, fidx, slot)
            check_iopf(tlps[1], n, iova, fidx, vm, True, n, n + 1)
            assert len(other) == 2
            (k1, c1, ifx, ivec), (k2, c2, dslot) = other
            assert (k1, ifx, ivec) == ("irq", 0, VEC)
            assert (k2, dslot) == ("done", slot) and c1 == c2 > max(tx_cycles)
            assert await h.rd(FR.FBQ_PROD) == n + 1
            assert await h.rd(FR.IOPF_PROD) == n + 1
            assert await h.rd(FR.FAULTS) == n + 1
            assert await h.rd(FR.STAGE_BUSY) == (1 << (n + 1)) - 1
            assert ctx_get2(ctx, u) == (1, 1)
    run_fault(tb, width)


def test_fault_read_only_iopf(width):
    async def tb(ctx, u, h):
        await h.setup()
        orig = bytes(h.mem)
        evs = await h.fault(4, 0x55_6677_8899, 0, card=0x100, length=64, vm=0x21)
        assert [e for e in evs if e[0] == "mem"] == []
        assert h.mem == orig
        tlps, other = split(evs, width)
        assert len(tlps) == 1
        check_iopf(tlps[0], 0, 0x55_6677_8899, 4, 0x21, False, FR.NO_FBQ, 1)
        assert [e[0] for e in other] == ["irq", "done"]
        assert other[0][2:] == (0, VEC)
        assert await h.rd(FR.FBQ_PROD) == 0
        assert await h.rd(FR.IOPF_PROD) == 1
        assert await h.rd(FR.FAULTS) == 1
        assert await h.rd(FR.STAGE_BUSY) == 0
        # a write fault after it: FBQ index 0, IOPF index 1
        evs = await h.fault(1, 0x2000, 1, card=0x40, length=16)
        tlps, _ = split(evs, width)
        check_fbq(tlps[0], 0, stage_addr(0, 0x40, width), 16, 1, 0)
        check_iopf(tlps[1], 1, 0x2000, 1, 0, True, 0, 2)
    run_fault(tb, width)


def test_fault_iopf_ring_full(width):
    async def tb(ctx, u, h):
        await h.setup(iopf_log=0)                       # one entry
        evs = await h.fault(2, 0x1000, 0)
        check_iopf(split(evs, width)[0][0], 0, 0x1000, 2, 0, False, FR.NO_FBQ, 1)
        for _ in range(10):
            assert ctx_get2(ctx, u) == (0, 0)
            await ctx.tick()
        await h.wr(FR.IOPF_CONS, 1)
        await ticks(ctx, 1)
        assert ctx_get2(ctx, u) == (1, 1)
        assert await h.rd(FR.IOPF_CONS) == 1
        # the ring wraps: entry 0 again, sequence 2
        evs = await h.fault(3, 0x3000, 1, card=0x10, length=8)
        tlps, _ = split(evs, width)
        check_iopf(tlps[1], 0, 0x3000, 3, 0, True, 0, 2)
        assert ctx_get2(ctx, u) == (0, 0)
    run_fault(tb, width)


def test_fault_disable_resets_indices():
    async def tb(ctx, u, h):
        await h.setup()
        await h.fault(1, 0x1000, 0)
        await h.fault(2, 0x2000, 1, card=0, length=4)
        await h.wr(FR.IOPF_CONS, 1)
        assert (await h.rd(FR.FBQ_PROD), await h.rd(FR.IOPF_PROD)) == (1, 2)
        await h.wr(FR.CTRL, 0)
        for off in (FR.FBQ_PROD, FR.FBQ_CONS, FR.IOPF_PROD, FR.IOPF_CONS, FR.CQ_PROD,
                    FR.CQ_CONS):
            assert await h.rd(off) == 0, hex(off)
        assert await h.rd(FR.FAULTS) == 2
        await h.wr(FR.CTRL, 1 | (3 << 8))
        evs = await h.fault(3, 0x3000, 0)
        tlps, other = split(evs, 64)
        check_iopf(tlps[0], 0, 0x3000, 3, 0, False, FR.NO_FBQ, 1)
        assert other[0] == ("irq", other[0][1], 0, 3)
    run_fault(tb)


def test_fault_fbq_ring_full():
    async def tb(ctx, u, h):
        await h.setup(fbq_log=0)
        await h.fault(1, 0x1000, 1, card=0, length=8)
        assert ctx_get2(ctx, u) == (0, 1)               # reads need no FBQ entry
        await h.fault(2, 0x2000, 0)
        assert ctx_get2(ctx, u) == (0, 1)
        await h.wr(FR.FBQ_CONS, 1)
        await ticks(ctx, 1)
        assert ctx_get2(ctx, u) == (1, 1)
    run_fault(tb)


def test_fault_staging_slots_full():
    async def tb(ctx, u, h):
        await h.setup()
        for n in range(Staging.SLOTS):
            evs = await h.fault(n + 1, 0x1000 * n, 1, card=8 * n, length=8)
            assert evs[-1][0] == "done" and evs[-1][2] == n
        assert await h.rd(FR.STAGE_BUSY) == 0xF
        for _ in range(5):
            assert ctx_get2(ctx, u) == (0, 1)
            await ctx.tick()
        # the engine replayed slot 2
        ctx.set(u.slot_free.slot, 2)
        ctx.set(u.slot_free.stb, 1)
        await ctx.tick()
        ctx.set(u.slot_free.stb, 0)
        assert ctx_get2(ctx, u) == (1, 1)
        assert await h.rd(FR.STAGE_BUSY) == 0b1011
        evs = await h.fault(6, 0x9000, 1, card=0x33, length=5)
        assert evs[-1][0] == "done" and evs[-1][2] == 2
        dst = stage_addr(2, 0x33, 64)
        tlps, _ = split(evs, 64)
        check_fbq(tlps[0], 4, dst, 5, 6, 2)
        assert await h.rd(FR.STAGE_BUSY) == 0xF
        assert ctx_get2(ctx, u) == (0, 1)
        # a read fault still goes through
        evs = await h.fault(7, 0xA000, 0)
        assert evs[-1][0] == "done"
    run_fault(tb)


def test_fault_cq_resume_retry_and_refuse(width):
    async def tb(ctx, u, h):
        await h.setup()
        await h.fault(1, 0x1000, 1, card=0x80, length=32)          # slot 0
        await h.fault(3, 0x3000, 1, card=0x100, length=32)         # slot 1
        await h.fault(4, 0x4000, 0)                                 # read: no slot
        assert await h.rd(FR.STAGE_BUSY) == 0b11
        # status 0: retry; the slot stays (the engine frees it after the replay)
        await h.cq_post(0, 1, FR.ST_MAPPED, iopf_index=0)
        req, evs = await h.cq_serve()
        assert req["fmt_type"] == TlpKind.MRD32 and req["length"] == 4
        assert req["tag"] == CQ_TAG and req["requester_id"] == PF_RID
        assert (req["first_be"], req["last_be"]) == (0xF, 0xF)
        assert req["addr"] == CQ_BASE
        assert [e[2:] for e in evs if e[0] == "resume"] == [(1, 1)]
        assert await h.rd(FR.CQ_CONS) == 1
        assert await h.rd(FR.STAGE_BUSY) == 0b11
        # status 1: refused; function 3's staging slot is freed here
        await h.cq_post(1, 3, FR.ST_REFUSED, iopf_index=1)
        req, evs = await h.cq_serve()
        assert req["addr"] == CQ_BASE + 16
        assert [e[2:] for e in evs if e[0] == "resume"] == [(3, 0)]
        assert await h.rd(FR.CQ_CONS) == 2
        assert await h.rd(FR.STAGE_BUSY) == 0b01
        # the read fault: retry
        await h.cq_post(2, 4, FR.ST_MAPPED, iopf_index=2)
        req, evs = await h.cq_serve()
        assert [e[2:] for e in evs if e[0] == "resume"] == [(4, 1)]
        assert await h.rd(FR.CQ_BAD) == 0
        assert await h.rd(FR.STAGE_BUSY) == 0b01
    run_fault(tb, width)


def test_fault_cq_bad_entry_and_release(width):
    async def tb(ctx, u, h):
        await h.setup()
        # nobody has a fault open
        await h.cq_post(0, 2, FR.ST_MAPPED)
        req, evs = await h.cq_serve()
        assert [e for e in evs if e[0] == "resume"] == []
        assert await h.rd(FR.CQ_BAD) == 1
        assert await h.rd(FR.CQ_CONS) == 1
        # an out-of-range function
        await h.cq_post(1, 200, FR.ST_MAPPED)
        req, evs = await h.cq_serve()
        assert [e for e in evs if e[0] == "resume"] == []
        assert await h.rd(FR.CQ_BAD) == 2
        # function 2 faults, then is reset: its slot and its open fault go
        await h.fault(1, 0x1000, 1, card=0x0, length=8)             # slot 0 (function 1)
        await h.fault(2, 0x2000, 1, card=0x8, length=8)             # slot 1 (function 2)
        assert await h.rd(FR.STAGE_BUSY) == 0b11
        ctx.set(u.release.fidx, 2)
        ctx.set(u.release.stb, 1)
        await ctx.tick()
        ctx.set(u.release.stb, 0)
        assert await h.rd(FR.STAGE_BUSY) == 0b01
        await h.cq_post(2, 2, FR.ST_MAPPED)
        req, evs = await h.cq_serve()
        assert [e for e in evs if e[0] == "resume"] == []
        assert await h.rd(FR.CQ_BAD) == 3
        # function 1's fault is still open; a second entry for it is bad
        await h.cq_post(3, 1, FR.ST_MAPPED)
        req, evs = await h.cq_serve()
        assert [e[2:] for e in evs if e[0] == "resume"] == [(1, 1)]
        assert req["addr"] == CQ_BASE + 16 * 3
        await h.cq_post(4, 1, FR.ST_MAPPED)                         # ring wraps to entry 0
        req, evs = await h.cq_serve()
        assert req["addr"] == CQ_BASE
        assert [e for e in evs if e[0] == "resume"] == []
        assert await h.rd(FR.CQ_BAD) == 4
        assert await h.rd(FR.CQ_CONS) == 5
        # VF Enable cleared: every VF's slot and open fault go, the PF's stay
        await h.fault(0, 0x5000, 1, card=0x10, length=8)            # slot 1 (the PF)
        await h.fault(3, 0x6000, 1, card=0x18, length=8)            # slot 2 (VF 3)
        await h.fault(5, 0x7000, 0)                                 # read: no slot (VF 5)
        assert await h.rd(FR.STAGE_BUSY) == 0b111                   # slot 0: VF 1's replay
        ctx.set(u.release.vfs, 1)
        await ctx.tick()
        ctx.set(u.release.vfs, 0)
        assert await h.rd(FR.STAGE_BUSY) == 0b010
        for i, f in enumerate((3, 5, 0)):
            await h.cq_post(5 + i, f, FR.ST_MAPPED)
            req, evs = await h.cq_serve()
            resumed = [e[2:] for e in evs if e[0] == "resume"]
            assert resumed == ([(0, 1)] if f == 0 else []), (f, resumed)
        assert await h.rd(FR.CQ_BAD) == 6 and await h.rd(FR.CQ_CONS) == 8
    run_fault(tb, width)


def test_fault_refusal_frees_only_that_function():
    async def tb(ctx, u, h):
        await h.setup()
        await h.fault(1, 0x1000, 1, card=0, length=8)               # slot 0
        await h.fault(2, 0x2000, 1, card=0, length=8)               # slot 1
        await h.fault(3, 0x3000, 1, card=0, length=8)               # slot 2
        await h.cq_post(0, 2, FR.ST_REFUSED)
        _, evs = await h.cq_serve()
        assert [e[2:] for e in evs if e[0] == "resume"] == [(2, 0)]
        assert await h.rd(FR.STAGE_BUSY) == 0b101
        # the freed slot is reused first
        evs = await h.fault(4, 0x4000, 1, card=0, length=8)
        assert evs[-1][2] == 1
        assert await h.rd(FR.STAGE_BUSY) == 0b111
    run_fault(tb)
