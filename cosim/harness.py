"""Common set-up of a cocotb bench: clock, reset, root complex, bridge, transport, driver."""

import logging

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Timer

from cocotbext.pcie.core import RootComplex

from host_driver.offcard import OffcardDriver
from .bridge import CardBridge
from .host import RootComplexTransport

__all__ = ["CardHarness", "CLOCK_NS"]

CLOCK_NS = 4          # 250 MHz card clock


def data_width_of(dut):
    """Data width of the RTL, from the width of its rx payload (hdl.tlp.TlpBeat)."""
    n = len(dut.rx__payload)
    w = (n - 141) * 32 // 33
    assert 141 + w + w // 32 == n, f"unexpected rx payload width {n}"
    return w


class CardHarness:
    def __init__(self, dut):
        self.dut = dut
        self.data_width = data_width_of(dut)
        logging.getLogger("cocotb.pcie").setLevel(logging.WARNING)
        self.rc = RootComplex()
        self.bridge = CardBridge(dut, self.data_width)
        self.rc.make_port().connect(self.bridge)
        self.t = RootComplexTransport(self.rc)
        self.drv = OffcardDriver(self.t)

    async def start(self):
        Clock(self.dut.clk, CLOCK_NS, unit="ns").start()
        # the uplink port idles until a bench attaches to it (cosim.uplink)
        self.dut.uplink_rx__valid.value = 0
        self.dut.uplink_rx__payload.value = 0
        self.dut.uplink_tx__ready.value = 1
        # the management UART idles high; the utilisation inputs read 0 % until a bench drives them
        self.dut.uart_rxd.value = 1
        self.dut.util.value = 0
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 8)
        self.dut.rst.value = 0
        await ClockCycles(self.dut.clk, 2)

    async def settle(self, cycles=64):
        """Let everything in flight drain."""
        await self.bridge.idle.wait()
        await ClockCycles(self.dut.clk, cycles)

    def cycles(self):
        return int(cocotb.utils.get_sim_time("ns") // CLOCK_NS)
