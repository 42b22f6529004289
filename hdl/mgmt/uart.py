"""Management UART: 8N1 transmitter and receiver, ``divisor`` card clocks per bit.

A character is one start bit (0), eight data bits LSB first and one stop bit (1); the line
idles high. ``divisor`` (an int >= 4) is the same for both directions.

:class:`UartTx` takes bytes on ``i`` and drives ``txd`` from a register. It is ready while
idle and in the last cycle of a stop bit, so a stream that holds ``valid`` sends characters
back to back, without an idle bit between them. ``busy`` is high while a character is on the
line.

:class:`UartRx` passes ``rxd`` through a two-flip-flop synchroniser (idle high). A falling
edge starts a character; the line is sampled in the middle of each bit (``divisor // 2``
cycles after the edge, then every ``divisor`` cycles). A start bit that is high again at its
middle is a glitch and ignored. A character whose stop bit is sampled low is dropped and
``frame_err`` strobes; a line held low (break) gives one ``frame_err``. A good byte is held on
``o`` until taken; one that completes while the previous byte is still held (not taken in that
cycle) is dropped and ``overrun`` strobes. Strobes are registered and last one cycle.

``idle_bits`` counts whole bit times since the middle of the last stop bit (or since reset),
saturating at 0xFFFF. A falling edge clears it and it stays 0 until the middle of the stop bit
(of the start bit, for a glitch); it keeps counting while a break holds the line low.
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.cdc import FFSynchronizer
from amaranth.lib.wiring import In, Out

__all__ = ["UartTx", "UartRx"]


def _check_divisor(divisor):
    if isinstance(divisor, bool) or not isinstance(divisor, int) or divisor < 4:
        raise ValueError(f"UART divisor must be an int >= 4 (card clocks per bit), "
                         f"got {divisor!r}")
    return divisor


class UartTx(wiring.Component):
    """8N1 transmitter; ``divisor`` clocks per bit."""

    def __init__(self, divisor):
        self.divisor = _check_divisor(divisor)
        super().__init__({
            "i":    In(stream.Signature(8)),
            "txd":  Out(1, init=1),
            "busy": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        sr = Signal(10, init=0x3FF)          # bits still to send, the one on the line in bit 0
        left = Signal(range(11))             # bits still to send, the current one included
        cnt = Signal(range(d))               # cycles left in the current bit, minus one
        busy = left != 0
        last = (left == 1) & (cnt == 0)      # last cycle of the stop bit
        m.d.comb += [
            self.txd.eq(sr[0]),
            self.busy.eq(busy),
            self.i.ready.eq(~busy | last),
        ]
        with m.If(self.i.valid & self.i.ready):
            m.d.sync += [sr.eq(Cat(C(0, 1), self.i.payload, C(1, 1))), left.eq(10), cnt.eq(d - 1)]
        with m.Elif(busy):
            with m.If(cnt == 0):
                m.d.sync += [sr.eq(Cat(sr[1:], C(1, 1))), left.eq(left - 1), cnt.eq(d - 1)]
            with m.Else():
                m.d.sync += cnt.eq(cnt - 1)
        return m


class UartRx(wiring.Component):
    """8N1 receiver; ``divisor`` clocks per bit, ``rxd`` asynchronous."""

    def __init__(self, divisor):
        self.divisor = _check_divisor(divisor)
        super().__init__({
            "rxd":       In(1, init=1),
            "o":         Out(stream.Signature(8)),
            "overrun":   Out(1),
            "frame_err": Out(1),
            "idle_bits": Out(16),
        })

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        rx = Signal(init=1)
        m.submodules.sync_rxd = FFSynchronizer(self.rxd, rx, init=1)
        rx_q = Signal(init=1)
        m.d.sync += rx_q.eq(rx)

        cnt = Signal(range(d), init=d - 1)   # bit timer: cycles to the next sample, minus one
        tick = cnt == 0
        nbit = Signal(range(8))
        sr = Signal(8)
        valid = Signal()
        data = Signal(8)
        idle_bits = Signal(16)
        m.d.comb += [
            self.o.valid.eq(valid), self.o.payload.eq(data), self.idle_bits.eq(idle_bits),
        ]
        m.d.sync += [self.overrun.eq(0), self.frame_err.eq(0)]
        with m.If(self.o.ready):
            m.d.sync += valid.eq(0)
        with m.If(tick):
            m.d.sync += cnt.eq(d - 1)
        with m.Else():
            m.d.sync += cnt.eq(cnt - 1)

        with m.FSM():
            with m.State("IDLE"):
                with m.If(rx_q & ~rx):
                    m.d.sync += [cnt.eq(d // 2 - 1), idle_bits.eq(0)]
                    m.next = "START"
                with m.Elif(tick & (idle_bits != 0xFFFF)):
                    m.d.sync += idle_bits.eq(idle_bits + 1)
            with m.State("START"):
                with m.If(tick):
                    m.d.sync += nbit.eq(0)
                    with m.If(rx):                 # high again at mid-bit: a glitch
                        m.next = "IDLE"
                    with m.Else():
                        m.next = "DATA"
            with m.State("DATA"):
                with m.If(tick):
                    m.d.sync += [sr.eq(Cat(sr[1:], rx)), nbit.eq(nbit + 1)]
                    with m.If(nbit == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                with m.If(tick):
                    with m.If(~rx):
                        m.d.sync += self.frame_err.eq(1)
                    with m.Elif(valid & ~self.o.ready):
                        m.d.sync += self.overrun.eq(1)
                    with m.Else():
                        m.d.sync += [valid.eq(1), data.eq(sr)]
                    m.next = "IDLE"
        return m
