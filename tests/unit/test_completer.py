"""The completer, exercised through the whole hdl.card.Card: TLPs in on ``rx``, completions
(and MSI-X writes) out on ``tx``; error counters read back through PF BAR2.

Every test runs at data widths 64 and 128."""

import pytest
from hdl.card import Card
from hdl.config import CardConfig
from hdl.pcie.tlp import TlpKind, CplStatus
from helpers import (run_cached, pack_beats, send_beats, recv_tlp, collect_beats, cfg_hdr, mem_hdr,
                     cpl_hdr, parse_cpl, hdr_int, dw0, req_dw1, hdr_dws)

from regmap import MgmtRegs, FuncRegs, Bar0Map

BUS = 0x5A
REQ = 0x0008                   # requester ID of the root port
BAR0_ADDR = 0xE000_0000
BAR2_ADDR = 0xF000_0000
VF_BAR0_ADDR = 0x4_0000_0000
SC, UR, CA = CplStatus.SC.value, CplStatus.UR.value, CplStatus.CA.value


@pytest.fixture(params=[64, 128], ids=lambda w: f"w{w}")
def width(request):
    return request.param


class Host:
    def __init__(self, ctx, dut, width):
        self.ctx, self.dut, self.w = ctx, dut, width
        self.tag = 0

    def next_tag(self):
        self.tag = (self.tag + 1) % 1024
        return self.tag

    async def send(self, hdr, payload=(), func=0):
        await send_beats(self.ctx, self.dut.rx, pack_beats(hdr, list(payload), self.w, func=func))

    async def recv(self):
        hdr, payload, beats = await recv_tlp(self.ctx, self.dut.tx, self.w)
        return parse_cpl(hdr), payload, beats

    async def quiet(self, cycles=20):
        """Nothing may come out of tx for ``cycles``."""
        moved = await collect_beats(self.ctx, self.dut.tx, cycles)
        assert moved == [], f"unexpected TLP(s) on tx: {[hex(b['hdr']) for b in moved]}"

    async def cfg_rd(self, fidx, off, bus=BUS):
        tag = self.next_tag()
        await self.send(cfg_hdr(False, fidx, off, bus=bus, tag=tag, requester_id=REQ))
        c, payload, _ = await self.recv()
        assert c["tag"] == tag and c["requester_id"] == REQ
        return c, payload

    async def cfg_wr(self, fidx, off, value, be=0xF, bus=BUS):
        tag = self.next_tag()
        await self.send(cfg_hdr(True, fidx, off, be=be, bus=bus, tag=tag, requester_id=REQ),
                        [value])
        c, payload, _ = await self.recv()
        assert (c["fmt_type"], c["status"], c["tag"], payload) == (TlpKind.CPL, SC, tag, [])
        return c

    async def mem_rd(self, addr, length=1, first_be=0xF, last_be=None):
        tag = self.next_tag()
        await self.send(mem_hdr(False, addr, length, first_be, last_be, tag=tag,
                                requester_id=REQ))
        c, payload, _ = await self.recv()
        assert c["tag"] == tag and c["requester_id"] == REQ
        return c, payload

    async def mem_wr(self, addr, data, first_be=0xF, last_be=None):
        await self.send(mem_hdr(True, addr, len(data), first_be, last_be, tag=0,
                                requester_id=REQ), data)

    async def setup(self, num_vfs=0):
        """Bus number, BARs, Memory Space + Bus Master Enable (like enumeration would)."""
        await self.cfg_wr(0, 0x10, BAR0_ADDR)
        await self.cfg_wr(0, 0x14, 0)
        await self.cfg_wr(0, 0x18, BAR2_ADDR)
        await self.cfg_wr(0, 0x04, 0x6)
        if num_vfs:
            await self.cfg_wr(0, 0x134, VF_BAR0_ADDR & 0xFFFF_FFFF)
            await self.cfg_wr(0, 0x138, VF_BAR0_ADDR >> 32)
            await self.cfg_wr(0, 0x120, num_vfs)
            await self.cfg_wr(0, 0x118, 0b11001)          # VF Enable, VF MSE, ARI hierarchy

    async def counter(self, off):
        c, payload = await self.mem_rd(BAR2_ADDR + off)
        assert c["status"] == SC and len(payload) == 1
        return payload[0]

    async def counters(self):
        names = {"malformed": MgmtRegs.ERR_MALFORMED, "unsupported": MgmtRegs.ERR_UNSUPPORTED,
                 "ca": MgmtRegs.ERR_CA, "unexp_cpl": MgmtRegs.ERR_UNEXP_CPL,
                 "poisoned": MgmtRegs.ERR_POISONED}
        return {n: await self.counter(o) for n, o in names.items()}


