"""cocotbext-pcie ``Device``s that hand every TLP to the RTL and send the RTL's TLPs upstream.

cocotbext-pcie's own ``Device`` routes to at most eight Python functions and has no ARI, so a
bridge forwards *every* TLP (configuration included) to the card and lets the RTL decide which
routing IDs exist. Two bridges, one behaviour:

* :class:`TlpBridge` (the default) talks to the TLP shim of a co-simulation build
  (:mod:`cosim.tlp_shim`, top ``offcard_sim``): it writes a whole TLP into the shim's input
  ports and reads a whole TLP from its output ports, waking once per TLP each way; the shim
  streams the beats cycle by cycle in the RTL. Its link to the root complex is a
  :class:`cosim.link.LeanPort`.
* :class:`BeatBridge` drives the card's ``rx`` and samples its ``tx`` a beat at a time from
  Python, over cocotbext-pcie's ``SimPort`` (a Gen3 x8 link with its data link layer). It is
  the reference the TLP path is compared with (``OFFCARD_TLP_PATH=beat`` selects it
  everywhere).

Both take TLPs as ``Tlp.pack`` / ``Tlp.unpack`` bytes; the beat layout comes from
:func:`hdl.pcie.tlp.TlpBeat`, so the Python side and the RTL share one definition of the stream.
No coroutine here wakes on an idle bus.
"""

import logging
import os
from collections import deque

import cocotb
from cocotb.queue import Queue
from cocotb.triggers import FallingEdge, RisingEdge, Event, ReadWrite, ValueChange, Timer
from cocotb.utils import get_sim_time

from cocotbext.pcie.core import Device
from cocotbext.pcie.core.tlp import Tlp, TlpType

from hdl.pcie.tlp import TlpBeat

from .link import LeanPort, retire

__all__ = ["TlpBridge", "BeatBridge", "BeatCodec", "tlp_path", "PATHS"]

#: The ways TLPs cross between Python and the RTL (``OFFCARD_TLP_PATH``).
PATHS = ("tlp", "beat")


def host_read_ns(value=None):
    """The host's added read latency in ns (``OFFCARD_HOST_READ_NS``, default 0): every
    completion the host sends the card arrives that much later, in order."""
    v = value if value is not None else os.environ.get("OFFCARD_HOST_READ_NS", "") or "0"
    try:
        ns = int(v)
    except ValueError:
        ns = -1
    if ns < 0:
        raise ValueError(f"OFFCARD_HOST_READ_NS must be a whole number of ns >= 0, got {v!r}")
    return ns


_COMPLETIONS = frozenset({TlpType.CPL, TlpType.CPL_DATA, TlpType.CPL_LOCKED,
                          TlpType.CPL_LOCKED_DATA})


def tlp_path(value=None):
    """The TLP path chosen by ``value`` or the environment (``OFFCARD_TLP_PATH``): ``tlp``
    (whole TLPs through the shim, the default) or ``beat`` (one beat at a time)."""
    v = (value if value is not None else os.environ.get("OFFCARD_TLP_PATH", "")) or "tlp"
    if v not in PATHS:
        raise ValueError(f"OFFCARD_TLP_PATH must be one of {', '.join(PATHS)}, got {v!r}")
    return v


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


