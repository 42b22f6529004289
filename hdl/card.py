"""Top level of the card: instantiates the blocks and connects them, nothing else.

::

    rx ─► RxRouter ─┬─ requests ─► Completer ─┬─► ConfigSpace (PF + VFs) ─► link, fn, bars
                    │                          └─► BarDecoder
                    │                        RegBusInterconnect ◄── host (Completer)
                    │                          │                ◄── uart (MgmtUart, firmware)
                    │                          └─► every register file (regmap.windows)
                    ├─ cpl desc ─► DmaQueues ──┬─ cmds ─► DmaReadChannel / DmaWriteChannel
                    ├─ cpl walk ─► Translator ◄┤ (device TLB, page walks)   │ CardMemoryMap
                    ├─ cpl cq ───► FaultUnit ◄─┘ (staging, FBQ/IOPF/CQ) ────┤ (card memory,
                    ├─ cpl vq ───► VirtioNet ◄─► VirtioPci (transport)      │  frame buffers)
                    └─ cpl dma ──► DmaReadChannel                           │
    tx ◄─ DirtyLogger ◄─ TlpArbiter ◄─ every TLP source (ARB_SOURCES)

The configuration space's state reaches every block that follows it through one connection
per signature (``link``: bus number, MPS, MRRS; ``fn``: per-function enables and the reset
strobes; ``bars``: the BAR decoder's). Completions find their requester by tag
(:data:`hdl.pcie.host_port.CPL_ROUTES`). The RX router and the TX arbiter are each one register
stage and the register bus two (one after the master mux, one in front of each target), so the
blocks' logic starts and ends at flip-flops at those crossings (the synthesis report in
``hdl/synth.py`` names the path that limits the clock now).
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from .config import CardConfig
from .iface import UplinkBeat, XlateReq, XlateResp
from .dma.dirty_log import DirtyLogger
from .dma.memory import CardMemoryMap
from .dma.mux import DmaChannelMux, LockMux
from .dma.queue import DmaQueues
from .dma.read import DmaReadChannel
from .dma.write import DmaWriteChannel
from .iommu.fault import FaultUnit
from .iommu.translate import Translator
from .mgmt.block import MgmtBlock, UtilLayout
from .mgmt.card_regs import MgmtRegisters
from .mgmt.frames import MgmtUart
from .mgmt.qos import RateLimiter
from .mgmt.telemetry import Telemetry
from .pcie.bar_decode import BarDecoder
from .pcie.completer import Completer
from .pcie.config_space import ConfigSpace
from .pcie.func_regs import FuncRegisters
from .pcie.host_port import CPL_ROUTES
from .pcie.msix import MsixController
from .pcie.regbus import RegBusInterconnect
from .pcie.rx_router import RxRouter
from .pcie.tlp import tlp_stream
from .pcie.tx_arbiter import TlpArbiter
from .virtio.net import VirtioNet
from .virtio.transport import VirtioPci

__all__ = ["Card", "ARB_SOURCES", "REG_TARGETS"]

#: The TLP sources, in the TX arbiter's round-robin order.
ARB_SOURCES = ("completer", "msix", "dma_rd", "dma_wr", "dma_q", "xlate", "fault", "virtio")
#: The register files on the register bus (the targets of regmap.windows.WINDOWS).
REG_TARGETS = ("funcregs", "msix", "mgmt", "dma_q", "xlate", "fault", "virtio", "vnet",
               "mboard", "telemetry", "qos", "dirtylog")


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
        W = cfg.data_width
        m = Module()
        # ---- PCIe transaction layer ---------------------------------------------------------
        m.submodules.rxroute = rr = RxRouter(W, CPL_ROUTES)
        m.submodules.txarb = arb = TlpArbiter(ARB_SOURCES, W)
        m.submodules.completer = cp = Completer(cfg)
        m.submodules.cfgspace = cs = ConfigSpace(cfg)
        m.submodules.bardec = bd = BarDecoder(cfg)
        m.submodules.regbus = ic = RegBusInterconnect(REG_TARGETS, tagged=("mboard",))
        m.submodules.funcregs = fr = FuncRegisters(cfg)
        m.submodules.msix = mx = MsixController(cfg)
        # ---- DMA, translation, faults -------------------------------------------------------
        m.submodules.dma_rd = drd = DmaReadChannel(W)
        m.submodules.dma_wr = dwr = DmaWriteChannel(W)
        m.submodules.dma_q = dq = DmaQueues(cfg)
        m.submodules.cardmem = mem = CardMemoryMap(W)
        m.submodules.rd_mux = rmux = DmaChannelMux(("queue", "virtio"))
        m.submodules.wr_mux = wmux = DmaChannelMux(("queue", "virtio"))
        m.submodules.xlate = xl = Translator(cfg)
        m.submodules.xl_mux = xmux = LockMux(XlateReq, XlateResp, ("queue", "virtio"))
        m.submodules.fault = fu = FaultUnit(cfg)
        m.submodules.dirtylog = dl = DirtyLogger(cfg, len(ARB_SOURCES),
                                                 skip=(ARB_SOURCES.index("msix"),))
        # ---- virtio-net ---------------------------------------------------------------------
        m.submodules.virtio = vio = VirtioPci(cfg)
        m.submodules.vnet = vn = VirtioNet(cfg)
        # ---- management ---------------------------------------------------------------------
        m.submodules.mgmt = mg = MgmtRegisters(cfg, requesters=5)
        m.submodules.mblock = mb = MgmtBlock(cfg)
        m.submodules.muart = mu = MgmtUart(cfg)
        m.submodules.telem = tel = Telemetry(cfg)
        m.submodules.qos = qos = RateLimiter(cfg)

        # the link: TLPs in by destination, TLPs out by round robin
        wiring.connect(m, wiring.flipped(self.rx), rr.i)
        wiring.connect(m, rr.req, cp.rx)
        for route, blk in (("desc", dq), ("walk", xl), ("cq", fu), ("vq", vn), ("dma", drd)):
            wiring.connect(m, getattr(rr, f"cpl_{route}"), blk.cpl)
        for name, blk in zip(ARB_SOURCES, (cp, mx, drd, dwr, dq, xl, fu, vn)):
            wiring.connect(m, blk.tx, getattr(arb, f"i_{name}"))
        wiring.connect(m, arb.o, dl.i)
        m.d.comb += dl.i_src.eq(arb.o_src)
        wiring.connect(m, dl.o, wiring.flipped(self.tx))

        # configuration requests, and the configuration space's state to whoever follows it
        wiring.connect(m, cp.cfg, cs.port)
        wiring.connect(m, cp.bar, bd.lookup)
        m.d.comb += [cs.cap_bus_stb.eq(cp.cap_bus_stb), cs.cap_bus.eq(cp.cap_bus)]
        wiring.connect(m, cs.link, cp.link, mx.link, drd.link, dwr.link, dq.link, xl.link,
                       fu.link, vn.link, dl.link)
        wiring.connect(m, cs.fn, mx.fn, dq.fn, xl.fn, vio.fn, vn.fn)
        wiring.connect(m, cs.bars, bd.bars)

        # the register bus: the host's requests and the firmware's, to every register file
        wiring.connect(m, cp.regs, ic.host)
        wiring.connect(m, mu.bus, ic.uart)
        m.d.comb += [mu.gnt.eq(ic.uart_gnt), mb.src_uart.eq(ic.mboard_uart)]
        for name, blk in zip(REG_TARGETS, (fr, mx, mg, dq, xl, fu, vio, vn, mb, tel, qos, dl)):
            wiring.connect(m, getattr(ic, f"t_{name}"), blk.bus)

        # interrupts
        for name, blk in (("func", fr), ("dma", dq), ("fault", fu), ("virtio_cfg", vio),
                          ("virtio_queue", vn)):
            wiring.connect(m, blk.irq, getattr(mx, f"irq_{name}"))

        # DMA channels, card memory, translation, page faults
        wiring.connect(m, drd.mem, mem.dma_wr)
        wiring.connect(m, dwr.mem, mem.dma_rd)
        wiring.connect(m, fu.mem_wr, mem.copy_wr)
        wiring.connect(m, fu.mem_rd, mem.copy_rd)
        m.d.comb += mem.copy_busy.eq(fu.mem_busy)
        for mux, client, chan in ((rmux, "rd", drd), (wmux, "wr", dwr)):
            wiring.connect(m, getattr(dq, f"{client}_cmd"), mux.queue_cmd)
            wiring.connect(m, mux.queue_done, getattr(dq, f"{client}_done"))
            wiring.connect(m, getattr(vn, f"{client}_cmd"), mux.virtio_cmd)
            wiring.connect(m, mux.virtio_done, getattr(vn, f"{client}_done"))
            wiring.connect(m, mux.cmd, chan.cmd)
            wiring.connect(m, chan.done, mux.done)
        wiring.connect(m, dq.xreq, xmux.queue_cmd)
        wiring.connect(m, xmux.queue_done, dq.xresp)
        wiring.connect(m, vn.xreq, xmux.virtio_cmd)
        wiring.connect(m, xmux.virtio_done, vn.xresp)
        wiring.connect(m, xmux.cmd, xl.req)
        wiring.connect(m, xl.resp, xmux.done)
        wiring.connect(m, dq.fault, fu.fault)
        wiring.connect(m, fu.resume, dq.resume)
        wiring.connect(m, dq.slot_free, fu.slot_free)
        wiring.connect(m, dq.release, fu.release)

        # virtio-net: the transport, the station table, the frame buffers, the uplink
        wiring.connect(m, vn.transport, vio.engine)
        wiring.connect(m, vio.mac, vn.show)
        wiring.connect(m, vn.pm_rd, mem.pkt_rd)
        wiring.connect(m, vn.pm_wr, mem.pkt_wr)
        m.d.comb += mem.pkt_own.eq(vn.pm_own)
        wiring.connect(m, mem.snoop, vn.snoop)
        wiring.connect(m, vn.uplink_tx, wiring.flipped(self.uplink_tx))
        wiring.connect(m, wiring.flipped(self.uplink_rx), vn.uplink_rx)

        # management: QoS on the transmit path, telemetry taps, errors and traffic counted
        m.d.comb += vn.tx_allow.eq(qos.allow)
        wiring.connect(m, vn.tx_ev, qos.debit, tel.tx)
        wiring.connect(m, vn.rx_ev, tel.rx)
        wiring.connect(m, vn.qos_wait, tel.qos_wait)
        wiring.connect(m, dq.busy_ev, tel.dma_busy)
        wiring.connect(m, dq.fault_ev, tel.faults)
        wiring.connect(m, tel.occ, dq.occ)
        wiring.connect(m, cp.events, mg.completer)
        m.d.comb += [mg.unexp.eq(Cat(drd.unexp, dq.unexp, xl.unexp, fu.unexp, vn.unexp)),
                     mg.rx_tlp.eq(rr.rx_tlp), mg.tx_tlp.eq(arb.tx_tlp)]
        wiring.connect(m, mg.errors, cs.err_events)
        m.d.comb += [mu.rxd.eq(self.uart_rxd), self.uart_txd.eq(mu.txd), mb.util.eq(self.util),
                     mb.uart_ok.eq(mu.ok), mb.uart_err.eq(mu.err)]
        return m
