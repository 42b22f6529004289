"""Management UART (hdl.mgmt.uart): 8N1 bit timing and order, Tx->Rx loopback, receiver errors."""

import gc
import warnings
import pytest
from amaranth import *
from amaranth.back import verilog
from amaranth.hdl import UnusedElaboratable
from hdl.mgmt.uart import UartRx, UartTx
from helpers import run_sim


def frame_bits(byte, stop=1):
    """Line levels of one character: start, 8 data bits LSB first, stop."""
    return [0] + [(byte >> k) & 1 for k in range(8)] + [stop]


# ---- transmitter ------------------------------------------------------------------------

@pytest.mark.parametrize("d", [4, 7])
def test_tx_bit_timing_and_order(d):
    dut = UartTx(d)
    data = [0x01, 0x80, 0xA5, 0x00, 0xFF, 0x3C]
    tail = 3 * d

    async def tb(ctx):
        trace, busy, accepted = [], [], []
        queue = list(data)
        ctx.set(dut.i.payload, queue[0])
        ctx.set(dut.i.valid, 1)
        for cyc in range(1 + 10 * d * len(data) + tail):
            trace.append(ctx.get(dut.txd))
            busy.append(ctx.get(dut.busy))
            moved = ctx.get(dut.i.valid) and ctx.get(dut.i.ready)
            await ctx.tick()
            if moved:
                accepted.append(cyc)
                queue.pop(0)
                if queue:
                    ctx.set(dut.i.payload, queue[0])
                else:
                    ctx.set(dut.i.valid, 0)
        # each bit exactly d cycles, characters back to back, the line high before and after
        expected = [1] + [v for b in data for v in frame_bits(b) for _ in range(d)] + [1] * tail
        assert trace == expected
        assert accepted == [10 * d * n for n in range(len(data))]
        assert busy == [0] + [1] * (10 * d * len(data)) + [0] * tail

    run_sim(dut, tb, deadline=1e-3)


def test_tx_holds_line_high_between_bytes():
    d = 5
    dut = UartTx(d)

    async def tb(ctx):
        trace = []
        for byte in (0x96, 0x69):
            ctx.set(dut.i.payload, byte)
            ctx.set(dut.i.valid, 1)
            await ctx.tick().until(dut.i.ready)
            ctx.set(dut.i.valid, 0)
            for _ in range(12 * d):           # 10 bits of character, 2 idle bits
                trace.append(ctx.get(dut.txd))
                await ctx.tick()
        one = lambda b: [v for v in frame_bits(b) for _ in range(d)] + [1] * (2 * d)
        assert trace == one(0x96) + one(0x69)

    run_sim(dut, tb, deadline=1e-4)


# ---- loopback ---------------------------------------------------------------------------

class Loopback(Elaboratable):
    """UartTx.txd wired to UartRx.rxd; ``err`` is sticky on overrun/frame_err; ``cycle`` counts."""

    def __init__(self, divisor):
        self.tx = UartTx(divisor)
        self.rx = UartRx(divisor)
        self.err = Signal()
        self.cycle = Signal(32)

    def elaborate(self, platform):
        m = Module()
        m.submodules.tx = self.tx
        m.submodules.rx = self.rx
        m.d.comb += self.rx.rxd.eq(self.tx.txd)
        m.d.sync += self.cycle.eq(self.cycle + 1)
        with m.If(self.rx.overrun | self.rx.frame_err):
            m.d.sync += self.err.eq(1)
        return m


