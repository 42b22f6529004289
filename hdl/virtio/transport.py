"""The virtio-pci modern transport of every function (PF and VFs): common configuration,
notifications, ISR status and the virtio-net device configuration, in BAR0 at
:class:`regmap.VirtioRegs` (the vendor capabilities that point there are in
:mod:`hdl.pcie.config_space`).

Per function: feature negotiation (the device offers ``VirtioRegs.FEATURES``; FEATURES_OK only
sticks when the driver's features are a subset that includes VERSION_1), the device status
handshake (writing 0 resets the function's virtio state, once the queue engine holds no frame
of the function: until then status reads as before and the function is not live; NEEDS_RESET
is set by the device and raises a configuration-change interrupt), and nine queues
(receiveq(k) = 2k and transmitq(k) = 2k + 1 of MAX_PAIRS = 4 pairs, then the control queue)
with size (power of two, at most 256), MSI-X vector (NO_VECTOR when the vector does
not exist), enable and the three ring addresses. Queue fields of a queue that does not exist
read 0 and ignore writes.

A queue's ring addresses, size and MSI-X vector live in block RAM (two words per queue,
:data:`QueueWord`; a reset marks the size and vector of the function's queues as their reset
values with one flag each, as a RAM cannot clear several words in a cycle), so what a queue
costs in logic is its enable and notification bits. The queue engine reads the enable through
``qr_*`` (combinational) and the words through ``qa_*`` (data a cycle after the address); it
sees notifications as ``kick`` bits (one per function and queue) that it acknowledges, and it
reports through ``isr_set`` (a queue interrupt was sent) and ``nr_set`` (the device needs a
reset). Register accesses honour byte enables, so 8-, 16- and 32-bit accesses work; the
16-bit queue fields kept in block RAM (size, vector) take 16- or 32-bit writes only, as the
driver must make them (virtio 1.2, 4.1.3.1): a one-byte write of them is ignored.
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import VirtioRegs as V

from ..config import CardConfig
from ..iface import RegBusSignature, IrqRequestSignature, FunctionStateSignature
from ..pcie.regfile import RegisterFile
from .mac_table import MacShowSignature

__all__ = ["VirtioPci", "NQ", "OFFERED", "VirtqSignature", "QueueWord", "times_nq"]

NQ = V.NUM_QUEUES_VALUE
# the feature bits the device offers; each function keeps one accepted-flag per offer
OFFERED = (V.F_NET_CSUM, V.F_NET_GUEST_CSUM, V.F_NET_MAC, V.F_NET_MRG_RXBUF, V.F_NET_STATUS,
           V.F_NET_CTRL_VQ, V.F_NET_MQ, V.F_RING_INDIRECT_DESC, V.F_RING_EVENT_IDX,
           V.F_VERSION_1)
QB = (NQ - 1).bit_length()         # bits of a queue index


def times_nq(x):
    """``x * NQ`` as shifts and adds: NQ is not a power of two, and a multiplier (a DSP block
    on the FPGA) on every queue address costs both the block and its delay."""
    if isinstance(x, int):
        return x * NQ
    return sum(x << i for i in range(NQ.bit_length()) if NQ >> i & 1)


def _dw(off):
    return off // 4


#: A queue's state in the transport's block RAM: two words per queue, each of four 32-bit
#: lanes (so a register's DW is one lane). Word 0 holds the descriptor table's and the driver
#: area's (available ring's) addresses, word 1 the device area's (used ring's) address, the
#: queue's size and its MSI-X vector.
QueueWord = data.StructLayout({"lo": 64, "hi": 64})     # word 0: desc, driver; 1: device, size | vec
QW_SIZE_LANE, QW_VEC_LANE = 2, 3                          # lanes of word 1


def VirtqSignature(num_functions):
    """What the virtqueue engine needs of the transport (the engine's side): the current
    queue's enable (``qr_*``, combinational) and its words (``qa_*``, block RAM: data a
    cycle after the address; :data:`QueueWord`: ``qa_sel`` 0 gives the descriptor table and
    driver area in ``lo`` / ``hi``, 1 the device area in ``lo`` and size (bits 64..72) and
    MSI-X vector (bits 96..111) in ``hi``), what each function negotiated, the notifications (``kick``, one
    bit per function and queue, which the engine acknowledges), the engine's reports (a queue
    interrupt sent: ``isr_*``; the device needs a reset: ``nr_*``) and the transport's virtio
    reset of a function (``vreset``)."""
    nf = num_functions
    return wiring.Signature({
        "qr_fidx":  Out(8),
        "qr_q":     Out(range(NQ)),
        "qr_en":    In(1),
        "qa_fidx":  Out(8),
        "qa_q":     Out(range(NQ)),
        "qa_sel":   Out(1),         # the queue's word (QueueWord) ...
        "qa_data":  In(QueueWord),  # ... a cycle after its address
        "live":     In(nf),         # DRIVER_OK and FEATURES_OK, no NEEDS_RESET / FAILED
        "ev_idx":   In(nf),         # VIRTIO_F_EVENT_IDX negotiated
        "indirect": In(nf),         # VIRTIO_F_INDIRECT_DESC negotiated
        "mrg":      In(nf),         # VIRTIO_NET_F_MRG_RXBUF negotiated
        "csum":     In(nf),         # VIRTIO_NET_F_CSUM negotiated (the device fills checksums)
        "gcsum":    In(nf),         # VIRTIO_NET_F_GUEST_CSUM negotiated (DATA_VALID given)
        "ctrl":     In(nf),         # VIRTIO_NET_F_CTRL_VQ negotiated (a control queue)
        "mq":       In(nf),         # VIRTIO_NET_F_MQ negotiated (up to MAX_PAIRS pairs)
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
        gf = Array(Signal(len(OFFERED), name=f"gf{i}") for i in range(nf))   # accepted offers
        # the driver wrote a feature bit the device did not offer: per select 0 / 1 (a later
        # write of the same word can take it back) and sticky for the words above
        gf_bad = Signal(nf * 3)
        # config_msix_vector: a vector that exists, or NO_VECTOR (all a write can leave)
        VB = max(1, (nvec - 1).bit_length())
        cv_ok = Signal(nf)
        cv_idx = Array(Signal(VB, name=f"cfgvec{i}") for i in range(nf))

        def cfgvec(g):
            return Mux(cv_ok.bit_select(g, 1), cv_idx[g], V.NO_VECTOR)

        # The select registers (device_feature_select, driver_feature_select, queue_select)
        # read back from a RAM of one word per function (bytes 0-3, 4-7 and 8-9, written
        # with the bus's byte enables; ``sel_z``: the function was reset since, the word reads
        # 0 and its next write fills the other bytes with 0). What the logic needs of them is
        # kept beside in flip-flops: whether each feature select is 0 or 1 (byte 0's value,
        # whether bytes 1-3 are zero) and queue_select's low byte and whether its high byte
        # is zero.
        m.submodules.selects = smem = Memory(shape=80, depth=nf, init=[])
        s_wr = smem.write_port(granularity=8)
        s_rd = smem.read_port()
        sel_z = Signal(nf, init=(1 << nf) - 1)
        FSEL = ("df", "gf")
        fs_b0z = {k: Signal(nf, init=(1 << nf) - 1, name=f"{k}sel_b0z") for k in FSEL}
        fs_b0o = {k: Signal(nf, name=f"{k}sel_b0o") for k in FSEL}
        fs_hnz = {k: Signal(nf * 3, name=f"{k}sel_hnz") for k in FSEL}

        def fsel_is(k, g, v):
            """Feature select ``k`` of function ``g`` is ``v`` (0 or 1)."""
            b0 = (fs_b0z if v == 0 else fs_b0o)[k].bit_select(g, 1)
            return b0 & (fs_hnz[k].word_select(g, 3) == 0)

        qsel_lo = Array(Signal(8, name=f"qsel{i}") for i in range(nf))
        # per function: queue_select names an existing queue (kept with qsel, so the write
        # path decodes one bit per function instead of comparing a selected 16-bit value)
        qok = Signal(nf, init=(1 << nf) - 1)
        isr = Signal(nf * 2)         # bit 0 queue, bit 1 config change, per function
        qen = Signal(nqt)
        kick = Signal(nqt)
        # the queues' words (QueueWord): word (fidx * NQ + q) * 2 + {0, 1}, a register's DW
        # per 32-bit lane. A queue's size and vector read as their reset values (QUEUE_SIZE_MAX,
        # NO_VECTOR) while its ``q_dsz`` / ``q_dvec`` flag is set: a reset sets the flags of all
        # the function's queues at once, a write of the field clears its flag
        m.submodules.queues = amem = Memory(shape=128, depth=nqt * 2, init=[])
        aw = amem.write_port(granularity=32)
        ar_bus = amem.read_port()
        ar_eng = amem.read_port()
        q_dsz = Signal(nqt, init=(1 << nqt) - 1)
        q_dvec = Signal(nqt, init=(1 << nqt) - 1)

        def size_vec(word, dsz, dvec):
            """The size and vector in word 1 (``word``), as the driver reads them."""
            return (Mux(dsz, V.QUEUE_SIZE_MAX, word.word_select(QW_SIZE_LANE, 32)[:9]),
                    Mux(dvec, V.NO_VECTOR, word.word_select(QW_VEC_LANE, 32)[:16]))

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
                   cv_ok.bit_select(g, 1).eq(0), qsel_lo[g].eq(0), qok.bit_select(g, 1).eq(1),
                   sel_z.bit_select(g, 1).eq(1), isr.word_select(g, 2).eq(0)]
            for k in FSEL:
                stm += [fs_b0z[k].bit_select(g, 1).eq(1), fs_b0o[k].bit_select(g, 1).eq(0),
                        fs_hnz[k].word_select(g, 3).eq(0)]
            for q in range(NQ):
                at = times_nq(g) + q
                stm += [q_dsz.bit_select(at, 1).eq(1), q_dvec.bit_select(at, 1).eq(1),
                        qen.bit_select(at, 1).eq(0), kick.bit_select(at, 1).eq(0)]
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
        m.d.comb += cur_q.eq(times_nq(f) + qsel_lo[f][:QB] if NQ > 1 else f)
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

        gsel = Mux(fsel_is("gf", f, 0), 0, Mux(fsel_is("gf", f, 1), 1, 2))
        acc, bad = offered_bit(gsel, wd)
        # the select RAM's write: the bus's bytes into their place (all bytes, the others 0,
        # after a reset)
        s_en = Signal(10)
        s_z = sel_z.bit_select(f, 1)
        s_bytes = Cat(wd, wd, wd[16:32])
        m.d.comb += [s_wr.addr.eq(f), s_rd.addr.eq(f), s_rd.en.eq(b.re),
                     s_wr.en.eq(Mux(s_en.any() & s_z, (1 << 10) - 1, s_en)),
                     s_wr.data.eq(Cat(*(Mux(s_en[i], s_bytes[8 * i:8 * i + 8], 0)
                                        for i in range(10))))]
        with m.If(s_en.any()):
            m.d.sync += sel_z.bit_select(f, 1).eq(0)

        def fsel_write(k):
            m.d.comb += s_en.eq(be << (0 if k == "df" else 4))
            with m.If(be[0]):
                m.d.sync += [fs_b0z[k].bit_select(f, 1).eq(wd[0:8] == 0),
                             fs_b0o[k].bit_select(f, 1).eq(wd[0:8] == 1)]
            for i in range(1, 4):
                with m.If(be[i]):
                    m.d.sync += fs_hnz[k].bit_select(f * 3 + (i - 1), 1).eq(wd[8 * i:8 * i + 8] != 0)

        aoff = Signal(3)             # DW index within the three 64-bit addresses
        is_sv = Signal()             # the DW of queue_size and queue_msix_vector
        m.d.comb += [aoff.eq(a - base - _dw(V.Q_DESC)), is_sv.eq(a - base == _dw(V.Q_SIZE))]
        # the written DW into its lane; the size and vector as the device keeps them (a
        # vector that does not exist becomes NO_VECTOR)
        wvec = Signal(16)
        m.d.comb += wvec.eq(Mux(wd[16:32] < nvec, wd[16:32], V.NO_VECTOR))
        m.d.comb += [aw.addr.eq(Cat(Mux(is_sv, 1, aoff[2]), cur_q)),
                     aw.data.eq(Mux(is_sv, Cat(wd, wd, wd[:16], C(0, 16), wvec, C(0, 16)),
                                    wd.replicate(4)))]
        with m.If(b.we & fok & in_common):
            with m.Switch(a - base):
                with m.Case(_dw(V.DFSELECT)):
                    fsel_write("df")
                with m.Case(_dw(V.GFSELECT)):
                    fsel_write("gf")
                with m.Case(_dw(V.GF)):
                    with m.If(~status[f][3] & (be == 0xF)):          # not after FEATURES_OK
                        for k, fbit in enumerate(OFFERED):
                            with m.If(gsel == fbit // 32):
                                m.d.sync += gf[f][k].eq(acc[k])
                        with m.If(gsel < 2):
                            m.d.sync += gf_bad.bit_select(f * 3 + gsel[0], 1).eq(bad)
                        with m.Elif(bad):
                            m.d.sync += gf_bad.bit_select(f * 3 + 2, 1).eq(1)
                with m.Case(_dw(V.MSIX_CONFIG)):
                    with m.If(be[0] | be[1]):
                        v = lanes(cfgvec(f), 0, 2)
                        m.d.sync += [cv_ok.bit_select(f, 1).eq(v < nvec), cv_idx[f].eq(v[:VB])]
                with m.Case(_dw(V.STATUS)):
                    with m.If(be[0]):
                        with m.If(wd[:8] == 0):
                            m.d.comb += wr_rst.eq(1)
                        with m.Else():
                            # FEATURES_OK sticks only for a valid feature set
                            # (and MQ only with the control queue it needs, 5.1.3.1)
                            mq_alone = (gf[f][OFFERED.index(V.F_NET_MQ)]
                                        & ~gf[f][OFFERED.index(V.F_NET_CTRL_VQ)])
                            ok = ((gf_bad.word_select(f, 3) == 0) & ~mq_alone
                                  & gf[f][OFFERED.index(V.F_VERSION_1)])
                            fo = wd[3] & (ok | status[f][3])
                            m.d.sync += status[f].eq(Cat(wd[:3], fo, wd[4:6],
                                                         status[f][6] | wd[6], wd[7]))
                    with m.If(be[2] | be[3]):
                        m.d.comb += s_en.eq(be[2:4] << 8)
                        lo = Mux(be[2], wd[16:24], qsel_lo[f])
                        hi_zero = Mux(be[3], wd[24:32] == 0, qok.bit_select(f, 1)
                                      | (qsel_lo[f] >= NQ))
                        m.d.sync += [qsel_lo[f].eq(lo), qok.bit_select(f, 1).eq((lo < NQ) & hi_zero)]
                with m.Case(_dw(V.Q_SIZE)):
                    # 16-bit fields take 16-bit (or 32-bit) writes, as the driver must make
                    # them (virtio 1.2, 4.1.3.1); a write of one byte of them is ignored
                    with m.If(q_ok & be[0] & be[1] & size_ok(wd[:16])
                              & ~qen.bit_select(cur_q, 1)):
                        m.d.comb += aw.en[QW_SIZE_LANE].eq(1)
                        m.d.sync += q_dsz.bit_select(cur_q, 1).eq(0)
                    with m.If(q_ok & be[2] & be[3]):
                        m.d.comb += aw.en[QW_VEC_LANE].eq(1)
                        m.d.sync += q_dvec.bit_select(cur_q, 1).eq(0)
                with m.Case(_dw(V.Q_ENABLE)):
                    with m.If(q_ok & be[0]):
                        with m.If(wd[0]):                  # only 1 may be written (spec 4.1.4.3)
                            m.d.sync += qen.bit_select(cur_q, 1).eq(1)
                for k in range(6):
                    with m.Case(_dw(V.Q_DESC) + k):
                        with m.If(q_ok & (be == 0xF) & ~qen.bit_select(cur_q, 1)):
                            m.d.comb += aw.en.bit_select(aoff[:2], 1).eq(1)
        with m.If(b.we & fok & in_notify):
            qn = a - _dw(V.NOTIFY)
            with m.If(qn < NQ):
                m.d.sync += kick.bit_select(times_nq(f) + qn[:max(QB, 1)], 1).eq(1)

        # ---- register reads -----------------------------------------------------------------
        m.d.comb += [ar_bus.addr.eq(Cat(Mux(is_sv, 1, aoff[2]), cur_q)), ar_bus.en.eq(b.re)]
        m.d.comb += self.mac.fidx.eq(f)

        def common(off, value):
            rf.read(fok & rf.addressed(V.COMMON + off), value)

        common(V.DF, Mux(fsel_is("df", f, 0), offered_lo, Mux(fsel_is("df", f, 1), offered_hi, 0)))
        common(V.GF, feature_word(gsel, gf[f]))
        common(V.MSIX_CONFIG, Cat(cfgvec(f), C(NQ, 16)))
        common(V.STATUS, status[f])
        common(V.Q_ENABLE, Mux(q_ok, Cat(qen.bit_select(cur_q, 1), C(0, 15), qsel_lo[f]), 0))
        # the selects from their RAM, a cycle later
        s_rz = Signal()
        with m.If(b.re):
            m.d.sync += s_rz.eq(sel_z.bit_select(f, 1))
        s_val = Mux(s_rz, 0, s_rd.data)
        rf.read_late(fok & rf.addressed(V.COMMON + V.DFSELECT), s_val[0:32])
        rf.read_late(fok & rf.addressed(V.COMMON + V.GFSELECT), s_val[32:64])
        rf.read_late(fok & rf.addressed(V.COMMON + V.STATUS), Cat(C(0, 16), s_val[64:80]))
        # the ring addresses, size and vector come from their block RAM, a cycle later
        in_addr = fok & q_ok & in_common & (a - base >= _dw(V.Q_DESC)) \
            & (a - base < _dw(V.Q_DESC) + 6)
        rlane = Signal(2)
        rdsz = Signal()
        rdvec = Signal()
        with m.If(b.re):
            m.d.sync += [rlane.eq(aoff[:2]), rdsz.eq(q_dsz.bit_select(cur_q, 1)),
                         rdvec.eq(q_dvec.bit_select(cur_q, 1))]
        rf.read_late(in_addr, ar_bus.data.word_select(rlane, 32))
        rsize, rvec = size_vec(ar_bus.data, rdsz, rdvec)
        rf.read_late(fok & q_ok & in_common & is_sv, Cat(rsize, C(0, 7), rvec))
        rf.read(fok & in_isr, isr.word_select(f, 2))
        rf.read(fok & rf.addressed(V.DEVICE + V.NET_MAC), self.mac.mac[:32])
        rf.read(fok & rf.addressed(V.DEVICE + 4), Cat(self.mac.mac[32:], C(1, 16)))    # link up
        rf.read(fok & rf.addressed(V.DEVICE + V.NET_MAX_PAIRS), V.MAX_PAIRS)
        rf.finish()

        # ---- engine side --------------------------------------------------------------------
        eq_idx = Signal(range(nqt))
        m.d.comb += [
            eq_idx.eq(times_nq(self.engine.qr_fidx) + self.engine.qr_q),
            self.engine.qr_en.eq(qen.bit_select(eq_idx, 1)),
            ar_eng.addr.eq(Cat(self.engine.qa_sel, times_nq(self.engine.qa_fidx) + self.engine.qa_q)),
            ar_eng.en.eq(1),
        ]
        # word 1's size and vector as the driver set them (the flags taken with the address)
        ea_idx = Signal(range(nqt))
        ea_dsz = Signal()
        ea_dvec = Signal()
        ea_w1 = Signal()
        m.d.comb += ea_idx.eq(times_nq(self.engine.qa_fidx) + self.engine.qa_q)
        m.d.sync += [ea_dsz.eq(q_dsz.bit_select(ea_idx, 1)), ea_dvec.eq(q_dvec.bit_select(ea_idx, 1)),
                     ea_w1.eq(self.engine.qa_sel)]
        esize, evec = size_vec(ar_eng.data, ea_dsz, ea_dvec)
        m.d.comb += [
            self.engine.qa_data.eq(Mux(ea_w1, Cat(ar_eng.data[:64], esize, C(0, 23), evec,
                                                  C(0, 16)), ar_eng.data)),
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
                self.engine.ctrl[g].eq(gf[g][OFFERED.index(V.F_NET_CTRL_VQ)]),
                self.engine.mq[g].eq(gf[g][OFFERED.index(V.F_NET_MQ)]),
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
            m.d.comb += [self.irq.valid.eq(cv_ok.bit_select(g, 1)), self.irq.fidx.eq(g),
                         self.irq.vector.eq(cv_idx[g])]
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