def run_card(tb, width, total_vfs=4):
    """Run ``tb(host)`` on a freshly reset Card (the elaborated simulator is reused)."""
    cfg = CardConfig(data_width=width, total_vfs=total_vfs)

    def make_tb(dut):
        async def bench(ctx):
            await tb(Host(ctx, dut, width))
        return bench
    run_cached(("card", cfg), lambda: Card(cfg), make_tb)


# ---- configuration requests --------------------------------------------------------------

def test_cfg_read_vendor_id(width):
    async def tb(h):
        tag = 0x2A5                                   # 10-bit tag: T9, T8 and the low byte
        await h.send(cfg_hdr(False, 0, 0x00, bus=BUS, tag=tag, requester_id=0x0100))
        c, payload, beats = await h.recv()
        assert c["fmt_type"] == TlpKind.CPLD and c["length"] == 1
        assert c["status"] == SC and c["bcm"] == 0
        assert c["tag"] == tag and c["requester_id"] == 0x0100
        assert c["completer_id"] == BUS << 8
        assert c["byte_count"] == 4 and c["lower_addr"] == 0
        assert payload == [0x1041_1AF4] and len(beats) == 1
        await h.quiet()
    run_card(tb, width)


def test_cfg_read_missing_function_gets_ur(width):
    async def tb(h):
        for fidx in (1, 4, 200):                      # VFs not enabled / beyond TotalVFs
            tag = h.next_tag()
            await h.send(cfg_hdr(False, fidx, 0x00, bus=BUS, tag=tag, requester_id=REQ))
            c, payload, beats = await h.recv()
            assert c["fmt_type"] == TlpKind.CPL and c["status"] == UR
            assert c["tag"] == tag and c["requester_id"] == REQ
            assert c["completer_id"] == (BUS << 8) | fidx
            assert payload == [] and beats[0]["strb"] == 0
            await h.quiet(10)
        await h.setup()
        assert (await h.counters())["unsupported"] == 3
    run_card(tb, width)


def test_cfg_write_gets_sc_and_takes_effect(width):
    async def tb(h):
        c = await h.cfg_wr(0, 0x0C, 0x0000_0040)        # cache line size
        assert c["completer_id"] == BUS << 8 and c["byte_count"] == 4 and c["length"] == 0
        await h.quiet(10)
        c, payload = await h.cfg_rd(0, 0x0C)
        assert c["status"] == SC and payload == [0x40]
        # byte enables travel with the request: write only byte 1 of the BAR2 register
        await h.cfg_wr(0, 0x18, 0xFFFF_FFFF, be=0b0010)
        assert (await h.cfg_rd(0, 0x18))[1] == [0x0000_F000]
        # VFs answer once enabled
        await h.setup(num_vfs=2)
        c, payload = await h.cfg_rd(2, 0x00)
        assert c["status"] == SC and payload == [0xFFFF_FFFF]
        assert c["completer_id"] == (BUS << 8) | 2
        c, _ = await h.cfg_rd(3, 0x00)
        assert c["status"] == UR
    run_card(tb, width)


def test_bus_number_captured_from_cfg_write(width):
    async def tb(h):
        await h.setup()                                  # CfgWr0s to bus BUS
        c, payload = await h.mem_rd(BAR0_ADDR + FuncRegs.ID)
        assert c["status"] == SC and payload == [0xC0DE_0000]
        assert c["completer_id"] == BUS << 8, "memory completion must carry the captured bus"
        await h.cfg_wr(0, 0x0C, 0, bus=0x21)
        c, _ = await h.mem_rd(BAR0_ADDR + FuncRegs.ID)
        assert c["completer_id"] == 0x21 << 8
    run_card(tb, width)


# ---- memory requests ---------------------------------------------------------------------

def test_mem_read_hitting_nothing_gets_ur(width):
    async def tb(h):
        await h.setup()
        for addr, fbe, bc, la in ((0x1234_5678, 0xF, 4, 0x78), (0x9_0000_0104, 0xC, 2, 0x06)):
            c, payload = await h.mem_rd(addr, first_be=fbe)
            assert c["fmt_type"] == TlpKind.CPL and c["status"] == UR and payload == []
            assert c["completer_id"] == BUS << 8
            assert (c["byte_count"], c["lower_addr"]) == (bc, la)
            await h.quiet(10)
        # with Memory Space disabled, a BAR0 read is UR too
        await h.cfg_wr(0, 0x04, 0x4)
        c, _ = await h.mem_rd(BAR0_ADDR)
        assert c["status"] == UR
        await h.cfg_wr(0, 0x04, 0x6)
        assert (await h.counters())["unsupported"] == 3
    run_card(tb, width)


