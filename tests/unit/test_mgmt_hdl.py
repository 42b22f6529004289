"""Unit tests of the management hardware: hdl.mgmt.telemetry (CounterBank, Telemetry), hdl.mgmt.qos
(RateLimiter), hdl.mgmt.block (MgmtBlock) on the register bus, and hdl.mgmt.frames (MgmtUart),
the UART frame engine, driven bit by bit by a Python 8N1 model against a dict-backed register
target in the testbench."""

import random
import pytest
from amaranth import Signal
from amaranth.hdl import Fragment, _ast
from hdl.config import CardConfig
from hdl.iface import READ_LATENCY
from hdl.mgmt.block import MgmtBlock
from hdl.mgmt.frames import MgmtUart, crc8_next
from hdl.mgmt.qos import RateLimiter
from hdl.mgmt.telemetry import CounterBank, Telemetry
from helpers import run_cached, run_sim, RegBus

from regmap import MgmtBlockRegs as R, MgmtRegs, Owner, UartProto as P

CFG = CardConfig(total_vfs=3)       # 4 functions
NF = CFG.num_functions
M32 = 0xFFFF_FFFF


class Bar2:
    """PF BAR2 accesses (fidx 0, bar 2 unless told) on a register-bus target; ``uart`` sets the
    target's ``src_uart`` (the side of the access) when the target has one."""

    def __init__(self, ctx, dut):
        self.ctx, self.dut, self.rb = ctx, dut, RegBus(ctx, dut.bus)

    def _side(self, uart):
        if uart is not None:
            self.ctx.set(self.dut.src_uart, uart)

    async def rd(self, off, uart=None, fidx=0, bar=2):
        self._side(uart)
        return await self.rb.rd(fidx, off, bar=bar)

    async def wr(self, off, value, uart=None, fidx=0, bar=2, be=0xF):
        self._side(uart)
        await self.rb.wr(fidx, off, value, be=be, bar=bar)


def cached(key, make_dut, tb):
    def make_tb(dut):
        async def bench(ctx):
            await tb(ctx, dut, Bar2(ctx, dut))
        return bench
    run_cached(key, make_dut, make_tb)


def signed32(v):
    return v - (1 << 32) if v & 0x8000_0000 else v


# =========================================================================================
# telemetry: CounterBank
# =========================================================================================

def test_counter_bank_rmw_one_event_per_clock():
    """Random events every clock (many back to back on the same counter, some for indices
    beyond the depth, which are ignored), amounts wrapping a 12-bit counter; while they run the
    read port returns a value at most two cycles stale, afterwards exactly the sums."""
    depth, width = 5, 12
    dut = CounterBank(depth, width=width, amount_bits=8)
    rng = random.Random(1)

    async def tb(ctx):
        hist = [[0] * depth]          # hist[k]: counters after the events of cycles < k
        raw = [0] * depth             # the sums without wrapping
        last = 0
        for cyc in range(400):
            stb = rng.random() < 0.85
            if rng.random() < 0.5:
                idx = last                          # back to back on the same counter
            elif rng.random() < 0.8:
                idx = rng.randrange(depth)
            else:
                idx = rng.randrange(depth, 16)      # out of range (also aliasing mod 8)
            amt = rng.randrange(256)
            last = idx if idx < depth else last
            ctx.set(dut.inc.stb, stb)
            ctx.set(dut.inc.fidx, idx)
            ctx.set(dut.inc.amount, amt)
            raddr = rng.randrange(depth)
            ctx.set(dut.rd_addr, raddr)
            now = list(hist[-1])
            if stb and idx < depth:
                now[idx] = (now[idx] + amt) % (1 << width)
                raw[idx] += amt
            hist.append(now)                        # hist[cyc + 1]
            await ctx.tick()
            got = ctx.get(dut.rd_data)
            # value read for raddr (set in cycle cyc): includes at least the events of cycles
            # before cyc - 1 (a lag of at most two cycles), at most those up to cyc
            ok = {hist[k][raddr] for k in range(max(0, cyc - 1), cyc + 2)}
            assert got in ok, (cyc, raddr, got, sorted(ok))
        ctx.set(dut.inc.stb, 0)
        for _ in range(3):
            await ctx.tick()
        assert sum(r >= 1 << width for r in raw) >= 2      # some counters did wrap
        for i in range(depth):
            ctx.set(dut.rd_addr, i)
            await ctx.tick()
            assert ctx.get(dut.rd_data) == hist[-1][i], i

    run_sim(dut, tb, deadline=1e-4)


def test_counter_bank_back_to_back_same_index_exact():
    """A run of events on one counter, one per clock, then one on another index in between:
    every one of them lands (the RMW read sees the write of the cycle before)."""
    dut = CounterBank(4, width=32, amount_bits=12)

    async def tb(ctx):
        seq = [(2, 1), (2, 2), (2, 4), (2, 8), (1, 16), (2, 32), (1, 64), (1, 128), (2, 256),
               (3, 0xFFF), (3, 0xFFF), (3, 0xFFF)]
        for idx, amt in seq:
            ctx.set(dut.inc.stb, 1)
            ctx.set(dut.inc.fidx, idx)
            ctx.set(dut.inc.amount, amt)
            await ctx.tick()
        ctx.set(dut.inc.stb, 0)
        await ctx.tick()
        await ctx.tick()
        want = [0, 16 + 64 + 128, 1 + 2 + 4 + 8 + 32 + 256, 3 * 0xFFF]
        for i in range(4):
            ctx.set(dut.rd_addr, i)
            await ctx.tick()
            assert ctx.get(dut.rd_data) == want[i], i

    run_sim(dut, tb, deadline=1e-5)


# =========================================================================================
# telemetry: Telemetry (TEL_* registers)
# =========================================================================================

TEL_REGS = {"tx_bytes": R.TEL_TX_BYTES, "tx_frames": R.TEL_TX_FRAMES,
            "rx_bytes": R.TEL_RX_BYTES, "rx_frames": R.TEL_RX_FRAMES,
            "dma_busy": R.TEL_DMA_BUSY, "faults": R.TEL_FAULTS, "qos_wait": R.TEL_QOS_WAIT}


def run_tel(tb):
    cached(("telemetry", CFG), lambda: Telemetry(CFG), tb)


