"""The runner's smoke design: an 8-bit Amaranth counter with an enable (``SmokeCounter``),
its Verilog, and the reset the smoke benches start with (the clock started, reset released
on a falling edge)."""

from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, FallingEdge

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

WIDTH = 8


class SmokeCounter(wiring.Component):
    en: In(1)
    count: Out(WIDTH)

    def elaborate(self, platform):
        m = Module()
        with m.If(self.en):
            m.d.sync += self.count.eq(self.count + 1)
        return m


def smoke_counter_verilog(name: str = "smoke_counter") -> str:
    from amaranth.back import verilog

    return verilog.convert(SmokeCounter(), name=name)


async def reset(dut):
    Clock(dut.clk, 10, unit="ns").start()
    dut.en.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    await FallingEdge(dut.clk)
    dut.rst.value = 0
