"""The TLP shim: gateware between Python and the card's TLP streams, in co-simulation builds only.

Python hands the simulator whole TLPs, not beats: the shim takes a TLP written in one go into
its input ports and streams its beats into the card's ``rx``, and gathers the beats the card
sends on ``tx`` into one TLP before it tells Python. Python then wakes once per TLP each way
instead of once per beat (a 512-byte completion is 64 beats at 64 bits). The card's own ports
and the synthesized design do not change: :class:`SimCard` puts the shim in front of an
unchanged :class:`hdl.card.Card`, and the generated top is another module (``offcard_sim``).

**Host to card.** Python writes ``in_hdr`` (the 128-bit header field of
:func:`hdl.pcie.tlp.TlpBeat`), ``in_data`` (the payload, first DW in bits [31:0]) and
``in_ndw``, then increments ``in_seq``. The shim copies the TLP into a holding register at the
next clock edge and says so on ``in_ack`` (= the ``in_seq`` taken; the input ports may then be
written again). Behind the holding register is the register that streams beats: a TLP moves up
when the one ahead of it gives its last beat, so TLPs enter the card back to back with no idle
clock as long as Python keeps one ahead. ``in_done`` counts the TLPs whose last beat the card
has taken; ``in_first`` / ``in_last`` are the cycles of the first and last beat of the last one.

**Card to host.** Every beat the card sends is taken at once (``tx.ready`` is high, as the old
bridge did). ``out_hdr``, ``out_data`` and ``out_ndw`` hold the TLP being gathered; when its
last beat arrives ``out_seq`` increments, in the cycle after that edge the ports hold the whole
TLP, and they keep it until the next TLP's first beat (at the earliest the next edge): Python
reads them on the change of ``out_seq``. ``out_first`` / ``out_last`` are the cycles of its
first and last beat; ``out_overflow`` sticks when a TLP carried more than ``max_dw`` DWs (its
excess is lost). ``cycle`` counts clock cycles from the start.

**Raw beats.** With ``raw`` set, the card's ``rx`` takes the beats of ``raw_rx`` instead (the
fuzzing bench sends malformed beat sequences that are not whole TLPs).
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from hdl.card import Card
from hdl.config import CardConfig
from hdl.iface import UplinkBeat
from hdl.mgmt.block import UtilLayout
from hdl.pcie.tlp import tlp_stream

__all__ = ["TlpShim", "SimCard", "MAX_DW"]

#: The longest TLP payload either way: the card's Max Payload Size Supported (512 bytes) bounds
#: what it sends and what a host sends it (the root complex's completions and writes).
MAX_DW = 128


class TlpShim(wiring.Component):
    def __init__(self, data_width, max_dw=MAX_DW):
        assert max_dw % (data_width // 32) == 0
        self.data_width = data_width
        self.max_dw = max_dw
        super().__init__({
            "in_hdr":   In(128),
            "in_data":  In(32 * max_dw),
            "in_ndw":   In(range(max_dw + 1)),
            "in_seq":   In(8),
            "in_ack":   Out(8),
            "in_done":  Out(8),
            "in_first": Out(32),
            "in_last":  Out(32),
            "out_hdr":  Out(128),
            "out_data": Out(32 * max_dw),
            "out_ndw":  Out(range(max_dw + 1)),
            "out_seq":  Out(8),
            "out_first": Out(32),
            "out_last": Out(32),
            "out_overflow": Out(1),
            "cycle":    Out(32),
            "raw":      In(1),
            "raw_rx":   In(tlp_stream(data_width)),
            "rx":       Out(tlp_stream(data_width)),     # to the card
            "tx":       In(tlp_stream(data_width)),      # from the card
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        DPB = W // 32
        MD = self.max_dw
        NB = MD // DPB                                   # beats of the longest TLP

        cycle = Signal(32, reset_less=True)
        m.d.sync += cycle.eq(cycle + 1)
        m.d.comb += self.cycle.eq(cycle)

        # ---- host -> card: input ports -> holding register -> streaming register ------------
        hold_valid = Signal()
        hold_hdr = Signal(128, reset_less=True)
        hold_data = Signal(32 * MD, reset_less=True)
        hold_ndw = Signal(range(MD + 1), reset_less=True)
        cur_valid = Signal()
        cur_hdr = Signal(128, reset_less=True)
        cur_data = Signal(32 * MD, reset_less=True)     # shifts down a beat at a time
        cur_left = Signal(range(MD + 1), reset_less=True)   # DWs still to send
        cur_first = Signal()                             # the next beat is the TLP's first
        taken = Signal(8)
        m.d.comb += self.in_ack.eq(taken)

        s = self.rx
        last = cur_left <= DPB
        moving = cur_valid & s.ready & ~self.raw
        end = moving & last                              # the streaming TLP's last beat
        cur_free = ~cur_valid | end
        m.d.comb += [
            s.p.hdr.eq(Mux(cur_first, cur_hdr, 0)),
            s.p.data.eq(cur_data[:W]),
            s.p.strb.eq(Mux(last, (C(1, DPB + 1) << cur_left) - 1, (1 << DPB) - 1)),
            s.p.sop.eq(cur_first),
            s.p.eop.eq(last),
        ]
        with m.If(self.raw):
            m.d.comb += [s.p.eq(self.raw_rx.p), s.valid.eq(self.raw_rx.valid),
                         self.raw_rx.ready.eq(s.ready)]
        with m.Else():
            m.d.comb += s.valid.eq(cur_valid)
        with m.If(moving):
            m.d.sync += [cur_data.eq(cur_data >> W), cur_left.eq(cur_left - DPB),
                         cur_first.eq(0)]
        # the holding register moves up when the streaming one is free (or frees this cycle)
        with m.If(hold_valid & cur_free):
            m.d.sync += [cur_valid.eq(1), cur_hdr.eq(hold_hdr), cur_data.eq(hold_data),
                         cur_left.eq(hold_ndw), cur_first.eq(1), hold_valid.eq(0)]
        with m.Elif(end):
            m.d.sync += cur_valid.eq(0)
        # a new TLP from Python into the holding register when it is free (or frees now)
        with m.If((self.in_seq != taken) & (~hold_valid | cur_free)):
            m.d.sync += [hold_valid.eq(1), hold_hdr.eq(self.in_hdr), hold_data.eq(self.in_data),
                         hold_ndw.eq(self.in_ndw), taken.eq(self.in_seq)]
        # the TLPs the card has taken, and when
        done = Signal(8)
        m.d.comb += self.in_done.eq(done)
        with m.If(moving & cur_first):
            m.d.sync += self.in_first.eq(cycle)
        with m.If(end):
            m.d.sync += [done.eq(done + 1), self.in_last.eq(cycle)]

        # ---- card -> host: gather the beats of one TLP ----------------------------------------
        t = self.tx
        m.d.comb += t.ready.eq(1)
        beat = Signal(range(NB + 1))
        got = Signal(range(MD + DPB + 1))
        nstrb = sum(t.p.strb[j] for j in range(DPB))
        with m.If(t.valid):
            k = Mux(t.p.sop, 0, beat)
            with m.If(t.p.sop):
                m.d.sync += [self.out_hdr.eq(t.p.hdr), self.out_first.eq(cycle)]
            with m.If(k < NB):
                m.d.sync += self.out_data.word_select(k, W).eq(t.p.data)
            with m.Else():
                m.d.sync += self.out_overflow.eq(1)
            n = Mux(t.p.sop, 0, got) + nstrb
            m.d.sync += [beat.eq(k + 1), got.eq(n)]
            with m.If(t.p.eop):
                m.d.sync += [self.out_ndw.eq(Mux(n > MD, MD, n)), self.out_seq.eq(self.out_seq + 1),
                             self.out_last.eq(cycle)]
        return m


class SimCard(wiring.Component):
    """The card with the TLP shim in front of its TLP streams: the top of co-simulation builds
    (``offcard_sim``). Every other port of the card passes through under its own name."""

    def __init__(self, cfg: CardConfig = CardConfig(), max_dw=MAX_DW):
        self.cfg = cfg
        self.max_dw = max_dw
        W = cfg.data_width
        shim = TlpShim(W, max_dw)
        members = {name: (In if m.flow == wiring.In else Out)(m.shape)
                   for name, m in shim.signature.members.items() if m.is_port}
        members.update({
            "raw_rx": In(tlp_stream(W)),
            "uplink_tx": Out(stream.Signature(UplinkBeat(W))),
            "uplink_rx": In(stream.Signature(UplinkBeat(W))),
            "util": In(UtilLayout),
            "uart_rxd": In(1, init=1),
            "uart_txd": Out(1, init=1),
        })
        self._shim = shim
        super().__init__(members)

    def elaborate(self, platform):
        m = Module()
        m.submodules.shim = shim = self._shim
        m.submodules.card = card = Card(self.cfg)
        wiring.connect(m, shim.rx, card.rx)
        wiring.connect(m, card.tx, shim.tx)
        for name, member in shim.signature.members.items():
            if name in ("rx", "tx"):
                continue
            if member.is_signature:
                if member.flow == wiring.In:
                    wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(shim, name))
                else:
                    wiring.connect(m, getattr(shim, name), wiring.flipped(getattr(self, name)))
            elif member.flow == wiring.In:
                m.d.comb += getattr(shim, name).eq(getattr(self, name))
            else:
                m.d.comb += getattr(self, name).eq(getattr(shim, name))
        wiring.connect(m, card.uplink_tx, wiring.flipped(self.uplink_tx))
        wiring.connect(m, wiring.flipped(self.uplink_rx), card.uplink_rx)
        m.d.comb += [card.util.eq(self.util), card.uart_rxd.eq(self.uart_rxd),
                     self.uart_txd.eq(card.uart_txd)]
        return m
