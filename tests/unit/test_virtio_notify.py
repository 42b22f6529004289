"""hdl.virtio.notify: the interrupt decisions of the virtio-net engine, off its path.

A model host answers the unit's MemRd (tag ``vqe``, the function's requester ID) from a dict of
u16 fields after ``LAT`` cycles, or with UR; translations are bypassed. The tests check the read
(address, byte enables, tag, requester), ``vring_need_event`` at its edges, the NO_INTERRUPT
flag, a failed read (no interrupt, counted suppressed), two asks held at once and served in
order, a third refused until one is done, and ``holds`` naming the functions of the asks held."""

import pytest

from hdl.pcie.host_port import HOST_TAGS
from hdl.virtio.notify import NotifyUnit
from helpers import run_sim, ReadHost, offer

W, NF, NVEC, BUS, LAT = 64, 4, 8, 0x21, 12
TAG = HOST_TAGS["vqe"]


class Host(ReadHost):
    """The unit's host side: u16 fields (IOVA -> value) read through :class:`ReadHost`, and
    what the unit raised."""

    def __init__(self, fields, ur=()):
        self.fields = dict(fields)
        super().__init__(lambda addr, ndw: [self.fields.get(addr, 0xAAAA)
                                            | self.fields.get(addr + 2, 0xBBBB) << 16],
                         W, LAT, ur)
        self.irqs, self.isrs, self.fired, self.suppressed = [], [], 0, 0
        self.holds = []                 # (cycle, holds)

    async def run(self, ctx, dut, cycles):
        for _ in range(cycles):
            self.step(ctx, dut)
            if ctx.get(dut.irq.valid):
                self.irqs.append((ctx.get(dut.irq.fidx), ctx.get(dut.irq.vector)))
            if ctx.get(dut.isr_set):
                self.isrs.append(ctx.get(dut.isr_fidx))
            self.fired += ctx.get(dut.fired)
            self.suppressed += ctx.get(dut.suppressed)
            self.holds.append((self.cycle, ctx.get(dut.holds)))
            await ctx.tick()


def ask(fidx, addr, new, added, ev_idx=1, vector=None):
    return {"fidx": fidx, "vector": fidx + 1 if vector is None else vector, "ev_idx": ev_idx,
            "addr": addr, "new": new, "added": added}


def run(asks, fields, ur=(), cycles=300):
    dut = NotifyUnit(W, NF, NVEC)
    host = Host(fields, ur)
    waits = []

    async def feeder(ctx):
        ctx.set(dut.bus_num, BUS)
        for a in asks:
            waits.append(await offer(ctx, dut.ask, a))

    async def hostside(ctx):
        await host.run(ctx, dut, cycles)
    run_sim(dut, feeder, hostside)
    return host, waits


@pytest.mark.parametrize("used_event,new,added,fire", [
    (0, 1, 1, True),          # 0 -> 1 passes used_event 0
    (1, 1, 1, False),         # used_event 1: not before the index moves past 1
    (1, 2, 1, True),
    (0, 4, 4, True),          # a merged frame moved it 0 -> 4, past 0
    (0xFFFF, 0, 1, True),     # across the 16-bit wrap
    (5, 4, 4, False),
])
def test_event_idx_decision(used_event, new, added, fire):
    at = 0x1000_0006                          # the upper half of its DW
    host, _ = run([ask(2, at, new, added)], {at: used_event})
    assert [r[1:] for r in host.reads] == [(0x1000_0004, 1, 0xC, TAG, BUS << 8 | 2)]
    assert host.irqs == ([(2, 3)] if fire else [])
    assert host.isrs == ([2] if fire else [])
    assert (host.fired, host.suppressed) == ((1, 0) if fire else (0, 1))


@pytest.mark.parametrize("flags,fire", [(0, True), (1, False), (0xFFFE, True)])
def test_no_interrupt_flag(flags, fire):
    at = 0x2000_0000                          # avail.flags, the lower half
    host, _ = run([ask(1, at, 7, 1, ev_idx=0)], {at: flags, at + 2: 0x0001})
    assert [r[3] for r in host.reads] == [0x3]
    assert host.irqs == ([(1, 2)] if fire else [])


def test_a_queue_without_a_vector_sets_only_the_isr():
    at = 0x3000_0000
    host, _ = run([ask(3, at, 1, 1, vector=0xFFFF)], {at: 0})
    assert host.irqs == [] and host.isrs == [3] and host.fired == 1


def test_a_failed_read_raises_nothing():
    at = 0x4000_0000
    host, _ = run([ask(1, at, 1, 1)], {}, ur={at})
    assert host.irqs == [] and host.isrs == [] and (host.fired, host.suppressed) == (0, 1)


def test_two_asks_held_a_third_waits_and_all_served_in_order():
    fields = {0x5000_0000: 0, 0x5000_0100: 0, 0x5000_0200: 0}
    asks = [ask(1, 0x5000_0000, 1, 1), ask(2, 0x5000_0100, 1, 1), ask(3, 0x5000_0200, 1, 1)]
    host, waits = run(asks, fields)
    assert [r[1] for r in host.reads] == [0x5000_0000, 0x5000_0100, 0x5000_0200]
    assert host.irqs == [(1, 2), (2, 3), (3, 4)]
    # the first two are taken at once; the third waits until the first read is answered
    assert waits[:2] == [0, 0] and waits[2] >= LAT
    # one read out at a time, each after the previous one's answer
    starts = [r[0] for r in host.reads]
    assert all(b - a >= LAT for a, b in zip(starts, starts[1:]))
    # holds: functions 1 and 2 while both asks wait, none at the end
    seen = {h for _, h in host.holds}
    assert 0b110 in seen and host.holds[-1][1] == 0