class _Bridge(Device):
    """What both bridges share: the counters, the hooks, the upstream side.

    ``divert``: when set to a ``cocotb.queue.Queue``, TLPs from the card go there as
    ``(hdr_bytes, payload_bytes)`` instead of upstream (used by the fuzzing bench).
    ``tx_hook(hdr, payload, first_beat_ns, last_beat_ns)`` sees every TLP the card sends,
    ``rx_hook(tlp, first_beat_ns, last_beat_ns)`` every TLP it took from the host.
    ``read_latency_ns`` (:func:`host_read_ns` at start, settable any time) delays every
    completion for the card's reads by that much, in order: a server's host memory answers in
    0.5-1 us, the root complex model at once (posted and non-posted requests from the host may
    pass the delayed completions, as PCIe ordering allows).
    """

    #: The bridge that drives each card's ports now: ``(id(dut), prefix) -> bridge``.
    _active = {}

    def __init__(self, dut, data_width, *args, prefix="", **kwargs):
        super().__init__(*args, **kwargs)
        # a bench may build a second harness on the same card within one test: the bridge
        # before it lets go of the ports (its coroutines end)
        old = _Bridge._active.get((id(dut), prefix))
        if old is not None:
            old.close()
        _Bridge._active[(id(dut), prefix)] = self
        self._tasks = []
        self.log = logging.getLogger("cocotb.offcard.bridge")
        self.dut = dut
        self.prefix = prefix
        self.clk = dut.clk
        self.codec = BeatCodec(data_width)
        self._to_host = Queue()
        self.divert = None
        self.tlps_in = 0             # TLPs handed to the RTL
        self.tlps_out = 0            # TLPs the RTL sent
        self.beats_in = 0
        self.beats_out = 0
        self.tx_hook = None
        self.rx_hook = None
        self.idle = Event()
        self.idle.set()
        self.read_latency_ns = host_read_ns()
        self._late = deque()         # (due ns, Tlp): completions held back
        self._late_more = Event()
        self._start(self._upstream())
        self._start(self._deliver_late())

    def _start(self, coro):
        self._tasks.append(cocotb.start_soon(coro))

    def close(self):
        """Stop driving the card (a newer bridge took over its ports)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
        self._tasks = []

    def port(self, name):
        return getattr(self.dut, self.prefix + name)

    async def _put_beats(self, beats, payload, valid, ready):
        """Drive ``beats`` (ints) on a valid/ready stream, one per clock the RTL is ready;
        returns the time of the first beat's handshake (None for no beats)."""
        t_first = None
        for b in beats:
            payload.value = b
            valid.value = 1
            while True:
                await RisingEdge(self.clk)
                if ready.value == 1:
                    break
            if t_first is None:
                t_first = get_sim_time("ns")
        valid.value = 0
        return t_first

    async def upstream_recv(self, tlp):
        """Called by the link for every TLP from the root complex."""
        assert tlp.check()
        if tlp.fmt_type in _COMPLETIONS and (self.read_latency_ns or self._late):
            # (also behind an earlier completion still held back: they stay in order)
            self._late.append((get_sim_time("ns") + self.read_latency_ns, tlp))
            self._late_more.set()
            return
        self.send_tlp(tlp)

    async def _deliver_late(self):
        while True:
            while not self._late:
                self._late_more.clear()
                await self._late_more.wait()
            due, tlp = self._late[0]
            wait = due - get_sim_time("ns")
            if wait > 0:
                await Timer(wait, "ns")
            self._late.popleft()
            self.send_tlp(tlp)

    def _from_card(self, hdr, payload, t_first, t_last):
        self.tlps_out += 1
        if self.tx_hook is not None:
            self.tx_hook(hdr, payload, t_first, t_last)
        self._to_host.put_nowait((hdr, payload))

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


class BeatBridge(_Bridge):
    """The card's ``rx`` / ``tx`` streams driven and sampled a beat at a time from Python, on
    cocotbext-pcie's own link model (Gen3 x8: the port model spends real time on each TLP,
    symbol time and link delay, as the card's PCIe hard IP would see)."""

    def __init__(self, dut, data_width, *args, prefix="", link_speed=3, link_width=8, **kwargs):
        super().__init__(dut, data_width, *args, prefix=prefix, **kwargs)
        self.upstream_port.max_link_speed = link_speed
        self.upstream_port.max_link_width = link_width
        self.rx_payload = self.port("rx__payload")
        self.rx_valid = self.port("rx__valid")
        self.rx_ready = self.port("rx__ready")
        self.tx_payload = self.port("tx__payload")
        self.tx_valid = self.port("tx__valid")
        self.tx_ready = self.port("tx__ready")
        self.rx_valid.value = 0
        self.tx_ready.value = 1
        self._to_rtl = Queue()       # (beats, tlp or None)
        self._start(self._drive())
        self._start(self._monitor())

    def send_tlp(self, tlp):
        self.send_beats(self.codec.beats(tlp.pack_header(),
                                         tlp.get_data() if tlp.has_data() else b""), tlp)

    def send_beats(self, beats, tlp=None):
        """Queue raw beats (ints) for the RTL; ``tlp`` gets its flow-control credit released."""
        self.idle.clear()
        self._to_rtl.put_nowait((beats, tlp))

    async def _drive(self):
        while True:
            beats, tlp = await self._to_rtl.get()
            t_first = await self._put_beats(beats, self.rx_payload, self.rx_valid, self.rx_ready)
            self.beats_in += len(beats)
            self.tlps_in += 1
            if self.rx_hook is not None and tlp is not None:
                self.rx_hook(tlp, t_first, get_sim_time("ns"))
            if tlp is not None:
                tlp.release_fc()
            if self._to_rtl.empty():
                self.idle.set()

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
                self._from_card(hdr, bytes(payload), t_first, get_sim_time("ns"))


