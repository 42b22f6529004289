"""hdl.pcie.host_port: one small host access at a time, with its own tag.

A model host answers the port's MemRd with CplD (or UR, a short completion, nothing) after a
delay; the tests check the TLPs the port sends (header fields, payload, byte enables), what it
reports (done, err, xerr, rdata), the timeout, back-to-back requests, back-pressure on ``tx``,
completions nobody waits for, and translation with a domain."""

import random

import pytest

from hdl.iface import CPL_TIMEOUT, XlateStatus
from hdl.pcie.host_port import HostPort, HOST_TAGS, DMA_READ_TAGS
from hdl.pcie.tlp import TlpKind

from helpers import (run_sim, parse_cpl, hdr_dws, cpl_hdr, pack_beats, send_beats, recv_tlp)

TAG = 5
BUS = 0x3A


def parse_req(hdr):
    d0, d1, d2, d3 = hdr_dws(hdr)
    fmt_type = d0 >> 24
    is64 = (fmt_type >> 5) & 1
    return {"fmt_type": fmt_type, "length": d0 & 0x3FF, "rid": d1 >> 16, "tag": (d1 >> 8) & 0xFF,
            "fbe": d1 & 0xF, "lbe": (d1 >> 4) & 0xF,
            "addr": ((d2 << 32) | (d3 & ~3)) if is64 else (d2 & ~3)}


async def request(ctx, dut, *, write=False, fidx=0, addr=0, ndw=1, fbe=0xF, lbe=None, wdata=0):
    if lbe is None:
        lbe = 0 if ndw == 1 else 0xF
    ctx.set(dut.req.p, {"write": write, "fidx": fidx, "addr": addr, "ndw": ndw, "fbe": fbe,
                        "lbe": lbe, "wdata": wdata})
    ctx.set(dut.req.valid, 1)
    for _ in range(50):
        ready = ctx.get(dut.req.ready)
        await ctx.tick()
        if ready:
            break
    else:
        raise AssertionError("port never took the request")
    ctx.set(dut.req.valid, 0)


async def wait_done(ctx, dut, limit=CPL_TIMEOUT + 100):
    for n in range(limit):
        if ctx.get(dut.done):
            return n, int(ctx.get(dut.err)), int(ctx.get(dut.xerr)), int(ctx.get(dut.rdata))
        await ctx.tick()
    raise AssertionError("no done")


def make(width, max_dw=4, translate=False):
    dut = HostPort(width, TAG, max_dw, translate)
    return dut


def test_tag_table_names_distinct_tags_outside_the_read_pool():
    tags = list(HOST_TAGS.values())
    assert len(set(tags)) == len(tags)
    assert not set(tags) & set(DMA_READ_TAGS)


@pytest.mark.parametrize("width", [64, 128, 256])
@pytest.mark.parametrize("ndw", [1, 2, 3, 4])
def test_read_sends_memrd_and_returns_the_data(width, ndw):
    dut = make(width)
    addr = 0x1_2345_6780 if ndw % 2 else 0x8000_1000
    data = [0x11111111 * (k + 1) for k in range(ndw)]

    async def tb(ctx):
        ctx.set(dut.bus_num, BUS)
        await request(ctx, dut, fidx=7, addr=addr, ndw=ndw)
        hdr, payload, beats = await recv_tlp(ctx, dut.tx, width)
        r = parse_req(hdr)
        assert r["fmt_type"] == (TlpKind.MRD64 if addr >> 32 else TlpKind.MRD32)
        assert (r["length"], r["rid"], r["tag"], r["addr"]) == (ndw, (BUS << 8) | 7, TAG, addr)
        assert payload == [] and len(beats) == 1
        await send_beats(ctx, dut.cpl, pack_beats(
            cpl_hdr(True, ndw, 0, 0, ndw * 4, (BUS << 8) | 7, TAG), data, width))
        n, err, xerr, rdata = await wait_done(ctx, dut)
        assert (err, xerr) == (0, 0)
        assert [(rdata >> (32 * k)) & 0xFFFF_FFFF for k in range(ndw)] == data
    run_sim(dut, tb)


@pytest.mark.parametrize("width", [64, 128, 256])
@pytest.mark.parametrize("ndw", [1, 2, 3, 4, 8])
def test_write_sends_memwr_with_payload_and_byte_enables(width, ndw):
    dut = make(width, max_dw=8)
    data = [0xA0000000 + k for k in range(ndw)]
    wdata = sum(d << (32 * k) for k, d in enumerate(data))

    async def tb(ctx):
        ctx.set(dut.bus_num, BUS)
        await request(ctx, dut, write=True, fidx=2, addr=0x4000_0010, ndw=ndw, fbe=0xC,
                      lbe=0 if ndw == 1 else 0x3, wdata=wdata)
        hdr, payload, beats = await recv_tlp(ctx, dut.tx, width,
                                             ready=lambda c: c % 3 != 1)   # back-pressure
        r = parse_req(hdr)
        assert r["fmt_type"] == TlpKind.MWR32 and r["length"] == ndw and r["rid"] == (BUS << 8) | 2
        assert (r["fbe"], r["lbe"]) == (0xC, 0 if ndw == 1 else 0x3)
        assert payload == data
        assert all(b["func"] == 2 for b in beats)
        n, err, xerr, _ = await wait_done(ctx, dut, 5)
        assert err == 0
    run_sim(dut, tb)


