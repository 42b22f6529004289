"""The management UART's frame engine: the firmware's way into the card (:class:`UartProto`).

It receives request frames on ``rxd``, checks them (length, CRC, command, address), runs the
register access on the card's register bus as the card's side of the management block (PF
BAR2; the bus is shared with the PCIe completer, which has priority: ``gnt`` says the access
went out this cycle) and sends one reply frame on ``txd`` for every frame it received, good or
bad. A frame that is bad or cut short is never executed; the engine then waits for the line
to be quiet for ``GAP_BITS`` bit times before it replies, so it resynchronises on the next
frame whatever garbage came before. Bytes that arrive outside a frame (not a sync byte) are
ignored. One frame at a time: a request sent before the previous reply is complete may be lost
(the receiver holds one byte).
"""

from amaranth import *
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from regmap import UartProto as P

from ..config import CardConfig
from ..iface import READ_LATENCY, RegBusSignature
from .uart import UartRx, UartTx

__all__ = ["MgmtUart", "crc8_next"]


def crc8_next(crc, byte):
    """CRC-8 (polynomial 0x07, no final XOR) after one more byte, as logic. The register is
    linear in ``crc ^ byte``: output bit *i* is the XOR of the input bits whose one-hot CRC has
    bit *i* set (8 XOR trees of a few inputs, not an unrolled shift loop)."""
    x = crc ^ byte
    bits = []
    for i in range(8):
        taps = [j for j in range(8) if (P.crc8(bytes([1 << j])) >> i) & 1]
        bit = x[taps[0]]
        for j in taps[1:]:
            bit = bit ^ x[j]
        bits.append(bit)
    return Cat(*bits)


