"""A lean PCIe link between cocotbext-pcie's root complex and the card, for co-simulation.

cocotbext-pcie's ``SimPort`` models the data link layer: a TLP waits for flow-control credits,
is queued, is serialised for its wire time, crosses a link delay, is copied into the
receiver's queue, is acknowledged by an ACK DLLP after a latency timer, and credits come back
in UpdateFC DLLPs (on timers even when the link is idle): about twenty scheduler reactions per
TLP. Between the root complex and this card none of it changes what either side does: credits
are infinite at the card (the bridge takes every TLP), nothing is lost or replayed, and a
Gen3 x8 link (7.9 GB/s) is four times faster than the card's 64-bit stream at 250 MHz, so it
never limits a transfer (the benches measure the card's stream, whose bandwidth the RTL and
the TLP shim model cycle by cycle).

A :class:`LeanPort` therefore hands a TLP sent on one end to the other end's receive handler
directly, in order, at the same simulated time. ``wire_time=True`` keeps the serialisation
delay (one timer per TLP) for a bench that wants the link's own bandwidth in the picture. The
root complex is unchanged: its root port gets a lean port (:func:`lean_root_port`), and it
enumerates and configures the card exactly as over a ``SimPort``.
"""

import logging
from collections import deque

from cocotb.triggers import Event, Timer
from cocotb.utils import get_sim_steps

from cocotbext.pcie.core.port import PCIE_GEN_RATE
from cocotbext.pcie.core.tlp import Tlp

__all__ = ["LeanPort", "lean_root_port", "retire"]


def retire(port):
    """A ``SimPort`` a lean port replaces: it is never connected, so it must never start its
    flow-control initialisation (its coroutines, already started, then only wait)."""
    port.fc_initialized = True


def lean_root_port(rc):
    """A root port of ``rc`` (cocotbext-pcie's ``RootComplex``) whose link is a lean port."""
    bridge = rc.make_port()
    retire(bridge.downstream_port)
    bridge.set_downstream_port(LeanPort())
    return bridge


class LeanPort:
    def __init__(self, link_speed=3, link_width=8, wire_time=False):
        self.log = logging.getLogger(f"cocotb.pcie.LeanPort.{id(self)}")
        self.parent = None
        self.rx_handler = None
        self.max_link_speed = link_speed
        self.max_link_width = link_width
        self.cur_link_speed = None
        self.cur_link_width = None
        self.max_payload_size = 128
        self.other = None
        self.wire_time = wire_time
        self._queue = deque()
        self._sending = False
        self._drained = Event()
        self._drained.set()
        self.tlps_sent = 0

    # ---- the link ---------------------------------------------------------------------------
    def connect(self, other):
        if isinstance(other, LeanPort):
            if self.other is not None or other.other is not None:
                raise ConnectionError("lean port already connected")
            self.other, other.other = other, self
            for a, b in ((self, other), (other, self)):
                a.cur_link_speed = min(a.max_link_speed, b.max_link_speed)
                a.cur_link_width = min(a.max_link_width, b.max_link_width)
        else:
            other.connect(self)           # a Device or a bridge: it connects its own port to us

    def _wire_steps(self, tlp):
        rate = PCIE_GEN_RATE[self.cur_link_speed] * self.cur_link_width
        return max(int(get_sim_steps(tlp.get_wire_size() * 8 / rate * 1e9, "ns")), 1)

    # ---- transmit ---------------------------------------------------------------------------
    async def send(self, tlp):
        """Deliver ``tlp`` to the other end (in order with every TLP sent before it)."""
        if self.other is None:
            raise ConnectionError("lean port not connected")
        tlp.release_fc()                  # (a credit of the port it came in through, if any)
        self._queue.append(Tlp(tlp))
        if self._sending:                 # an earlier send delivers it, in order
            return
        self._sending = True
        self._drained.clear()
        try:
            while self._queue:
                pkt = self._queue.popleft()
                if self.wire_time:
                    await Timer(self._wire_steps(pkt), "step")
                self.tlps_sent += 1
                await self.other.rx_handler(pkt)
        finally:
            self._sending = False
            self._drained.set()
