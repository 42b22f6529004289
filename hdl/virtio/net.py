"""The virtio-net datapath of the card, as one block: what :mod:`hdl.card` connects.

::

    bus ──► NetRegisters ──mig──► VirtioNetEngine ◄──transport──► (hdl.virtio.transport)
               │ mac                  │   │ move         │ xreq
               ▼                      │   ▼              │
            MacTable ◄────lookup──────┘ PieceMover ──────┤ xreq ──► LockMux ──► xreq (translator)
               ▲ show                     │ rd / wr      │
     (transport's device config)          ▼              ▼
                                    DMA channels    host port TLPs (tx / cpl)

* :class:`hdl.virtio.engine.VirtioNetEngine` -- the split virtqueues and the frame switch, with
  its notification unit (:class:`hdl.virtio.notify.NotifyUnit`: the interrupt decisions) and
  receive prefetch unit (:class:`hdl.virtio.prefetch.RxPrefetch`), each with a host port of
  its own whose TLPs and completions share the engine's ``tx`` / ``cpl``;
* :class:`hdl.virtio.net_regs.NetRegisters` -- its counters and migration controls (PF BAR2);
* :class:`hdl.virtio.mac_table.MacTable` -- the station table;
* :class:`hdl.dma.mover.PieceMover` -- buffers between host and card memory, a translated
  page at a time (the transmit gather and the receive scatter share it);
* a :class:`hdl.dma.mux.LockMux` -- the engine's host port and the mover take turns at the
  translator.
"""

from amaranth import *
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from ..config import CardConfig
from ..iface import (RegBusSignature, IrqRequestSignature, DmaCmd, DmaDone, XlateReq, XlateResp,
                     EventSignature, PktReadPort, PktWritePort, UplinkBeat, LinkSignature,
                     FunctionStateSignature)
from ..dma.mover import PieceMover
from ..dma.mux import LockMux
from ..pcie.tlp import tlp_stream
from .engine import VirtioNetEngine
from .mac_table import MacTable, MacShowSignature
from .net_regs import NetRegisters
from .transport import VirtqSignature

__all__ = ["VirtioNet"]


class VirtioNet(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        nf = cfg.num_functions
        W = cfg.data_width
        super().__init__({
            "bus":       In(RegBusSignature()),         # NetRegs, MigRegs (PF BAR2)
            "tx":        Out(tlp_stream(W)),            # the engine's host ports
            "cpl":       In(tlp_stream(W)),
            "unexp":     Out(1),
            "rd_cmd":    Out(stream.Signature(DmaCmd)),  # the DMA channels, for the mover
            "rd_done":   In(stream.Signature(DmaDone)),
            "wr_cmd":    Out(stream.Signature(DmaCmd)),
            "wr_done":   In(stream.Signature(DmaDone)),
            "xreq":      Out(stream.Signature(XlateReq)),     # the functions' domains
            "xresp":     In(stream.Signature(XlateResp)),
            "irq":       Out(IrqRequestSignature()),
            "link":      In(LinkSignature()),
            "fn":        In(FunctionStateSignature(nf)),
            "transport": Out(VirtqSignature(nf)),
            "show":      In(MacShowSignature()),        # the device configuration's mac field
            "pm_rd":     Out(PktReadPort(W)),           # the frame buffers
            "pm_wr":     Out(PktWritePort(W)),
            "pm_own":    Out(1),
            "snoop":     In(PktWritePort(W)),
            "uplink_tx": Out(stream.Signature(UplinkBeat(W))),
            "uplink_rx": In(stream.Signature(UplinkBeat(W))),
            "tx_allow":  In(nf, init=(1 << nf) - 1),     # QoS and telemetry
            "tx_ev":     Out(EventSignature(12)),
            "rx_ev":     Out(EventSignature(12)),
            "qos_wait":  Out(EventSignature()),
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        m.submodules.engine = eng = VirtioNetEngine(cfg)
        m.submodules.regs = regs = NetRegisters(cfg)
        m.submodules.mac = mac = MacTable(cfg.num_functions)
        m.submodules.mover = mv = PieceMover()
        m.submodules.xmux = xmux = LockMux(XlateReq, XlateResp, ("port", "mover"))

        wiring.connect(m, wiring.flipped(self.bus), regs.bus)
        wiring.connect(m, eng.events, regs.events)
        wiring.connect(m, regs.mig, eng.mig)
        wiring.connect(m, regs.mac, mac.program)
        wiring.connect(m, eng.mac, mac.lookup)
        wiring.connect(m, wiring.flipped(self.show), mac.show)
        wiring.connect(m, eng.move, mv.move)
        wiring.connect(m, eng.xreq, xmux.port_cmd)
        wiring.connect(m, xmux.port_done, eng.xresp)
        wiring.connect(m, mv.xreq, xmux.mover_cmd)
        wiring.connect(m, xmux.mover_done, mv.xresp)
        wiring.connect(m, xmux.cmd, wiring.flipped(self.xreq))
        wiring.connect(m, wiring.flipped(self.xresp), xmux.done)
        for name in ("rd_cmd", "wr_cmd"):
            wiring.connect(m, getattr(mv, name), wiring.flipped(getattr(self, name)))
        for name in ("rd_done", "wr_done"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(mv, name))
        for name in ("tx", "irq", "transport", "pm_rd", "pm_wr", "uplink_tx", "tx_ev", "rx_ev",
                     "qos_wait"):
            wiring.connect(m, getattr(eng, name), wiring.flipped(getattr(self, name)))
        for name in ("cpl", "link", "fn", "snoop", "uplink_rx"):
            wiring.connect(m, wiring.flipped(getattr(self, name)), getattr(eng, name))
        m.d.comb += [self.unexp.eq(eng.unexp), self.pm_own.eq(eng.pm_own),
                     eng.tx_allow.eq(self.tx_allow)]
        return m
