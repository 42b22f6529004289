"""Quick smoke bench for the runner: an 8-bit Amaranth counter with an enable.

The design (:class:`cosim.scenarios.smoke.SmokeCounter`) is written to Verilog by
``tests/test_runner_smoke.py``; the cocotb tests drive on falling edges and sample on the next
falling edge, so the result does not depend on how a simulator orders reads around the rising
edge.
"""

import cocotb
from cocotb.triggers import FallingEdge

from cosim.scenarios.smoke import WIDTH, reset


@cocotb.test()
async def counts_when_enabled(dut):
    await reset(dut)
    assert dut.count.value.to_unsigned() == 0
    dut.en.value = 1
    for i in range(1, 300):  # wraps at 256
        await FallingEdge(dut.clk)
        assert dut.count.value.to_unsigned() == i % (1 << WIDTH), f"cycle {i}"


@cocotb.test()
async def holds_when_disabled(dut):
    await reset(dut)
    model = 0
    pattern = [1, 1, 0, 1, 0, 0, 0, 1, 1, 1, 0, 1] * 4
    for en in pattern:
        dut.en.value = en
        await FallingEdge(dut.clk)
        model = (model + en) % (1 << WIDTH)
        assert dut.count.value.to_unsigned() == model