def test_mmio_read_write_pf_and_vf(width):
    async def tb(h):
        await h.setup(num_vfs=2)
        await h.mem_wr(BAR0_ADDR + FuncRegs.SCRATCH, [0xCAFE_F00D])
        await h.quiet(10)                                  # posted: no completion
        c, payload = await h.mem_rd(BAR0_ADDR + FuncRegs.ID, length=3)
        assert c["status"] == SC and c["length"] == 3 and c["byte_count"] == 12
        assert payload == [0xC0DE_0000, FuncRegs.VERSION_VALUE, 0xCAFE_F00D]
        vf2 = VF_BAR0_ADDR + 1 * CardConfig().vf_bar0_size
        await h.mem_wr(vf2 + FuncRegs.SCRATCH, [0x1122_3344])
        c, payload = await h.mem_rd(vf2 + FuncRegs.ID, length=3)
        assert c["status"] == SC and c["completer_id"] == (BUS << 8) | 2
        assert payload == [0xC0DE_8002, FuncRegs.VERSION_VALUE, 0x1122_3344]
        # partial read: byte count and lower address follow the byte enables
        c, payload = await h.mem_rd(BAR0_ADDR + FuncRegs.SCRATCH, first_be=0b0110)
        assert (c["byte_count"], c["lower_addr"]) == (2, 0x09) and payload == [0xCAFE_F00D]
        assert (await h.counters()) == dict(malformed=0, unsupported=0, ca=0, unexp_cpl=0,
                                            poisoned=0)
    run_card(tb, width)


def test_mem_read_longer_than_max_gets_ca(width):
    async def tb(h):
        await h.setup()
        c, payload = await h.mem_rd(BAR0_ADDR, length=CardConfig().max_mmio_dw + 1)
        assert c["status"] == CA and payload == []
        assert (await h.counters())["ca"] == 1
    run_card(tb, width)


# ---- malformed and unexpected TLPs -------------------------------------------------------

def test_malformed_posted_dropped_and_counted(width):
    async def tb(h):
        await h.setup()
        # MWr Length 2 with one payload DW
        await h.send(mem_hdr(True, BAR0_ADDR + FuncRegs.SCRATCH, 2), [0x1111_1111])
        await h.quiet()
        # MWr Length 1 with three payload DWs
        await h.send(mem_hdr(True, BAR0_ADDR + FuncRegs.SCRATCH, 1), [1, 2, 3])
        await h.quiet()
        # unknown Fmt/Type (Fmt 000, Type 0b11111)
        await h.send(hdr_int(dw0(0b000_11111, 1), req_dw1(REQ, 7, 0xF), BAR0_ADDR))
        await h.quiet()
        # a beat without sop
        beat = pack_beats(0, [0xAAAA_AAAA], h.w)[0]
        beat["sop"] = 0
        await send_beats(h.ctx, h.dut.rx, [beat])
        await h.quiet()
        cnt = await h.counters()
        assert cnt["malformed"] == 4 and cnt["unsupported"] == 0
        c, payload = await h.mem_rd(BAR0_ADDR + FuncRegs.SCRATCH)
        assert payload == [0], "a malformed write was performed"
    run_card(tb, width)


def test_malformed_non_posted_gets_exactly_one_ur(width):
    async def tb(h):
        await h.setup()
        cases = [
            # CfgRd with Length 2
            ("cfgrd len 2", cfg_hdr(False, 0, 0x00, bus=BUS, tag=11, requester_id=REQ,
                                    length=2), []),
            # MRd carrying a payload DW
            ("mrd with data", mem_hdr(False, BAR0_ADDR, 1, tag=12, requester_id=REQ), [5]),
            # CfgWr with no payload
            ("cfgwr no data", cfg_hdr(True, 0, 0x0C, bus=BUS, tag=13, requester_id=REQ), []),
            # MRd Length 2 with last BE 0
            ("mrd bad be", mem_hdr(False, BAR0_ADDR, 2, 0xF, 0x0, tag=14, requester_id=REQ), []),
            # MRd crossing 4 KiB
            ("mrd 4k", mem_hdr(False, BAR0_ADDR + 0xFFC, 2, tag=15, requester_id=REQ), []),
        ]
        for name, hdr, payload in cases:
            await h.send(hdr, payload)
            moved = await collect_beats(h.ctx, h.dut.tx, 30)
            assert len(moved) == 1, f"{name}: expected exactly one completion, got {len(moved)}"
            c = parse_cpl(moved[0]["hdr"])
            assert c["status"] == UR and c["fmt_type"] == TlpKind.CPL, name
            assert c["tag"] == hdr_dws(hdr)[1] >> 8 & 0xFF and c["requester_id"] == REQ, name
        cnt = await h.counters()
        assert cnt["malformed"] == len(cases) and cnt["unsupported"] == 0
        assert (await h.cfg_rd(0, 0x0C))[1] == [0], "malformed CfgWr was performed"
    run_card(tb, width)