@pytest.mark.parametrize("d,take_delay", [(4, 0), (16, 7)])
def test_loopback_all_bytes_back_to_back(d, take_delay):
    """All 256 values sent back to back; the consumer may wait up to ``take_delay * d`` cycles
    per byte (less than a character time: no overrun)."""
    dut = Loopback(d)
    data = list(range(256))
    sent_at = []

    async def sender(ctx):
        ctx.set(dut.tx.i.valid, 1)
        for b in data:
            ctx.set(dut.tx.i.payload, b)
            (t,) = await ctx.tick().sample(dut.cycle).until(dut.tx.i.valid & dut.tx.i.ready)
            sent_at.append(t)
        ctx.set(dut.tx.i.valid, 0)

    async def receiver(ctx):
        got = []
        for n in range(len(data)):
            if take_delay:
                await ctx.tick().until(dut.rx.o.valid)
                for _ in range((n % take_delay) * d):
                    await ctx.tick()
            ctx.set(dut.rx.o.ready, 1)
            (p,) = await ctx.tick().sample(dut.rx.o.payload).until(dut.rx.o.valid)
            ctx.set(dut.rx.o.ready, 0)
            got.append(p)
        assert got == data
        assert not ctx.get(dut.err)

    run_sim(dut, sender, receiver, deadline=(len(data) + 2) * 10 * d * 1e-8)
    assert [b - a for a, b in zip(sent_at, sent_at[1:])] == [10 * d] * (len(data) - 1)


# ---- receiver, line driven by hand ------------------------------------------------------

class RxBench:
    """Drives ``rxd`` cycle by cycle and records what the receiver does on every edge."""

    def __init__(self, ctx, dut):
        self.ctx, self.dut = ctx, dut
        self.cycle = 0
        self.got = []            # (cycle, byte) taken from ``o``
        self.overrun = []        # cycles with the strobe high
        self.frame_err = []
        self.idle = []           # idle_bits, one per cycle

    async def wait(self, n):
        dut = self.dut
        for _ in range(n):
            _, _, v, r, p, ov, fe, idle = await self.ctx.tick().sample(
                dut.o.valid, dut.o.ready, dut.o.payload, dut.overrun, dut.frame_err,
                dut.idle_bits)
            if v and r:
                self.got.append((self.cycle, p))
            if ov:
                self.overrun.append(self.cycle)
            if fe:
                self.frame_err.append(self.cycle)
            self.idle.append(idle)
            self.cycle += 1

    async def line(self, level, cycles):
        self.ctx.set(self.dut.rxd, level)
        await self.wait(cycles)

    async def frame(self, byte, stop=1):
        for v in frame_bits(byte, stop):
            await self.line(v, self.dut.divisor)
        self.ctx.set(self.dut.rxd, 1)

    def bytes(self):
        return [b for _, b in self.got]


def test_rx_overrun_keeps_first_byte():
    d = 8
    dut = UartRx(d)

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        await rb.line(1, 2 * d)
        await rb.frame(0x3A)                  # o.ready low: the consumer takes nothing
        await rb.frame(0xC5)
        await rb.line(1, 2 * d)
        assert rb.overrun and len(rb.overrun) == 1, rb.overrun
        assert ctx.get(dut.o.valid) and ctx.get(dut.o.payload) == 0x3A
        assert not rb.frame_err
        ctx.set(dut.o.ready, 1)
        await rb.wait(1)
        assert rb.bytes() == [0x3A] and not ctx.get(dut.o.valid)
        await rb.frame(0x5C)                  # the receiver goes on after an overrun
        await rb.line(1, 2 * d)
        assert rb.bytes() == [0x3A, 0x5C] and len(rb.overrun) == 1

    run_sim(dut, tb, deadline=1e-4)


@pytest.mark.parametrize("late", [0, 1])
def test_rx_take_in_completion_cycle(late):
    """The held byte is taken in the cycle the next one completes (no overrun, both
    delivered), or one cycle after it (overrun, the next one dropped)."""
    d = 4
    dut = UartRx(d)

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        await rb.line(1, d)
        await rb.frame(0x11)
        await rb.line(1, d)
        first = rb.cycle
        stop_mid = first + 2 + d // 2 + 9 * d     # cycle the second stop bit is sampled
        bits = frame_bits(0x22)
        for c in range(first, first + 12 * d):
            n = (c - first) // d
            ctx.set(dut.rxd, bits[n] if n < len(bits) else 1)
            ctx.set(dut.o.ready, int(c == stop_mid + late))
            await rb.wait(1)
        assert rb.got == [(stop_mid + late, 0x11)]
        if late:
            assert rb.overrun == [stop_mid + 1] and not ctx.get(dut.o.valid)
        else:
            assert rb.overrun == []
            assert ctx.get(dut.o.valid) and ctx.get(dut.o.payload) == 0x22

    run_sim(dut, tb, deadline=1e-4)