@pytest.mark.parametrize("what", ["ur", "short", "poisoned_fmt", "timeout"])
def test_failed_read_reports_err(what):
    width = 64
    dut = make(width)

    async def tb(ctx):
        await request(ctx, dut, addr=0x1000, ndw=4)
        await recv_tlp(ctx, dut.tx, width)
        if what == "ur":
            await send_beats(ctx, dut.cpl, pack_beats(cpl_hdr(False, 0, 1, 0, 16, 0, TAG), [],
                                                      width))
        elif what == "short":
            await send_beats(ctx, dut.cpl, pack_beats(cpl_hdr(True, 3, 0, 0, 16, 0, TAG),
                                                      [1, 2, 3], width))
        elif what == "poisoned_fmt":        # a Cpl (no data) with status SC
            await send_beats(ctx, dut.cpl, pack_beats(cpl_hdr(False, 0, 0, 0, 16, 0, TAG), [],
                                                      width))
        n, err, xerr, _ = await wait_done(ctx, dut)
        assert (err, xerr) == (1, 0)
        if what == "timeout":
            assert n >= CPL_TIMEOUT - 5
        # the port is usable again, and a late completion is unexpected
        assert ctx.get(dut.req.ready)
        if what == "timeout":
            ctx.set(dut.cpl.p, pack_beats(cpl_hdr(True, 4, 0, 0, 16, 0, TAG), [0] * 4, width)[0])
            ctx.set(dut.cpl.valid, 1)
            await ctx.tick().until(dut.cpl.ready)
            assert ctx.get(dut.unexp)
            ctx.set(dut.cpl.valid, 0)
    run_sim(dut, tb)


def test_error_completion_with_payload_is_drained():
    width = 64
    dut = make(width)

    async def tb(ctx):
        await request(ctx, dut, addr=0x1000, ndw=4)
        await recv_tlp(ctx, dut.tx, width)
        # a completion with status CA that still carries 4 DWs (2 beats): both beats are taken
        await send_beats(ctx, dut.cpl, pack_beats(cpl_hdr(True, 4, 4, 0, 16, 0, TAG),
                                                  [9, 9, 9, 9], width))
        n, err, _, _ = await wait_done(ctx, dut)
        assert err == 1
        # nothing counted as unexpected: the second beat belonged to the read
    run_sim(dut, tb)


def test_back_to_back_requests_and_unexpected_completion():
    width = 128
    dut = make(width)
    rnd = random.Random(3)

    async def tb(ctx):
        ctx.set(dut.bus_num, 1)
        unexp = 0
        # a completion while nothing waits: taken and reported
        ctx.set(dut.cpl.p, pack_beats(cpl_hdr(True, 1, 0, 0, 4, 0, TAG), [5], width)[0])
        ctx.set(dut.cpl.valid, 1)
        assert ctx.get(dut.cpl.ready) and ctx.get(dut.unexp)
        await ctx.tick()
        ctx.set(dut.cpl.valid, 0)
        for k in range(20):
            write = rnd.random() < 0.5
            addr = rnd.randrange(0, 1 << 40) & ~3
            ndw = rnd.randint(1, 4)
            await request(ctx, dut, write=write, addr=addr, ndw=ndw, wdata=k)
            hdr, payload, _ = await recv_tlp(ctx, dut.tx, width)
            assert parse_req(hdr)["addr"] == addr
            if not write:
                await send_beats(ctx, dut.cpl, pack_beats(
                    cpl_hdr(True, ndw, 0, 0, ndw * 4, 0x100, TAG), [k] * ndw, width))
            n, err, _, rdata = await wait_done(ctx, dut)
            assert err == 0
            if not write:
                assert rdata & 0xFFFF_FFFF == k
            # the next request may be offered in the very cycle of done
            assert ctx.get(dut.req.ready)
    run_sim(dut, tb)


@pytest.mark.parametrize("case", ["ok", "bypass_cross", "cross", "blocked"])
def test_translation(case):
    width = 64
    dut = make(width, translate=True)
    iova = 0x7000 + (0xFF8 if case in ("bypass_cross", "cross") else 0x10)

    async def tb(ctx):
        await request(ctx, dut, fidx=3, addr=iova, ndw=4)
        # the translation request
        for _ in range(10):
            if ctx.get(dut.xreq.valid):
                break
            await ctx.tick()
        assert ctx.get(dut.xreq.p.fidx) == 3 and ctx.get(dut.xreq.p.iova) == iova
        assert ctx.get(dut.xreq.p.last) == iova + 15
        ctx.set(dut.xreq.ready, 1)
        await ctx.tick()
        ctx.set(dut.xreq.ready, 0)
        status = XlateStatus.BLOCKED if case == "blocked" else XlateStatus.OK
        ctx.set(dut.xresp.p, {"status": status, "bypass": case == "bypass_cross",
                              "phys": 0x9_0000_0000 + (iova & 0xFFF), "vm": 0})
        ctx.set(dut.xresp.valid, 1)
        await ctx.tick().until(dut.xresp.ready)
        ctx.set(dut.xresp.valid, 0)
        if case in ("blocked", "cross"):
            n, err, xerr, _ = await wait_done(ctx, dut, 5)
            assert (err, xerr) == (1, 1)
            assert not ctx.get(dut.tx.valid)
            return
        hdr, _, _ = await recv_tlp(ctx, dut.tx, width)
        assert parse_req(hdr)["addr"] == 0x9_0000_0000 + (iova & 0xFFF)
        await send_beats(ctx, dut.cpl, pack_beats(cpl_hdr(True, 4, 0, 0, 16, 3, TAG),
                                                  [1, 2, 3, 4], width))
        n, err, xerr, _ = await wait_done(ctx, dut)
        assert (err, xerr) == (0, 0)
    run_sim(dut, tb)
