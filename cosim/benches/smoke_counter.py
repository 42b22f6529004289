"""Quick smoke bench for the runner: an 8-bit Amaranth counter with an enable.

The design (``SmokeCounter`` below) is written to Verilog by ``tests/test_runner_smoke.py``;
the cocotb tests drive on falling edges and sample on the next falling edge, so the result
does not depend on how a simulator orders reads around the rising edge.
"""


import cocotb
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


async def _reset(dut):
    Clock(dut.clk, 10, unit="ns").start()
    dut.en.value = 0
    dut.rst.value = 1
    await ClockCycles(dut.clk, 2)
    await FallingEdge(dut.clk)
    dut.rst.value = 0


@cocotb.test()
async def counts_when_enabled(dut):
    await _reset(dut)
    assert dut.count.value.to_unsigned() == 0
    dut.en.value = 1
    for i in range(1, 300):  # wraps at 256
        await FallingEdge(dut.clk)
        assert dut.count.value.to_unsigned() == i % (1 << WIDTH), f"cycle {i}"


@cocotb.test()
async def holds_when_disabled(dut):
    await _reset(dut)
    model = 0
    pattern = [1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1] * 4
    for en in pattern:
        dut.en.value = en
        await FallingEdge(dut.clk)
        model = (model + en) % (1 << WIDTH)
        assert dut.count.value.to_unsigned() == model