def test_telemetry_counts_per_function():
    rng = random.Random(7)

    async def tb(ctx, dut, bus):
        want = {f: dict.fromkeys(TEL_REGS, 0) for f in range(NF)}
        prev = {}
        for cyc in range(300):
            for src in ("tx", "rx", "dma_busy", "faults", "qos_wait"):
                ev = getattr(dut, src)
                stb = rng.random() < 0.7
                f = prev.get(src, 0) if rng.random() < 0.5 else rng.randrange(NF)
                prev[src] = f
                ctx.set(ev.stb, stb)
                ctx.set(ev.fidx, f)
                if src in ("tx", "rx"):
                    amt = rng.randrange(4096)
                    ctx.set(ev.amount, amt)
                    if stb:
                        want[f][src + "_bytes"] += amt
                        want[f][src + "_frames"] += 1
                else:
                    ctx.set(ev.amount, 1)
                    if stb:
                        want[f][src] += 1
            await ctx.tick()
        for src in ("tx", "rx", "dma_busy", "faults", "qos_wait"):
            ctx.set(getattr(dut, src).stb, 0)
        await ctx.tick()
        await ctx.tick()
        assert all(want[f]["tx_frames"] > 10 for f in range(NF))
        for f in reversed(range(NF)):
            ctx.set(dut.occ.occ, 0x1230 + f)
            await bus.wr(R.TEL_SEL, f)
            assert ctx.get(dut.occ.fidx) == f
            assert await bus.rd(R.TEL_SEL) == f
            for name, off in TEL_REGS.items():
                assert await bus.rd(off) == want[f][name] & M32, (f, name)
            assert await bus.rd(R.TEL_OCC) == 0x1230 + f

    run_tel(tb)


def test_telemetry_counter_visible_two_cycles_after_event():
    async def tb(ctx, dut, bus):
        await bus.wr(R.TEL_SEL, 2)
        ctx.set(dut.faults.stb, 1)
        ctx.set(dut.faults.fidx, 2)
        ctx.set(dut.faults.amount, 1)
        await ctx.tick()
        ctx.set(dut.faults.stb, 0)
        await ctx.tick()
        # the read is issued two cycles after the event
        assert await bus.rd(R.TEL_FAULTS) == 1
        assert await bus.rd(R.TEL_DMA_BUSY) == 0

    run_tel(tb)


def test_telemetry_window_decode_and_zero_when_not_addressed():
    async def tb(ctx, dut, bus):
        ctx.set(dut.tx.stb, 1)
        ctx.set(dut.tx.fidx, 0)
        ctx.set(dut.tx.amount, 100)
        await ctx.tick()
        ctx.set(dut.tx.stb, 0)
        ctx.set(dut.occ.occ, 0x55)
        await ctx.tick()
        await ctx.tick()
        assert await bus.rd(R.TEL_TX_BYTES) == 100
        # not addressed: another function, another BAR, another register of BAR2
        assert await bus.rd(R.TEL_TX_BYTES, fidx=1) == 0
        assert await bus.rd(R.TEL_TX_BYTES, bar=0) == 0
        assert await bus.rd(R.TEL_OCC, fidx=1) == 0
        for off in (R.BLOCK_ID, R.TEL_QOS_WAIT + 4, R.QOS_SEL, R.TEL_TX_BYTES - 0x400):
            assert await bus.rd(off) == 0, hex(off)
        # no read at all: 0 as well
        assert await bus.rd(R.TEL_TX_BYTES) == 100
        await ctx.tick()
        assert ctx.get(dut.bus.rdata) == 0
        # TEL_SEL is written only through fidx 0, BAR2
        await bus.wr(R.TEL_SEL, 3, fidx=1)
        await bus.wr(R.TEL_SEL, 3, bar=0)
        await bus.wr(R.TEL_SEL + 0x1000 - 0x400, 3)
        assert await bus.rd(R.TEL_SEL) == 0
        await bus.wr(R.TEL_SEL, 3)
        assert await bus.rd(R.TEL_SEL) == 3
        assert await bus.rd(R.TEL_TX_BYTES) == 0

    run_tel(tb)


# =========================================================================================
# QoS: RateLimiter
# =========================================================================================

QCFG = CardConfig(total_vfs=2)      # 3 functions
QNF = QCFG.num_functions


def run_qos(tb):
    cached(("qos", QCFG), lambda: RateLimiter(QCFG), tb)


async def qos_setup(bus, f, rate, burst):
    await bus.wr(R.QOS_SEL, f)
    await bus.wr(R.QOS_BURST, burst)
    await bus.wr(R.QOS_RATE, rate)


def allow(ctx, dut, f):
    return (ctx.get(dut.allow) >> f) & 1


async def debit(ctx, dut, f, amount):
    ctx.set(dut.debit.stb, 1)
    ctx.set(dut.debit.fidx, f)
    ctx.set(dut.debit.amount, amount)
    await ctx.tick()
    ctx.set(dut.debit.stb, 0)


@pytest.mark.parametrize("f,rate,amount,burst", [
    (1, 64, 16, 200),          # 0.25 B/clk, small frames
    (2, 700, 100, 1000),       # 2.73 B/clk
    (0, 3000, 600, 3000),      # 11.7 B/clk
])
def test_qos_long_run_rate(f, rate, amount, burst):
    warm, n = 1000, 12000

    async def tb(ctx, dut, bus):
        await qos_setup(bus, f, rate, burst)
        ctx.set(dut.debit.fidx, f)
        ctx.set(dut.debit.amount, amount)
        cum = 0
        in_window = 0
        others_blocked = 0
        for cyc in range(warm + n):
            a = ctx.get(dut.allow)
            go = (a >> f) & 1
            others_blocked += (a | (1 << f)) != (1 << QNF) - 1
            ctx.set(dut.debit.stb, go)
            await ctx.tick()
            if go:
                cum += amount
                if cyc >= warm:
                    in_window += amount
            # never more than the bucket plus one frame plus what the rate gave so far
            assert cum * 256 <= burst * 256 + amount * 256 + rate * (cyc + 1), cyc
        ctx.set(dut.debit.stb, 0)
        want = rate * n / 256
        assert abs(in_window - want) <= 0.01 * want, (in_window, want)
        assert others_blocked == 0          # the unlimited functions are never held back

    run_qos(tb)


