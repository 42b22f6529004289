"""hdl.dma.mover.PieceMover: a buffer moved a translated page at a time.

The world: a translator (bypass, or a domain mapping IOVA page n to bus page n + 0x100 up to a
limit, NOT_PRESENT on chosen pages) and two DMA channels that record their commands and answer
done (OK, or an error on a chosen command) a few cycles later."""

import random

import pytest

from hdl.dma.mover import PieceMover, MoveStatus
from hdl.iface import XlateStatus, DmaStatus
from helpers import run_sim

PAGE = 4096
OFFSET = 0x100 * PAGE


def world(dut, *, bypass=False, limit=1 << 40, absent=(), fail_at=None, jobs=()):
    """Run ``jobs`` (dicts of MoveCmd fields) one after the other; returns [(status, cmds)]."""
    results = []

    def resp_for(iova, last):
        page = iova // PAGE
        if bypass:
            return {"status": XlateStatus.OK, "bypass": 1, "phys": iova, "vm": 0}
        if last // PAGE >= limit or page >= limit:
            return {"status": XlateStatus.BLOCKED, "bypass": 0, "phys": 0, "vm": 0}
        if page in absent:
            return {"status": XlateStatus.NOT_PRESENT, "bypass": 0, "phys": 0, "vm": 0}
        return {"status": XlateStatus.OK, "bypass": 0, "phys": iova + OFFSET, "vm": 0}

    async def translator(ctx):
        # state machines on the values sampled at each edge (no await inside the loop)
        ctx.set(dut.xreq.ready, 1)
        async for _, _, xv, xr, iova, last, rv, rr in ctx.tick().sample(
                dut.xreq.valid, dut.xreq.ready, dut.xreq.p.iova, dut.xreq.p.last,
                dut.xresp.valid, dut.xresp.ready):
            if xv and xr:                            # a request moved: answer next cycle
                ctx.set(dut.xreq.ready, 0)
                ctx.set(dut.xresp.p, resp_for(iova, last))
                ctx.set(dut.xresp.valid, 1)
            elif rv and rr:                          # the answer moved
                ctx.set(dut.xresp.valid, 0)
                ctx.set(dut.xreq.ready, 1)

    cmds = []

    def channel(cmd, done, kind):
        async def proc(ctx):
            ctx.set(cmd.ready, 1)
            wait = None
            async for _, _, cv, cr, p, dv, dr in ctx.tick().sample(
                    cmd.valid, cmd.ready, cmd.p, done.valid, done.ready):
                if cv and cr:
                    cmds.append((kind, int(p.fidx), int(p.host), int(p.card), int(p.length)))
                    ctx.set(cmd.ready, 0)
                    wait = 3
                elif dv and dr:
                    ctx.set(done.valid, 0)
                    ctx.set(cmd.ready, 1)
                elif wait is not None:
                    wait -= 1
                    if wait == 0:
                        wait = None
                        bad = fail_at is not None and len(cmds) - 1 == fail_at
                        ctx.set(done.p.status, DmaStatus.CPL_ERROR if bad else DmaStatus.OK)
                        ctx.set(done.valid, 1)
        return proc

    async def driver(ctx):
        for job in jobs:
            cmds.clear()
            ctx.set(dut.move.cmd.p, job)
            ctx.set(dut.move.cmd.valid, 1)
            await ctx.tick().until(dut.move.cmd.ready)
            ctx.set(dut.move.cmd.valid, 0)
            ctx.set(dut.move.done.ready, 1)
            while not ctx.get(dut.move.done.valid):
                await ctx.tick()
            status = ctx.get(dut.move.done.p.status)
            await ctx.tick()
            ctx.set(dut.move.done.ready, 0)
            results.append((int(status), list(cmds)))

    run_sim(dut, driver, processes=[translator, channel(dut.rd_cmd, dut.rd_done, "rd"),
                                    channel(dut.wr_cmd, dut.wr_done, "wr")])
    return results


def expected_pieces(iova, card, length, bypass):
    out, done = [], 0
    while done < length:
        at = iova + done
        n = length - done if bypass else min(length - done, PAGE - at % PAGE)
        out.append((at if bypass else at + OFFSET, card + done, n))
        done += n
    return out


@pytest.mark.parametrize("bypass", [False, True])
@pytest.mark.parametrize("to_host", [0, 1])
def test_buffers_cut_at_pages_in_order(bypass, to_host):
    rnd = random.Random(bypass * 2 + to_host)
    jobs = []
    for _ in range(12):
        length = rnd.choice([1, 3, 64, 1500, 4096, 4097, 9000, 65536])
        jobs.append({"fidx": rnd.randrange(4), "to_host": to_host,
                     "iova": rnd.randrange(0, 1 << 24), "card": rnd.randrange(0, 1 << 16),
                     "length": length})
    res = world(PieceMover(), bypass=bypass, jobs=jobs)
    for job, (status, cmds) in zip(jobs, res):
        assert status == MoveStatus.OK
        kind = "wr" if to_host else "rd"
        assert all(c[0] == kind and c[1] == job["fidx"] for c in cmds)
        assert [c[2:] for c in cmds] == expected_pieces(job["iova"], job["card"], job["length"],
                                                        bypass)


def test_translation_failure_stops_before_the_failing_piece():
    # pages 2..3 of the buffer: page 3 is absent, so only the piece in page 2 moves
    job = {"fidx": 1, "to_host": 1, "iova": 2 * PAGE + 100, "card": 0x40, "length": 6000}
    (status, cmds), = world(PieceMover(), absent={3}, jobs=[job])
    assert status == MoveStatus.XLATE
    assert [c[2:] for c in cmds] == [(2 * PAGE + 100 + OFFSET, 0x40, PAGE - 100)]


def test_whole_buffer_must_fit_the_domain():
    job = {"fidx": 1, "to_host": 0, "iova": 5 * PAGE - 10, "card": 0, "length": 100}
    (status, cmds), = world(PieceMover(), limit=5, jobs=[job])
    assert status == MoveStatus.XLATE and cmds == []            # blocked before anything moved


def test_channel_error_ends_the_move():
    job = {"fidx": 0, "to_host": 0, "iova": 0, "card": 0, "length": 3 * PAGE}
    (status, cmds), = world(PieceMover(), fail_at=1, jobs=[job])
    assert status == MoveStatus.DMA and len(cmds) == 2          # the third piece never went
