"""Type-0 configuration space of the PF and of every VF, in RTL.

Layout (byte offsets, the same on the PF and on VFs unless noted):

====== ================================================================================
0x000  type-0 header. PF: BAR0 64-bit prefetchable (BAR0/BAR1), BAR2 32-bit
       non-prefetchable. VF: Vendor/Device ID read 0xFFFF (SR-IOV rule), BARs read 0,
       only Bus Master Enable is writable in Command.
0x040  PCI Express capability v2, endpoint (MPSS 512 B, extended and 10-bit tags completer)
0x080  MSI-X capability: table at BAR0+0x2000, PBA at BAR0+0x3000 (per function)
0x090  PCI Power Management capability (PF only): D0 and D3hot, No_Soft_Reset; in D3hot the
       PF decodes no memory and masters nothing
0x0A0  virtio vendor-specific capabilities (PF and VFs): common cfg (0xA0), notify (0xB0,
       notify_off_multiplier 4), ISR (0xC4), device cfg (0xD4), all in BAR0 (hdl.virtio.transport)
0x100  ARI extended capability (PF and VFs; Next Function Number 0)
0x110  SR-IOV extended capability (PF only): TotalVFs/InitialVFs = ``total_vfs``,
       First VF Offset 1, VF Stride 1, VF BAR0 64-bit prefetchable of ``vf_bar0_size``, or of
       the System Page Size when that is larger (each VF's BAR is page aligned)
====== ================================================================================

VFs are FLR capable: writing Initiate Function Level Reset in a VF's Device Control resets that
VF's configuration state, its MSI-X vectors (masked, nothing pending) and its DMA queue.

Errors set the PF's RW1C status bits (Status: Signaled Target Abort, Detected Parity Error;
Device Status: Correctable, Non-Fatal, Fatal, Unsupported Request Detected); no error messages
are sent (the PF BAR2 counters count every event).

Rules kept in the RTL: read-only fields ignore writes, writes honour byte enables, BAR sizing
reads back the size mask, NumVFs only changes while VF Enable is clear and never above TotalVFs,
and clearing VF Enable returns every VF's config state to reset values.

Access port: one DW access at a time (``we``/``re`` pulses), read data one cycle after ``re``.
``exists`` tells, combinationally, whether the addressed function index exists.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import Bar0Map, VirtioRegs, VirtioCaps

from ..config import CardConfig
from ..iface import LinkSignature, FunctionStateSignature, ErrorEvents
from .bar_decode import BarConfigSignature

__all__ = ["CfgPortSignature", "ConfigSpace", "CapOffsets"]


class CapOffsets:
    PCIE = 0x40
    MSIX = 0x80
    PM = 0x90          # PF only
    ARI = 0x100
    SRIOV = 0x110


def CfgPortSignature():
    """Config access port, seen from the requester (the completer logic)."""
    return wiring.Signature({
        "fidx":   Out(8),    # function index: 0 = PF, n = VF n
        "reg":    Out(10),   # DW index into the 4 KiB config space
        "be":     Out(4),
        "wdata":  Out(32),
        "we":     Out(1),
        "re":     Out(1),
        "exists": In(1),
        "rdata":  In(32),
    })


# read-only constant values
DEVCAP = 0x2 | (1 << 5) | (7 << 6) | (7 << 9) | (1 << 15)     # MPSS 512 B, ext tag, RBER
VF_DEVCAP = DEVCAP | (1 << 28)                                # VFs: Function Level Reset
PMC = 0b011                                                   # PM spec 1.2; no D1/D2, no PME
LINKCAP = 0x3 | (8 << 4)                                      # 8 GT/s x8
LINKSTA = 0x3 | (8 << 4) | (1 << 12)                          # 8 GT/s x8, slot clock
DEVCAP2 = 0xF | (1 << 4) | (1 << 16)                          # CTO ranges, CTO disable, 10-bit tag cpl
LINKCAP2 = 0b111 << 1                                         # 2.5, 5, 8 GT/s
DEVCTL_INIT = (1 << 4) | (1 << 11) | (2 << 12)                # RO enable, no snoop, MRRS 512 B
DEVCTL_MASK = 0x79FF
SUPPORTED_PAGE_SIZES = 0x553
STATUS = (1 << 4) | (1 << 0)                                 # capabilities list, Immediate Readiness


def virtio_cap_dws():
    """DW index -> value of the read-only virtio vendor capabilities (virtio 1.x 4.1.4)."""
    caps = [(VirtioCaps.COMMON, VirtioCaps.CFG_TYPE_COMMON, VirtioRegs.COMMON, VirtioRegs.COMMON_LEN),
            (VirtioCaps.NOTIFY, VirtioCaps.CFG_TYPE_NOTIFY, VirtioRegs.NOTIFY, VirtioRegs.NOTIFY_LEN),
            (VirtioCaps.ISR, VirtioCaps.CFG_TYPE_ISR, VirtioRegs.ISR, VirtioRegs.ISR_LEN),
            (VirtioCaps.DEVICE, VirtioCaps.CFG_TYPE_DEVICE, VirtioRegs.DEVICE, VirtioRegs.DEVICE_LEN)]
    dws = {}
    for k, (off, typ, bar_off, length) in enumerate(caps):
        nxt = caps[k + 1][0] if k + 1 < len(caps) else 0
        cap_len = 20 if typ == VirtioCaps.CFG_TYPE_NOTIFY else 16
        dws[off // 4] = 0x09 | (nxt << 8) | (cap_len << 16) | (typ << 24)
        dws[off // 4 + 1] = 0                     # bar 0, id 0, padding
        dws[off // 4 + 2] = bar_off
        dws[off // 4 + 3] = length
        if typ == VirtioCaps.CFG_TYPE_NOTIFY:
            dws[off // 4 + 4] = VirtioRegs.NOTIFY_MULT
    return dws


class ConfigSpace(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self.cfg = cfg
        nf = cfg.num_functions
        super().__init__({
            "port":        In(CfgPortSignature()),
            "cap_bus_stb": In(1),      # capture the bus number (type-0 config write)
            "cap_bus":     In(8),
            "link":        Out(LinkSignature()),        # bus number, MPS, MRRS
            "bars":        Out(BarConfigSignature()),   # what the BAR decoder needs
            # per function enables, and the reset strobes (registered: the engines that act
            # on them sit all over the die)
            "fn":          Out(FunctionStateSignature(nf)),
            "err_events":  In(ErrorEvents()),           # the errors the card counted
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        p = self.port
        nvf = cfg.total_vfs
        nvec = cfg.msix_vectors

        # ---- state ------------------------------------------------------------------------
        command = Signal(16)
        cache_line = Signal(8)
        int_line = Signal(8)
        bar0 = Signal(64)
        bar2 = Signal(32)
        devctl = Signal(16, init=DEVCTL_INIT)
        linkctl = Signal(16)
        devctl2 = Signal(16)
        linkctl2 = Signal(16, init=0x3)
        pstate = Signal(2)          # PF power state: 0 = D0, 3 = D3hot
        sta_sig_ta = Signal()       # Status: Signaled Target Abort (we sent CA)
        sta_par = Signal()          # Status: Detected Parity Error (poisoned TLP received)
        ds_cor = Signal()           # Device Status: Correctable Error Detected
        ds_nonfatal = Signal()      # Device Status: Non-Fatal Error Detected
        ds_fatal = Signal()         # Device Status: Fatal Error Detected
        ds_ur = Signal()            # Device Status: Unsupported Request Detected
        msix_en_pf = Signal()
        msix_fm_pf = Signal()
        vf_en = Signal()
        vf_mse = Signal()
        ari_hier = Signal()
        num_vfs = Signal(16)
        sys_page = Signal(32, init=1)
        vf_bar0 = Signal(64)
        vf_bme = Signal(nvf)
        vf_msix_en = Signal(nvf)
        vf_msix_fm = Signal(nvf)

        with m.If(self.cap_bus_stb):
            m.d.sync += self.link.bus_num.eq(self.cap_bus)

        # ---- addressing -------------------------------------------------------------------
        is_pf = p.fidx == 0
        vfi = Signal(8)
        m.d.comb += vfi.eq(p.fidx - 1)
        is_vf = Signal()
        m.d.comb += is_vf.eq(vf_en & (p.fidx != 0) & (p.fidx <= num_vfs))
        m.d.comb += p.exists.eq(is_pf | is_vf)

        bmask = Signal(32)
        m.d.comb += bmask.eq(Cat(*(p.be[i].replicate(8) for i in range(4))))

        def wr(sig, lsb=0, mask=None):
            """Byte-enable masked write of ``sig`` located at bit ``lsb`` of the DW."""
            w = len(sig)
            bm = bmask[lsb:lsb + w]
            if mask is not None:
                bm = bm & C(mask, w)
            m.d.sync += sig.eq((sig & ~bm) | (p.wdata[lsb:lsb + w] & bm))

        def dw(reg_byte_offset):
            return reg_byte_offset // 4

        PCIE = dw(CapOffsets.PCIE)
        MSIX = dw(CapOffsets.MSIX)
        PM = dw(CapOffsets.PM)
        ARI = dw(CapOffsets.ARI)
        SRIOV = dw(CapOffsets.SRIOV)

        bar0_mask_lo = ~(cfg.bar0_size - 1) & 0xFFFF_FFF0
        bar2_mask = ~(cfg.bar2_size - 1) & 0xFFFF_FFF0
        vfbar_mask_lo = ~(cfg.vf_bar0_size - 1) & 0xFFFF_FFF0
        msix_ctl_ro = C(nvec - 1, 11)

        # ---- VF BAR0 aperture: max(vf_bar0_size, System Page Size) per VF -------------------
        sv = exact_log2(cfg.vf_bar0_size)
        vf_shift = Signal(range(64), init=sv)
        vf_mask = Signal(64, init=~(cfg.vf_bar0_size - 1) & (2 ** 64 - 1))
        with m.Switch(sys_page):
            for bit in range(32):
                if SUPPORTED_PAGE_SIZES >> bit & 1:
                    sh = max(sv, 12 + bit)
                    with m.Case(1 << bit):
                        m.d.comb += [vf_shift.eq(sh), vf_mask.eq(~((1 << sh) - 1) & (2 ** 64 - 1))]
            with m.Default():
                m.d.comb += [vf_shift.eq(sv), vf_mask.eq(~((1 << sv) - 1) & (2 ** 64 - 1))]
        vf_bar0_eff = vf_bar0 & vf_mask

        # ---- PF read mux ------------------------------------------------------------------
        pf_rd = Signal(32)
        with m.Switch(p.reg):
            with m.Case(0x00):
                m.d.comb += pf_rd.eq(cfg.vendor_id | (cfg.device_id << 16))
            with m.Case(0x01):
                m.d.comb += pf_rd.eq(Cat(command, C(STATUS, 16)) | (sta_sig_ta << 27)
                                     | (sta_par << 31))
            with m.Case(0x02):
                m.d.comb += pf_rd.eq((cfg.class_code << 8) | cfg.revision_id)
            with m.Case(0x03):
                m.d.comb += pf_rd.eq(Cat(cache_line, C(0, 24)))
            with m.Case(0x04):
                m.d.comb += pf_rd.eq(bar0[:32] | 0b1100)
            with m.Case(0x05):
                m.d.comb += pf_rd.eq(bar0[32:])
            with m.Case(0x06):
                m.d.comb += pf_rd.eq(bar2)
            with m.Case(0x0B):
                m.d.comb += pf_rd.eq(cfg.subsystem_vendor_id | (cfg.subsystem_id << 16))
            with m.Case(0x0D):
                m.d.comb += pf_rd.eq(CapOffsets.PCIE)
            with m.Case(0x0F):
                m.d.comb += pf_rd.eq(Cat(int_line, C(0, 24)))
            with m.Case(PCIE + 0):
                m.d.comb += pf_rd.eq(0x10 | (CapOffsets.MSIX << 8) | (0x0002 << 16))
            with m.Case(PCIE + 1):
                m.d.comb += pf_rd.eq(DEVCAP)
            with m.Case(PCIE + 2):
                m.d.comb += pf_rd.eq(Cat(devctl, ds_cor, ds_nonfatal, ds_fatal, ds_ur, C(0, 12)))
            with m.Case(PCIE + 3):
                m.d.comb += pf_rd.eq(LINKCAP)
            with m.Case(PCIE + 4):
                m.d.comb += pf_rd.eq(Cat(linkctl, C(LINKSTA, 16)))
            with m.Case(PCIE + 9):
                m.d.comb += pf_rd.eq(DEVCAP2)
            with m.Case(PCIE + 10):
                m.d.comb += pf_rd.eq(Cat(devctl2, C(0, 16)))
            with m.Case(PCIE + 11):
                m.d.comb += pf_rd.eq(LINKCAP2)
            with m.Case(PCIE + 12):
                m.d.comb += pf_rd.eq(Cat(linkctl2, C(0, 16)))
            with m.Case(MSIX + 0):
                m.d.comb += pf_rd.eq(Cat(C(0x11, 8), C(CapOffsets.PM, 8), msix_ctl_ro, C(0, 3),
                                         msix_fm_pf, msix_en_pf))
            with m.Case(MSIX + 1):
                m.d.comb += pf_rd.eq(Bar0Map.MSIX_TABLE | 0)
            with m.Case(MSIX + 2):
                m.d.comb += pf_rd.eq(Bar0Map.MSIX_PBA | 0)
            with m.Case(PM + 0):
                m.d.comb += pf_rd.eq(0x01 | (VirtioCaps.COMMON << 8) | (PMC << 16))
            with m.Case(PM + 1):
                m.d.comb += pf_rd.eq(Cat(pstate, C(0, 1), C(1, 1)))   # No_Soft_Reset
            for k, v in virtio_cap_dws().items():
                with m.Case(k):
                    m.d.comb += pf_rd.eq(v)
            with m.Case(ARI + 0):
                m.d.comb += pf_rd.eq(0x000E | (1 << 16) | (CapOffsets.SRIOV << 20))
            with m.Case(SRIOV + 0):
                m.d.comb += pf_rd.eq(0x0010 | (1 << 16) | (0 << 20))
            with m.Case(SRIOV + 2):
                m.d.comb += pf_rd.eq(Cat(vf_en, C(0, 2), vf_mse, ari_hier, C(0, 27)))
            with m.Case(SRIOV + 3):
                m.d.comb += pf_rd.eq(nvf | (nvf << 16))
            with m.Case(SRIOV + 4):
                m.d.comb += pf_rd.eq(Cat(num_vfs, C(0, 16)))
            with m.Case(SRIOV + 5):
                m.d.comb += pf_rd.eq(1 | (1 << 16))
            with m.Case(SRIOV + 6):
                m.d.comb += pf_rd.eq(cfg.vf_device_id << 16)
            with m.Case(SRIOV + 7):
                m.d.comb += pf_rd.eq(SUPPORTED_PAGE_SIZES)
            with m.Case(SRIOV + 8):
                m.d.comb += pf_rd.eq(sys_page)
            with m.Case(SRIOV + 9):
                m.d.comb += pf_rd.eq(vf_bar0_eff[:32] | 0b1100)
            with m.Case(SRIOV + 10):
                m.d.comb += pf_rd.eq(vf_bar0_eff[32:])
            with m.Default():
                m.d.comb += pf_rd.eq(0)

        # ---- VF read mux ------------------------------------------------------------------
        vf_rd = Signal(32)
        bme_i = vf_bme.bit_select(vfi, 1)
        men_i = vf_msix_en.bit_select(vfi, 1)
        mfm_i = vf_msix_fm.bit_select(vfi, 1)
        with m.Switch(p.reg):
            with m.Case(0x00):
                m.d.comb += vf_rd.eq(0xFFFF_FFFF)
            with m.Case(0x01):
                m.d.comb += vf_rd.eq(Cat(C(0, 2), bme_i, C(0, 13), C(STATUS, 16)))
            with m.Case(0x02):
                m.d.comb += vf_rd.eq((cfg.class_code << 8) | cfg.revision_id)
            with m.Case(0x0B):
                m.d.comb += vf_rd.eq(cfg.subsystem_vendor_id | (cfg.subsystem_id << 16))
            with m.Case(0x0D):
                m.d.comb += vf_rd.eq(CapOffsets.PCIE)
            with m.Case(PCIE + 0):
                m.d.comb += vf_rd.eq(0x10 | (CapOffsets.MSIX << 8) | (0x0002 << 16))
            with m.Case(PCIE + 1):
                m.d.comb += vf_rd.eq(VF_DEVCAP)
            with m.Case(PCIE + 3):
                m.d.comb += vf_rd.eq(LINKCAP)
            with m.Case(PCIE + 4):
                m.d.comb += vf_rd.eq(LINKSTA << 16)
            with m.Case(PCIE + 9):
                m.d.comb += vf_rd.eq(DEVCAP2)
            with m.Case(PCIE + 11):
                m.d.comb += vf_rd.eq(LINKCAP2)
            with m.Case(MSIX + 0):
                m.d.comb += vf_rd.eq(Cat(C(0x11, 8), C(VirtioCaps.COMMON, 8), msix_ctl_ro, C(0, 3),
                                         mfm_i, men_i))
            with m.Case(MSIX + 1):
                m.d.comb += vf_rd.eq(Bar0Map.MSIX_TABLE | 0)
            with m.Case(MSIX + 2):
                m.d.comb += vf_rd.eq(Bar0Map.MSIX_PBA | 0)
            for k, v in virtio_cap_dws().items():
                with m.Case(k):
                    m.d.comb += vf_rd.eq(v)
            with m.Case(ARI + 0):
                m.d.comb += vf_rd.eq(0x000E | (1 << 16))
            with m.Default():
                m.d.comb += vf_rd.eq(0)

        with m.If(p.re):
            m.d.sync += p.rdata.eq(Mux(is_pf, pf_rd, vf_rd))

        # ---- PF writes --------------------------------------------------------------------
        with m.If(p.we & is_pf):
            with m.Switch(p.reg):
                with m.Case(0x01):
                    wr(command, 0, 0x0546)       # MSE, BME, parity, SERR, INTx disable
                    with m.If(p.be[3] & p.wdata[27]):
                        m.d.sync += sta_sig_ta.eq(0)
                    with m.If(p.be[3] & p.wdata[31]):
                        m.d.sync += sta_par.eq(0)
                with m.Case(0x03):
                    wr(cache_line, 0)
                with m.Case(0x04):
                    wr(bar0[:32], 0, bar0_mask_lo)
                with m.Case(0x05):
                    wr(bar0[32:], 0)
                with m.Case(0x06):
                    wr(bar2, 0, bar2_mask)
                with m.Case(0x0F):
                    wr(int_line, 0)
                with m.Case(PCIE + 2):
                    wr(devctl, 0, DEVCTL_MASK)
                    with m.If(p.be[2]):
                        for bit, sig in ((16, ds_cor), (17, ds_nonfatal), (18, ds_fatal), (19, ds_ur)):
                            with m.If(p.wdata[bit]):
                                m.d.sync += sig.eq(0)
                with m.Case(PCIE + 4):
                    wr(linkctl, 0, 0x00C3)
                with m.Case(PCIE + 10):
                    wr(devctl2, 0, 0x001F)
                with m.Case(PCIE + 12):
                    wr(linkctl2, 0, 0x000F)
                with m.Case(MSIX + 0):
                    wr(msix_fm_pf, 30)
                    wr(msix_en_pf, 31)
                with m.Case(PM + 1):
                    with m.If(p.be[0] & ((p.wdata[:2] == 0) | (p.wdata[:2] == 3))):
                        m.d.sync += pstate.eq(p.wdata[:2])     # D1/D2 are not supported
                with m.Case(SRIOV + 2):
                    wr(vf_en, 0)
                    wr(vf_mse, 3)
                    wr(ari_hier, 4)
                with m.Case(SRIOV + 4):
                    new_num = Signal(16)
                    m.d.comb += new_num.eq((num_vfs & ~bmask[:16]) | (p.wdata[:16] & bmask[:16]))
                    with m.If(~vf_en & (new_num <= nvf)):
                        m.d.sync += num_vfs.eq(new_num)
                with m.Case(SRIOV + 8):
                    # one supported page size at a time, and only while the VFs are off
                    new_page = Signal(32)
                    m.d.comb += new_page.eq((sys_page & ~bmask) | (p.wdata & bmask))
                    with m.If(~vf_en & ((new_page & ~SUPPORTED_PAGE_SIZES) == 0)
                              & (new_page != 0) & ((new_page & (new_page - 1)) == 0)):
                        m.d.sync += sys_page.eq(new_page)
                with m.Case(SRIOV + 9):
                    wr(vf_bar0[:32], 0, vfbar_mask_lo)
                with m.Case(SRIOV + 10):
                    wr(vf_bar0[32:], 0)

        # ---- VF writes --------------------------------------------------------------------
        m.d.sync += self.fn.flr.eq(0)
        with m.If(p.we & is_vf):
            with m.Switch(p.reg):
                with m.Case(PCIE + 2):
                    with m.If(p.be[1] & p.wdata[15]):
                        # Initiate Function Level Reset: this VF back to its reset state
                        m.d.sync += [vf_bme.bit_select(vfi, 1).eq(0),
                                     vf_msix_en.bit_select(vfi, 1).eq(0),
                                     vf_msix_fm.bit_select(vfi, 1).eq(0)]
                        m.d.sync += [self.fn.flr.eq(1), self.fn.flr_fidx.eq(p.fidx)]
                with m.Case(0x01):
                    with m.If(p.be[0]):
                        m.d.sync += vf_bme.bit_select(vfi, 1).eq(p.wdata[2])
                with m.Case(MSIX + 0):
                    with m.If(p.be[3]):
                        m.d.sync += [
                            vf_msix_fm.bit_select(vfi, 1).eq(p.wdata[30]),
                            vf_msix_en.bit_select(vfi, 1).eq(p.wdata[31]),
                        ]

        # error events set the PF's status bits (device-level reporting; counters in BAR2)
        ev = self.err_events
        for cond, sig in ((ev.ca, sta_sig_ta), (ev.poisoned, sta_par), (ev.unexp_cpl, ds_cor),
                          (ev.poisoned, ds_nonfatal), (ev.malformed, ds_fatal),
                          (ev.unsupported, ds_ur)):
            with m.If(cond):
                m.d.sync += sig.eq(1)

        # clearing VF Enable resets every VF (their config state goes back to reset values)
        vf_en_q = Signal()
        m.d.sync += [vf_en_q.eq(vf_en), self.fn.vf_reset.eq(vf_en_q & ~vf_en)]
        with m.If(vf_en_q & ~vf_en):
            m.d.sync += [vf_bme.eq(0), vf_msix_en.eq(0), vf_msix_fm.eq(0)]

        # ---- state outputs ----------------------------------------------------------------
        vf_alive = Signal(nvf)
        for i in range(nvf):
            m.d.comb += vf_alive[i].eq(vf_en & (num_vfs > i))
        m.d.comb += [
            self.bars.pf_mse.eq(command[1] & (pstate == 0)),
            self.bars.pf_bar0.eq(bar0),
            self.bars.pf_bar2.eq(bar2),
            self.link.mps.eq(devctl[5:8]),
            self.link.mrrs.eq(devctl[12:15]),
            self.bars.vf_enable.eq(vf_en),
            self.bars.vf_mse.eq(vf_mse),
            self.bars.num_vfs.eq(num_vfs),
            self.bars.vf_bar0.eq(vf_bar0_eff),
            self.bars.vf_shift.eq(vf_shift),
            self.fn.bme.eq(Cat(command[2] & (pstate == 0), vf_bme & vf_alive)),
            self.fn.msix_en.eq(Cat(msix_en_pf, vf_msix_en & vf_alive)),
            self.fn.msix_fmask.eq(Cat(msix_fm_pf, vf_msix_fm)),
        ]
        return m
