"""Per-function QoS: a token bucket on each function's virtio transmit path.

Registers (PF BAR2, :class:`MgmtBlockRegs`): ``QOS_SEL`` picks a function, ``QOS_RATE`` sets
its fill rate in 1/256 byte per card clock (0 = unlimited), ``QOS_BURST`` its depth in bytes;
``QOS_TOKENS`` reads the bucket (signed, 1/256 byte). Writing the rate or the depth fills the
bucket.

Every clock each limited bucket gains its rate, up to its depth. The virtio engine may start a
frame of a function whose bucket is not negative (``allow``); the frame's length is then taken
from the bucket (``debit``), which may go negative, so a function sends at its rate on average
with bursts of at most the depth plus one frame. Buckets are flip-flops so that every function
refills in parallel; the arithmetic is 24 bits per function.
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from regmap import MgmtBlockRegs as R

from ..config import CardConfig
from ..iface import RegBusSignature, EventSignature
from ..pcie.regfile import RegisterFile

__all__ = ["RateLimiter", "TOKEN_BITS", "FRAC_BITS"]

FRAC_BITS = 8           # tokens are kept in 1/256 byte
TOKEN_BITS = 24         # signed: -32768 .. +32767 bytes


class RateLimiter(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        nf = cfg.num_functions
        super().__init__({
            "bus": In(RegBusSignature()),
            "allow": Out(nf),                 # function n may start a frame
            "debit": In(EventSignature(12)),  # a frame of ``amount`` bytes was started
        })

    def elaborate(self, platform):
        nf = self._card.num_functions
        m = Module()
        b = self.bus
        sel = Signal(8)
        rate = [Signal(16, name=f"rate{i}") for i in range(nf)]
        burst = [Signal(15, name=f"burst{i}") for i in range(nf)]
        tokens = [Signal(signed(TOKEN_BITS), name=f"tokens{i}") for i in range(nf)]

        rf = RegisterFile(m, b, "qos")
        set_rate = rf.we(R.QOS_RATE, full=False)
        set_burst = rf.we(R.QOS_BURST, full=False)
        with m.If(rf.we(R.QOS_SEL, full=False)):
            m.d.sync += sel.eq(rf.wdata[:8])

        for i in range(nf):
            full = Cat(C(0, FRAC_BITS), burst[i], C(0, 1)).as_signed()
            here = sel == i
            take = self.debit.stb & (self.debit.fidx == i)
            gained = Signal(signed(TOKEN_BITS + 1), name=f"gained{i}")
            m.d.comb += gained.eq(tokens[i] + rate[i]
                                  - Mux(take, Cat(C(0, FRAC_BITS), self.debit.amount), 0))
            m.d.comb += self.allow[i].eq((rate[i] == 0) | (tokens[i] >= 0))
            with m.If(set_rate & here):
                m.d.sync += [rate[i].eq(b.wdata[:16]), tokens[i].eq(full)]
            with m.Elif(set_burst & here):
                m.d.sync += [burst[i].eq(b.wdata[:15]),
                             tokens[i].eq(Cat(C(0, FRAC_BITS), b.wdata[:15], C(0, 1)).as_signed())]
            with m.Elif(rate[i] == 0):
                m.d.sync += tokens[i].eq(full)
            with m.Elif(gained > full):
                m.d.sync += tokens[i].eq(full)
            with m.Else():
                m.d.sync += tokens[i].eq(gained)

        rf.read(R.QOS_SEL, sel)
        for off, regs in ((R.QOS_RATE, rate), (R.QOS_BURST, burst), (R.QOS_TOKENS, tokens)):
            # (a selector past the last function reads 0; the tokens are signed)
            rf.read(off, Mux(sel < nf, Array(regs)[sel], 0))
        rf.finish()
        return m
