"""Per-function telemetry counters of the management block (PF BAR2, :class:`MgmtBlockRegs`).

Counters live in small RAMs, one per event source, each updated by a read-modify-write
pipeline that takes one event per clock (the read port is transparent to the write port, so an
event for the function updated in the cycle before sees that cycle's sum). The host or the
firmware selects a function with ``TEL_SEL`` and reads its counters; a counter may lag its event
by two cycles. Counters are 32-bit, wrap, and are not cleared by FLR (they count for the card,
not for the function's driver).
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from regmap import MgmtBlockRegs as R

from ..config import CardConfig
from ..iface import RegBusSignature, EventSignature, OccupancySignature
from ..pcie.regfile import RegisterFile

__all__ = ["CounterBank", "Telemetry"]


class CounterBank(wiring.Component):
    """``depth`` counters of ``width`` bits in a RAM: ``inc`` adds to one per clock,
    ``rd_addr`` -> ``rd_data`` reads one with a cycle of latency."""

    def __init__(self, depth, width=32, amount_bits=16):
        self.depth = depth
        self.width = width
        super().__init__({
            "inc": In(EventSignature(amount_bits)),
            "rd_addr": In(range(depth)),
            "rd_data": Out(width),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.mem = mem = Memory(shape=self.width, depth=self.depth, init=[])
        wp = mem.write_port()
        rmw = mem.read_port(transparent_for=(wp,))
        rd = mem.read_port()
        s1 = Signal()
        s1_idx = Signal(range(self.depth))
        s1_amt = Signal.like(self.inc.amount)
        valid = self.inc.stb & (self.inc.fidx < self.depth)
        m.d.comb += [rmw.addr.eq(self.inc.fidx), rmw.en.eq(1)]
        m.d.sync += [s1.eq(valid), s1_idx.eq(self.inc.fidx), s1_amt.eq(self.inc.amount)]
        m.d.comb += [wp.addr.eq(s1_idx), wp.data.eq(rmw.data + s1_amt), wp.en.eq(s1)]
        m.d.comb += [rd.addr.eq(self.rd_addr), self.rd_data.eq(rd.data)]
        return m


# register -> (bank, bits of the bank's word)
_BANKS = ("tx", "rx", "dma_busy", "faults", "qos_wait")


class Telemetry(wiring.Component):
    """The TEL_* window. Event inputs: frames taken from a transmit queue and delivered into a
    receive queue (with their byte counts), DMA queue busy cycles, page faults, transmit visits
    held back by the QoS limiter; ``occ`` reads the DMA ring occupancy of the selected function."""

    def __init__(self, cfg: CardConfig):
        self._card = cfg
        super().__init__({
            "bus": In(RegBusSignature()),
            "tx": In(EventSignature(12)),
            "rx": In(EventSignature(12)),
            "dma_busy": In(EventSignature()),
            "faults": In(EventSignature()),
            "qos_wait": In(EventSignature()),
            "occ": Out(OccupancySignature()),
        })

    def elaborate(self, platform):
        nf = self._card.num_functions
        m = Module()
        sel = Signal(8)
        banks = {}
        for name in _BANKS:
            ev = getattr(self, name)
            # frames and their bytes: one event adds to two banks
            parts = ([(name + "_bytes", ev.amount), (name + "_frames", 1)]
                     if name in ("tx", "rx") else [(name, 1)])
            for bname, amount in parts:
                bank = CounterBank(nf, 32, len(ev.amount))
                m.submodules[f"bank_{bname}"] = bank
                m.d.comb += [bank.inc.stb.eq(ev.stb), bank.inc.fidx.eq(ev.fidx),
                             bank.inc.amount.eq(amount), bank.rd_addr.eq(sel)]
                banks[bname] = bank.rd_data
        m.d.comb += self.occ.fidx.eq(sel)

        rf = RegisterFile(m, self.bus, "telemetry")
        with m.If(rf.we(R.TEL_SEL, full=False)):
            m.d.sync += sel.eq(rf.wdata[:8])
        # reads: the banks' data is for ``sel`` already, and is taken the cycle after ``re``
        occ_q = Signal(16)
        m.d.sync += occ_q.eq(self.occ.occ)
        for off, val in [(R.TEL_SEL, sel), (R.TEL_TX_BYTES, banks["tx_bytes"]),
                         (R.TEL_TX_FRAMES, banks["tx_frames"]),
                         (R.TEL_RX_BYTES, banks["rx_bytes"]),
                         (R.TEL_RX_FRAMES, banks["rx_frames"]),
                         (R.TEL_DMA_BUSY, banks["dma_busy"]), (R.TEL_FAULTS, banks["faults"]),
                         (R.TEL_OCC, occ_q), (R.TEL_QOS_WAIT, banks["qos_wait"])]:
            rf.read_late(off, val)
        rf.finish()
        return m
