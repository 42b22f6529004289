"""The completer: receives every TLP the host sends and answers each non-posted one once.

Per TLP, store-and-forward:

1. ``IDLE``/``RECV`` take the beats (header on the ``sop`` beat), keep up to ``max_mmio_dw``
   payload DWs and count all of them.
2. ``DECODE`` classifies the TLP and checks it (known Fmt/Type, payload length against the
   Length field, Length/byte-enable rules, 4 KiB crossing, poisoned bit); then picks one action.
3. The action: a config read or write through :class:`hdl.pcie.config_space.ConfigSpace`, an MMIO
   read or write on the register bus (one DW per cycle), or nothing.
4. ``CPL`` sends the completion (SC with data, SC, UR or CA) for a non-posted request.

What gets what:

=================================================== ===================================
well-formed CfgRd0/CfgWr0 to an existing function   SC (data for reads)
CfgRd0/CfgWr0 to a function that does not exist      UR, ``unsupported``
MemRd that hits a BAR, Length <= max_mmio_dw         SC with data
MemRd that hits a BAR, longer                        CA, ``ca``
MemRd that hits no BAR                               UR, ``unsupported``
MemWr that hits a BAR, Length <= max_mmio_dw         performed
MemWr that hits no BAR / is too long                 dropped, ``unsupported``
CfgRd1/CfgWr1, IO, locked reads, AtomicOps           UR, ``unsupported``
Messages                                             dropped, ``unsupported``
Completions (no DMA reads outstanding yet)           dropped, ``unexp_cpl``
malformed non-posted request                         UR, ``malformed``
malformed other TLP, stray beat                      dropped, ``malformed``
poisoned non-posted / posted request                 UR / dropped, ``poisoned``
=================================================== ===================================

A TLP whose ``sop`` arrives before the previous one's ``eop`` truncates the previous one
(malformed); the new TLP is then received normally.
"""

from amaranth import *
from amaranth.lib import wiring, data
from amaranth.lib.wiring import In, Out

from ..config import CardConfig
from ..iface import READ_LATENCY, RegBusSignature, ErrorEvents, LinkSignature
from .bar_decode import BarLookupSignature
from .config_space import CfgPortSignature
from .tlp import tlp_stream, TlpKind, Dw0, ReqDw1, CfgDw2, hdr_dw, make_hdr, CplStatus

__all__ = ["Completer"]


def _first_set(be):
    """Index of the lowest set bit of a 4-bit byte enable (3 if none of bits 0..2)."""
    return Mux(be[0], 0, Mux(be[1], 1, Mux(be[2], 2, 3)))


def _last_set(be):
    """Index of the highest set bit of a 4-bit byte enable (0 if none of bits 1..3)."""
    return Mux(be[3], 3, Mux(be[2], 2, Mux(be[1], 1, 0)))