def test_rx_bad_stop_bit():
    d = 8
    dut = UartRx(d)

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        ctx.set(dut.o.ready, 1)
        await rb.line(1, 2 * d)
        await rb.frame(0xA7, stop=0)
        await rb.line(1, 3 * d)
        assert len(rb.frame_err) == 1 and rb.got == [] and not rb.overrun
        # the (registered) strobe follows the middle of the stop bit, seen through the
        # 2-stage synchroniser
        assert rb.frame_err == [2 * d + 2 + d // 2 + 9 * d + 1]
        await rb.frame(0x4B)                  # the next good character is received
        await rb.line(1, 2 * d)
        assert rb.bytes() == [0x4B] and len(rb.frame_err) == 1

    run_sim(dut, tb, deadline=1e-4)


def test_rx_break_gives_one_frame_error():
    d = 4
    dut = UartRx(d)

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        ctx.set(dut.o.ready, 1)
        await rb.line(1, 2 * d)
        await rb.line(0, 50 * d)              # line held low for 5 character times
        await rb.line(1, 3 * d)
        assert len(rb.frame_err) == 1 and rb.got == []
        await rb.frame(0x81)
        await rb.line(1, 2 * d)
        assert rb.bytes() == [0x81] and len(rb.frame_err) == 1

    run_sim(dut, tb, deadline=1e-4)


def test_rx_glitch_is_ignored():
    d = 8
    dut = UartRx(d)

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        ctx.set(dut.o.ready, 1)
        await rb.line(1, 2 * d)
        for low in range(1, d // 2):          # shorter than half a bit
            await rb.line(0, low)
            await rb.line(1, 12 * d)
        assert rb.got == [] and not rb.frame_err and not rb.overrun
        await rb.frame(0xE1)
        await rb.line(1, 2 * d)
        assert rb.bytes() == [0xE1] and not rb.frame_err

    run_sim(dut, tb, deadline=1e-4)


def test_rx_idle_bits():
    d = 4
    dut = UartRx(d)
    quiet = 300                               # more than UartProto.GAP_BITS

    async def tb(ctx):
        rb = RxBench(ctx, dut)
        ctx.set(dut.o.ready, 1)
        await rb.line(1, quiet * d)
        # one increment every d cycles from reset
        assert rb.idle == [n // d for n in range(quiet * d)]
        assert ctx.get(dut.idle_bits) == quiet
        # start bit: cleared once the edge is through the synchroniser (2 cycles + edge)
        ctx.set(dut.rxd, 0)
        await rb.wait(2)
        assert ctx.get(dut.idle_bits) == quiet
        await rb.wait(1)
        assert ctx.get(dut.idle_bits) == 0
        await rb.wait(d - 3)
        for v in frame_bits(0x5A)[1:]:
            await rb.line(v, d)
        start = quiet * d
        await rb.line(1, 20 * d)
        assert rb.bytes() == [0x5A]
        stop_mid = start + 2 + d // 2 + 9 * d     # cycle the stop bit is sampled
        assert all(i == 0 for i in rb.idle[start + 3:stop_mid + 1])
        after = rb.idle[stop_mid + 1:]
        assert after == [n // d for n in range(len(after))]

    run_sim(dut, tb, deadline=1e-4)


# ---- parameters and elaboration ---------------------------------------------------------

@pytest.mark.parametrize("cls", [UartTx, UartRx])
@pytest.mark.parametrize("bad", [3, 0, -16, 16.0, True, "16"])
def test_bad_divisor(cls, bad):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnusedElaboratable)    # the half-built component
        with pytest.raises(ValueError, match="divisor must be an int >= 4"):
            cls(bad)
        gc.collect()


@pytest.mark.parametrize("cls,d", [(UartTx, 4), (UartRx, 16), (UartRx, 1085)])
def test_elaborates_to_verilog(cls, d):
    text = verilog.convert(cls(d), name="uart")
    assert "module uart" in text
