"""PF BAR2 registers of the virtio-net switch: its counters and control (:class:`regmap.NetRegs`)
and the per-function migration controls (:class:`regmap.MigRegs`).

* **counters**: 32-bit, wrapping, one per event the engine reports (``events``);
* **control**: ``NetRegs.CTRL`` DEFAULT_PF;
* **coalescing**: ``NetRegs.COAL``, how many used elements a queue may hold back and for how
  long, and ``NetRegs.COAL_Q``, the same per queue of the function ``MIG_SEL`` selects (a queue
  without its own setting uses ``COAL``);
* **migration**: ``MIG_SEL`` selects a function; ``MIG_CTRL`` bit 0 stops it (the engine starts
  no transmit for it and delivers nothing into it); ``MIG_STATUS`` reads stopped and idle
  (stopped, and the engine holds none of its work); the device-internal indices of queue
  ``Q_SEL`` and the pending transmit notifications of the selected function read through, and
  are written back only while it is idle (a write otherwise is ignored); ``MAC_LO`` / ``MAC_HI`` are its entry in
  the station table (:mod:`hdl.virtio.mac_table`).

The engine (:mod:`hdl.virtio.engine`) owns the indices and acts on the controls; this block
owns the registers and turns accepted writes into strobes on ``mig``.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from regmap import NetRegs, MigRegs as MG

from ..config import CardConfig
from ..iface import RegBusSignature
from ..pcie.regfile import RegisterFile
from .mac_table import MacProgramSignature
from .transport import NQ, times_nq

__all__ = ["NetRegisters", "NET_EVENTS", "NetEventsSignature", "MigrationSignature"]

#: The engine's counted events, in the order of their registers.
NET_EVENTS = ("tx_frames", "rx_frames", "uplink_out", "uplink_in", "drop_nobuf", "drop_bad",
              "drop_unknown", "drop_size", "queue_irqs", "irq_suppressed", "xlate_errors",
              "csum_filled", "csum_valid", "csum_bad", "drop_csum")

#: The index registers the migration window reads through and restores (of queue Q_SEL).
MIG_INDICES = {"q_avail": MG.Q_AVAIL, "q_used": MG.Q_USED}


def NetEventsSignature():
    """One-cycle strobes, one per counted event (the engine's side)."""
    return wiring.Signature({n: Out(1) for n in NET_EVENTS})


def MigrationSignature(num_functions):
    """The migration controls (the registers' side): the stopped functions, DEFAULT_PF, the
    selected function and queue and what the engine knows of them (the queue's indices a cycle
    after ``sel`` / ``q`` change), and restore strobes for its indices (one per index,
    ``wdata`` the value), given only while it is idle."""
    members = {
        "stop":       Out(num_functions),
        "default_pf": Out(1),
        "sel":        Out(8),
        "q":          Out(range(NQ)),
        "busy":       In(1),              # the engine holds work of function ``sel``
        "tx_pend":    In(1),
        "set_tx_pend": Out(1),
        "wdata":      Out(16),
        # used-ring coalescing of queue ``coal_q`` (fidx * NQ + q), a cycle after it is given:
        # NetRegs.COAL_Q where the queue has its own, else NetRegs.COAL
        "coal_q":     In(range(num_functions * NQ)),
        "coal":       Out(8),             # used elements the queue may hold back
        "coal_time":  Out(16),            # ... and clocks the oldest of them may wait
    }
    for name in MIG_INDICES:
        members[name] = In(16)
        members[f"set_{name}"] = Out(1)
    return wiring.Signature(members)


class NetRegisters(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        super().__init__({
            "bus":    In(RegBusSignature()),
            "events": In(NetEventsSignature()),
            "mig":    Out(MigrationSignature(cfg.num_functions)),
            "mac":    Out(MacProgramSignature()),
        })

    def elaborate(self, platform):
        nf = self._card.num_functions
        m = Module()
        rf = RegisterFile(m, self.bus, "net", "migration", "net_coal")
        mg = self.mig

        for name in NET_EVENTS:
            ctr = Signal(32, name=name)
            with m.If(getattr(self.events, name)):
                m.d.sync += ctr.eq(ctr + 1)
            rf.read(getattr(NetRegs, name.upper()), ctr)

        with m.If(rf.we(NetRegs.CTRL)):
            m.d.sync += mg.default_pf.eq(rf.wdata[0])
        rf.read(NetRegs.CTRL, mg.default_pf)
        sel_ok = mg.sel < nf
        self._coalescing(m, rf, sel_ok)
        stopped = mg.stop.bit_select(mg.sel, 1)
        idle = stopped & ~mg.busy
        with m.If(rf.we(MG.SEL)):
            m.d.sync += mg.sel.eq(rf.wdata[:8])
        q_ok = Signal(init=1)
        with m.If(rf.we(MG.Q_SEL)):
            m.d.sync += [mg.q.eq(rf.wdata[:len(mg.q)]), q_ok.eq(rf.wdata < NQ)]
        rf.read(MG.Q_SEL, Mux(q_ok, mg.q, 0xFFFF_FFFF))         # none: all ones
        with m.If(rf.we(MG.CTRL) & sel_ok):
            m.d.sync += mg.stop.bit_select(mg.sel, 1).eq(rf.wdata[0])
        rf.read(MG.SEL, mg.sel)
        rf.read(MG.CTRL, stopped)
        rf.read(MG.STATUS, Cat(stopped, idle))
        restore = idle & sel_ok
        m.d.comb += mg.wdata.eq(rf.wdata[:16])
        for name, off in MIG_INDICES.items():
            m.d.comb += getattr(mg, f"set_{name}").eq(rf.we(off) & restore & q_ok)
            rf.read(off, Mux(q_ok, getattr(mg, name), 0))
        m.d.comb += mg.set_tx_pend.eq(rf.we(MG.TX_PEND) & restore)
        rf.read(MG.TX_PEND, mg.tx_pend)

        mac = self.mac
        m.d.comb += [mac.sel.eq(mg.sel), mac.wdata.eq(rf.wdata),
                     mac.we_lo.eq(rf.we(MG.MAC_LO)), mac.we_hi.eq(rf.we(MG.MAC_HI))]
        rf.read(MG.MAC_LO, mac.rd_mac[:32])
        rf.read(MG.MAC_HI, mac.rd_mac[32:])
        rf.finish()
        return m

    def _coalescing(self, m, rf, sel_ok):
        """NetRegs.COAL, the default, and NetRegs.COAL_Q, each queue's own (block RAM; an OWN
        flag per queue in a register, so the card's reset returns every queue to the
        default)."""
        nf = self._card.num_functions
        mg = self.mig
        coal = Signal(32, init=NetRegs.COAL_RESET)
        with m.If(rf.we(NetRegs.COAL)):
            m.d.sync += coal.eq(rf.wdata & 0xFFFF_00FF)
        rf.read(NetRegs.COAL, coal)

        per_q = Memory(shape=24, depth=nf * NQ, init=[])     # count, time
        own = Signal(nf * NQ)
        wr = per_q.write_port()
        eng_rd = per_q.read_port()
        bus_rd = per_q.read_port()
        m.submodules.coal_q = per_q
        qn = Signal(range(NQ))                 # the queue the bus names in the window
        m.d.comb += qn.eq(rf.bus.addr - NetRegs.COAL_Q // 4)
        at = Signal(range(nf * NQ))
        m.d.comb += at.eq(times_nq(mg.sel) + qn)
        in_q = rf.within("net_coal") & (rf.bus.addr >= NetRegs.COAL_Q // 4)
        with m.If(in_q & rf.bus.we & (rf.bus.be == 0xF) & sel_ok):
            m.d.comb += [wr.en.eq(1), wr.addr.eq(at),
                         wr.data.eq(Cat(rf.wdata[:8], rf.wdata[16:]))]
            m.d.sync += own.bit_select(at, 1).eq(rf.wdata[8])
        own_bus = Signal()
        ok_bus = Signal()
        m.d.sync += [own_bus.eq(own.bit_select(at, 1)), ok_bus.eq(sel_ok)]
        m.d.comb += bus_rd.addr.eq(at)
        rf.read_late(in_q, Mux(ok_bus, Cat(bus_rd.data[:8], own_bus, C(0, 7), bus_rd.data[8:]), 0))

        own_eng = Signal()
        m.d.sync += own_eng.eq(own.bit_select(mg.coal_q, 1))
        m.d.comb += [eng_rd.addr.eq(mg.coal_q),
                     mg.coal.eq(Mux(own_eng, eng_rd.data[:8], coal[:8])),
                     mg.coal_time.eq(Mux(own_eng, eng_rd.data[8:], coal[16:]))]