def test_qos_burst_caps_bucket():
    async def tb(ctx, dut, bus):
        await qos_setup(bus, 1, 5000, 100)      # ~19.5 B/clk into a 100-byte bucket
        for _ in range(50):
            await ctx.tick()
        assert signed32(await bus.rd(R.QOS_TOKENS)) == 100 * 256
        await debit(ctx, dut, 1, 30)
        seen = []
        for _ in range(10):
            seen.append(signed32(await bus.rd(R.QOS_TOKENS)))
        assert min(seen) < 100 * 256                 # the debit was taken
        assert max(seen) <= 100 * 256, seen          # and the refill stops at the depth
        assert seen[-1] == 100 * 256
        # a bigger depth fills up to itself, never beyond
        await bus.wr(R.QOS_BURST, 200)
        for _ in range(10):
            v = signed32(await bus.rd(R.QOS_TOKENS))
            assert v == 200 * 256, v
        # the other functions are untouched (unlimited, rate 0)
        await bus.wr(R.QOS_SEL, 2)
        assert await bus.rd(R.QOS_RATE) == 0
        assert await bus.rd(R.QOS_BURST) == 0
        await bus.wr(R.QOS_SEL, 1)
        assert await bus.rd(R.QOS_RATE) == 5000
        assert await bus.rd(R.QOS_BURST) == 200

    run_qos(tb)


def test_qos_burst_full_15_bit_range():
    """QOS_BURST is 15 bits of bytes and the bucket holds -32768..+32767 bytes: a depth of
    16 KiB or more must fill the bucket to +depth and let the function send."""
    async def tb(ctx, dut, bus):
        for burst in (0x3FFF, 0x4000, 0x7FFF):
            await qos_setup(bus, 1, 256, burst)
            for _ in range(4):
                await ctx.tick()
            got = signed32(await bus.rd(R.QOS_TOKENS))
            assert (burst, got) == (burst, burst * 256)
            assert allow(ctx, dut, 1) == 1, burst

    run_qos(tb)


def test_qos_rate_zero_is_unlimited():
    async def tb(ctx, dut, bus):
        await qos_setup(bus, 2, 0, 10)
        for _ in range(40):
            assert ctx.get(dut.allow) == (1 << QNF) - 1
            await debit(ctx, dut, 2, 4095)
        assert ctx.get(dut.allow) == (1 << QNF) - 1
        # a limited bucket driven negative is released at once by rate 0
        await qos_setup(bus, 1, 1, 0)
        await debit(ctx, dut, 1, 100)
        assert allow(ctx, dut, 1) == 0
        await bus.wr(R.QOS_RATE, 0)
        assert allow(ctx, dut, 1) == 1
        for _ in range(5):
            await debit(ctx, dut, 1, 4095)
            assert allow(ctx, dut, 1) == 1

    run_qos(tb)


def test_qos_tokens_signed_and_allow_at_zero():
    async def tb(ctx, dut, bus):
        await qos_setup(bus, 1, 1, 10)           # 1/256 byte per clock: hardly refills
        await debit(ctx, dut, 1, 1000)
        raw = await bus.rd(R.QOS_TOKENS)
        assert raw >> 24 == 0xFF, hex(raw)       # sign-extended to 32 bits
        v = signed32(raw)
        assert (10 - 1000) * 256 <= v <= (10 - 1000) * 256 + 4, v
        assert allow(ctx, dut, 1) == 0
        # 1 B/clk from -20 bytes: allowed again once the bucket is back at zero
        await qos_setup(bus, 1, 256, 0)
        assert allow(ctx, dut, 1) == 1
        await debit(ctx, dut, 1, 20)
        blocked = 0
        while not allow(ctx, dut, 1):
            blocked += 1
            assert blocked < 100
            await ctx.tick()
        assert 19 <= blocked <= 21, blocked
        assert signed32(await bus.rd(R.QOS_TOKENS)) >= 0

    run_qos(tb)


def test_qos_writing_rate_or_burst_refills():
    async def tb(ctx, dut, bus):
        await qos_setup(bus, 1, 2, 50)
        await debit(ctx, dut, 1, 2000)
        assert signed32(await bus.rd(R.QOS_TOKENS)) < 0 and not allow(ctx, dut, 1)
        await bus.wr(R.QOS_RATE, 2)                 # same rate: still a refill
        assert signed32(await bus.rd(R.QOS_TOKENS)) == 50 * 256
        assert allow(ctx, dut, 1)
        await debit(ctx, dut, 1, 2000)
        assert not allow(ctx, dut, 1)
        await bus.wr(R.QOS_BURST, 70)
        assert signed32(await bus.rd(R.QOS_TOKENS)) == 70 * 256
        assert allow(ctx, dut, 1)
        # the refill is for the selected function only
        await qos_setup(bus, 2, 3, 40)
        await debit(ctx, dut, 2, 500)
        await bus.wr(R.QOS_SEL, 1)
        await bus.wr(R.QOS_RATE, 3)
        assert not allow(ctx, dut, 2)
        await bus.wr(R.QOS_SEL, 2)
        assert signed32(await bus.rd(R.QOS_TOKENS)) < 0

    run_qos(tb)


def test_qos_registers_and_window():
    async def tb(ctx, dut, bus):
        for f in range(QNF):
            await qos_setup(bus, f, 100 + f, 1000 + f)
        for f in range(QNF):
            await bus.wr(R.QOS_SEL, f)
            assert await bus.rd(R.QOS_SEL) == f
            assert await bus.rd(R.QOS_RATE) == 100 + f
            assert await bus.rd(R.QOS_BURST) == 1000 + f
        await bus.wr(R.QOS_RATE, 0x1_FFFF)           # 16 bits
        assert await bus.rd(R.QOS_RATE) == 0xFFFF
        await bus.wr(R.QOS_BURST, 0xFFFF)            # 15 bits
        assert await bus.rd(R.QOS_BURST) == 0x7FFF
        # other functions / BARs: ignored writes, zero reads
        await bus.wr(R.QOS_RATE, 7, fidx=1)
        await bus.wr(R.QOS_RATE, 7, bar=0)
        assert await bus.rd(R.QOS_RATE) == 0xFFFF
        assert await bus.rd(R.QOS_RATE, fidx=1) == 0
        assert await bus.rd(R.QOS_RATE, bar=0) == 0
        assert await bus.rd(R.TEL_SEL) == 0

    run_qos(tb)


