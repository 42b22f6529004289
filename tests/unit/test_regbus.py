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
