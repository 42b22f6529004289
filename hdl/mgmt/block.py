"""The management block: what the firmware and the host share (PF BAR2, :class:`MgmtBlockRegs`).

* the four utilisation inputs (custom hardware, processor, memory, network; percent), sampled
  every clock from the card's ``util`` port;
* a free-running 64-bit cycle counter (reading ``CYCLES_LO`` latches ``CYCLES_HI``);
* a mailbox: a FIFO of 31-bit words each way between the host (PF BAR2) and the firmware (the
  management UART);
* one owner per management task, the card or the host, and a FIFO of requests per task that the
  host pushes and only the owner can pop. An owner register holds exactly one of the two values
  at every instant: a move of a task is one write, never a moment with two owners or none.

Which side made an access is ``src_uart``: 1 for the UART's frame engine (the card's side),
0 for the PCIe completer (the host's side). Reads of ``REQ_POP`` and of the receiving mailbox
register pop; BAR2 is non-prefetchable, so no host ever reads it speculatively.
"""

from amaranth import *
from amaranth.lib import data, wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from regmap import MgmtBlockRegs as R, Owner

from ..config import CardConfig
from ..iface import RegBusSignature
from ..pcie.regfile import RegisterFile

__all__ = ["MgmtBlock", "UtilLayout"]

UtilLayout = data.StructLayout({"custom_hw": 8, "processor": 8, "memory": 8, "network": 8})


class MgmtBlock(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        super().__init__({
            "bus": In(RegBusSignature()),
            "src_uart": In(1),
            "util": In(UtilLayout),
            "uart_ok": In(1),        # a UART frame was executed
            "uart_err": In(1),       # a UART frame was refused (error reply)
            "owner": Out(2 * R.TASKS),   # task t's owner at [2t+1:2t]
        })

    def elaborate(self, platform):
        m = Module()
        b = self.bus
        rf = RegisterFile(m, b, "mgmt_block", "mgmt_tasks")
        host = ~self.src_uart
        card = self.src_uart

        util_q = Signal(32)
        m.d.sync += util_q.eq(self.util.as_value())
        cycles = Signal(64)
        cycles_hi = Signal(32)
        m.d.sync += cycles.eq(cycles + 1)

        owner_refused = Signal(32)
        pop_denied = Signal(32)
        req_refused = Signal(32)
        mbox_refused = Signal(16)
        uart_frames = Signal(32)
        uart_errors = Signal(32)
        with m.If(self.uart_ok):
            m.d.sync += uart_frames.eq(uart_frames + 1)
        with m.If(self.uart_err):
            m.d.sync += uart_errors.eq(uart_errors + 1)

        # ---- mailbox ------------------------------------------------------------------------
        m.submodules.h2c = h2c = SyncFIFO(width=31, depth=R.MBOX_DEPTH)
        m.submodules.c2h = c2h = SyncFIFO(width=31, depth=R.MBOX_DEPTH)
        for fifo, reg, sender in ((h2c, R.MBOX_H2C, host), (c2h, R.MBOX_C2H, card)):
            push = rf.we(reg) & sender
            m.d.comb += [fifo.w_data.eq(rf.wdata[:31]), fifo.w_en.eq(push)]
            with m.If(push & ~fifo.w_rdy):
                m.d.sync += mbox_refused.eq(mbox_refused + 1)
            m.d.comb += fifo.r_en.eq(rf.re(reg) & ~sender & fifo.r_rdy)

        # ---- tasks: owners and request FIFOs ------------------------------------------------
        owners = [Signal(2, name=f"owner{t}", init=Owner.CARD) for t in range(R.TASKS)]
        m.d.comb += self.owner.eq(Cat(*owners))
        reqs = []
        for t in range(R.TASKS):
            fifo = SyncFIFO(width=31, depth=R.REQ_DEPTH)
            m.submodules[f"req{t}"] = fifo
            reqs.append(fifo)
            with m.If(rf.we(R.OWNER + 4 * t)):
                with m.If((rf.wdata == Owner.CARD) | (rf.wdata == Owner.HOST)):
                    m.d.sync += owners[t].eq(rf.wdata[:2])
                with m.Else():
                    m.d.sync += owner_refused.eq(owner_refused + 1)
            push = rf.we(R.REQ_PUSH + 4 * t) & host
            m.d.comb += [fifo.w_data.eq(rf.wdata[:31]), fifo.w_en.eq(push)]
            with m.If(push & ~fifo.w_rdy):
                m.d.sync += req_refused.eq(req_refused + 1)
            is_owner = Mux(card, owners[t] == Owner.CARD, owners[t] == Owner.HOST)
            pop = rf.re(R.REQ_POP + 4 * t)
            m.d.comb += fifo.r_en.eq(pop & is_owner & fifo.r_rdy)
            with m.If(pop & ~is_owner):
                m.d.sync += pop_denied.eq(pop_denied + 1)

        # ---- reads --------------------------------------------------------------------------
        simple = {R.BLOCK_ID: R.BLOCK_ID_VALUE, R.UTIL: util_q,
                  R.CYCLES_HI: cycles_hi, R.OWNER_REFUSED: owner_refused,
                  R.POP_DENIED: pop_denied, R.REQ_REFUSED: req_refused,
                  R.UART_FRAMES: uart_frames, R.UART_ERRORS: uart_errors,
                  R.MBOX_STAT: Cat(h2c.r_level, C(0, 8 - len(h2c.r_level)),
                                   c2h.r_level, C(0, 8 - len(c2h.r_level)), mbox_refused)}
        for off, val in simple.items():
            rf.read(off, val)
        rf.read(R.CYCLES_LO, cycles[:32])
        with m.If(rf.re(R.CYCLES_LO)):
            m.d.sync += cycles_hi.eq(cycles[32:])         # HI is latched by the LO read
        for fifo, reg, sender in ((h2c, R.MBOX_H2C, host), (c2h, R.MBOX_C2H, card)):
            rf.read(reg, Mux(~sender & fifo.r_rdy, Cat(fifo.r_data, C(1, 1)), 0))
        for t_ in range(R.TASKS):
            rf.read(R.OWNER + 4 * t_, owners[t_])
            rf.read(R.REQ_POP + 4 * t_, Mux(reqs[t_].r_en, Cat(reqs[t_].r_data, C(1, 1)), 0))
            rf.read(R.REQ_LEVEL + 4 * t_, reqs[t_].r_level)
        rf.finish()
        return m
