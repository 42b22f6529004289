"""cocotbext-pcie ``Device`` that hands every TLP to the RTL and sends the RTL's TLPs upstream.

cocotbext-pcie's own ``Device`` routes to at most eight Python functions and has no ARI, so this
bridge forwards *every* TLP (configuration included) into the card's ``rx`` stream and lets the
RTL decide which routing IDs exist. TLPs are converted with ``Tlp.pack`` / ``Tlp.unpack``; the
beat layout comes from :func:`hdl.pcie.tlp.TlpBeat`, so the Python side and the RTL share one
definition of the stream.

No coroutine here wakes on an idle bus: the driver sleeps on its queue, the monitor on a rising
edge of ``tx__valid``.
"""

import logging

import cocotb
from cocotb.queue import Queue
from cocotb.triggers import RisingEdge, Event
from cocotb.utils import get_sim_time

from cocotbext.pcie.core import Device
from cocotbext.pcie.core.tlp import Tlp

from hdl.pcie.tlp import TlpBeat

__all__ = ["CardBridge", "BeatCodec"]


class BeatCodec:
    """Packs and unpacks TLP stream beats as integers, from the Amaranth layout."""

    def __init__(self, data_width):
        self.data_width = data_width
        self.dpb = data_width // 32
        layout = TlpBeat(data_width)
        self.off = {name: field.offset for name, field in layout}
        self.width = {name: field.width for name, field in layout}

    def pack(self, *, hdr=0, data=0, strb=0, sop=0, eop=0, func=0, bar=0):
        o = self.off
        return (hdr << o["hdr"] | data << o["data"] | strb << o["strb"] | sop << o["sop"]
                | eop << o["eop"] | func << o["func"] | bar << o["bar"])

    def field(self, value, name):
        return (value >> self.off[name]) & ((1 << self.width[name]) - 1)

    def beats(self, hdr_bytes, payload, *, sop=True, eop=True):
        """Beats (as ints) of one TLP: ``hdr_bytes`` (12 or 16 wire bytes), ``payload`` bytes."""
        hdr = int.from_bytes(bytes(hdr_bytes).ljust(16, b"\0")[:16], "big")
        ndw = len(payload) // 4
        bpb = self.dpb * 4
        nbeats = max(1, -(-ndw // self.dpb))
        out = []
        for k in range(nbeats):
            chunk = payload[k * bpb:(k + 1) * bpb]
            ndw_k = len(chunk) // 4
            out.append(self.pack(
                hdr=hdr if k == 0 else 0,
                data=int.from_bytes(chunk, "little"),
                strb=(1 << ndw_k) - 1,
                sop=int(sop and k == 0),
                eop=int(eop and k == nbeats - 1),
            ))
        return out


class CardBridge(Device):
    """The card as a PCIe device on a cocotbext-pcie link.

    ``dut`` must expose ``clk``, ``rx__payload/valid/ready`` and ``tx__payload/valid/ready``.
    ``divert``: when set to a ``cocotb.queue.Queue``, TLPs from the card go there as
    ``(hdr_bytes, payload_bytes)`` instead of upstream (used by the fuzzing bench).
    """

    def __init__(self, dut, data_width, *args, prefix="", link_speed=3, link_width=8, **kwargs):
        super().__init__(*args, **kwargs)
        # a Gen3 x8 link: the port model then spends real time on each TLP (symbol time,
        # link delay), as the card's PCIe hard IP would see
        self.upstream_port.max_link_speed = link_speed
        self.upstream_port.max_link_width = link_width
        self.log = logging.getLogger("cocotb.offcard.bridge")
        self.dut = dut
        self.clk = dut.clk
        self.codec = BeatCodec(data_width)
        self.rx_payload = getattr(dut, f"{prefix}rx__payload")
        self.rx_valid = getattr(dut, f"{prefix}rx__valid")
        self.rx_ready = getattr(dut, f"{prefix}rx__ready")
        self.tx_payload = getattr(dut, f"{prefix}tx__payload")
        self.tx_valid = getattr(dut, f"{prefix}tx__valid")
        self.tx_ready = getattr(dut, f"{prefix}tx__ready")
        self.rx_valid.value = 0
        self.tx_ready.value = 1
        self._to_rtl = Queue()       # (beats, tlp or None)
        self._to_host = Queue()
        self.divert = None
        self.tlps_in = 0             # TLPs handed to the RTL
        self.tlps_out = 0            # TLPs the RTL sent
        self.beats_in = 0
        self.beats_out = 0
        self.tx_hook = None          # called as hook(hdr, payload, first_beat_ns, last_beat_ns)
        self.rx_hook = None          # called as hook(tlp, first_beat_ns, last_beat_ns), host -> card
        self.idle = Event()
        self.idle.set()
        cocotb.start_soon(self._drive())
        cocotb.start_soon(self._monitor())
        cocotb.start_soon(self._upstream())

    # ---- host -> card ---------------------------------------------------------------------
    async def upstream_recv(self, tlp):
        """Called by the link for every TLP from the root complex."""
        assert tlp.check()
        self.send_beats(self.codec.beats(tlp.pack_header(), tlp.get_data() if tlp.has_data() else b""), tlp)

    def send_beats(self, beats, tlp=None):
        """Queue raw beats (ints) for the RTL; ``tlp`` gets its flow-control credit released."""
        self.idle.clear()
        self._to_rtl.put_nowait((beats, tlp))

    async def _drive(self):
        while True:
            beats, tlp = await self._to_rtl.get()
            t_first = None
            for b in beats:
                self.rx_payload.value = b
                self.rx_valid.value = 1
                while True:
                    await RisingEdge(self.clk)
                    if self.rx_ready.value == 1:
                        break
                if t_first is None:
                    t_first = get_sim_time("ns")
                self.beats_in += 1
            self.rx_valid.value = 0
            self.tlps_in += 1
            if self.rx_hook is not None and tlp is not None:
                self.rx_hook(tlp, t_first, get_sim_time("ns"))
            if tlp is not None:
                tlp.release_fc()
            if self._to_rtl.empty():
                self.idle.set()

    # ---- card -> host ---------------------------------------------------------------------
    async def _monitor(self):
        codec = self.codec
        hdr = None
        payload = bytearray()
        while True:
            if self.tx_valid.value != 1:
                await RisingEdge(self.tx_valid)
            await RisingEdge(self.clk)
            if not (self.tx_valid.value == 1 and self.tx_ready.value == 1):
                continue
            raw = self.tx_payload.value
            if not raw.is_resolvable:
                self.log.error("tx payload has X/Z bits: %s", str(raw))
            v = int(raw)
            self.beats_out += 1
            if codec.field(v, "sop"):
                hdr = codec.field(v, "hdr").to_bytes(16, "big")
                payload = bytearray()
                t_first = get_sim_time("ns")
            ndw = bin(codec.field(v, "strb")).count("1")
            payload += codec.field(v, "data").to_bytes(codec.dpb * 4, "little")[:ndw * 4]
            if codec.field(v, "eop"):
                self.tlps_out += 1
                if self.tx_hook is not None:
                    self.tx_hook(hdr, bytes(payload), t_first, get_sim_time("ns"))
                self._to_host.put_nowait((hdr, bytes(payload)))

    async def _upstream(self):
        while True:
            hdr, payload = await self._to_host.get()
            if self.divert is not None:
                self.divert.put_nowait((hdr, payload))
                continue
            fmt = hdr[0] >> 5
            hdr_len = 16 if fmt & 1 else 12
            try:
                tlp = Tlp.unpack(hdr[:hdr_len] + payload)
            except Exception as e:
                raise ValueError(f"card sent a TLP the host cannot parse: header {hdr.hex()}, "
                                 f"{len(payload)} payload bytes") from e
            await self.send(tlp)
