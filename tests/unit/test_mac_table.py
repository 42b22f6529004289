"""Unit tests of hdl.virtio.mac_table.MacTable: reset addresses, programming, lookup, retirement."""

import random
from hdl.virtio.mac_table import MacTable, default_mac
from helpers import run_sim

NF = 5


def mac(b: bytes) -> int:
    return int.from_bytes(b, "little")


async def program(ctx, dut, f, address: bytes):
    ctx.set(dut.program.sel, f)
    ctx.set(dut.program.wdata, mac(address[:4]))
    ctx.set(dut.program.we_lo, 1)
    await ctx.tick()
    ctx.set(dut.program.we_lo, 0)
    ctx.set(dut.program.wdata, mac(address[4:]))
    ctx.set(dut.program.we_hi, 1)
    await ctx.tick()
    ctx.set(dut.program.we_hi, 0)


async def lookup(ctx, dut, address: bytes):
    ctx.set(dut.lookup.dst, mac(address))
    await ctx.tick()
    return ctx.get(dut.lookup.hit), ctx.get(dut.lookup.hit_fidx)


def test_reset_addresses_and_lookup():
    dut = MacTable(NF)

    async def tb(ctx):
        for f in range(NF):
            ctx.set(dut.program.sel, f)
            ctx.set(dut.show.fidx, f)
            assert ctx.get(dut.program.rd_mac) == ctx.get(dut.show.mac) == default_mac(f)
            assert await lookup(ctx, dut, bytes([2, 0x0F, 0xFC, 0, 0, f])) == (1, f)
        ctx.set(dut.program.sel, NF)                                # beyond the functions: reads 0
        assert ctx.get(dut.program.rd_mac) == 0
        assert (await lookup(ctx, dut, bytes([2, 0x0F, 0xFC, 0, 0, NF])))[0] == 0
        assert (await lookup(ctx, dut, b"\xff" * 6))[0] == 0
    run_sim(dut, tb)


def test_program_move_and_retire():
    dut = MacTable(NF)
    guest = bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56])
    retired = b"\xff" * 6

    async def tb(ctx):
        await program(ctx, dut, 3, guest)
        ctx.set(dut.program.sel, 3)
        assert ctx.get(dut.program.rd_mac) == mac(guest)
        ctx.set(dut.show.fidx, 3)
        assert ctx.get(dut.show.mac) == mac(guest)
        assert await lookup(ctx, dut, guest) == (1, 3)
        # the old address of function 3 is gone
        assert (await lookup(ctx, dut, bytes([2, 0x0F, 0xFC, 0, 0, 3])))[0] == 0
        # the address moves to function 1: retire 3 first, then program 1
        await program(ctx, dut, 3, retired)
        assert (await lookup(ctx, dut, guest))[0] == 0
        assert (await lookup(ctx, dut, retired))[0] == 0   # multicast never hits
        await program(ctx, dut, 1, guest)
        assert await lookup(ctx, dut, guest) == (1, 1)
        # a duplicate address: the lower function wins
        await program(ctx, dut, 4, guest)
        assert await lookup(ctx, dut, guest) == (1, 1)
        # writes beyond the functions change nothing
        await program(ctx, dut, NF + 2, bytes(6))
        for f in (0, 2):
            assert await lookup(ctx, dut, bytes([2, 0x0F, 0xFC, 0, 0, f])) == (1, f)
    run_sim(dut, tb)


def test_random_against_model():
    dut = MacTable(NF)
    rnd = random.Random(11)

    async def tb(ctx):
        model = {f: default_mac(f).to_bytes(6, "little") for f in range(NF)}
        pool = [bytes([rnd.choice((0x02, 0x03, 0x52)), 0, 0, 0, 0, rnd.randrange(4)])
                for _ in range(6)]
        for _ in range(60):
            if rnd.random() < 0.4:
                f, a = rnd.randrange(NF), rnd.choice(pool)
                await program(ctx, dut, f, a)
                model[f] = a
            else:
                a = rnd.choice(pool + list(model.values()))
                owners = [f for f in range(NF) if model[f] == a and not a[0] & 1]
                want = (1, owners[0]) if owners else (0, None)
                hit, fidx = await lookup(ctx, dut, a)
                assert (hit, fidx if hit else None) == want, (a.hex(":"), model)
    run_sim(dut, tb)
