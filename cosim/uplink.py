"""The card's uplink port in a bench: Ethernet frames in and out of the virtio-net switch.

``uplink_tx`` (card -> network) is collected into :attr:`Uplink.received`; :meth:`Uplink.send`
puts a frame on ``uplink_rx``. Beats follow :func:`hdl.iface.UplinkBeat` (data, a keep
bit per byte, last), whose field offsets are read from the Amaranth layout. ``prefix`` picks
one card of a top level holding several (``cosim.twin``: ``a_``, ``b_``).
"""

import cocotb
from cocotb.utils import get_sim_time
from cocotb.queue import Queue
from cocotb.triggers import RisingEdge

from hdl.iface import UplinkBeat

__all__ = ["Uplink"]


class Uplink:
    def __init__(self, dut, data_width, *, prefix=""):
        self.dut = dut
        self.clk = dut.clk
        self.tx_payload = getattr(dut, f"{prefix}uplink_tx__payload")
        self.tx_valid = getattr(dut, f"{prefix}uplink_tx__valid")
        self.tx_ready = getattr(dut, f"{prefix}uplink_tx__ready")
        self.rx_payload = getattr(dut, f"{prefix}uplink_rx__payload")
        self.rx_valid = getattr(dut, f"{prefix}uplink_rx__valid")
        self.rx_ready = getattr(dut, f"{prefix}uplink_rx__ready")
        self.wb = data_width // 8
        layout = UplinkBeat(data_width)
        self.off = {name: f.offset for name, f in layout}
        self.received: list[bytes] = []
        self.times_ns: list[float] = []         # when each received frame's last beat left
        self.arrived = Queue()
        self._to_card = Queue()
        self.tx_ready.value = 1
        self.rx_valid.value = 0
        cocotb.start_soon(self._monitor())
        cocotb.start_soon(self._drive())

    def _pack(self, chunk, last):
        keep = (1 << len(chunk)) - 1
        return (int.from_bytes(chunk, "little") << self.off["data"] | keep << self.off["keep"]
                | int(last) << self.off["last"])

    def send(self, frame: bytes):
        """Queue ``frame`` for the card's ``uplink_rx``."""
        self._to_card.put_nowait(bytes(frame))

    async def _drive(self):
        clk = self.clk
        while True:
            frame = await self._to_card.get()
            chunks = [frame[k:k + self.wb] for k in range(0, len(frame), self.wb)] or [b""]
            for n, chunk in enumerate(chunks):
                self.rx_payload.value = self._pack(chunk, n == len(chunks) - 1)
                self.rx_valid.value = 1
                while True:
                    await RisingEdge(clk)
                    if self.rx_ready.value == 1:
                        break
            self.rx_valid.value = 0

    async def _monitor(self):
        clk = self.clk
        frame = bytearray()
        mask_d = (1 << (8 * self.wb)) - 1
        while True:
            if self.tx_valid.value != 1:
                await RisingEdge(self.tx_valid)     # no wake-ups on an idle port
            await RisingEdge(clk)
            if not (self.tx_valid.value == 1 and self.tx_ready.value == 1):
                continue
            v = int(self.tx_payload.value)
            data = (v >> self.off["data"]) & mask_d
            keep = (v >> self.off["keep"]) & ((1 << self.wb) - 1)
            raw = data.to_bytes(self.wb, "little")
            frame += bytes(raw[i] for i in range(self.wb) if keep >> i & 1)
            if (v >> self.off["last"]) & 1:
                self.received.append(bytes(frame))
                self.times_ns.append(get_sim_time("ns"))
                self.arrived.put_nowait(bytes(frame))
                frame = bytearray()
