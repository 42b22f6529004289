"""Unit tests of hdl.pcie.regbus.RegBusSlice: the register bus's one request register stage."""

import random
from hdl.iface import REQUEST_FIELDS
from hdl.pcie.regbus import RegBusSlice
from helpers import run_sim



def test_request_one_cycle_late_rdata_through():
    dut = RegBusSlice()
    rng = random.Random(5)
    FIELDS = {n: len(getattr(dut.i, n)) for n in REQUEST_FIELDS}

    async def tb(ctx):
        prev = None
        for cyc in range(200):
            req = {k: rng.getrandbits(w) for k, w in FIELDS.items()}
            if req["we"] and req["re"]:
                req["re"] = 0                       # one strobe at a time
            tag = rng.getrandbits(1)
            for k, v in req.items():
                ctx.set(getattr(dut.i, k), v)
            ctx.set(dut.tag_i, tag)
            rdata = rng.getrandbits(32)
            ctx.set(dut.o.rdata, rdata)
            assert ctx.get(dut.i.rdata) == rdata, "rdata must pass straight through"
            if prev is None:
                assert ctx.get(dut.o.we) == 0 and ctx.get(dut.o.re) == 0, "strobe out of reset"
            else:
                got = {k: ctx.get(getattr(dut.o, k)) for k in FIELDS}
                assert got == prev[0], f"cycle {cyc}: {got} != {prev[0]}"
                strobe = prev[0]["we"] | prev[0]["re"]
                assert ctx.get(dut.tag_o) == (prev[1] & strobe), "tag goes only with a strobe"
            prev = (req, tag)
            await ctx.tick()
    run_sim(dut, tb)


def test_interconnect_host_first_uart_in_free_cycles_data_ored_back():
    """RegBusInterconnect: the host's request wins a cycle, the UART gets the bus when the
    host leaves it free; each target sees the request READ_LATENCY - 1 cycles later; the
    targets' read data (each zero unless addressed) comes back ORed to both masters; the tag
    says the UART made a request, for the tagged target only."""
    from hdl.iface import READ_LATENCY
    from hdl.pcie.regbus import RegBusInterconnect
    dut = RegBusInterconnect(("a", "b"), tagged=("b",))

    async def tb(ctx):
        # host and UART both ask: the host goes, the UART is told to wait
        ctx.set(dut.host.re, 1)
        ctx.set(dut.host.addr, 0x11)
        ctx.set(dut.uart.re, 1)
        ctx.set(dut.uart.addr, 0x22)
        assert ctx.get(dut.uart_gnt) == 0
        await ctx.tick()
        ctx.set(dut.host.re, 0)
        assert ctx.get(dut.uart_gnt) == 1                 # the UART's turn now
        await ctx.tick()
        ctx.set(dut.uart.re, 0)
        # the host's request reaches both targets two cycles after it was made
        for t in (dut.t_a, dut.t_b):
            assert ctx.get(t.re) == 1 and ctx.get(t.addr) == 0x11
        assert ctx.get(dut.b_uart) == 0
        ctx.set(dut.t_a.rdata, 0x1234_0000)
        ctx.set(dut.t_b.rdata, 0x0000_5678)
        assert ctx.get(dut.host.rdata) == 0x1234_5678 == ctx.get(dut.uart.rdata)
        await ctx.tick()
        for t in (dut.t_a, dut.t_b):
            assert ctx.get(t.re) == 1 and ctx.get(t.addr) == 0x22
        assert ctx.get(dut.b_uart) == 1                   # made by the UART
        await ctx.tick()
        assert ctx.get(dut.t_a.re) == 0 and ctx.get(dut.b_uart) == 0
        assert READ_LATENCY == 3
    run_sim(dut, tb)