class TlpBridge(_Bridge):
    """Whole TLPs through the TLP shim (:mod:`cosim.tlp_shim`) of an ``offcard_sim`` build, on a
    :class:`cosim.link.LeanPort` link. ``clock_ns`` converts the shim's cycle stamps into the
    times the hooks report."""

    def __init__(self, dut, data_width, *args, prefix="", clock_ns, wire_time=False, **kwargs):
        super().__init__(dut, data_width, *args, prefix=prefix, **kwargs)
        retire(self.upstream_port)
        self.set_port(LeanPort(wire_time=wire_time))
        self.clock_ns = clock_ns
        p = self.port
        self.in_hdr, self.in_data, self.in_ndw = p("in_hdr"), p("in_data"), p("in_ndw")
        self.in_seq, self.in_ack, self.in_done = p("in_seq"), p("in_ack"), p("in_done")
        self.in_first, self.in_last = p("in_first"), p("in_last")
        self.out_hdr, self.out_data, self.out_ndw = p("out_hdr"), p("out_data"), p("out_ndw")
        self.out_seq, self.out_first, self.out_last = p("out_seq"), p("out_first"), p("out_last")
        self.out_overflow = p("out_overflow")
        self.raw, self.raw_payload = p("raw"), p("raw_rx__payload")
        self.raw_valid, self.raw_ready = p("raw_rx__valid"), p("raw_rx__ready")
        self.in_seq.value = 0
        self.raw.value = 0
        self.raw_valid.value = 0
        self.max_dw = len(self.in_data) // 32
        self._pending = deque()      # what waits for the shim: ("tlp", hdr, data, ndw, tlp) or
        self._more = Event()         # ("raw", beats)
        self._seq = 0                # TLPs written into the shim
        self._posted = deque()       # (Tlp, DWs) in the shim, oldest first
        self._done = 0               # TLPs the card has taken all of
        self._taken = Event()
        self._start(self._feed())
        self._start(self._watch_done())
        self._start(self._collect())

    # ---- host -> card -------------------------------------------------------------------------
    def send_tlp(self, tlp):
        data = tlp.get_data() if tlp.has_data() else b""
        if len(data) > 4 * self.max_dw:
            raise ValueError(f"a {len(data)}-byte TLP for the card: the shim carries at most "
                             f"{4 * self.max_dw}")
        hdr = int.from_bytes(bytes(tlp.pack_header()).ljust(16, b"\0")[:16], "big")
        self._queue(("tlp", hdr, int.from_bytes(data, "little"), len(data) // 4, tlp))

    def send_beats(self, beats, tlp=None):
        """Raw beats (ints) for the card's ``rx``, one at a time (malformed input: the fuzzing
        bench); they go in after every TLP queued before them."""
        self._queue(("raw", beats, tlp))

    def _queue(self, item):
        self.idle.clear()
        self._pending.append(item)
        self._more.set()

    async def _change(self, signal):
        """The next change of ``signal``, once every value of the clock edge that made it has
        settled (Icarus calls back while the edge's non-blocking assignments still land: the
        shim's other outputs may not hold their new values yet)."""
        await ValueChange(signal)
        await ReadWrite()

    async def _wait_port_free(self):
        """Wait until the shim has taken every TLP written, at a moment when writing the input
        ports cannot race a clock edge: after the edge that acknowledged the last TLP, or, when
        the port was already free, at the clock's falling edge. (A write woken by a timer can
        land in the time step of a rising edge; Icarus may then evaluate part of the shim's
        next state with the old inputs and part with the new, and take ``in_seq`` without the
        TLP.)"""
        if int(self.in_ack.value) == self._seq & 0xFF:
            await FallingEdge(self.clk)
            return
        while int(self.in_ack.value) != self._seq & 0xFF:
            await self._change(self.in_ack)

    async def _wait_all_taken(self):
        while self._done != self._seq:
            self._taken.clear()
            await self._taken.wait()

    def _beats(self, ndw):
        return max(1, -(-ndw // self.codec.dpb))

    async def _feed(self):
        while True:
            while not self._pending:
                self._more.clear()
                await self._more.wait()
            item = self._pending.popleft()
            if item[0] == "raw":
                await self._wait_all_taken()
                await self._raw(item[1], item[2])
                continue
            _, hdr, data, ndw, tlp = item
            await self._wait_port_free()
            self.in_hdr.value = hdr
            self.in_data.value = data
            self.in_ndw.value = ndw
            self._seq += 1
            self._posted.append((tlp, ndw))
            self.in_seq.value = self._seq & 0xFF

    async def _watch_done(self):
        """Count the TLPs the card has taken whole (the shim's ``in_done`` changes once per
        TLP): the counters, ``rx_hook``, credits and ``idle`` follow."""
        while True:
            await self._change(self.in_done)
            if self.dut.rst.value == 1:
                continue                 # (the card's reset: the shim's counters go back to 0)
            done = int(self.in_done.value)
            while self._done & 0xFF != done:
                if not self._posted:     # (what a bench before this one left in the shim)
                    self._done, self._seq = done, done
                    break
                self._done += 1
                tlp, ndw = self._posted.popleft()
                self.tlps_in += 1
                self.beats_in += self._beats(ndw)
                if self.rx_hook is not None:
                    now = get_sim_time("ns")
                    span = (int(self.in_last.value) - int(self.in_first.value)) * self.clock_ns
                    self.rx_hook(tlp, now - span, now)
                tlp.release_fc()
            self._taken.set()
            if self._done == self._seq and not self._pending:
                self.idle.set()

    async def _raw(self, beats, tlp):
        self.raw.value = 1
        await self._put_beats(beats, self.raw_payload, self.raw_valid, self.raw_ready)
        self.raw.value = 0
        self.beats_in += len(beats)
        self.tlps_in += 1
        if tlp is not None:
            tlp.release_fc()
        if not self._pending and self._done == self._seq:
            self.idle.set()

    # ---- card -> host -------------------------------------------------------------------------
    async def _collect(self):
        seq = int(self.out_seq.value)
        while True:
            await self._change(self.out_seq)
            s = int(self.out_seq.value)
            if self.dut.rst.value == 1:
                seq = s                  # (the card's reset: the shim's counters go back to 0)
                continue
            if s != (seq + 1) & 0xFF:
                raise AssertionError(f"TLP shim: {(s - seq) & 0xFF} TLPs from the card at once "
                                     f"(one read per TLP is the contract)")
            seq = s
            if self.out_overflow.value == 1:
                raise AssertionError(f"the card sent a TLP longer than the shim's {self.max_dw} DW")
            ndw = int(self.out_ndw.value)
            hdr = int(self.out_hdr.value).to_bytes(16, "big")
            payload = (int(self.out_data.value) & ((1 << (32 * ndw)) - 1)).to_bytes(4 * ndw,
                                                                                   "little")
            now = get_sim_time("ns")
            span = (int(self.out_last.value) - int(self.out_first.value)) * self.clock_ns
            self.beats_out += self._beats(ndw)
            self._from_card(hdr, payload, now - span, now)

