"""The register-file helper every register file of the card is built with.

A register file sits on the register bus (:func:`hdl.iface.RegBusSignature`) and serves one or
more windows of :data:`regmap.windows.WINDOWS`. The helper decodes them once (BAR, the PF alone
for PF-only windows, the address range) and builds the read-back the bus expects: ``rdata``
is zero unless this file was addressed, and carries the value the cycle after ``re``::

    rf = RegisterFile(m, self.bus, "dma_queue")
    with m.If(rf.we(DmaRegs.PROD)):             # a full-DW write of one register
        m.d.sync += prod[rf.fidx].eq(rf.wdata[:16])
    rf.read(DmaRegs.PROD, prod[rf.fidx])         # registered: sampled with ``re``
    rf.read_late(DmaRegs.SCRATCH, ram.data)      # already one cycle late (a RAM read port)
    rf.finish()                                  # drives bus.rdata

``read`` values are sampled in the cycle of ``re``; ``read_late`` values are taken as they are
in the cycle after it (the data of a block-RAM read port whose address was the request's).
"""

from amaranth import *

from regmap.windows import window

__all__ = ["RegisterFile"]


class RegisterFile:
    def __init__(self, m, bus, *windows):
        ws = [window(n) for n in windows]
        if not ws or len({w.bar for w in ws}) != 1 or len({w.functions for w in ws}) != 1:
            raise ValueError(f"register file over {windows}: one BAR and one function scope")
        self.m = m
        self.bus = bus
        self.windows = ws
        b = bus
        hit = 0
        for w in ws:
            hit = hit | self._in(w)
        sel = (b.bar == ws[0].bar) & hit
        if ws[0].functions == "pf":
            sel = sel & (b.fidx == 0)
        self.sel = Signal(name=f"{ws[0].name}_sel")
        m.d.comb += self.sel.eq(sel)
        self.fidx = b.fidx
        self.wdata = b.wdata
        self.be = b.be
        self._reads = []
        self._late = []
        self._done = False

    def _check(self, offset):
        if not any(offset in w for w in self.windows):
            raise ValueError(f"register {offset:#x} is outside {[w.name for w in self.windows]}")
        return offset // 4

    def _in(self, w):
        a = self.bus.addr
        below = a < w.limit // 4
        return below if w.base == 0 else (a >= w.base // 4) & below

    def within(self, name):
        """The bus addresses window ``name`` (one of this file's)."""
        return self.sel & self._in(next(w for w in self.windows if w.name == name))

    def addressed(self, offset):
        """The bus names register ``offset`` of this file (a strobe may still be absent)."""
        return self.sel & (self.bus.addr == self._check(offset))

    def we(self, offset, full=True):
        """A write of register ``offset`` (``full``: all four byte enables; else any)."""
        be_ok = (self.bus.be == 0xF) if full else self.bus.be.any()
        return self.bus.we & self.addressed(offset) & be_ok

    def re(self, offset):
        """A read of register ``offset`` (for reads with a side effect)."""
        return self.bus.re & self.addressed(offset)

    def read(self, where, value):
        """``value`` reads back at ``where`` (a register offset, or a condition on the bus)."""
        if isinstance(where, int):
            self._check(where)
        self._reads.append((where, value))

    def read_late(self, where, value):
        """``value`` reads back at ``where``, taken the cycle after ``re`` as it is then."""
        self._late.append((where, value))

    def _cond(self, where):
        return self.addressed(where) if isinstance(where, int) else (self.sel & where)

    def finish(self):
        assert not self._done
        self._done = True
        m, b = self.m, self.bus
        name = self.windows[0].name
        rdata = Signal(32, name=f"{name}_rdata")
        if self._reads:
            regs = [(w // 4, v) for w, v in self._reads if isinstance(w, int)]
            conds = [(w, v) for w, v in self._reads if not isinstance(w, int)]
            with m.If(b.re):
                m.d.sync += rdata.eq(0)
                with m.If(self.sel):
                    if regs:
                        with m.Switch(b.addr):
                            for dw, value in regs:
                                with m.Case(dw):
                                    m.d.sync += rdata.eq(value)
                    for cond, value in conds:
                        with m.If(cond):
                            m.d.sync += rdata.eq(value)
        out = rdata
        if self._late:
            late = Signal(len(self._late), name=f"{name}_rlate")
            m.d.sync += late.eq(0)
            with m.If(b.re):
                for i, (where, _) in enumerate(self._late):
                    m.d.sync += late[i].eq(self._cond(where))
            for i, (_, value) in enumerate(self._late):
                out = out | Mux(late[i], value, 0)
        m.d.comb += b.rdata.eq(out)
