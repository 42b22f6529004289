"""Checksum offload of the virtio-net switch: ``VIRTIO_NET_F_CSUM`` and ``VIRTIO_NET_F_GUEST_CSUM``.

The engine holds one frame at a time in a frame buffer slot (:class:`hdl.memmap.PacketBuf`), its
Ethernet header on a word boundary. :class:`ChecksumUnit` watches every write into the frame
buffers (``snoop``) and keeps the 16-bit ones' complement sum of the frame's bytes as they land,
in whatever order and with whatever byte enables the DMA read channel or the uplink writes them;
it also catches the transmitted frame's ``virtio_net_hdr`` (flags, ``csum_start``,
``csum_offset``) as it lands before the frame. When the frame is complete the engine starts one
short pass (``start``) over the frame's first words, which needs the frame buffer ports
(``rd`` / ``wr``) for a few clocks, never the whole frame:

* **fill** (the sender negotiated ``VIRTIO_NET_F_CSUM`` and set ``NEEDS_CSUM``): the sum from
  ``csum_start`` to the end of the frame is the whole frame's sum less the bytes before
  ``csum_start``; its complement (0 sent as 0xFFFF) is written big-endian at ``csum_start +
  csum_offset``, over the pseudo-header sum the driver put there (virtio 1.2, 5.1.6.2). Offsets
  that put the field outside the frame set ``bad_offsets`` (the engine drops the frame);
* **check** (the receiver negotiated ``VIRTIO_NET_F_GUEST_CSUM``): a TCP or UDP segment in an
  unfragmented IPv4 or IPv6 packet (no IPv6 extension headers, no VLAN tag) whose IP length
  fills the frame exactly is checked against the pseudo-header; ``l4`` says the frame was one,
  ``valid`` that its checksum holds (the engine then sets ``DATA_VALID`` in the receive header).
  Anything else is left for the driver to check (never a false ``valid``).

A frame that is neither IPv4 nor IPv6 and needs no fill ends the pass as soon as its EtherType is
read. Sums are kept as plain integers (a byte at an even offset of the frame weighs 256, at an
odd one 1) and folded only at the end: the sum from an odd ``csum_start`` is the folded sum
rotated by a byte.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..iface import PktReadPort, PktWritePort
from ..memmap import PacketBuf as P

__all__ = ["ChecksumUnit", "NEEDS_CSUM", "DATA_VALID", "HEAD_BYTES"]

NEEDS_CSUM, DATA_VALID = 1, 2          # virtio_net_hdr.flags
HEAD_BYTES = 14 + 60 + 6               # Ethernet + the longest IPv4 header, and IPv6's addresses
ETH_IPV4, ETH_IPV6 = 0x0800, 0x86DD
TCP, UDP = 6, 17
ACC_BITS = 28                          # a slot's bytes weighted 256 at most: < 2^27


def fold(m, x, name):
    """``x`` (a plain sum) folded to 16 bits: ones' complement addition of its 16-bit halves."""
    y = Signal(17, name=f"{name}_y")
    z = Signal(16, name=f"{name}_z")
    m.d.comb += [y.eq(x[:16] + x[16:]), z.eq(y[:16] + y[16])]
    return z