def test_truncated_tlp_is_malformed_and_next_one_served(width):
    async def tb(h):
        await h.setup()
        dpb = h.w // 32
        # an MWr whose first beat already carries all Length DWs, but without eop: the next
        # TLP's sop cuts it short, so it is malformed and must not be performed
        first = pack_beats(mem_hdr(True, BAR0_ADDR + FuncRegs.SCRATCH, dpb),
                           [0xBAD0_0000 + k for k in range(dpb)], h.w)
        assert len(first) == 1
        first[0]["eop"] = 0
        second = pack_beats(cfg_hdr(False, 0, 0, bus=BUS, tag=99, requester_id=REQ), [], h.w)
        await send_beats(h.ctx, h.dut.rx, first + second)
        c, payload, _ = await h.recv()
        assert c["tag"] == 99 and c["status"] == SC and payload == [0x1041_1AF4]
        await h.quiet()
        assert (await h.counters())["malformed"] == 1
        assert (await h.mem_rd(BAR0_ADDR + FuncRegs.SCRATCH))[1] == [0], \
            "truncated write was performed"
    run_card(tb, width)


def test_unexpected_completion_counted(width):
    async def tb(h):
        await h.setup()
        await h.send(cpl_hdr(True, 1, SC, REQ, 4, BUS << 8, 5), [0x1234])
        await h.quiet()
        await h.send(cpl_hdr(False, 0, UR, REQ, 4, BUS << 8, 6))
        await h.quiet()
        cnt = await h.counters()
        assert cnt["unexp_cpl"] == 2 and cnt["malformed"] == 0 and cnt["unsupported"] == 0
    run_card(tb, width)


def test_poisoned_requests(width):
    async def tb(h):
        await h.setup()
        await h.send(mem_hdr(True, BAR0_ADDR + FuncRegs.SCRATCH, 1, ep=1), [0xBAD])
        await h.quiet()
        await h.send(mem_hdr(False, BAR0_ADDR, 1, tag=3, requester_id=REQ, ep=1))
        c, payload, _ = await h.recv()
        assert c["status"] == UR and c["tag"] == 3
        assert (await h.counters())["poisoned"] == 2
        assert (await h.mem_rd(BAR0_ADDR + FuncRegs.SCRATCH))[1] == [0]
    run_card(tb, width)


def test_rx_tx_counters(width):
    async def tb(h):
        await h.setup()
        rx0 = await h.counter(MgmtRegs.RX_TLPS)
        tx0 = await h.counter(MgmtRegs.TX_TLPS)
        await h.mem_wr(BAR0_ADDR + FuncRegs.SCRATCH, [1])
        await h.cfg_rd(0, 0)
        rx1 = await h.counter(MgmtRegs.RX_TLPS)
        tx1 = await h.counter(MgmtRegs.TX_TLPS)
        # rx: tx0 read, MWr, CfgRd, rx1 read; tx: completions of tx0 read, CfgRd, rx1 read
        assert rx1 - rx0 == 4 and tx1 - tx0 == 3
        assert await h.counter(MgmtRegs.CARD_ID) == MgmtRegs.CARD_ID_VALUE
    run_card(tb, width)


def test_msix_message_through_card(width):
    async def tb(h):
        await h.setup()
        await h.cfg_wr(0, 0x80, 1 << 31)                   # MSI-X enable
        tbl = BAR0_ADDR + Bar0Map.MSIX_TABLE + 16 * 1
        await h.mem_wr(tbl, [0xFEE0_0040, 0, 0x4321, 0])    # vector 1, unmasked
        await h.mem_wr(BAR0_ADDR + FuncRegs.IRQ, [1])
        hdr, payload, _ = await recv_tlp(h.ctx, h.dut.tx, h.w)
        d0, d1, d2, _ = hdr_dws(hdr)
        assert d0 >> 24 == TlpKind.MWR32 and d0 & 0x3FF == 1
        assert d1 >> 16 == BUS << 8 and d2 == 0xFEE0_0040 and payload == [0x4321]
        await h.quiet()
    run_card(tb, width)
