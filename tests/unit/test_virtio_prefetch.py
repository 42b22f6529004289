"""hdl.virtio.prefetch: receive head descriptors read ahead, a record per function.

A model host (:class:`helpers.ReadHost`) answers the unit's 4-DW MemRd after ``LAT`` cycles;
the tests check the read (address, length, tag, requester), the record (descriptor, position,
head) and its valid bit, one read at a time (``ask.ready``), and forgetting: a record, a read
still out (its answer is dropped), a failed read (no record)."""

from hdl.pcie.host_port import HOST_TAGS
from hdl.virtio.prefetch import RxPrefetch
from helpers import run_sim, ReadHost, offer

W, NF, BUS, LAT = 64, 4, 0x17, 10
TAG = HOST_TAGS["vqp"]


def desc_dws(addr):
    """A descriptor's four DWs, made from its own address (so each answer is recognisable)."""
    return [(addr * 7 + k) & 0xFFFF_FFFF for k in range(4)]


def as_int(dws):
    return sum(d << (32 * k) for k, d in enumerate(dws))


def run(script, ur=(), cycles=200):
    """``script(ctx, dut, host)``: an async testbench; the host runs beside it."""
    dut = RxPrefetch(W, NF)
    host = ReadHost(lambda addr, ndw: desc_dws(addr), W, LAT, ur)
    done = []

    async def hostside(ctx):
        ctx.set(dut.bus_num, BUS)
        for _ in range(cycles):
            host.step(ctx, dut)
            await ctx.tick()

    async def tb(ctx):
        await script(ctx, dut, host)
        done.append(1)
    run_sim(dut, tb, hostside)
    assert done
    return host


async def ask(ctx, dut, fidx, pos, head, addr):
    return await offer(ctx, dut.ask, {"fidx": fidx, "pos": pos, "head": head, "addr": addr})


async def forget(ctx, dut, mask):
    ctx.set(dut.forget, mask)
    await ctx.tick()
    ctx.set(dut.forget, 0)


async def record(ctx, dut, fidx):
    ctx.set(dut.rd_fidx, fidx)
    await ctx.tick()
    return ctx.get(dut.val) >> fidx & 1, ctx.get(dut.rd)


async def wait_idle(ctx, dut, limit=100):
    for _ in range(limit):
        if ctx.get(dut.ask.ready):
            return
        await ctx.tick()
    raise AssertionError("the unit stayed busy")


def test_a_read_ahead_becomes_the_function_s_record():
    async def script(ctx, dut, host):
        await ask(ctx, dut, 2, pos=0x1234, head=5, addr=0x8000_0050)
        assert not ctx.get(dut.ask.ready)                # one read at a time
        assert ctx.get(dut.holds) == 0b100
        await wait_idle(ctx, dut)
        val, rec = await record(ctx, dut, 2)
        assert val == 1 and (rec.pos, rec.head) == (0x1234, 5)
        assert int(rec.desc) == as_int(desc_dws(0x8000_0050))
        assert ctx.get(dut.val) == 0b100 and ctx.get(dut.holds) == 0
        assert [r[1:] for r in host.reads] == [(0x8000_0050, 4, 0xF, TAG, BUS << 8 | 2)]
    run(script)


def test_forget_a_record_and_a_read_still_out():
    async def script(ctx, dut, host):
        await ask(ctx, dut, 1, pos=3, head=3, addr=0x4000_0030)
        await wait_idle(ctx, dut)
        assert ctx.get(dut.val) == 0b10
        await forget(ctx, dut, 0b10)
        assert ctx.get(dut.val) == 0
        # forgotten while its read is out: the answer is dropped
        await ask(ctx, dut, 1, pos=4, head=4, addr=0x4000_0040)
        await forget(ctx, dut, 0b10)
        await wait_idle(ctx, dut)
        await ctx.tick().repeat(2)
        assert ctx.get(dut.val) == 0
        # forgetting another function leaves this one's read alone
        await ask(ctx, dut, 1, pos=5, head=5, addr=0x4000_0050)
        await forget(ctx, dut, 0b1101)
        await wait_idle(ctx, dut)
        await ctx.tick()
        val, rec = await record(ctx, dut, 1)
        assert val == 1 and rec.pos == 5
    run(script)


def test_a_failed_read_leaves_no_record():
    async def script(ctx, dut, host):
        await ask(ctx, dut, 3, pos=9, head=1, addr=0x6000_0010)
        await wait_idle(ctx, dut)
        await ctx.tick()
        assert ctx.get(dut.val) == 0
    run(script, ur={0x6000_0010})


def test_records_per_function_and_the_newest_wins():
    async def script(ctx, dut, host):
        for f, pos in ((0, 10), (3, 30), (0, 11)):
            await ask(ctx, dut, f, pos=pos, head=pos % 8, addr=0x7000_0000 + 16 * pos)
            await wait_idle(ctx, dut)
        await ctx.tick()
        assert ctx.get(dut.val) == 0b1001
        _, r0 = await record(ctx, dut, 0)
        _, r3 = await record(ctx, dut, 3)
        assert (r0.pos, int(r0.desc)) == (11, as_int(desc_dws(0x7000_0000 + 16 * 11)))
        assert (r3.pos, int(r3.desc)) == (30, as_int(desc_dws(0x7000_0000 + 16 * 30)))
    run(script)