class Completer(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        W = cfg.data_width
        super().__init__({
            "rx":          In(tlp_stream(W)),
            "tx":          Out(tlp_stream(W)),
            "cfg":         Out(CfgPortSignature()),
            "cap_bus_stb": Out(1),
            "cap_bus":     Out(8),
            "bar":         Out(BarLookupSignature()),
            "regs":        Out(RegBusSignature()),
            "link":     In(LinkSignature()),
            "events":      Out(ErrorEvents()),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        W = cfg.data_width
        DPB = W // 32
        MAXDW = cfg.max_mmio_dw
        rx, tx = self.rx, self.tx
        ev = self.events

        # ---- receive buffer -------------------------------------------------------------
        hdr = Signal(128)
        buf = [Signal(32, name=f"buf{i}") for i in range(MAXDW)]
        beat = Signal(range(1024 // DPB + 2))      # beat index within the TLP (saturating)
        pay_dw = Signal(12)                        # payload DWs seen (saturating)
        trunc = Signal()                           # cut short by a new sop
        nbeats_max = (MAXDW + DPB - 1) // DPB

        strb_cnt = Signal(range(DPB + 1))
        m.d.comb += strb_cnt.eq(sum(rx.p.strb[j] for j in range(DPB)))

        def take_beat(first):
            idx = 0 if first else beat
            for s in range(MAXDW):
                with m.If(idx == s // DPB):
                    m.d.sync += buf[s].eq(rx.p.data[32 * (s % DPB):32 * (s % DPB) + 32])
            if first:
                m.d.sync += [beat.eq(1), pay_dw.eq(strb_cnt)]
            else:
                with m.If(beat < nbeats_max + 1):
                    m.d.sync += beat.eq(beat + 1)
                with m.If(pay_dw < 2048):
                    m.d.sync += pay_dw.eq(pay_dw + strb_cnt)

        # ---- header fields ----------------------------------------------------------------
        dw0 = data.View(Dw0, hdr_dw(hdr, 0))
        dw1 = data.View(ReqDw1, hdr_dw(hdr, 1))
        cdw2 = data.View(CfgDw2, hdr_dw(hdr, 2))
        ft = Cat(dw0.type, dw0.fmt)
        has_data = dw0.fmt[1]
        len_dw = Signal(11)
        m.d.comb += len_dw.eq(Mux(dw0.length == 0, 1024, dw0.length))
        addr = Signal(64)
        m.d.comb += addr.eq(Mux(dw0.fmt[0],
                                Cat(C(0, 2), hdr_dw(hdr, 3)[2:], hdr_dw(hdr, 2)),
                                Cat(C(0, 2), hdr_dw(hdr, 2)[2:], C(0, 32))))
        m.d.comb += self.bar.addr.eq(addr)
        tag = Cat(dw1.tag, dw0.tag8, dw0.tag9)
        first_be = dw1.first_be
        last_be = dw1.last_be

        def is_(*kinds):
            return ft.matches(*kinds)

        k_cfg0 = is_(TlpKind.CFGRD0, TlpKind.CFGWR0)
        k_cfg1 = is_(TlpKind.CFGRD1, TlpKind.CFGWR1)
        k_mrd = is_(TlpKind.MRD32, TlpKind.MRD64)
        k_mwr = is_(TlpKind.MWR32, TlpKind.MWR64)
        k_lk = is_(TlpKind.MRDLK32, TlpKind.MRDLK64)
        k_io = is_(TlpKind.IORD, TlpKind.IOWR)
        k_cpl = is_(TlpKind.CPL, TlpKind.CPLD, TlpKind.CPLLK, TlpKind.CPLDLK)
        k_atom = is_(TlpKind.FETCHADD32, TlpKind.FETCHADD64, TlpKind.SWAP32, TlpKind.SWAP64,
                     TlpKind.CAS32, TlpKind.CAS64)
        k_msg = ((dw0.fmt == 0b001) | (dw0.fmt == 0b011)) & (dw0.type[3:5] == 0b10)
        known = k_cfg0 | k_cfg1 | k_mrd | k_mwr | k_lk | k_io | k_cpl | k_atom | k_msg
        non_posted = k_cfg0 | k_cfg1 | k_mrd | k_lk | k_io | k_atom
        k_mem = k_mrd | k_mwr | k_lk

        # malformed checks
        exp_dw = Mux(has_data, len_dw, 0)
        bad_len = (pay_dw != exp_dw) & ~k_cpl & ~k_msg
        bad_cpl_len = k_cpl & (pay_dw != exp_dw)
        bad_msg_len = k_msg & (pay_dw != exp_dw)
        bad_cfgio = (k_cfg0 | k_cfg1 | k_io) & ((dw0.length != 1) | (last_be != 0))
        bad_be = k_mem & Mux(len_dw == 1, last_be != 0, (first_be == 0) | (last_be == 0))
        bad_4k = k_mem & ((addr[2:12] + len_dw) > 1024)
        bad_mps = has_data & ~k_cpl & (len_dw > (C(32, 11) << self.link.mps))
        malformed = Signal()
        m.d.comb += malformed.eq(trunc | ~known | bad_len | bad_cpl_len | bad_msg_len
                                 | bad_cfgio | bad_be | bad_4k | bad_mps)

        # byte count / lower address of a memory read completion (a zero-length read,
        # First DW BE 0000b, has Lower Address [1:0] = 00b and Byte Count 1)
        fbo = _first_set(first_be)
        la_lo = Mux(first_be == 0, 0, fbo)
        mrd_bc = Signal(13)
        with m.If(len_dw == 1):
            m.d.comb += mrd_bc.eq(Mux(first_be == 0, 1, _last_set(first_be) - fbo + 1))
        with m.Else():
            m.d.comb += mrd_bc.eq((len_dw << 2) - fbo - (3 - _last_set(last_be)))

        # ---- completion fields ------------------------------------------------------------
        c_status = Signal(3)
        c_len = Signal(11)        # DWs of data in the completion (0 = no data)
        c_bc = Signal(12)
        c_la = Signal(7)
        c_cid = Signal(16)
        c_locked = Signal()      # completion of a locked read (CplLk)

        # ---- action registers -------------------------------------------------------------
        fidx = Signal(8)
        bar_id = Signal(3)
        offset = Signal(len(self.bar.offset))
        i = Signal(range(MAXDW + READ_LATENCY + 1))
        is_read = Signal()

        # config port
        m.d.comb += [
            self.cfg.fidx.eq(cdw2.completer_id[:8]),
            self.cfg.reg.eq(cdw2.reg),
            self.cfg.be.eq(first_be),
            self.cfg.wdata.eq(buf[0]),
            self.cap_bus.eq(cdw2.completer_id[8:]),
        ]
        # register bus
        m.d.comb += [
            self.regs.fidx.eq(fidx),
            self.regs.bar.eq(bar_id),
            self.regs.addr.eq(offset + i),
            self.regs.wdata.eq(Array(buf)[i[:len(Const(MAXDW - 1))] if MAXDW > 1 else 0]),
            self.regs.be.eq(Mux(i == 0, first_be, Mux(i == len_dw - 1, last_be, 0xF))),
        ]

        # ---- transmit (completion) --------------------------------------------------------
        obeat = Signal(range(nbeats_max + 1))
        c_beats = Signal(range(nbeats_max + 2))
        m.d.comb += c_beats.eq(Mux(c_len == 0, 1, (c_len + DPB - 1) // DPB))
        cpl_fmt = Mux(c_len != 0, 0b010, 0b000)
        o_dw0 = Cat(c_len[:10], C(0, 2), dw0.attr_lo, C(0, 2), C(0, 2), dw0.attr_hi, tag[8],
                   dw0.tc, tag[9], Cat(c_locked, C(0b0101, 4)), cpl_fmt)
        o_dw1 = Cat(c_bc, C(0, 1), c_status, c_cid)
        o_dw2 = Cat(c_la, C(0, 1), tag[:8], dw1.requester_id)
        m.d.comb += [
            tx.p.hdr.eq(make_hdr(o_dw0, o_dw1, o_dw2)),
            tx.p.sop.eq(obeat == 0),
            tx.p.eop.eq(obeat == c_beats - 1),
            tx.p.func.eq(fidx),
        ]
        for j in range(DPB):
            with m.Switch(obeat):
                for bidx in range(nbeats_max):
                    s = bidx * DPB + j
                    if s < MAXDW:
                        with m.Case(bidx):
                            m.d.comb += [tx.p.data[32 * j:32 * j + 32].eq(buf[s]),
                                         tx.p.strb[j].eq(s < c_len)]

        def complete(status, length, bc, la, cid):
            m.d.sync += [c_status.eq(status), c_len.eq(length), c_bc.eq(bc), c_la.eq(la),
                         c_cid.eq(cid), obeat.eq(0), c_locked.eq(k_lk)]

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += rx.ready.eq(1)
                m.d.sync += trunc.eq(0)
                with m.If(rx.valid):
                    with m.If(rx.p.sop):
                        m.d.sync += hdr.eq(rx.p.hdr)
                        take_beat(first=True)
                        with m.If(rx.p.eop):
                            m.next = "DECODE"
                        with m.Else():
                            m.next = "RECV"
                    with m.Else():
                        m.d.comb += ev.malformed.eq(1)       # stray beat outside a TLP

            with m.State("RECV"):
                m.d.comb += rx.ready.eq(~rx.p.sop)
                with m.If(rx.valid):
                    with m.If(rx.p.sop):
                        m.d.sync += trunc.eq(1)             # new TLP before eop
                        m.next = "DECODE"
                    with m.Else():
                        take_beat(first=False)
                        with m.If(rx.p.eop):
                            m.next = "DECODE"

            with m.State("DECODE"):
                cid_mem = Cat(self.bar.fidx, self.link.bus_num)
                cid_pf = Cat(C(0, 8), self.link.bus_num)
                m.d.sync += [fidx.eq(self.bar.fidx), bar_id.eq(self.bar.bar),
                             offset.eq(self.bar.offset), i.eq(0), is_read.eq(k_mrd)]
                ur_bc = Mux(k_mrd | k_lk, mrd_bc, 4)
                ur_la = Mux(k_mrd | k_lk, Cat(la_lo, addr[2:7]), 0)
                ur_cid = Mux(k_cfg0 | k_cfg1, cdw2.completer_id, cid_pf)
                with m.If(malformed):
                    m.d.comb += ev.malformed.eq(1)
                    with m.If(known & non_posted):
                        complete(CplStatus.UR, 0, ur_bc, ur_la, ur_cid)
                        m.next = "CPL"
                    with m.Else():
                        m.next = "IDLE"
                with m.Elif(dw0.ep & ~k_cpl & ~k_msg):
                    m.d.comb += ev.poisoned.eq(1)
                    with m.If(non_posted):
                        complete(CplStatus.UR, 0, ur_bc, ur_la, ur_cid)
                        m.next = "CPL"
                    with m.Else():
                        m.next = "IDLE"
                with m.Elif(k_cfg0 & self.cfg.exists):
                    with m.If(has_data):
                        m.d.comb += [self.cfg.we.eq(1), self.cap_bus_stb.eq(1)]
                        complete(CplStatus.SC, 0, 4, 0, cdw2.completer_id)
                        m.next = "CPL"
                    with m.Else():
                        m.d.comb += self.cfg.re.eq(1)
                        m.next = "CFG_RD"
                with m.Elif(k_mrd & self.bar.hit):
                    with m.If(len_dw <= MAXDW):
                        m.next = "MMIO"
                    with m.Else():
                        m.d.comb += ev.ca.eq(1)
                        complete(CplStatus.CA, 0, mrd_bc, Cat(la_lo, addr[2:7]), cid_mem)
                        m.next = "CPL"
                with m.Elif(k_mwr & self.bar.hit & (len_dw <= MAXDW)):
                    m.next = "MMIO"
                with m.Elif(k_cpl):
                    m.d.comb += ev.unexp_cpl.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    # config to a missing function, type-1 config, IO, locked, atomics,
                    # memory requests that hit nothing, messages
                    m.d.comb += ev.unsupported.eq(1)
                    with m.If(non_posted):
                        complete(CplStatus.UR, 0, ur_bc, ur_la, ur_cid)
                        m.next = "CPL"
                    with m.Else():
                        m.next = "IDLE"

            with m.State("CFG_RD"):
                m.d.sync += buf[0].eq(self.cfg.rdata)
                complete(CplStatus.SC, 1, 4, 0, cdw2.completer_id)
                m.next = "CPL"

            with m.State("MMIO"):
                # one DW per cycle; read data arrives READ_LATENCY cycles after its strobe
                with m.If(i < len_dw):
                    m.d.comb += [self.regs.re.eq(is_read), self.regs.we.eq(~is_read)]
                with m.If(is_read & (i >= READ_LATENCY)):
                    for s in range(MAXDW):
                        with m.If(i == s + READ_LATENCY):
                            m.d.sync += buf[s].eq(self.regs.rdata)
                m.d.sync += i.eq(i + 1)
                with m.If(Mux(is_read, i == len_dw + READ_LATENCY - 1, i == len_dw - 1)):
                    with m.If(is_read):
                        complete(CplStatus.SC, len_dw, mrd_bc, Cat(la_lo, addr[2:7]),
                                 Cat(fidx, self.link.bus_num))
                        m.next = "CPL"
                    with m.Else():
                        m.next = "IDLE"

            with m.State("CPL"):
                m.d.comb += tx.valid.eq(1)
                with m.If(tx.ready):
                    m.d.sync += obeat.eq(obeat + 1)
                    with m.If(tx.p.eop):
                        m.next = "IDLE"
        return m
