"""amaranth.sim tests of the DMA read and write channels against a model of host memory."""

import random
import pytest
from amaranth import *
from amaranth.lib import wiring
from amaranth.sim import Simulator
from hdl.dma.memory import CardMemory
from hdl.dma.read import DmaReadChannel, TAG_BASE
from hdl.dma.write import DmaWriteChannel
from hdl.memmap import CARD_MEM_BYTES


class Bench(Elaboratable):
    def __init__(self, w):
        self.w = w
        self.mem = CardMemory(w)
        self.rd = DmaReadChannel(w)
        self.wr = DmaWriteChannel(w)
        # preload port for the bench, in front of the read channel's memory writes
        self.pl_addr = Signal(range(CARD_MEM_BYTES * 8 // w))
        self.pl_data = Signal(w)
        self.pl_en = Signal(w // 8)

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = self.mem
        m.submodules.rd = self.rd
        m.submodules.wr = self.wr
        with m.If(self.pl_en != 0):
            m.d.comb += [self.mem.wr.addr.eq(self.pl_addr), self.mem.wr.data.eq(self.pl_data),
                         self.mem.wr.en.eq(self.pl_en)]
        with m.Else():
            m.d.comb += [self.mem.wr.addr.eq(self.rd.mem.addr), self.mem.wr.data.eq(self.rd.mem.data),
                         self.mem.wr.en.eq(self.rd.mem.en)]
        wiring.connect(m, self.wr.mem, self.mem.rd)
        return m


def unpack(hdr):
    dw = [(hdr >> (96 - 32 * i)) & 0xFFFFFFFF for i in range(4)]
    fmt, length = dw[0] >> 29, dw[0] & 0x3FF or 1024
    fbe, lbe, tag = dw[1] & 0xF, (dw[1] >> 4) & 0xF, (dw[1] >> 8) & 0xFF
    addr = ((dw[2] << 32) | dw[3]) if fmt & 1 else dw[2]
    return fmt, length, fbe, lbe, tag, addr & ~3


async def collect_tlp(ctx, tx, dpb):
    """One TLP from a stream: (hdr, [payload DWs])."""
    dws, hdr = [], None
    ctx.set(tx.ready, 1)
    while True:
        while not ctx.get(tx.valid):
            await ctx.tick()
        p = ctx.get(tx.p)
        await ctx.tick()                     # the beat moves on this edge (ready is high)
        if p.sop:
            hdr = p.hdr
        for i in range(dpb):
            if p.strb >> i & 1:
                dws.append((p.data >> (32 * i)) & 0xFFFFFFFF)
        if p.eop:
            return hdr, dws


async def send_cmd(ctx, cmd, **fields):
    """Hand one command to a channel's ``cmd`` stream."""
    for name, value in fields.items():
        ctx.set(getattr(cmd.p, name), value)
    ctx.set(cmd.valid, 1)
    while not ctx.get(cmd.ready):
        await ctx.tick()
    await ctx.tick()
    ctx.set(cmd.valid, 0)


async def take_done(ctx, done):
    """Wait for and take one ``done`` record; returns its status."""
    ctx.set(done.ready, 1)
    while not ctx.get(done.valid):
        await ctx.tick()
    status = ctx.get(done.p.status)
    await ctx.tick()
    ctx.set(done.ready, 0)
    return status


def run(w, tb):
    b = Bench(w)
    sim = Simulator(b)
    sim.add_clock(1e-8)
    async def bench(ctx):
        await tb(ctx, b)
    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("w", [64, 128])
@pytest.mark.parametrize("mps", [128, 256])
def test_write_channel_any_alignment(w, mps):
    """Card memory -> MemWr TLPs: every byte lands at the right host address, BEs exact."""
    dpb = w // 32
    rnd = random.Random(w + mps)
    cases = [(rnd.randrange(0, 4096), rnd.randrange(1, 700)) for _ in range(12)]
    cases += [(84, 4096), (1, 1), (2, 2), (3, 4)]
    # a first TLP of one beat (a few bytes before an MPS boundary), then more
    cases += [(mps - 4, 200), (mps - 6, 200), (mps - 16, 100), (2 * mps - 12, 500)]

    async def tb(ctx, b):
        image = bytes(rnd.getrandbits(8) for _ in range(CARD_MEM_BYTES // 8))
        for i in range(len(image) * 8 // w):
            ctx.set(b.pl_addr, i)
            ctx.set(b.pl_data, int.from_bytes(image[i * w // 8:(i + 1) * w // 8], "little"))
            ctx.set(b.pl_en, (1 << (w // 8)) - 1)
            await ctx.tick()
        ctx.set(b.pl_en, 0)
        ctx.set(b.wr.link.mps, mps.bit_length() - 8)
        for hoff, length in cases:
            host = 0x1_0000_0000 + hoff
            card = (rnd.randrange(0, len(image) - length - 8) & ~3) | (hoff & 3)
            await send_cmd(ctx, b.wr.cmd, host=host, card=card, length=length, fidx=3)
            got = {}
            while sum(1 for _ in got) < length:
                hdr, dws = await collect_tlp(ctx, b.wr.tx, dpb)
                fmt, n, fbe, lbe, tag, addr = unpack(hdr)
                assert n == len(dws) and n * 4 <= mps
                assert (addr // 4096) == ((addr + 4 * n - 1) // 4096)
                for j, d in enumerate(dws):
                    be = fbe if j == 0 else (lbe if j == n - 1 else 0xF)
                    if n == 1:
                        be = fbe
                    for k in range(4):
                        if be >> k & 1:
                            a = addr + 4 * j + k
                            assert a not in got
                            got[a] = (d >> (8 * k)) & 0xFF
            assert sorted(got) == list(range(host, host + length)), (hoff, length)
            want = image[card:card + length]
            assert bytes(got[host + i] for i in range(length)) == want, (hoff, length, card)
            assert await take_done(ctx, b.wr.done) == 0

    run(w, tb)


def cpl_beats(dpb, tag, req_id, status, byte_count, lower_addr, dws):
    """Beats (hdr, data, strb, sop, eop) of a completion."""
    n = len(dws)
    fmt = 0b010 if n else 0b000
    dw0 = (fmt << 29) | (0b01010 << 24) | (n & 0x3FF)
    dw1 = (0x0100 << 16) | (status << 13) | (byte_count & 0xFFF)
    dw2 = (req_id << 16) | ((tag & 0xFF) << 8) | (lower_addr & 0x7F)
    hdr = (dw0 << 96) | (dw1 << 64) | (dw2 << 32)
    out = []
    nb = max(1, -(-n // dpb))
    for k in range(nb):
        chunk = dws[k * dpb:(k + 1) * dpb]
        data = sum(d << (32 * i) for i, d in enumerate(chunk))
        out.append((hdr if k == 0 else 0, data, (1 << len(chunk)) - 1, int(k == 0), int(k == nb - 1)))
    return out


@pytest.mark.parametrize("w", [64, 128])
@pytest.mark.parametrize("mrrs,rcb_split", [(128, True), (512, False), (4096, True)])
def test_read_channel_split_out_of_order(w, mrrs, rcb_split):
    """MemRd -> completions split at 64 B and out of order across tags -> card memory, checked
    byte-exact by reading it back through the write channel."""
    dpb = w // 32
    rnd = random.Random(w * mrrs + rcb_split)
    host_mem = bytearray(rnd.getrandbits(8) for _ in range(3 * 4096 + 64))
    HBASE = 0x2000_0000
    cases = [(1, 1), (3, 6), (0, 256), (0, 4096), (84, 4096),
             (rnd.randrange(0, 4000), rnd.randrange(1, 3000)), (4093, 300)]

    async def tb(ctx, b):
        ctx.set(b.rd.link.mrrs, mrrs.bit_length() - 8)
        ctx.set(b.wr.link.mps, 1)
        for hoff, length in cases:
            card = (rnd.randrange(0, CARD_MEM_BYTES - length - 8) & ~3) | (hoff & 3)
            await send_cmd(ctx, b.rd.cmd, host=HBASE + hoff, card=card, length=length, fidx=2)
            pending = {}          # tag -> list of completions (beats), in order
            done = False
            guard = 0
            reqs = []
            sent = []
            hist = []
            while not done:
                guard += 1
                assert guard < 20_000, (f"read channel stuck: hoff {hoff} len {length}, pending "
                                        f"{sorted(pending)}, busy {ctx.get(b.rd.outstanding):#x}, hist {[h for h in hist if h[0] in (52,)]} "
                                        f"tx {ctx.get(b.rd.tx.valid)} reqs {reqs}")
                if ctx.get(b.rd.done.valid):
                    assert ctx.get(b.rd.done.p.status) == 0
                    ctx.set(b.rd.done.ready, 1)
                    done = True
                elif ctx.get(b.rd.tx.valid):
                    fmt, n, fbe, lbe, tag, addr = unpack(ctx.get(b.rd.tx.p.hdr))
                    reqs.append((tag, hex(addr), n))
                    ctx.set(b.rd.tx.ready, 1)       # take exactly this request
                    assert n * 4 <= mrrs and addr // mrrs == (addr + 4 * n - 1) // mrrs
                    first = fbe & -fbe
                    off = {1: 0, 2: 1, 4: 2, 8: 3}[first]
                    last_be = fbe if n == 1 else lbe
                    hi = last_be.bit_length() - 1
                    total = 4 * n - off - (3 - hi)
                    a = addr
                    cpls = []
                    remaining = total
                    la = addr + off
                    while a < addr + 4 * n:
                        end = min(addr + 4 * n, (a // 64 + 1) * 64) if rcb_split else addr + 4 * n
                        dws = [int.from_bytes(host_mem[a - HBASE + 4 * j:a - HBASE + 4 * j + 4], "little")
                               for j in range((end - a) // 4)]
                        cpls.append(cpl_beats(dpb, tag, 0x0102, 0, remaining, la, dws))
                        remaining -= (end - la)
                        a = la = end
                    pending[tag] = cpls
                    await ctx.tick()
                    ctx.set(b.rd.tx.ready, 0)
                    continue
                elif pending:
                    tag = rnd.choice(sorted(pending))
                    beats = pending[tag].pop(0)
                    sent.append(tag)
                    hist.append((tag, hex(ctx.get(b.rd.outstanding)), len(beats)))
                    if not pending[tag]:
                        del pending[tag]
                    for (hdr, data, strb, sop, eop) in beats:
                        ctx.set(b.rd.cpl.p.hdr, hdr)
                        ctx.set(b.rd.cpl.p.data, data)
                        ctx.set(b.rd.cpl.p.strb, strb)
                        ctx.set(b.rd.cpl.p.sop, sop)
                        ctx.set(b.rd.cpl.p.eop, eop)
                        ctx.set(b.rd.cpl.valid, 1)
                        while not ctx.get(b.rd.cpl.ready):
                            await ctx.tick()
                        await ctx.tick()
                    ctx.set(b.rd.cpl.valid, 0)
                    continue
                await ctx.tick()
            await ctx.tick()
            ctx.set(b.rd.done.ready, 0)
            # read back through the write channel
            await send_cmd(ctx, b.wr.cmd, host=0x1_0000_0000 + hoff, card=card, length=length, fidx=2)
            got = {}
            while len(got) < length:
                hdr, dws = await collect_tlp(ctx, b.wr.tx, dpb)
                fmt, n, fbe, lbe, tag, addr = unpack(hdr)
                for j, d in enumerate(dws):
                    be = fbe if j == 0 else (lbe if j == n - 1 else 0xF)
                    for k in range(4):
                        if be >> k & 1:
                            got[addr + 4 * j + k - 0x1_0000_0000] = (d >> (8 * k)) & 0xFF
            want = bytes(host_mem[hoff:hoff + length])
            have = bytes(got[hoff + i] for i in range(length))
            bad = [i for i in range(length) if have[i] != want[i]]
            assert not bad, f"hoff {hoff} len {length} card {card:#x}: {len(bad)} bad from {bad[0]}"
            assert await take_done(ctx, b.wr.done) == 0

    run(w, tb)
