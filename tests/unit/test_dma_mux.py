"""DmaChannelMux: one DMA channel shared by two engines, each holding it until its done."""

from hdl.dma.mux import DmaChannelMux
from helpers import run_sim


def test_lock_until_done_and_alternation():
    dut = DmaChannelMux()
    log = []

    async def channel(ctx):
        """The channel: takes a command, answers done 3 cycles later."""
        ctx.set(dut.cmd.ready, 1)
        for _ in range(4):
            while True:
                _, _, valid = await ctx.tick().sample(dut.cmd.valid)
                if valid:                    # (ready is high here: the command moved)
                    break
            ctx.set(dut.cmd.ready, 0)
            for _ in range(3):
                await ctx.tick()
            ctx.set(dut.done.valid, 1)
            ctx.set(dut.done.p.status, len(log) % 2)
            await ctx.tick().until(dut.done.ready)
            ctx.set(dut.done.valid, 0)
            ctx.set(dut.cmd.ready, 1)

    async def clients(ctx):
        # both clients ask at once, twice each
        for k, cmd in enumerate((dut.queue_cmd, dut.virtio_cmd)):
            ctx.set(cmd.valid, 1)
            ctx.set(cmd.p.length, 100 + k)
        got = {0: 0, 1: 0}
        ctx.set(dut.queue_done.ready, 1)
        ctx.set(dut.virtio_done.ready, 1)
        # sampled before each edge: with ready held high, a valid done moves on that edge
        async for _, _, busy, cvalid, v0, v1, owner in ctx.tick().sample(
                dut.busy, dut.cmd.valid, dut.queue_done.valid, dut.virtio_done.valid, dut.owner):
            assert not (busy and cvalid), "a command offered while the channel is busy"
            for k, v in enumerate((v0, v1)):
                if v:
                    assert owner == k
                    log.append(k)
                    got[k] += 1
                    if got[k] == 2:
                        ctx.set((dut.queue_cmd, dut.virtio_cmd)[k].valid, 0)
            if len(log) == 4:
                break
        assert sorted(log) == [0, 0, 1, 1] and log[0] != log[1], log

    run_sim(dut, clients, channel, deadline=1e-5)


def test_single_client_gets_its_own_done_only():
    dut = DmaChannelMux()

    async def tb(ctx):
        ctx.set(dut.virtio_cmd.valid, 1)
        ctx.set(dut.virtio_cmd.p.length, 7)
        ctx.set(dut.cmd.ready, 1)
        await ctx.tick().until(dut.cmd.valid & dut.cmd.ready)
        assert ctx.get(dut.cmd.p.length) == 7
        ctx.set(dut.virtio_cmd.valid, 0)
        ctx.set(dut.done.valid, 1)
        ctx.set(dut.virtio_done.ready, 1)
        assert ctx.get(dut.virtio_done.valid) and not ctx.get(dut.queue_done.valid)
        await ctx.tick()
        ctx.set(dut.done.valid, 0)
        assert not ctx.get(dut.busy)

    run_sim(dut, tb, deadline=1e-6)


def test_three_clients_round_robin_and_names():
    import pytest
    from hdl.dma.mux import LockMux
    from hdl.iface import DmaCmd, DmaDone
    with pytest.raises(ValueError, match="distinct"):
        LockMux(DmaCmd, DmaDone, ("a", "a"))
    dut = LockMux(DmaCmd, DmaDone, ("a", "b", "c"))
    order = []

    async def tb(ctx):
        for name in ("a", "b", "c"):
            ctx.set(getattr(dut, f"{name}_cmd").valid, 1)
            ctx.set(getattr(dut, f"{name}_done").ready, 1)
        ctx.set(dut.cmd.ready, 1)
        for _ in range(6):
            await ctx.tick().until(dut.busy)
            order.append(ctx.get(dut.owner))
            ctx.set(dut.done.valid, 1)
            await ctx.tick()
            ctx.set(dut.done.valid, 0)
        # every client keeps asking: each gets its turn in rotation (after reset "a" counts as
        # the last one served, as with two clients)
        assert order == [1, 2, 0, 1, 2, 0], order

    run_sim(dut, tb, deadline=1e-5)