# =========================================================================================
# MgmtBlock
# =========================================================================================

HOST, CARD = 0, 1                   # src_uart


def run_mb(tb):
    cached(("mgmt_block",), lambda: MgmtBlock(CFG), tb)


def test_mb_block_id_util_and_window():
    async def tb(ctx, dut, bus):
        assert await bus.rd(R.BLOCK_ID, uart=HOST) == R.BLOCK_ID_VALUE
        assert await bus.rd(R.BLOCK_ID, uart=CARD) == R.BLOCK_ID_VALUE
        assert await bus.rd(R.BLOCK_ID, fidx=1) == 0
        assert await bus.rd(R.BLOCK_ID, bar=0) == 0
        assert await bus.rd(R.TEL_SEL) == 0
        ctx.set(dut.util, {"custom_hw": 11, "processor": 22, "memory": 33, "network": 99})
        await ctx.tick()
        assert await bus.rd(R.UTIL) == 11 | 22 << 8 | 33 << 16 | 99 << 24
        ctx.set(dut.util, {"custom_hw": 100, "processor": 0, "memory": 1, "network": 2})
        await ctx.tick()
        assert await bus.rd(R.UTIL) == 100 | 0 << 8 | 1 << 16 | 2 << 24

    run_mb(tb)


def test_mb_cycles_count_and_lo_read_latches_hi():
    dut = MgmtBlock(CFG)
    frag = Fragment.get(dut, None)
    cycles = next(s for stmts in frag.statements.values() for st in stmts
                  for s in st._lhs_signals() if s.name == "cycles")

    async def tb(ctx):
        bus = Bar2(ctx, dut)
        a = await bus.rd(R.CYCLES_LO)
        for _ in range(10):
            await ctx.tick()
        b = await bus.rd(R.CYCLES_LO)
        assert b - a == 11
        assert await bus.rd(R.CYCLES_HI) == 0
        # put the counter just below a carry into the high word
        ctx.set(cycles, (5 << 32) | 0xFFFF_FFF0)
        lo = await bus.rd(R.CYCLES_LO)
        assert 0xFFFF_FFF0 <= lo <= 0xFFFF_FFF2, hex(lo)
        for _ in range(40):                      # the counter carries into HI meanwhile
            await ctx.tick()
        assert await bus.rd(R.CYCLES_HI) == 5     # latched with LO, not the live value
        assert await bus.rd(R.CYCLES_HI) == 5
        lo = await bus.rd(R.CYCLES_LO)
        assert 0x10 <= lo <= 0x40, hex(lo)
        assert await bus.rd(R.CYCLES_HI) == 6

    run_sim(frag, tb, deadline=1e-5)


def test_mb_mailbox_both_ways():
    async def tb(ctx, dut, bus):
        async def stat():
            return await bus.rd(R.MBOX_STAT)
        # H2C: pushed by the host, popped by the card
        words = [0x1234, 0, 0x7FFF_FFFF, 0xFFFF_FFFF]
        for w in words:
            await bus.wr(R.MBOX_H2C, w, uart=HOST)
        await bus.wr(R.MBOX_H2C, 0x999, uart=CARD)          # the receiver's write: nothing
        await ctx.tick()
        assert await stat() == len(words)
        assert await bus.rd(R.MBOX_H2C, uart=HOST) == 0      # the sender's read: no pop
        assert await stat() == len(words)
        for w in words:
            assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0x8000_0000 | (w & 0x7FFF_FFFF)
        assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0      # empty
        # C2H: pushed by the card, popped by the host
        for w in (5, 6, 7):
            await bus.wr(R.MBOX_C2H, w, uart=CARD)
        await bus.wr(R.MBOX_C2H, 0x999, uart=HOST)
        await ctx.tick()
        assert await stat() == 3 << 8
        assert await bus.rd(R.MBOX_C2H, uart=CARD) == 0
        assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0
        for w in (5, 6, 7):
            assert await bus.rd(R.MBOX_C2H, uart=HOST) == 0x8000_0000 | w
        assert await bus.rd(R.MBOX_C2H, uart=HOST) == 0
        assert await stat() == 0
        # another function or BAR: neither pushes nor pops
        await bus.wr(R.MBOX_H2C, 1, uart=HOST, fidx=1)
        await bus.wr(R.MBOX_H2C, 1, uart=HOST, bar=0)
        await ctx.tick()
        assert await stat() == 0

    run_mb(tb)


def test_mb_mailbox_full_refusals_counted():
    async def tb(ctx, dut, bus):
        for i in range(R.MBOX_DEPTH + 1):
            await bus.wr(R.MBOX_H2C, 100 + i, uart=HOST)
        for i in range(R.MBOX_DEPTH + 2):
            await bus.wr(R.MBOX_C2H, 200 + i, uart=CARD)
        await ctx.tick()
        assert await bus.rd(R.MBOX_STAT) == R.MBOX_DEPTH | R.MBOX_DEPTH << 8 | 3 << 16
        for i in range(R.MBOX_DEPTH):
            assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0x8000_0000 | (100 + i)
            assert await bus.rd(R.MBOX_C2H, uart=HOST) == 0x8000_0000 | (200 + i)
        assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0
        assert await bus.rd(R.MBOX_C2H, uart=HOST) == 0
        assert await bus.rd(R.MBOX_STAT) == 3 << 16

    run_mb(tb)


def test_mb_owner_registers():
    async def tb(ctx, dut, bus):
        for t in range(R.TASKS):
            assert await bus.rd(R.OWNER + 4 * t) == Owner.CARD
        assert ctx.get(dut.owner) == 0b01010101
        await bus.wr(R.OWNER + 4, Owner.HOST, uart=HOST)
        await bus.wr(R.OWNER + 12, Owner.HOST, uart=CARD)
        assert ctx.get(dut.owner) == 0b10011001
        refused = 0
        for bad in (0, 3, 0x101, 0x8000_0002, M32):
            await bus.wr(R.OWNER + 4, bad)
            refused += 1
            assert await bus.rd(R.OWNER + 4) == Owner.HOST
        assert await bus.rd(R.OWNER) == Owner.CARD
        assert await bus.rd(R.OWNER_REFUSED) == refused
        assert ctx.get(dut.owner) == 0b10011001
        await bus.wr(R.OWNER + 4, Owner.CARD)
        assert await bus.rd(R.OWNER + 4) == Owner.CARD
        # another function's / BAR's write: neither a move nor a refusal
        await bus.wr(R.OWNER, Owner.HOST, fidx=1)
        await bus.wr(R.OWNER, 0, bar=0)
        assert await bus.rd(R.OWNER) == Owner.CARD
        assert await bus.rd(R.OWNER_REFUSED) == refused

    run_mb(tb)