class MgmtUart(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        super().__init__({
            "rxd": In(1, init=1),
            "txd": Out(1, init=1),
            "bus": Out(RegBusSignature()),   # the engine drives the register bus
            "gnt": In(1),                    # its strobe is on the bus this cycle
            "ok": Out(1),                    # a frame was executed (one-cycle strobe)
            "err": Out(1),                   # an error reply was sent (one-cycle strobe)
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        m.submodules.urx = urx = UartRx(cfg.uart_divisor)
        m.submodules.utx = utx = UartTx(cfg.uart_divisor)
        m.d.comb += [urx.rxd.eq(self.rxd), self.txd.eq(utx.txd)]

        rlen = Signal(8)
        cmd = Signal(8)
        seq = Signal(8)
        pay = Array(Signal(8, name=f"pay{i}") for i in range(P.MAX_LEN))
        n = Signal(range(P.MAX_LEN + 1))
        crc = Signal(8)
        status = Signal(8)
        rdata = Signal(32)
        rwait = Signal(range(READ_LATENCY))
        addr = Cat(pay[0], pay[1])
        wdata = Cat(pay[2], pay[3], pay[4], pay[5])
        quiet = urx.idle_bits >= P.GAP_BITS
        byte = urx.o.payload

        b = self.bus
        m.d.comb += [b.fidx.eq(0), b.bar.eq(2), b.addr.eq(addr[2:]), b.wdata.eq(wdata),
                     b.be.eq(0xF)]

        # reply: 0x5A LEN CMD|0x80 SEQ STATUS [DATA x4] CRC
        has_data = Signal()
        tlen = Mux(has_data, 5, 1)           # the reply's LEN
        ti = Signal(4)                        # byte being sent
        tcrc = Signal(8)
        rcmd = Mux(status == P.OK, cmd | 0x80, P.ERROR)
        tbyte = Signal(8)
        with m.Switch(ti):
            with m.Case(0):
                m.d.comb += tbyte.eq(P.SYNC_REPLY)
            with m.Case(1):
                m.d.comb += tbyte.eq(tlen)
            with m.Case(2):
                m.d.comb += tbyte.eq(rcmd)
            with m.Case(3):
                m.d.comb += tbyte.eq(seq)
            with m.Case(4):
                m.d.comb += tbyte.eq(status)
            for i in range(4):
                with m.Case(5 + i):
                    m.d.comb += tbyte.eq(Mux(has_data, rdata.word_select(i, 8), tcrc))
            with m.Default():
                m.d.comb += tbyte.eq(tcrc)
        last_ti = Mux(has_data, 9, 5)

        def fail(code):
            m.d.sync += status.eq(code)
            m.next = "DISCARD"

        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += urx.o.ready.eq(1)
                m.d.sync += [seq.eq(0), cmd.eq(0), n.eq(0), crc.eq(0), has_data.eq(0),
                             status.eq(P.OK)]
                with m.If(urx.o.valid & (byte == P.SYNC_REQ)):
                    m.next = "LEN"
            for state, nxt in (("LEN", "CMD"), ("CMD", "SEQ"), ("SEQ", "PAY"), ("PAY", "CRC")):
                with m.State(state):
                    m.d.comb += urx.o.ready.eq(1)
                    with m.If(urx.o.valid):
                        m.d.sync += crc.eq(crc8_next(crc, byte))
                        if state == "LEN":
                            m.d.sync += rlen.eq(byte)
                            with m.If(byte > P.MAX_LEN):
                                fail(P.BAD_LEN)
                            with m.Else():
                                m.next = nxt
                        elif state == "CMD":
                            m.d.sync += cmd.eq(byte)
                            m.next = nxt
                        elif state == "SEQ":
                            m.d.sync += seq.eq(byte)
                            m.next = nxt
                            with m.If(rlen == 0):
                                m.next = "CRC"
                        else:
                            m.d.sync += [pay[n].eq(byte), n.eq(n + 1)]
                            with m.If(n + 1 == rlen):
                                m.next = nxt
                    with m.Elif(quiet):
                        m.d.sync += status.eq(P.TRUNCATED)
                        m.next = "REPLY"
            with m.State("CRC"):
                m.d.comb += urx.o.ready.eq(1)
                with m.If(urx.o.valid):
                    with m.If(byte != crc):
                        fail(P.BAD_CRC)
                    with m.Else():
                        m.next = "DECODE"
                with m.Elif(quiet):
                    m.d.sync += status.eq(P.TRUNCATED)
                    m.next = "REPLY"
            with m.State("DISCARD"):
                # drop whatever follows until the line has been quiet, then say what was wrong
                m.d.comb += urx.o.ready.eq(1)
                with m.If(quiet & ~urx.o.valid):
                    m.next = "REPLY"
            with m.State("DECODE"):
                bad_addr = (addr[:2] != 0) | (addr >= cfg.bar2_size)

                def reject(code):
                    m.d.sync += status.eq(code)
                    m.next = "REPLY"
                with m.If(cmd == P.PING):
                    with m.If(rlen != 0):
                        reject(P.BAD_LEN)
                    with m.Else():
                        # the card's identification, at BAR2 offset 0
                        m.d.sync += [has_data.eq(1), pay[0].eq(0), pay[1].eq(0)]
                        m.next = "READ"
                # READ and WRITE: a length each, then the address, then the bus access
                for code, length, access in ((P.READ, 2, "READ"), (P.WRITE, 6, "WRITE")):
                    with m.Elif(cmd == code):
                        with m.If(rlen != length):
                            reject(P.BAD_LEN)
                        with m.Elif(bad_addr):
                            reject(P.BAD_ADDR)
                        with m.Else():
                            m.d.sync += has_data.eq(code == P.READ)
                            m.next = access
                with m.Else():
                    reject(P.UNKNOWN_CMD)
            with m.State("READ"):
                m.d.comb += b.re.eq(1)
                with m.If(self.gnt):
                    m.d.sync += rwait.eq(0)
                    m.next = "READ_DATA"
            with m.State("READ_DATA"):
                # the data is on the bus READ_LATENCY cycles after the granted strobe
                m.d.sync += rwait.eq(rwait + 1)
                with m.If(rwait == READ_LATENCY - 1):
                    m.d.sync += rdata.eq(b.rdata)
                    m.d.comb += self.ok.eq(1)
                    m.next = "REPLY"
            with m.State("WRITE"):
                m.d.comb += b.we.eq(1)
                with m.If(self.gnt):
                    m.d.comb += self.ok.eq(1)
                    m.next = "REPLY"
            with m.State("REPLY"):
                m.d.sync += [ti.eq(0), tcrc.eq(0)]
                m.d.comb += self.err.eq(status != P.OK)
                m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [utx.i.valid.eq(1), utx.i.payload.eq(tbyte)]
                with m.If(utx.i.ready):
                    m.d.sync += ti.eq(ti + 1)
                    with m.If((ti >= 1) & (ti < last_ti)):
                        m.d.sync += tcrc.eq(crc8_next(tcrc, tbyte))
                    with m.If(ti == last_ti):
                        m.next = "IDLE"
        return m
