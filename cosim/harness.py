"""Common set-up of a cocotb bench: clock, reset, root complex, bridge, transport, driver.

``prefix`` selects one card of a top level that holds several (``cosim.twin``: ``a_``, ``b_``):
its ports are ``<prefix>rx__payload`` etc., while ``clk`` and ``rst`` are shared, so
:func:`start_twin` starts the clock and pulses the reset once for all of them.
"""

import logging

import cocotb
from cocotb.clock import Clock
from cocotb.triggers import ClockCycles, Timer

from cocotbext.pcie.core import RootComplex

from host_driver.offcard import OffcardDriver
from .bridge import BeatBridge, TlpBridge
from .host import RootComplexTransport
from .link import lean_root_port

__all__ = ["CardHarness", "CLOCK_NS", "start_twin"]

CLOCK_NS = 4          # 250 MHz card clock


def has_shim(dut, prefix=""):
    """The top is ``offcard_sim`` (the card behind the TLP shim), not the bare ``offcard``."""
    return hasattr(dut, f"{prefix}in_seq")


def data_width_of(dut, prefix=""):
    """Data width of the RTL, from the width of its rx payload (hdl.pcie.tlp.TlpBeat)."""
    n = len(getattr(dut, f"{prefix}{'raw_rx' if has_shim(dut, prefix) else 'rx'}__payload"))
    w = (n - 141) * 32 // 33
    assert 141 + w + w // 32 == n, f"unexpected rx payload width {n}"
    return w


class CardHarness:
    def __init__(self, dut, *, prefix=""):
        self.dut = dut
        self.prefix = prefix
        self.data_width = data_width_of(dut, prefix)
        logging.getLogger("cocotb.pcie").setLevel(logging.WARNING)
        self.rc = RootComplex()
        if has_shim(dut, prefix):
            # whole TLPs through the shim, on a lean link (cosim.link)
            self.bridge = TlpBridge(dut, self.data_width, prefix=prefix, clock_ns=CLOCK_NS)
            lean_root_port(self.rc).connect(self.bridge)
        else:
            self.bridge = BeatBridge(dut, self.data_width, prefix=prefix)
            self.rc.make_port().connect(self.bridge)
        self.t = RootComplexTransport(self.rc)
        self.drv = OffcardDriver(self.t)

    def port(self, name):
        """This card's port ``name`` (``clk`` and ``rst`` are never prefixed)."""
        return getattr(self.dut, name if name in ("clk", "rst") else self.prefix + name)

    async def start(self, *, clock=True, reset=True):
        """Idle this card's inputs; start the clock and pulse the reset unless told not to
        (the cards of a twin share both: see :func:`start_twin`)."""
        if clock:
            Clock(self.dut.clk, CLOCK_NS, unit="ns").start()
        # the uplink port idles until a bench attaches to it (cosim.uplink)
        self.port("uplink_rx__valid").value = 0
        self.port("uplink_rx__payload").value = 0
        self.port("uplink_tx__ready").value = 1
        # the management UART idles high; the utilisation inputs read 0 % until a bench drives them
        self.port("uart_rxd").value = 1
        self.port("util").value = 0
        if reset:
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


async def start_twin(*harnesses):
    """Start cards that share ``clk`` and ``rst``: every card's inputs idle, then one clock and
    one reset pulse for all of them."""
    first, *rest = harnesses
    for h in rest:
        await h.start(clock=False, reset=False)
    await first.start()