def test_mb_request_fifos():
    async def tb(ctx, dut, bus):
        for t in range(R.TASKS):
            for i in range(t + 1):
                await bus.wr(R.REQ_PUSH + 4 * t, (t << 8) | i, uart=HOST)
        await bus.wr(R.REQ_PUSH, 0x77, uart=CARD)        # the card cannot push
        await ctx.tick()
        for t in range(R.TASKS):
            assert await bus.rd(R.REQ_LEVEL + 4 * t) == t + 1
        # task 2 to the host; the card owns the rest
        await bus.wr(R.OWNER + 8, Owner.HOST)
        denied = 0
        assert await bus.rd(R.REQ_POP + 8, uart=CARD) == 0
        denied += 1
        assert await bus.rd(R.REQ_POP + 4, uart=HOST) == 0
        denied += 1
        assert await bus.rd(R.POP_DENIED) == denied
        assert await bus.rd(R.REQ_LEVEL + 8) == 3 and await bus.rd(R.REQ_LEVEL + 4) == 2
        for i in range(3):
            assert await bus.rd(R.REQ_POP + 8, uart=HOST) == 0x8000_0000 | (2 << 8) | i
        assert await bus.rd(R.REQ_POP + 8, uart=HOST) == 0          # empty: not a denial
        for t in (0, 1, 3):
            for i in range(t + 1):
                assert await bus.rd(R.REQ_POP + 4 * t, uart=CARD) == 0x8000_0000 | (t << 8) | i
            assert await bus.rd(R.REQ_POP + 4 * t, uart=CARD) == 0
        assert await bus.rd(R.POP_DENIED) == denied
        # a word with bit 30 set and a zero word: 31 bits kept, bit 31 the valid flag
        await bus.wr(R.REQ_PUSH, 0xFFFF_FFFF, uart=HOST)
        await bus.wr(R.REQ_PUSH, 0, uart=HOST)
        await ctx.tick()
        assert await bus.rd(R.REQ_POP, uart=CARD) == 0xFFFF_FFFF
        assert await bus.rd(R.REQ_POP, uart=CARD) == 0x8000_0000
        # other function / BAR: no pop, no denial
        await bus.wr(R.REQ_PUSH, 42, uart=HOST)
        await ctx.tick()
        assert await bus.rd(R.REQ_POP, uart=CARD, fidx=1) == 0
        assert await bus.rd(R.REQ_POP, uart=HOST, bar=0) == 0
        assert await bus.rd(R.REQ_LEVEL) == 1
        assert await bus.rd(R.POP_DENIED) == denied

    run_mb(tb)


def test_mb_request_fifo_full_refused():
    async def tb(ctx, dut, bus):
        for i in range(R.REQ_DEPTH + 3):
            await bus.wr(R.REQ_PUSH + 4, i, uart=HOST)
        await ctx.tick()
        assert await bus.rd(R.REQ_LEVEL + 4) == R.REQ_DEPTH
        assert await bus.rd(R.REQ_REFUSED) == 3
        for i in range(R.REQ_DEPTH):
            assert await bus.rd(R.REQ_POP + 4, uart=CARD) == 0x8000_0000 | i
        assert await bus.rd(R.REQ_POP + 4, uart=CARD) == 0
        assert await bus.rd(R.REQ_LEVEL + 4) == 0
        assert await bus.rd(R.REQ_REFUSED) == 3

    run_mb(tb)


def test_mb_push_then_pop_next_cycle():
    """A push is complete when its write cycle ends: a pop issued in the very next cycle (the
    register bus allows one access per clock, e.g. the host's write followed by the UART's read
    through the arbiter) must find the word, as REQ_LEVEL and MBOX_STAT already say it is
    there."""
    async def tb(ctx, dut, bus):
        await bus.wr(R.REQ_PUSH, 0x11, uart=HOST)
        assert await bus.rd(R.REQ_LEVEL) == 1
        await bus.wr(R.REQ_PUSH + 4, 0x22, uart=HOST)
        assert await bus.rd(R.REQ_POP + 4, uart=CARD) == 0x8000_0022
        await bus.wr(R.MBOX_H2C, 0x33, uart=HOST)
        assert await bus.rd(R.MBOX_H2C, uart=CARD) == 0x8000_0033

    run_mb(tb)


def test_mb_uart_frame_counters():
    async def tb(ctx, dut, bus):
        pattern = [(1, 0), (1, 1), (0, 1), (0, 0), (1, 0), (1, 0), (0, 1)]
        for ok, err in pattern:
            ctx.set(dut.uart_ok, ok)
            ctx.set(dut.uart_err, err)
            await ctx.tick()
        ctx.set(dut.uart_ok, 0)
        ctx.set(dut.uart_err, 0)
        await ctx.tick()
        assert await bus.rd(R.UART_FRAMES) == sum(p[0] for p in pattern)
        assert await bus.rd(R.UART_ERRORS) == sum(p[1] for p in pattern)

    run_mb(tb)