class ChecksumUnit(wiring.Component):
    """Ports:

    * ``snoop``: every write into the frame buffers (:class:`hdl.dma.memory.CardMemoryMap`);
    * ``clear``: a new frame starts (its sum back to 0);
    * ``start`` with ``slot``, ``length`` (the frame's bytes), ``fill`` (the sender negotiated
      CSUM) and ``check`` (the receiver negotiated GUEST_CSUM): one pass; ``busy`` until it is
      over, the results held until the next ``start``;
    * ``rd`` / ``wr``: the frame buffer ports, driven while ``busy`` (the engine lends them).
    """

    def __init__(self, data_width):
        self._w = data_width
        super().__init__({
            "snoop":   In(PktWritePort(data_width)),
            "clear":   In(1),
            "start":   In(1),
            "slot":    In(1),
            "length":  In(16),
            "fill":    In(1),
            "check":   In(1),
            "busy":    Out(1),
            "filled":  Out(1),          # a checksum was written into the frame
            "bad_offsets": Out(1),      # NEEDS_CSUM with the field outside the frame
            "l4":      Out(1),          # a TCP / UDP segment the check could judge
            "valid":   Out(1),          # ... and its checksum holds
            "rd":      Out(PktReadPort(data_width)),
            "wr":      Out(PktWritePort(data_width)),
        })

    def elaborate(self, platform):
        m = Module()
        W = self._w
        WB = W // 8
        LB = exact_log2(WB)
        SW = P.SLOT // WB                              # words per slot
        HDR_OFF = (-P.NET_HDR) % WB
        FRAME_OFF = HDR_OFF + P.NET_HDR
        F0 = FRAME_OFF // WB                           # the frame's first word in a slot
        HEAD_WORDS = (HEAD_BYTES + WB - 1) // WB

        def weighted(data, keep):
            """The plain sum of a word's enabled bytes, 256 for an even lane, 1 for an odd."""
            return sum(Mux(keep[l], data.word_select(l, 8), 0) << (8 if l % 2 == 0 else 0)
                       for l in range(WB))

        # ---- the running sum of the frame, from every write into a slot's frame words -------
        sn = self.snoop
        sn_q = Signal.like(sn.data)
        sn_en = Signal(WB)
        sn_word = Signal(range(SW))
        sn_hdr = Signal()                  # the write was into slot 0's header words
        m.d.sync += [sn_q.eq(sn.data), sn_word.eq(sn.addr[:exact_log2(SW)]), sn_hdr.eq(0),
                     sn_en.eq(0)]
        with m.If(sn.addr[:exact_log2(SW)] >= F0):
            m.d.sync += sn_en.eq(sn.en)
        with m.Elif(sn.addr < F0):
            m.d.sync += [sn_hdr.eq(1), sn_en.eq(sn.en)]
        acc = Signal(ACC_BITS)
        corr = Signal(16)                  # the field's old value, taken out of the sum once
        corr_en = Signal()
        with m.If(self.clear):
            m.d.sync += acc.eq(0)
        with m.Else():
            m.d.sync += acc.eq(acc + Mux(sn_hdr, 0, weighted(sn_q, sn_en))
                               - Mux(corr_en, corr, 0))

        # the transmitted frame's virtio_net_hdr, caught as it lands (slot 0's header words)
        flags = Signal(8)
        cs = Signal(16)
        co = Signal(16)
        for name, sig, off in (("flags", flags, 0), ("cs", cs, 6), ("co", co, 8)):
            for i in range(len(sig) // 8):
                b = HDR_OFF + off + i
                with m.If(sn_hdr & (sn_word == b // WB) & sn_en[b % WB]):
                    m.d.sync += sig.word_select(i, 8).eq(sn_q.word_select(b % WB, 8))

        # ---- the pass over the frame's first words -------------------------------------------
        length = Signal(16)
        slot = Signal()
        do_fill = Signal()
        do_check = Signal()
        f_at = Signal(17)                   # the checksum field's offset in the frame
        m.d.comb += f_at.eq(cs + co)
        k = Signal(range(SW + 1))            # next word to read
        j = Signal(range(SW + 1))            # word whose data is on ``rd.data``
        dv = Signal()                        # ``rd.data`` holds word ``j``
        last = Signal(range(SW + 1))         # the last word the pass needs
        # what the words read give
        etype = Signal(16)
        vihl = Signal(8)
        ip4_len = Signal(16)
        ip6_len = Signal(16)
        frag = Signal(16)
        ip6_nh = Signal(8)
        ip4_proto = Signal(8)
        pre_l4 = Signal(ACC_BITS)            # bytes before the L4 header
        pre_cs = Signal(ACC_BITS)            # bytes before csum_start
        addr4 = Signal(20)                   # the IPv4 / IPv6 addresses, as pseudo-header words
        addr6 = Signal(22)
        old = Signal(16)                     # the checksum field as the driver left it
        is4 = (etype == ETH_IPV4) & (vihl[4:] == 4) & (vihl[:4] >= 5)
        is6 = (etype == ETH_IPV6) & (vihl[4:] == 6)
        l4_at = Signal(8)
        m.d.comb += l4_at.eq(Mux(is6, 54, 14 + (vihl[:4] << 2)))
        fields = ((etype, 12), (vihl, 14), (ip4_len, 16), (ip6_len, 18), (frag, 20),
                  (ip6_nh, 20), (ip4_proto, 23))

        rd, wr = self.rd, self.wr
        slot_base = Mux(slot, SW, 0) + F0
        m.d.comb += rd.addr.eq(slot_base + k)

        with m.FSM(name="pass") as fsm:
            m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
            with m.State("IDLE"):
                with m.If(self.start):
                    m.d.sync += [slot.eq(self.slot), length.eq(self.length),
                                 do_fill.eq(self.fill), do_check.eq(self.check), k.eq(0),
                                 dv.eq(0), self.filled.eq(0), self.bad_offsets.eq(0),
                                 self.l4.eq(0), self.valid.eq(0), pre_l4.eq(0), pre_cs.eq(0),
                                 addr4.eq(0), addr6.eq(0), etype.eq(0), vihl.eq(0)]
                    m.next = "BEGIN"
            with m.State("BEGIN"):
                # (a clock after ``start``: the header's last bytes have reached cs / co)
                fill = do_fill & flags[0]
                m.d.sync += [do_fill.eq(fill),
                             last.eq(Mux(fill & ((f_at + 1) >> LB > HEAD_WORDS - 1),
                                         (f_at + 1) >> LB, HEAD_WORDS - 1))]
                with m.If(fill & (f_at + 2 > length)):
                    m.d.sync += self.bad_offsets.eq(1)
                    m.next = "IDLE"
                with m.Elif(fill | do_check):
                    m.next = "READ"
                with m.Else():
                    m.next = "IDLE"
            with m.State("READ"):
                # read word ``k`` while looking at word ``j`` (read a clock ago)
                m.d.comb += rd.en.eq(1)
                m.d.sync += [k.eq(k + 1), j.eq(k), dv.eq(1)]
                with m.If(dv):
                    d = rd.data
                    keep_l4, keep_cs, keep4, keep6 = (Signal(WB, name=n) for n in
                                                      ("keep_l4", "keep_cs", "keep4", "keep6"))
                    for lane in range(WB):
                        b = Signal(17, name=f"b{lane}")
                        m.d.comb += [b.eq((j << LB) | lane),
                                     keep_l4[lane].eq(((b < 16) | (b < l4_at)) & (b < length)),
                                     keep_cs[lane].eq((b < cs) & (b < length)),
                                     keep4[lane].eq((b >= 26) & (b < 34)),
                                     keep6[lane].eq((b >= 22) & (b < 54))]
                    m.d.sync += [pre_l4.eq(pre_l4 + weighted(d, keep_l4)),
                                 pre_cs.eq(pre_cs + weighted(d, keep_cs)),
                                 addr4.eq(addr4 + weighted(d, keep4)),
                                 addr6.eq(addr6 + weighted(d, keep6))]
                    for sig, off in fields:
                        for i in range(len(sig) // 8):
                            b = off + i
                            with m.If(j == b // WB):
                                m.d.sync += sig.word_select(len(sig) // 8 - 1 - i, 8).eq(
                                    d.word_select(b % WB, 8))
                    for i in range(2):
                        with m.If(j == (f_at + i) >> LB):
                            m.d.sync += old.word_select(1 - i, 8).eq(
                                d.word_select((f_at + i)[:LB], 8))
                    # a frame that is no IP packet needs no more words unless it is filled
                    et_seen = j > 13 // WB
                    with m.If((j == last) | (et_seen & ~do_fill & ~(is4 | is6))):
                        m.d.comb += rd.en.eq(0)
                        m.next = "SUM"
            # -- fill: the complement of the sum from csum_start, big-endian at the field --
            fsum = fold(m, acc - pre_cs, "fill")
            rot = Mux(cs[0], Cat(fsum[8:], fsum[:8]), fsum)
            value = Signal(16)
            m.d.comb += value.eq(~rot)
            fill_value = Signal(16)
            with m.State("SUM"):
                m.d.sync += fill_value.eq(Mux(value == 0, 0xFFFF, value))
                with m.If(do_fill):
                    m.next = "FILL_HI"
                with m.Else():
                    m.next = "CHECK"
            # the old value's share of the sum, by the parity of the field's offset
            old_w = Mux(f_at[0], Cat(old[8:], old[:8]), old)
            for i, (state, nxt) in enumerate((("FILL_HI", "FILL_LO"), ("FILL_LO", "SETTLE0"))):
                with m.State(state):
                    at = Signal(17, name=f"fill_at{i}")
                    m.d.comb += [at.eq(f_at + i),
                                 wr.addr.eq(slot_base + (at >> LB)),
                                 wr.en.eq(1 << at[:LB]),
                                 wr.data.eq(Mux(i == 0, fill_value[8:],
                                                fill_value[:8]).replicate(WB))]
                    if i == 0:
                        m.d.comb += [corr.eq(old_w), corr_en.eq(1)]
                    m.next = nxt
            # the field's new bytes reach the sum through the snoop two clocks later
            with m.State("SETTLE0"):
                m.next = "SETTLE1"
            with m.State("SETTLE1"):
                m.d.sync += self.filled.eq(1)
                m.next = "CHECK"
            # -- check: the L4 checksum against the pseudo-header --
            with m.State("CHECK"):
                proto = Mux(is6, ip6_nh, ip4_proto)
                l4_len = Signal(16)
                m.d.comb += l4_len.eq(length - l4_at)
                ip_end = Mux(is6, 54 + ip6_len, 14 + ip4_len)[:17]
                eligible = (((is4 & (frag[:14] == 0)) | is6)
                            & ((proto == TCP) | (proto == UDP))
                            & (ip_end == length)
                            & (length >= l4_at + Mux(proto == TCP, 20, 8)))
                total = Signal(ACC_BITS + 1)
                m.d.comb += total.eq(acc - pre_l4 + Mux(is6, addr6, addr4) + proto + l4_len)
                ok = fold(m, total, "check") == 0xFFFF
                m.d.sync += [self.l4.eq(do_check & eligible),
                             self.valid.eq(do_check & eligible & ok)]
                m.next = "IDLE"
        return m
