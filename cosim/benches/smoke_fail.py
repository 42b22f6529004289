"""A bench that fails on purpose: proves that cosim.runner reports a failed cocotb test."""

import cocotb
from cocotb.triggers import FallingEdge

from cosim.scenarios.smoke import reset


@cocotb.test()
async def deliberately_fails(dut):
    """The counter is 0 after reset; asserting 1 must fail, and the runner must say so."""
    await reset(dut)
    await FallingEdge(dut.clk)
    assert dut.count.value.to_unsigned() == 1, "this test fails on purpose"