def test_mb_requests_exactly_once_with_ownership_moves():
    rng = random.Random(11)

    async def tb(ctx, dut, bus):
        pushed = {t: [] for t in range(2)}
        popped = {t: [] for t in range(2)}
        owner = {0: Owner.CARD, 1: Owner.CARD}
        level = {0: 0, 1: 0}
        denied = refused = 0
        nxt = 1
        for step in range(500):
            t = rng.randrange(2)
            op = rng.random()
            if op < 0.4:
                v = nxt
                nxt += 1
                await bus.wr(R.REQ_PUSH + 4 * t, v, uart=HOST)
                if level[t] < R.REQ_DEPTH:
                    pushed[t].append(v)
                    level[t] += 1
                else:
                    refused += 1
                await ctx.tick()        # (see test_mb_push_then_pop_next_cycle)
            elif op < 0.55:
                new = rng.choice((Owner.CARD, Owner.HOST))
                await bus.wr(R.OWNER + 4 * t, new, uart=rng.randrange(2))
                owner[t] = new
            else:
                side = rng.randrange(2)
                got = await bus.rd(R.REQ_POP + 4 * t, uart=side)
                mine = (owner[t] == Owner.CARD) == (side == CARD)
                if not mine:
                    assert got == 0, (step, hex(got))
                    denied += 1
                elif level[t] == 0:
                    assert got == 0, (step, hex(got))
                else:
                    assert got >> 31 == 1, step
                    popped[t].append(got & 0x7FFF_FFFF)
                    level[t] -= 1
        # drain through whichever side owns the task now
        for t in range(2):
            side = CARD if owner[t] == Owner.CARD else HOST
            while True:
                got = await bus.rd(R.REQ_POP + 4 * t, uart=side)
                if not got:
                    break
                popped[t].append(got & 0x7FFF_FFFF)
            assert popped[t] == pushed[t], t       # nothing lost, duplicated or reordered
            assert await bus.rd(R.REQ_LEVEL + 4 * t) == 0
        assert denied > 20 and refused > 0 and sum(map(len, popped.values())) > 100
        assert await bus.rd(R.POP_DENIED) == denied
        assert await bus.rd(R.REQ_REFUSED) == refused

    run_mb(tb)


# =========================================================================================
# MgmtUart: the frame engine
# =========================================================================================

UCFG = CardConfig(uart_divisor=4)
D = UCFG.uart_divisor
GARBAGE = 0xDEAD_BEEF           # rdata in cycles that do not answer a granted read


def line(data, idle_bits=0):
    """Line levels, one per clock, of 8N1 characters (LSB first), ``idle_bits`` after each."""
    wave = []
    for byte in data:
        for bit in [0] + [(byte >> k) & 1 for k in range(8)] + [1] + [1] * idle_bits:
            wave += [bit] * D
    return wave


def request(cmd, seq, payload=b"", length=None, crc_xor=0):
    ln = len(payload) if length is None else length
    body = bytes([ln, cmd, seq]) + bytes(payload)
    return bytes([P.SYNC_REQ]) + body + bytes([P.crc8(body) ^ crc_xor])


def read_req(seq, addr):
    return request(P.READ, seq, addr.to_bytes(2, "little"))


def write_req(seq, addr, value):
    return request(P.WRITE, seq, addr.to_bytes(2, "little") + value.to_bytes(4, "little"))


class TxDecoder:
    """8N1 receiver model on ``txd``: samples each bit in its middle."""

    def __init__(self):
        self.start = None
        self.cur = 0
        self.bytes = []          # (value, cycle of the start bit's falling edge)

    def feed(self, cyc, level):
        if self.start is None:
            if level == 0:
                self.start, self.cur = cyc, 0
            return
        rel = cyc - self.start - D // 2
        if rel < 0 or rel % D:
            return
        k = rel // D
        if k == 0:
            assert level == 0, f"start bit glitch at {cyc}"
        elif k <= 8:
            self.cur |= level << (k - 1)
        else:
            assert level == 1, f"stop bit low at {cyc}"
            self.bytes.append((self.cur, self.start))
            self.start = None

    def frames(self):
        out, i, bs = [], 0, self.bytes
        while i < len(bs):
            assert bs[i][0] == P.SYNC_REPLY, f"reply does not start with 0x5A: {bs[i:]}"
            if i + 1 >= len(bs) or i + bs[i + 1][0] + 5 > len(bs):
                break
            n = bs[i + 1][0] + 5
            out.append((bytes(b for b, _ in bs[i:i + n]), bs[i][1]))
            i += n
        return out


class UartResult:
    pass


def uart_session(requests, mem=None, hold=0, gap_after=4):
    """Run the engine (``CardConfig(uart_divisor=4)``) against a dict-backed register target
    (DW address -> value) that answers a granted ``re`` ``READ_LATENCY`` cycles later, as the
    card's register slice and target do: each request (bytes, or
    a list of line levels) is sent once the previous reply is complete. ``hold``: cycles
    ``gnt`` stays low for every access the engine requests."""
    mem = {} if mem is None else mem
    waves = [r if isinstance(r, list) else line(r) for r in requests]
    res = UartResult()
    res.mem = mem
    res.accesses, res.req_cycles, res.ok, res.err, res.sent_end = [], [], [], [], []

    def make_tb(dut):
        async def tb(ctx):
            dec = TxDecoder()
            b = dut.bus
            last = {}

            def drive(sig, value):          # only on a change: a set costs a settle
                if last.get(sig.name) != value:
                    ctx.set(sig, value)
                    last[sig.name] = value

            wave, pos, k = waves[0], 0, 0
            pending = [None] * READ_LATENCY   # reads in flight, oldest first
            denied = 0
            idle_until = None
            done_at = None
            limit = sum(len(w) for w in waves) + len(waves) * (P.GAP_BITS + 160) * D
            for cyc in range(limit):
                # the request line
                if wave is not None and idle_until is None:
                    drive(dut.rxd, wave[pos])
                    pos += 1
                    if pos == len(wave):
                        res.sent_end.append(cyc + 1)
                        wave = None
                else:
                    drive(dut.rxd, 1)
                    if idle_until is not None and cyc >= idle_until:
                        idle_until, wave, pos = None, waves[k], 0
                # the register target: read data for the access granted READ_LATENCY ago
                due = pending.pop(0)
                drive(b.rdata, GARBAGE if due is None else mem.get(due, 0))
                pending.append(None)
                re, we = ctx.get(b.re), ctx.get(b.we)
                if re or we:
                    res.req_cycles.append(cyc)
                    gnt = int(denied >= hold)
                    denied = 0 if gnt else denied + 1
                    drive(dut.gnt, gnt)
                    if gnt:
                        acc = {"re": re, "we": we, "fidx": ctx.get(b.fidx), "bar": ctx.get(b.bar),
                               "addr": ctx.get(b.addr), "be": ctx.get(b.be), "cyc": cyc}
                        if we:
                            acc["wdata"] = ctx.get(b.wdata)
                            mem[acc["addr"]] = acc["wdata"]
                        if re:
                            pending[-1] = acc["addr"]
                        res.accesses.append(acc)
                else:
                    drive(dut.gnt, 1)
                if ctx.get(dut.ok):
                    res.ok.append(cyc)
                if ctx.get(dut.err):
                    res.err.append(cyc)
                dec.feed(cyc, ctx.get(dut.txd))
                await ctx.tick()
                if done_at is None and dec.start is None and len(dec.bytes) > 1:
                    if len(dec.frames()) > k:       # reply k complete
                        k += 1
                        if k < len(waves):
                            idle_until = cyc + 1 + gap_after
                        else:
                            done_at = cyc + 40 * D
                if done_at is not None and cyc >= done_at:
                    break
            else:
                raise AssertionError(f"only {len(dec.frames())} of {len(waves)} replies "
                                     f"in {limit} cycles: {dec.bytes}")
            res.replies = dec.frames()
            assert len(res.replies) == len(waves), res.replies
        return tb

    run_cached(("mgmt_uart", UCFG), lambda: MgmtUart(UCFG), make_tb)
    return res


