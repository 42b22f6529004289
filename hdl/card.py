"""Top level of the card: the PCIe transaction-layer endpoint and what hangs off it.

::

    rx ─► RxRouter ─┬─ requests ─► Completer ─┬─► ConfigSpace (PF + VFs), BarDecoder
                    │     MgmtUart (firmware) ─┴─► RegBusSlice ─┬─ FuncRegisters ─ irq ─┐
                    │                   (then one RegBusSlice per target)
                    │                                           ├─ MsixController ◄─────┤
                    │                                           ├─ MgmtRegisters (BAR2) │
                    │                                           ├─ DmaQueues            │
                    │                                           ├─ Translator (BAR2)    │
                    │                                           └─ FaultUnit (BAR2)     │
                    ├─ cpl tag 0 ─► DmaQueues ─┬─ cmds ─► DmaReadChannel / DmaWriteChannel
                    ├─ cpl tag 1 ─► Translator ◄┤ (device TLB, page walks)    │  CardMemory
                    ├─ cpl tag 2 ─► FaultUnit ◄─┘ (staging, FBQ/IOPF/CQ) ──────┘
                    └─ other cpl ─► DmaReadChannel
    tx ◄─ TlpArbiter ◄─ Completer, MsixController, read/write channels, DmaQueues,
                        Translator, FaultUnit, VirtioNetEngine

The RX router and the TX arbiter are each one register stage and the register bus two (one
after the master mux, one in front of each target), so the blocks' logic starts and ends at
flip-flops at those crossings (the synthesis
report in ``hdl/synth.py`` names the path that limits the clock now).
"""

from amaranth import *
from amaranth.lib import wiring, stream
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import CardConfig
from .dma.common import CardMemory
from .dma.mux import DmaChannelMux, LockMux
from .dma.queue import DmaQueues, DESC_TAG
from .dma.read import DmaReadChannel
from .dma.write import DmaWriteChannel
from .iface import REQUEST_FIELDS, UplinkBeat, XlateReq, XlateResp
from .iommu.fault import FaultUnit, CQ_TAG
from .iommu.translate import Translator, WALK_TAG
from .memmap import PKT_WORDS, PacketBuf
from .mgmt.block import MgmtBlock, UtilLayout
from .mgmt.card_regs import MgmtRegisters
from .mgmt.frames import MgmtUart
from .mgmt.qos import RateLimiter
from .mgmt.telemetry import Telemetry
from .pcie.bar_decode import BarDecoder
from .pcie.completer import Completer
from .pcie.config_space import ConfigSpace
from .pcie.func_regs import FuncRegisters
from .pcie.msix import MsixController
from .pcie.regbus import RegBusSlice
from .pcie.rx_router import RxRouter
from .pcie.tlp import tlp_stream
from .pcie.tx_arbiter import TlpArbiter
from .virtio.net import VirtioNetEngine, VQ_TAG
from .virtio.transport import VirtioPci

__all__ = ["Card"]


