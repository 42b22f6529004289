"""The virtio-pci modern transport of every function (PF and VFs): common configuration,
notifications, ISR status and the virtio-net device configuration, in BAR0 at
:class:`regmap.VirtioRegs` (the vendor capabilities that point there are in
:mod:`hdl.pcie.config_space`).

Per function: feature negotiation (the device offers ``VirtioRegs.FEATURES``; FEATURES_OK only
sticks when the driver's features are a subset that includes VERSION_1), the device status
handshake (writing 0 resets the function's virtio state, once the queue engine holds no frame
of the function: until then status reads as before and the function is not live; NEEDS_RESET
is set by the device and raises a configuration-change interrupt), and two queues (receiveq1,
transmitq1) with size (power of two, at most 256), MSI-X vector (NO_VECTOR when the vector does
not exist), enable and the three ring addresses. Queue fields of a queue that does not exist
read 0 and ignore writes.

The queue engine reads the queue state through ``qr_*`` (combinational) and the ring addresses
through ``qa_*`` (block RAM, data a cycle after the address); it sees notifications as
``kick`` bits (one per function and queue) that it acknowledges, and it reports through
``isr_set`` (a queue interrupt was sent) and ``nr_set`` (the device needs a reset).
Register accesses honour byte enables, so 8-, 16- and 32-bit accesses all work.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import VirtioRegs as V

from ..config import CardConfig
from ..iface import RegBusSignature, IrqRequestSignature, FunctionStateSignature
from ..pcie.regfile import RegisterFile
from .mac_table import MacShowSignature

__all__ = ["VirtioPci", "NQ", "OFFERED", "VirtqSignature"]

NQ = V.NUM_QUEUES_VALUE
# the feature bits the device offers; each function keeps one accepted-flag per offer
OFFERED = (V.F_NET_CSUM, V.F_NET_GUEST_CSUM, V.F_NET_MAC, V.F_NET_MRG_RXBUF, V.F_NET_STATUS,
           V.F_RING_INDIRECT_DESC, V.F_RING_EVENT_IDX, V.F_VERSION_1)


def _dw(off):
    return off // 4


def VirtqSignature(num_functions):
    """What the virtqueue engine needs of the transport (the engine's side): the current
    queue's state (``qr_*``, combinational) and ring addresses (``qa_*``, block RAM: data a
    cycle after the address), what each function negotiated, the notifications (``kick``, one
    bit per function and queue, which the engine acknowledges), the engine's reports (a queue
    interrupt sent: ``isr_*``; the device needs a reset: ``nr_*``) and the transport's virtio
    reset of a function (``vreset``)."""
    nf = num_functions
    return wiring.Signature({
        "qr_fidx":  Out(8),
        "qr_q":     Out(range(NQ)),
        "qr_size":  In(9),
        "qr_vec":   In(16),
        "qr_en":    In(1),
        "qa_fidx":  Out(8),
        "qa_q":     Out(range(NQ)),
        "qa_sel":   Out(2),         # 0 descriptor table, 1 driver (avail), 2 device (used)
        "qa_data":  In(64),         # a cycle after the address
        "live":     In(nf),         # DRIVER_OK and FEATURES_OK, no NEEDS_RESET / FAILED
        "ev_idx":   In(nf),         # VIRTIO_F_EVENT_IDX negotiated
        "indirect": In(nf),         # VIRTIO_F_INDIRECT_DESC negotiated
        "mrg":      In(nf),         # VIRTIO_NET_F_MRG_RXBUF negotiated
        "csum":     In(nf),         # VIRTIO_NET_F_CSUM negotiated (the device fills checksums)
        "gcsum":    In(nf),         # VIRTIO_NET_F_GUEST_CSUM negotiated (DATA_VALID given)
        "kick":     In(nf * NQ),    # notified, not yet acknowledged; bit = fidx * NQ + q
        "kick_ack": Out(1),
        "kick_idx": Out(range(nf * NQ)),
        "isr_set":  Out(1),         # a queue interrupt was sent for ``isr_fidx``
        "isr_fidx": Out(8),
        "nr_set":   Out(1),         # function ``nr_fidx`` is broken: NEEDS_RESET
        "nr_fidx":  Out(8),
        "vreset":   In(1),          # strobe: function ``vreset_fidx``'s virtio state reset
        "vreset_fidx": In(8),
        "holds":    Out(nf),        # functions whose work the engine holds (a frame under way)
    })


class VirtioPci(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        nf = cfg.num_functions
        super().__init__({
            "bus":      In(RegBusSignature()),
            "engine":   In(VirtqSignature(nf)),     # the virtqueue engine
            "mac":      Out(MacShowSignature()),    # the station table's address of a function
            "irq":      Out(IrqRequestSignature()),   # configuration change interrupts
            "fn":       In(FunctionStateSignature(nf)),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        nvec = cfg.msix_vectors
        b = self.bus
        nqt = nf * NQ

        status = Array(Signal(8, name=f"vstatus{i}") for i in range(nf))
        dfsel = Array(Signal(32, name=f"dfsel{i}") for i in range(nf))
        gfsel = Array(Signal(32, name=f"gfsel{i}") for i in range(nf))
        gf = Array(Signal(len(OFFERED), name=f"gf{i}") for i in range(nf))   # accepted offers
        # the driver wrote a feature bit the device did not offer: per select 0 / 1 (a later
        # write of the same word can take it back) and sticky for the words above
        gf_bad = Signal(nf * 3)
        cfgvec = Array(Signal(16, name=f"cfgvec{i}", init=V.NO_VECTOR) for i in range(nf))
        qsel = Array(Signal(16, name=f"qsel{i}") for i in range(nf))
        # per function: queue_select names an existing queue (kept with qsel, so the write
        # path decodes one bit per function instead of comparing a selected 16-bit value)
        qok = Signal(nf, init=(1 << nf) - 1)
        isr = Signal(nf * 2)         # bit 0 queue, bit 1 config change, per function
        qsize = Array(Signal(9, name=f"qsize{i}", init=V.QUEUE_SIZE_MAX) for i in range(nqt))
        qvec = Array(Signal(16, name=f"qvec{i}", init=V.NO_VECTOR) for i in range(nqt))
        qen = Signal(nqt)
        kick = Signal(nqt)

        # ring addresses: entry (fidx * NQ + q) * 4 + {0 desc, 1 driver, 2 device}
        m.submodules.addr = amem = Memory(shape=64, depth=nqt * 4, init=[])
        aw = amem.write_port(granularity=32)
        ar_bus = amem.read_port()
        ar_eng = amem.read_port()

        def offered_bit(sel, word):
            """The driver-feature word ``word`` under select ``sel`` as the vector of accepted
            offers, and whether it sets any bit the device did not offer."""
            bits = []
            for k, fbit in enumerate(OFFERED):
                hit = (sel == fbit // 32)
                bits.append(hit & word[fbit % 32])
            mask_lo = sum(1 << (f % 32) for f in OFFERED if f < 32)
            mask_hi = sum(1 << (f % 32) for f in OFFERED if f >= 32)
            bad = Mux(sel == 0, (word & ~mask_lo) != 0,
                      Mux(sel == 1, (word & ~mask_hi) != 0, word != 0))
            return Cat(*bits), bad

        def feature_word(sel, accepted):
            """Read-back of the driver-feature word under select ``sel``."""
            w = 0
            for k, fbit in enumerate(OFFERED):
                w = w | Mux(sel == fbit // 32, accepted[k] << (fbit % 32), 0)
            return w

        offered_lo = V.FEATURES & 0xFFFF_FFFF
        offered_hi = V.FEATURES >> 32

        # ---- resets ------------------------------------------------------------------------
        # A driver's reset (status 0) waits while the engine holds a frame of the function:
        # meanwhile the function is not live (the engine takes no new work for it) and its
        # registers, status included, read as before; the reset is done, and status reads 0,
        # once the engine has let it go, so nothing is written for the function after the
        # driver has seen its reset complete (virtio 1.2, 4.1.4.3.2).
        rst = Signal()
        rst_f = Signal(8)
        rst_pend = Signal(nf)              # resets waiting for the engine
        wr_rst = Signal()                  # the driver of function ``b.fidx`` writes status 0
        m.d.comb += [self.engine.vreset.eq(rst), self.engine.vreset_fidx.eq(rst_f)]
        ready = Signal(nf)
        m.d.comb += ready.eq(rst_pend & ~self.engine.holds)
        at_once = wr_rst & ~self.engine.holds.bit_select(b.fidx, 1) & ~self.fn.flr
        with m.If(at_once):
            m.d.comb += [rst.eq(1), rst_f.eq(b.fidx)]
        with m.Elif(~self.fn.flr):
            for g in reversed(range(nf)):          # the lowest function first
                with m.If(ready[g]):
                    m.d.comb += [rst.eq(1), rst_f.eq(g)]
        with m.If(rst):
            m.d.sync += rst_pend.bit_select(rst_f, 1).eq(0)
        with m.If(wr_rst & ~at_once):
            m.d.sync += rst_pend.bit_select(b.fidx, 1).eq(1)

        def reset_function(g):
            stm = [status[g].eq(0), gf[g].eq(0), gf_bad.word_select(g, 3).eq(0),
                   cfgvec[g].eq(V.NO_VECTOR), qsel[g].eq(0), qok.bit_select(g, 1).eq(1),
                   dfsel[g].eq(0), gfsel[g].eq(0),
                   isr.word_select(g, 2).eq(0)]
            for q in range(NQ):
                stm += [qsize[g * NQ + q].eq(V.QUEUE_SIZE_MAX), qvec[g * NQ + q].eq(V.NO_VECTOR),
                        qen.bit_select(g * NQ + q, 1).eq(0), kick.bit_select(g * NQ + q, 1).eq(0)]
            return stm

        # ---- register writes ----------------------------------------------------------------
        f = b.fidx
        a = b.addr
        base = _dw(V.COMMON)
        rf = RegisterFile(m, b, "virtio_common", "virtio_notify", "virtio_isr", "virtio_device")
        in_common = rf.within("virtio_common")
        in_notify = rf.within("virtio_notify")
        in_isr = rf.within("virtio_isr")
        fok = f < nf
        cur_q = Signal(range(nqt))
        m.d.comb += cur_q.eq(f * NQ + qsel[f][:exact_log2(NQ)] if NQ > 1 else f)
        q_ok = qok.bit_select(f, 1)
        wd = b.wdata
        be = b.be

        def size_ok(v):
            """``v`` is a power of two no larger than QUEUE_SIZE_MAX: one bit set, compared
            bit by bit (no carry chain on the register write path)."""
            nb = exact_log2(V.QUEUE_SIZE_MAX) + 1
            return (v[nb:] == 0) & Cat(*(v[:nb] == (1 << i) for i in range(nb))).any()

        def lanes(old, lo_byte, nbytes):
            """``old`` (a field of ``nbytes`` at byte ``lo_byte`` of the DW) with the written
            lanes replaced."""
            parts = []
            for k in range(nbytes):
                lane = lo_byte + k
                parts.append(Mux(be[lane], wd[8 * lane:8 * lane + 8], old[8 * k:8 * k + 8]))
            return Cat(*parts)

        acc, bad = offered_bit(gfsel[f], wd)
        aoff = Signal(3)             # DW index within the three 64-bit addresses
        m.d.comb += [aoff.eq(a - base - _dw(V.Q_DESC)),
                     aw.addr.eq(cur_q * 4 + aoff[1:]), aw.data.eq(Cat(wd, wd))]
        with m.If(b.we & fok & in_common):
            with m.Switch(a - base):
                with m.Case(_dw(V.DFSELECT)):
                    m.d.sync += dfsel[f].eq(lanes(dfsel[f], 0, 4))
                with m.Case(_dw(V.GFSELECT)):
                    m.d.sync += gfsel[f].eq(lanes(gfsel[f], 0, 4))
                with m.Case(_dw(V.GF)):
                    with m.If(~status[f][3] & (be == 0xF)):          # not after FEATURES_OK
                        for k, fbit in enumerate(OFFERED):
                            with m.If(gfsel[f] == fbit // 32):
                                m.d.sync += gf[f][k].eq(acc[k])
                        with m.If(gfsel[f] < 2):
                            m.d.sync += gf_bad.bit_select(f * 3 + gfsel[f][0], 1).eq(bad)
                        with m.Elif(bad):
                            m.d.sync += gf_bad.bit_select(f * 3 + 2, 1).eq(1)
                with m.Case(_dw(V.MSIX_CONFIG)):
                    with m.If(be[0] | be[1]):
                        v = lanes(cfgvec[f], 0, 2)
                        m.d.sync += cfgvec[f].eq(Mux(v < nvec, v, V.NO_VECTOR))
                with m.Case(_dw(V.STATUS)):
                    with m.If(be[0]):
                        with m.If(wd[:8] == 0):
                            m.d.comb += wr_rst.eq(1)
                        with m.Else():
                            # FEATURES_OK sticks only for a valid feature set
                            ok = (gf_bad.word_select(f, 3) == 0) & gf[f][OFFERED.index(V.F_VERSION_1)]
                            fo = wd[3] & (ok | status[f][3])
                            m.d.sync += status[f].eq(Cat(wd[:3], fo, wd[4:6],
                                                         status[f][6] | wd[6], wd[7]))
                    with m.If(be[2] | be[3]):
                        v = lanes(qsel[f], 2, 2)
                        m.d.sync += [qsel[f].eq(v), qok.bit_select(f, 1).eq(v < NQ)]
                with m.Case(_dw(V.Q_SIZE)):
                    with m.If(q_ok & (be[0] | be[1])):
                        v = lanes(qsize[cur_q], 0, 2)
                        pow2 = size_ok(v)
                        with m.If(pow2 & ~qen.bit_select(cur_q, 1)):
                            m.d.sync += qsize[cur_q].eq(v)
                    with m.If(q_ok & (be[2] | be[3])):
                        v = lanes(qvec[cur_q], 2, 2)
                        m.d.sync += qvec[cur_q].eq(Mux(v < nvec, v, V.NO_VECTOR))
                with m.Case(_dw(V.Q_ENABLE)):
                    with m.If(q_ok & be[0]):
                        with m.If(wd[0]):                  # only 1 may be written (spec 4.1.4.3)
                            m.d.sync += qen.bit_select(cur_q, 1).eq(1)
                for k in range(6):
                    with m.Case(_dw(V.Q_DESC) + k):
                        with m.If(q_ok & (be == 0xF) & ~qen.bit_select(cur_q, 1)):
                            m.d.comb += aw.en.eq(Mux(aoff[0], 0b10, 0b01))
        with m.If(b.we & fok & in_notify):
            qn = a - _dw(V.NOTIFY)
            with m.If(qn < NQ):
                m.d.sync += kick.bit_select(f * NQ + qn[:max(exact_log2(NQ), 1)], 1).eq(1)

        # ---- register reads -----------------------------------------------------------------
        m.d.comb += [ar_bus.addr.eq(cur_q * 4 + aoff[1:]), ar_bus.en.eq(b.re)]
        m.d.comb += self.mac.fidx.eq(f)

        def common(off, value):
            rf.read(fok & rf.addressed(V.COMMON + off), value)

        common(V.DFSELECT, dfsel[f])
        common(V.DF, Mux(dfsel[f] == 0, offered_lo, Mux(dfsel[f] == 1, offered_hi, 0)))
        common(V.GFSELECT, gfsel[f])
        common(V.GF, feature_word(gfsel[f], gf[f]))
        common(V.MSIX_CONFIG, Cat(cfgvec[f], C(NQ, 16)))
        common(V.STATUS, Cat(status[f], C(0, 8), qsel[f]))
        common(V.Q_SIZE, Mux(q_ok, Cat(qsize[cur_q], C(0, 7), qvec[cur_q]), 0))
        common(V.Q_ENABLE, Mux(q_ok, Cat(qen.bit_select(cur_q, 1), C(0, 15), qsel[f]), 0))
        # the ring addresses come from their block RAM, a cycle later
        in_addr = fok & q_ok & in_common & (a - base >= _dw(V.Q_DESC)) \
            & (a - base < _dw(V.Q_DESC) + 6)
        rsel_hi = Signal()
        with m.If(b.re):
            m.d.sync += rsel_hi.eq(aoff[0])
        rf.read_late(in_addr, Mux(rsel_hi, ar_bus.data[32:], ar_bus.data[:32]))
        rf.read(fok & in_isr, isr.word_select(f, 2))
        rf.read(fok & rf.addressed(V.DEVICE + V.NET_MAC), self.mac.mac[:32])
        rf.read(fok & rf.addressed(V.DEVICE + 4), Cat(self.mac.mac[32:], C(1, 16)))    # link up
        rf.read(fok & rf.addressed(V.DEVICE + V.NET_MAX_PAIRS), 1)                  # 1 pair
        rf.finish()

        # ---- engine side --------------------------------------------------------------------
        eq_idx = Signal(range(nqt))
        m.d.comb += [
            eq_idx.eq(self.engine.qr_fidx * NQ + self.engine.qr_q),
            self.engine.qr_size.eq(qsize[eq_idx]),
            self.engine.qr_vec.eq(qvec[eq_idx]),
            self.engine.qr_en.eq(qen.bit_select(eq_idx, 1)),
            ar_eng.addr.eq((self.engine.qa_fidx * NQ + self.engine.qa_q) * 4 + self.engine.qa_sel),
            ar_eng.en.eq(1),
            self.engine.qa_data.eq(ar_eng.data),
            self.engine.kick.eq(kick),
        ]
        for g in range(nf):
            base_st = status[g]
            m.d.comb += [
                self.engine.live[g].eq(base_st[2] & base_st[3] & ~base_st[6] & ~base_st[7]
                                       & ~rst_pend[g]),
                self.engine.ev_idx[g].eq(gf[g][OFFERED.index(V.F_RING_EVENT_IDX)]),
                self.engine.indirect[g].eq(gf[g][OFFERED.index(V.F_RING_INDIRECT_DESC)]),
                self.engine.mrg[g].eq(gf[g][OFFERED.index(V.F_NET_MRG_RXBUF)]),
                self.engine.csum[g].eq(gf[g][OFFERED.index(V.F_NET_CSUM)]),
                self.engine.gcsum[g].eq(gf[g][OFFERED.index(V.F_NET_GUEST_CSUM)]),
            ]
        with m.If(self.engine.kick_ack):
            m.d.sync += kick.bit_select(self.engine.kick_idx, 1).eq(0)
        # read-to-clear ISR: the read above returned the bits; one set in the same cycle (below,
        # so it wins) is kept for the next read
        with m.If(b.re & fok & in_isr):
            m.d.sync += isr.word_select(f, 2).eq(0)
        with m.If(self.engine.isr_set):
            m.d.sync += isr.bit_select(self.engine.isr_fidx * 2, 1).eq(1)
        with m.If(self.engine.nr_set & (self.engine.nr_fidx < nf)):
            g = self.engine.nr_fidx
            m.d.sync += [status[g].eq(status[g] | V.S_NEEDS_RESET),
                         isr.bit_select(g * 2 + 1, 1).eq(1)]
            m.d.comb += [self.irq.valid.eq(cfgvec[g] < nvec), self.irq.fidx.eq(g),
                         self.irq.vector.eq(cfgvec[g][:5])]
        with m.If(rst):
            m.d.sync += reset_function(rst_f)
        with m.If(self.fn.flr):
            m.d.comb += [self.engine.vreset.eq(1), self.engine.vreset_fidx.eq(self.fn.flr_fidx)]
            m.d.sync += [*reset_function(self.fn.flr_fidx),
                         rst_pend.bit_select(self.fn.flr_fidx, 1).eq(0)]
        with m.If(self.fn.vf_reset):
            m.d.sync += rst_pend.eq(rst_pend & 1)
            for g in range(1, nf):
                m.d.sync += reset_function(g)
        return m