def check_reply(frame, cmd, seq, status=P.OK, data=None):
    assert frame[0] == P.SYNC_REPLY
    assert len(frame) == frame[1] + 5
    assert frame[-1] == P.crc8(frame[1:-1]), "reply CRC"
    assert frame[2] == (cmd | 0x80 if status == P.OK else P.ERROR), frame.hex()
    if seq is not None:
        assert frame[3] == seq, frame.hex()
    assert frame[4] == status, frame.hex()
    if data is None:
        assert frame[1] == 1, frame.hex()
    else:
        assert frame[1] == 5 and frame[5:9] == data.to_bytes(4, "little"), frame.hex()


def check_strobes(res, ok, err):
    assert len(res.ok) == ok and len(res.err) == err, (res.ok, res.err)


def no_bus(res):
    assert res.req_cycles == [] and res.accesses == []


def test_uart_ping():
    res = uart_session([request(P.PING, 0x37)], mem={0: MgmtRegs.CARD_ID_VALUE, 1: 0x1111})
    (frame, _), = res.replies
    check_reply(frame, P.PING, 0x37, data=MgmtRegs.CARD_ID_VALUE)
    (acc,) = res.accesses
    assert (acc["re"], acc["we"], acc["fidx"], acc["bar"], acc["addr"]) == (1, 0, 0, 2, 0)
    check_strobes(res, 1, 0)