class Card(wiring.Component):
    """The offload card. Ports: ``rx`` (TLPs from the host), ``tx`` (TLPs to the host)."""

    def __init__(self, cfg: CardConfig = CardConfig()):
        self.cfg = cfg
        super().__init__({
            "rx": In(tlp_stream(cfg.data_width)),
            "tx": Out(tlp_stream(cfg.data_width)),
            "uplink_tx": Out(stream.Signature(UplinkBeat(cfg.data_width))),   # to the network
            "uplink_rx": In(stream.Signature(UplinkBeat(cfg.data_width))),    # from it
            "util": In(UtilLayout),            # utilisation inputs of the card's resources
            "uart_rxd": In(1, init=1),         # management UART, from the firmware
            "uart_txd": Out(1, init=1),        # ... to it
        })

    def elaborate(self, platform):
        cfg = self.cfg
        m = Module()
        m.submodules.cfgspace = cs = ConfigSpace(cfg)
        m.submodules.bardec = bd = BarDecoder(cfg)
        m.submodules.completer = cp = Completer(cfg)
        m.submodules.funcregs = fr = FuncRegisters(cfg)
        m.submodules.msix = mx = MsixController(cfg)
        m.submodules.mgmt = mg = MgmtRegisters(cfg)
        m.submodules.txarb = arb = TlpArbiter(8, cfg.data_width)
        m.submodules.rxroute = rr = RxRouter(cfg.data_width, (DESC_TAG, WALK_TAG, CQ_TAG, VQ_TAG))
        m.submodules.cardmem = mem = CardMemory(cfg.data_width)
        m.submodules.dma_rd = drd = DmaReadChannel(cfg.data_width)
        m.submodules.dma_wr = dwr = DmaWriteChannel(cfg.data_width)
        m.submodules.dma_q = dq = DmaQueues(cfg)
        m.submodules.xlate = xl = Translator(cfg)
        m.submodules.fault = fu = FaultUnit(cfg)
        m.submodules.virtio = vio = VirtioPci(cfg)
        m.submodules.vnet = vn = VirtioNetEngine(cfg)
        m.submodules.rd_mux = rmux = DmaChannelMux()
        m.submodules.wr_mux = wmux = DmaChannelMux()
        m.submodules.xl_mux = xmux = LockMux(XlateReq, XlateResp)
        m.submodules.mblock = mb = MgmtBlock(cfg)
        m.submodules.muart = mu = MgmtUart(cfg)
        m.submodules.telem = tel = Telemetry(cfg)
        m.submodules.qos = qos = RateLimiter(cfg)
        W = cfg.data_width
        m.submodules.pktmem = pmem = Memory(shape=W, depth=PKT_WORDS(W), init=[])
        pm_w = pmem.write_port(granularity=8)
        pm_r = pmem.read_port()

        wiring.connect(m, wiring.flipped(self.rx), rr.i)
        m.d.comb += [vn.mac_fidx.eq(vio.mac_fidx), vio.mac.eq(vn.mac)]
        wiring.connect(m, rr.req, cp.rx)
        wiring.connect(m, rr.cpl0, dq.cpl)
        wiring.connect(m, rr.cpl1, xl.cpl)
        wiring.connect(m, rr.cpl2, fu.cpl)
        wiring.connect(m, rr.cpl_r, drd.cpl)
        wiring.connect(m, rr.cpl3, vn.cpl)
        # Card memory: the DMA channels' ports, lent to the staging copier while it copies (the
        # queue engine waits for the copy and the virtio engine never touches that memory).
        # Above it, the frame buffers: the channels' ports when they address them, the virtio
        # engine's own while it streams a frame to or from the uplink.
        pkt_w0 = PacketBuf.BASE * 8 // W
        wr_pkt = drd.mem.addr >= pkt_w0
        rd_pkt = dwr.mem.addr >= pkt_w0
        rd_pkt_q = Signal()
        with m.If(dwr.mem.en):
            m.d.sync += rd_pkt_q.eq(rd_pkt)
        lend = fu.mem_busy
        m.d.comb += [
            mem.wr.addr.eq(Mux(lend, fu.mem_wr.addr, drd.mem.addr)),
            mem.wr.data.eq(Mux(lend, fu.mem_wr.data, drd.mem.data)),
            mem.wr.en.eq(Mux(lend, fu.mem_wr.en, Mux(wr_pkt, 0, drd.mem.en))),
            mem.rd.addr.eq(Mux(lend, fu.mem_rd.addr, dwr.mem.addr)),
            mem.rd.en.eq(Mux(lend, fu.mem_rd.en, dwr.mem.en & ~rd_pkt)),
            dwr.mem.data.eq(Mux(rd_pkt_q, pm_r.data, mem.rd.data)),
            fu.mem_rd.data.eq(mem.rd.data),
            pm_w.addr.eq(Mux(vn.pm_own, vn.pm_wr.addr, drd.mem.addr - pkt_w0)),
            pm_w.data.eq(Mux(vn.pm_own, vn.pm_wr.data, drd.mem.data)),
            pm_w.en.eq(Mux(vn.pm_own, vn.pm_wr.en, Mux(wr_pkt, drd.mem.en, 0))),
            pm_r.addr.eq(Mux(vn.pm_own, vn.pm_rd.addr, dwr.mem.addr - pkt_w0)),
            pm_r.en.eq(Mux(vn.pm_own, vn.pm_rd.en, dwr.mem.en & rd_pkt)),
            vn.pm_rd.data.eq(pm_r.data),
            vn.snoop.addr.eq(pm_w.addr), vn.snoop.data.eq(pm_w.data), vn.snoop.en.eq(pm_w.en),
        ]
        # the translator, shared by the descriptor queues and the virtio engine
        wiring.connect(m, dq.xreq, xmux.cmd0)
        wiring.connect(m, xmux.done0, dq.xresp)
        wiring.connect(m, vn.xreq, xmux.cmd1)
        wiring.connect(m, xmux.done1, vn.xresp)
        wiring.connect(m, xmux.cmd, xl.req)
        wiring.connect(m, xl.resp, xmux.done)
        wiring.connect(m, dq.fault, fu.fault)
        wiring.connect(m, fu.resume, dq.resume)
        wiring.connect(m, dq.slot_free, fu.slot_free)
        wiring.connect(m, dq.release, fu.release)
        wiring.connect(m, fu.irq, mx.irq3)
        # the DMA channels, shared by the descriptor queues and the virtio engine
        wiring.connect(m, dq.rd_cmd, rmux.cmd0)
        wiring.connect(m, rmux.done0, dq.rd_done)
        wiring.connect(m, vn.rd_cmd, rmux.cmd1)
        wiring.connect(m, rmux.done1, vn.rd_done)
        wiring.connect(m, rmux.cmd, drd.cmd)
        wiring.connect(m, drd.done, rmux.done)
        wiring.connect(m, dq.wr_cmd, wmux.cmd0)
        wiring.connect(m, wmux.done0, dq.wr_done)
        wiring.connect(m, vn.wr_cmd, wmux.cmd1)
        wiring.connect(m, wmux.done1, vn.wr_done)
        wiring.connect(m, wmux.cmd, dwr.cmd)
        wiring.connect(m, dwr.done, wmux.done)
        # virtio: the transport and the engine
        m.d.comb += [
            vio.qr_fidx.eq(vn.qr_fidx), vio.qr_q.eq(vn.qr_q), vn.qr_size.eq(vio.qr_size),
            vn.qr_vec.eq(vio.qr_vec), vn.qr_en.eq(vio.qr_en),
            vio.qa_fidx.eq(vn.qa_fidx), vio.qa_q.eq(vn.qa_q), vio.qa_sel.eq(vn.qa_sel),
            vn.qa_data.eq(vio.qa_data),
            vn.live.eq(vio.live), vn.ev_idx.eq(vio.ev_idx), vn.indirect.eq(vio.indirect),
            vn.mrg.eq(vio.mrg),
            vn.kick.eq(vio.kick), vio.kick_ack.eq(vn.kick_ack), vio.kick_idx.eq(vn.kick_idx),
            vio.isr_set.eq(vn.isr_set), vio.isr_fidx.eq(vn.isr_fidx),
            vio.nr_set.eq(vn.nr_set), vio.nr_fidx.eq(vn.nr_fidx),
            vn.vreset.eq(vio.reset), vn.vreset_fidx.eq(vio.reset_fidx),
            vn.bus_num.eq(cs.bus_num), vn.bme.eq(cs.bme),
        ]
        wiring.connect(m, vn.irq, mx.irq5)
        wiring.connect(m, vn.uplink_tx, wiring.flipped(self.uplink_tx))
        wiring.connect(m, wiring.flipped(self.uplink_rx), vn.uplink_rx)
        wiring.connect(m, dq.irq, mx.irq2)
        m.d.comb += [
            drd.mrrs.eq(cs.mrrs), drd.bus_num.eq(cs.bus_num),
            dwr.mps.eq(cs.mps), dwr.bus_num.eq(cs.bus_num),
            dq.bus_num.eq(cs.bus_num), dq.bme.eq(cs.bme),
            dq.flr.eq(cs.flr), dq.flr_fidx.eq(cs.flr_fidx), dq.vf_reset.eq(cs.vf_reset),
            vn.vf_reset.eq(cs.vf_reset),
            xl.bus_num.eq(cs.bus_num), xl.flr.eq(cs.flr), xl.flr_fidx.eq(cs.flr_fidx),
            xl.vf_reset.eq(cs.vf_reset),
            fu.bus_num.eq(cs.bus_num),
            vio.flr.eq(cs.flr), vio.flr_fidx.eq(cs.flr_fidx), vio.vf_reset.eq(cs.vf_reset),
        ]
        wiring.connect(m, vio.irq, mx.irq4)
        wiring.connect(m, cp.cfg, cs.port)
        wiring.connect(m, cp.bar, bd.lookup)
        m.d.comb += [
            cs.cap_bus_stb.eq(cp.cap_bus_stb),
            cs.cap_bus.eq(cp.cap_bus),
            cp.bus_num.eq(cs.bus_num),
            cp.mps.eq(cs.mps),
            bd.pf_mse.eq(cs.pf_mse),
            bd.pf_bar0.eq(cs.pf_bar0),
            bd.pf_bar2.eq(cs.pf_bar2),
            bd.vf_enable.eq(cs.vf_enable),
            bd.vf_mse.eq(cs.vf_mse),
            bd.num_vfs.eq(cs.num_vfs),
            bd.vf_bar0.eq(cs.vf_bar0),
            bd.vf_shift.eq(cs.vf_shift),
            mx.bus_num.eq(cs.bus_num),
            mx.bme.eq(cs.bme),
            mx.msix_en.eq(cs.msix_en),
            mx.msix_fmask.eq(cs.msix_fmask),
            mx.vf_reset.eq(cs.vf_reset),
            mx.flr.eq(cs.flr), mx.flr_fidx.eq(cs.flr_fidx),
        ]

        # register bus: two masters, the completer (the host) and the management UART's frame
        # engine (the firmware), which gets the bus in cycles the completer leaves free. The
        # chosen request goes through one register stage (RegBusSlice ``regslice``) and then
        # through one more per target (``regslice_<target>``, placed next to it), so neither
        # the master mux nor the broadcast to eleven targets shares a cycle with a target's
        # address decode. The targets' read data is ORed (each drives 0 unless addressed)
        # back to both masters.
        targets = {"funcregs": fr, "msix": mx, "mgmt": mg, "dma_q": dq, "xlate": xl,
                   "fault": fu, "virtio": vio, "vnet": vn, "mboard": mb, "telemetry": tel,
                   "qos": qos}
        m.submodules.regslice = rs = RegBusSlice()
        uart_turn = Signal()
        m.d.comb += [mu.gnt.eq(~cp.regs.we & ~cp.regs.re),
                     uart_turn.eq(mu.gnt & (mu.bus.we | mu.bus.re))]
        for name in REQUEST_FIELDS:
            m.d.comb += getattr(rs.i, name).eq(Mux(uart_turn, getattr(mu.bus, name),
                                                   getattr(cp.regs, name)))
        rdata = 0
        slices = {}
        for tname, t in targets.items():
            m.submodules[f"regslice_{tname}"] = ts = slices[tname] = RegBusSlice()
            for name in REQUEST_FIELDS:
                m.d.comb += [getattr(ts.i, name).eq(getattr(rs.o, name)),
                             getattr(t.bus, name).eq(getattr(ts.o, name))]
            m.d.comb += ts.o.rdata.eq(t.bus.rdata)
            rdata = rdata | ts.i.rdata
        # the management block's "made by the UART" flag travels with the request
        m.d.comb += [rs.tag_i.eq(uart_turn), rs.o.rdata.eq(rdata),
                     slices["mboard"].tag_i.eq(rs.tag_o), mb.src_uart.eq(slices["mboard"].tag_o),
                     cp.regs.rdata.eq(rs.i.rdata), mu.bus.rdata.eq(rs.i.rdata)]
        m.d.comb += [mu.rxd.eq(self.uart_rxd), self.uart_txd.eq(mu.txd),
                     mb.util.eq(self.util), mb.uart_ok.eq(mu.ok), mb.uart_err.eq(mu.err)]
        # QoS on the virtio transmit path, and the telemetry taps
        m.d.comb += [vn.tx_allow.eq(qos.allow)]
        wiring.connect(m, vn.tx_ev, qos.debit)
        m.d.comb += [
            tel.tx.stb.eq(vn.tx_ev.stb), tel.tx.fidx.eq(vn.tx_ev.fidx),
            tel.tx.amount.eq(vn.tx_ev.amount),
            tel.dma_busy.stb.eq(dq.busy), tel.dma_busy.fidx.eq(dq.busy_fidx),
            tel.faults.stb.eq(dq.fault.stb), tel.faults.fidx.eq(dq.fault.fidx),
            dq.occ_fidx.eq(tel.occ_fidx), tel.occ.eq(dq.occ),
        ]
        wiring.connect(m, vn.rx_ev, tel.rx)
        wiring.connect(m, vn.qos_wait, tel.qos_wait)

        wiring.connect(m, fr.irq, mx.irq)
        # every event but the unexpected-completion count comes from the completer
        for name in ("malformed", "unsupported", "ca", "poisoned"):
            m.d.comb += getattr(mg.events, name).eq(getattr(cp.events, name))
        m.d.comb += mg.events.rx_tlp.eq(self.rx.valid & self.rx.ready & self.rx.p.sop)
        m.d.comb += mg.events.unexp_cpl.eq(cp.events.unexp_cpl | drd.unexp | dq.unexp
                                          | xl.unexp | fu.unexp)
        # (the virtio engine's host port takes every tag-3 completion, expected or not)
        for name in ("ca", "unsupported", "malformed", "poisoned"):
            m.d.comb += getattr(cs.err_events, name).eq(getattr(cp.events, name))
        m.d.comb += cs.err_events.unexp_cpl.eq(mg.events.unexp_cpl)
        m.d.comb += mg.events.tx_tlp.eq(self.tx.valid & self.tx.ready & self.tx.p.sop)

        wiring.connect(m, cp.tx, arb.i0)
        wiring.connect(m, mx.tx, arb.i1)
        wiring.connect(m, drd.tx, arb.i2)
        wiring.connect(m, dwr.tx, arb.i3)
        wiring.connect(m, dq.tx, arb.i4)
        wiring.connect(m, xl.tx, arb.i5)
        wiring.connect(m, fu.tx, arb.i6)
        wiring.connect(m, vn.tx, arb.i7)
        wiring.connect(m, arb.o, wiring.flipped(self.tx))
        return m