@pytest.mark.parametrize("addr", [0x404, 0x000, 0xFFC])
def test_uart_read(addr):
    mem = {addr // 4: 0x8765_4321, addr // 4 + 1: 0x1111_1111, (addr // 4 - 1) % 1024: 0x2222}
    res = uart_session([read_req(0xC3, addr)], mem=mem)
    (frame, _), = res.replies
    check_reply(frame, P.READ, 0xC3, data=0x8765_4321)
    (acc,) = res.accesses
    assert (acc["re"], acc["we"], acc["fidx"], acc["bar"], acc["addr"], acc["be"]) == \
        (1, 0, 0, 2, addr // 4, 0xF)
    check_strobes(res, 1, 0)


def test_uart_write():
    res = uart_session([write_req(0x05, 0x450, 0xCAFE_BABE)], mem={0x114: 7})
    (frame, _), = res.replies
    check_reply(frame, P.WRITE, 0x05)
    (acc,) = res.accesses
    assert (acc["re"], acc["we"], acc["fidx"], acc["bar"], acc["addr"], acc["be"],
            acc["wdata"]) == (0, 1, 0, 2, 0x450 // 4, 0xF, 0xCAFE_BABE)
    assert res.mem == {0x114: 0xCAFE_BABE}
    check_strobes(res, 1, 0)


def test_uart_held_off_gnt_delays_but_keeps_the_access():
    res = uart_session([write_req(1, 0x104, 0x0BAD_F00D), read_req(2, 0x104)], hold=9)
    (w, _), (r, _) = res.replies
    check_reply(w, P.WRITE, 1)
    check_reply(r, P.READ, 2, data=0x0BAD_F00D)
    assert [(a["we"], a["re"], a["addr"]) for a in res.accesses] == [(1, 0, 0x41), (0, 1, 0x41)]
    # each access requested for 10 consecutive cycles, granted in the last
    cyc = res.req_cycles
    assert len(cyc) == 20 and cyc[9] - cyc[0] == 9 and cyc[19] - cyc[10] == 9
    assert [a["cyc"] for a in res.accesses] == [cyc[9], cyc[19]]
    check_strobes(res, 2, 0)


def test_uart_sequence_numbers_and_several_frames():
    mem = {i: 0x100 * i + 1 for i in range(8)}
    seqs = (0, 1, 0x7F, 0x80, 0xFF)
    reqs = [read_req(s, 4 * (s % 8)) for s in seqs]
    # a slow sender: 40 idle bit times between the bytes (well inside GAP_BITS)
    reqs.append(line(read_req(0x5A, 8), idle_bits=40))
    res = uart_session(reqs, mem=mem, gap_after=0)
    for (frame, _), s in zip(res.replies, seqs):
        check_reply(frame, P.READ, s, data=mem[s % 8])
    check_reply(res.replies[-1][0], P.READ, 0x5A, data=mem[2])
    check_strobes(res, 6, 0)


def test_uart_bad_crc_is_refused_after_the_gap():
    good = write_req(0x42, 0x450, 1)
    res = uart_session([good[:-1] + bytes([good[-1] ^ 0x10])], mem={})
    (frame, start), = res.replies
    check_reply(frame, P.WRITE, 0x42, P.BAD_CRC)
    no_bus(res)
    assert res.mem == {}
    check_strobes(res, 0, 1)
    quiet = start - res.sent_end[0]
    assert (P.GAP_BITS - 1) * D <= quiet <= (P.GAP_BITS + 4) * D, quiet


@pytest.mark.parametrize("cut", [1, 3, 6, 10])
def test_uart_truncated_frame(cut):
    full = write_req(0x66, 0x450, 0x1234_5678)
    res = uart_session([full[:cut]])
    (frame, start), = res.replies
    check_reply(frame, P.WRITE, 0x66 if cut > 3 else 0, P.TRUNCATED)   # SEQ 0: never came
    no_bus(res)
    check_strobes(res, 0, 1)
    quiet = start - res.sent_end[0]
    assert (P.GAP_BITS - 1) * D <= quiet <= (P.GAP_BITS + 4) * D, quiet


def test_uart_unknown_command():
    res = uart_session([request(0x07, 0x21), request(0x00, 0x22, b"\x00\x04")])
    check_reply(res.replies[0][0], 0x07, 0x21, P.UNKNOWN_CMD)
    check_reply(res.replies[1][0], 0x00, 0x22, P.UNKNOWN_CMD)
    no_bus(res)
    check_strobes(res, 0, 2)


def test_uart_len_over_max_is_bad_len():
    frame = request(P.WRITE, 0x13, bytes(range(7)))
    res = uart_session([frame])
    (reply, start), = res.replies
    check_reply(reply, P.WRITE, None, P.BAD_LEN)
    assert reply[3] in (0, 0x13)
    no_bus(res)
    check_strobes(res, 0, 1)
    assert start - res.sent_end[0] >= (P.GAP_BITS - 1) * D


def test_uart_wrong_len_for_command():
    cases = [(P.READ, b"\x04\x04\x00"),          # READ with LEN 3
             (P.READ, b"\x04"), (P.READ, b""), (P.PING, b"\x00"), (P.PING, b"\x00" * 6),
             (P.WRITE, b"\x50\x04\x01\x00\x00"),  # 5 of 6
             (P.WRITE, b"\x50\x04")]
    res = uart_session([request(cmd, 0x50 + i, pay) for i, (cmd, pay) in enumerate(cases)],
                       mem={0x101: 9})
    for i, ((cmd, _), (reply, _)) in enumerate(zip(cases, res.replies)):
        check_reply(reply, cmd, 0x50 + i, P.BAD_LEN)
    no_bus(res)
    assert res.mem == {0x101: 9}
    check_strobes(res, 0, len(cases))


def test_uart_bad_addr():
    cases = [(0, 0x401), (0, 0x402), (0, 0x1000), (0, 0x8000),      # reads
             (1, 0x403), (1, 0x1FFC), (1, 0xFFFF)]                  # writes
    reqs = [write_req(0x31 + i, a, 5) if w else read_req(0x31 + i, a)
            for i, (w, a) in enumerate(cases)]
    res = uart_session(reqs)
    for i, ((w, a), (reply, _)) in enumerate(zip(cases, res.replies)):
        check_reply(reply, P.WRITE if w else P.READ, 0x31 + i, P.BAD_ADDR)
    no_bus(res)
    check_strobes(res, 0, len(cases))


def test_uart_garbage_before_sync_is_ignored():
    garbage = bytes([0x00, 0xFF, 0x5A, 0x13, 0x02, 0x80])
    res = uart_session([garbage + read_req(0x44, 0x20)], mem={8: 0x600D})
    (reply, _), = res.replies
    check_reply(reply, P.READ, 0x44, data=0x600D)
    assert len(res.accesses) == 1
    check_strobes(res, 1, 0)


def test_uart_recovers_after_errors():
    mem = {0x40: 0xAAAA_5555}
    reqs = [
        request(P.READ, 1, b"\x00\x01", crc_xor=0x80),   # bad CRC
        read_req(2, 0x100),
        write_req(3, 0x104, 0x77)[:5],                  # cut short
        write_req(4, 0x104, 0x77),
        request(0x09, 5),                                # unknown
        read_req(6, 0x104),
        request(P.READ, 7, bytes(7)),                    # LEN > 6
        read_req(8, 0x100),
        read_req(9, 0x102),                              # unaligned
        request(P.PING, 10),
    ]
    mem[0] = MgmtRegs.CARD_ID_VALUE
    res = uart_session(reqs, mem=mem)
    r = [f for f, _ in res.replies]
    check_reply(r[0], P.READ, 1, P.BAD_CRC)
    check_reply(r[1], P.READ, 2, data=0xAAAA_5555)
    check_reply(r[2], P.WRITE, 3, P.TRUNCATED)
    check_reply(r[3], P.WRITE, 4)
    check_reply(r[4], 0x09, 5, P.UNKNOWN_CMD)
    check_reply(r[5], P.READ, 6, data=0x77)
    check_reply(r[6], P.READ, None, P.BAD_LEN)
    check_reply(r[7], P.READ, 8, data=0xAAAA_5555)
    check_reply(r[8], P.READ, 9, P.BAD_ADDR)
    check_reply(r[9], P.PING, 10, data=MgmtRegs.CARD_ID_VALUE)
    assert [(a["we"], a["addr"]) for a in res.accesses] == \
        [(0, 0x40), (1, 0x41), (0, 0x41), (0, 0x40), (0, 0)]
    check_strobes(res, 5, 5)
    # one cycle each, one per frame
    assert len(set(res.ok)) == 5 and len(set(res.err)) == 5


def _tree_size(value):
    """Nodes of an expression tree, shared subexpressions counted at every use (that is what
    the simulator's code generator and the RTLIL back end emit)."""
    n, stack = 0, [value]
    while stack:
        x = stack.pop()
        n += 1
        if isinstance(x, _ast.Operator):
            stack.extend(x.operands)
        elif isinstance(x, _ast.Slice):
            stack.append(x.value)
        elif isinstance(x, _ast.Part):
            stack += [x.value, x.offset]
        elif isinstance(x, _ast.Concat):
            stack.extend(x.parts)
        elif isinstance(x, _ast.SwitchValue):
            stack.append(x.test)
            stack += [c for _, c in x.cases]
    return n


def test_crc8_next_logic_size():
    """One CRC-8 byte step is 8 XORs of up to 8 input bits each. ``crc8_next`` refers to the
    previous bit-step's value three times per step, so its tree grows as 3**8: ~52000 nodes per
    instance, which makes ``Simulator(MgmtUart)`` take several seconds to build and the RTLIL of
    MgmtUart alone ~28 MB (tens of seconds to emit)."""
    size = _tree_size(crc8_next(Signal(8), Signal(8)))
    assert size < 1000, size
