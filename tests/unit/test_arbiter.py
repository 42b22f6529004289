"""Unit tests of hdl.pcie.tx_arbiter.TlpArbiter (packet-granular round robin, registered grant and output).

One testbench models both sources and the sink cycle by cycle (no races between
testbenches): values are set, the combinational response is read, then the clock ticks."""

import random
import pytest
from hdl.pcie.tx_arbiter import TlpArbiter
from helpers import beat_dict, run_sim

DW = 64


def make_packets(src, lengths):
    pkts = []
    for n, ln in enumerate(lengths):
        pkts.append([{
            "hdr": (src << 120) | (n << 8) | 0xAB if k == 0 else 0,
            "data": (src << 48) | (n << 16) | k,
            "strb": 0b11, "sop": int(k == 0), "eop": int(k == ln - 1), "func": src, "bar": 0,
        } for k in range(ln)])
    return pkts


class Source:
    def __init__(self, port, packets, p_valid, rng):
        self.port, self.p_valid, self.rng = port, p_valid, rng
        self.beats = [b for p in packets for b in p]
        self.pos = 0
        self.presenting = False

    def drive(self, ctx):
        if not self.presenting and self.pos < len(self.beats) and self.rng.random() < self.p_valid:
            self.presenting = True
        ctx.set(self.port.valid, int(self.presenting))
        if self.presenting:
            ctx.set(self.port.p, self.beats[self.pos])

    def current(self):
        return self.beats[self.pos]

    @property
    def done(self):
        return self.pos == len(self.beats)


def simulate(src_packets, p_valid=(1.0, 1.0), p_ready=1.0, seed=0, max_cycles=5000,
             withdraw=0.0):
    """Run the arbiter; returns the list of (source, beat) that came out, in order.

    Checked every cycle: at most one source moves, and only into a free output register; a
    stalled output beat holds; nothing appears on the output that no source sent. With
    ``withdraw`` > 0 a source drops an unmoved first beat now and then (as MSI-X may)."""
    n = len(src_packets)
    dut = TlpArbiter(n, DW)
    rng = random.Random(seed)
    out = []

    async def tb(ctx):
        srcs = [Source(getattr(dut, f"i{k}"), pk, p_valid[k], rng) for k, pk in enumerate(src_packets)]
        in_flight = []                              # beats taken by the arbiter, not yet out
        held = None
        for _ in range(max_cycles):
            if all(s.done for s in srcs) and not in_flight and not ctx.get(dut.o.valid):
                break
            for s in srcs:
                if (s.presenting and s.current()["sop"] and withdraw
                        and rng.random() < withdraw):
                    s.presenting = False            # withdraw before it moved
                s.drive(ctx)
            ready = int(rng.random() < p_ready)
            ctx.set(dut.o.ready, ready)
            ov = ctx.get(dut.o.valid)
            op = beat_dict(ctx.get(dut.o.p)) if ov else None
            if held is not None:
                assert ov and op == held, "a stalled output beat changed or vanished"
            moved = [k for k, s in enumerate(srcs) if s.presenting and ctx.get(s.port.ready)]
            assert len(moved) <= 1, f"sources {moved} moved in one cycle"
            if moved and ov and not ready:
                raise AssertionError("a source moved into a full, stalled output register")
            if ov and ready:
                assert in_flight and in_flight[0][1] == op, "output beat was never sent"
                out.append(in_flight.pop(0))
            held = op if ov and not ready else None
            await ctx.tick()
            for k in moved:
                in_flight.append((k, srcs[k].current()))
                srcs[k].pos += 1
                srcs[k].presenting = False
        else:
            raise AssertionError("sources not drained (deadlock?)")

    run_sim(dut, tb)
    return out


def split_packets(out):
    pkts, cur = [], None
    for src, b in out:
        if b["sop"]:
            assert cur is None, "sop inside a packet"
            cur = (src, [])
        assert cur is not None, "beat outside a packet"
        assert cur[0] == src, f"packet interleaved: source {src} beat inside a source {cur[0]} packet"
        cur[1].append(b)
        if b["eop"]:
            pkts.append(cur)
            cur = None
    assert cur is None
    return pkts


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_no_interleave_no_loss(seed):
    rng = random.Random(1000 + seed)
    sent = [make_packets(k, [rng.randint(1, 5) for _ in range(25)]) for k in range(2)]
    out = simulate(sent, p_valid=(rng.uniform(0.3, 1), rng.uniform(0.3, 1)),
                   p_ready=rng.uniform(0.3, 1), seed=seed, withdraw=0.2 * (seed % 2))
    pkts = split_packets(out)
    for k in range(2):
        got = [p for s, p in pkts if s == k]
        assert got == sent[k], f"source {k}: beats lost, duplicated or reordered"


@pytest.mark.parametrize("seed", range(3))
def test_eight_sources(seed):
    """The card's configuration: eight sources, random valid and ready."""
    rng = random.Random(2000 + seed)
    sent = [make_packets(k, [rng.randint(1, 4) for _ in range(8)]) for k in range(8)]
    out = simulate(sent, p_valid=[rng.uniform(0.2, 1) for _ in range(8)],
                   p_ready=rng.uniform(0.4, 1), seed=seed, withdraw=0.1)
    pkts = split_packets(out)
    for k in range(8):
        assert [p for s, p in pkts if s == k] == sent[k]


def test_round_robin_single_beat_packets():
    sent = [make_packets(k, [1] * 10) for k in range(2)]
    out = simulate(sent)
    srcs = [s for s, _ in out]
    assert len(srcs) == 20
    assert all(srcs[i] != srcs[i + 1] for i in range(19)), f"not alternating: {srcs}"


def test_round_robin_multi_beat_packets_under_backpressure():
    sent = [make_packets(0, [3] * 6), make_packets(1, [2] * 6)]
    out = simulate(sent, p_ready=0.5, seed=7)
    order = [s for s, _ in split_packets(out)]
    assert order in ([0, 1] * 6, [1, 0] * 6), f"packet grants not round robin: {order}"


def test_back_to_back_full_rate():
    """Sink always ready. Source 1 alone (the grant is parked on source 0 out of reset): two
    cycles to its first beat, then one beat per cycle with no bubble inside or between its
    packets, and a pause between packets costs nothing beyond itself (the grant stays parked
    on it). Then both sources with packets pending all the time: grants alternate, no idle
    cycle."""
    dut = TlpArbiter(2, DW)
    beats = [b for p in make_packets(1, [2, 1, 3]) for b in p]

    async def run(ctx, plan):
        """``plan``: per cycle, a dict source -> beat or None; returns [(cycle, data)] out."""
        seen, pos = [], {k: 0 for k in plan}
        cyc = 0
        while cyc < 40:
            for k, seq in plan.items():
                port = getattr(dut, f"i{k}")
                b = seq[pos[k]] if pos[k] < len(seq) else None
                ctx.set(port.valid, int(b is not None and b != "gap"))
                if b not in (None, "gap"):
                    ctx.set(port.p, b)
            if ctx.get(dut.o.valid):
                seen.append((cyc, ctx.get(dut.o.p.func), ctx.get(dut.o.p.data)))
            moved = []
            for k, seq in plan.items():
                port = getattr(dut, f"i{k}")
                b = seq[pos[k]] if pos[k] < len(seq) else None
                if b == "gap" or (b is not None and ctx.get(port.ready)):
                    moved.append(k)
            await ctx.tick()
            for k in moved:
                pos[k] += 1
            cyc += 1
        return seen

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        seen = await run(ctx, {1: beats[:3] + ["gap"] + beats[3:]})
        assert [d for _, _, d in seen] == [b["data"] for b in beats]
        cycles = [c for c, _, _ in seen]
        assert cycles[0] == 2, f"first beat after {cycles[0]} cycles, expected 2"
        assert cycles == [2, 3, 4, 6, 7, 8], f"bubbles beyond the source's own gap: {cycles}"
        # grant parked on source 1: its next packet goes out one cycle after it is offered
        again = make_packets(1, [1])[0]
        seen = await run(ctx, {1: again})
        assert [c for c, _, _ in seen] == [1]
        # two sources, packets pending all the time
        plan = {0: [b for p in make_packets(0, [2, 2]) for b in p],
                1: [b for p in make_packets(1, [2, 2]) for b in p]}
        seen = await run(ctx, plan)
        assert [s for _, s, _ in seen] in ([1, 1, 0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 1, 1])
        assert [c for c, _, _ in seen] == list(range(1, 9)), "idle cycles between packets"
    run_sim(dut, tb)


def test_backpressure_holds_everything():
    """A full, stalled output register holds its beat; no source sees ready meanwhile; the
    grant stays with the packet's source across a stall in mid-packet and moves on at its
    ``eop`` beat."""
    dut = TlpArbiter(2, DW)
    b0 = make_packets(0, [1])[0]
    b1 = make_packets(1, [2])[0]

    async def tb(ctx):
        ctx.set(dut.o.ready, 0)
        ctx.set(dut.i1.p, b1[0])
        ctx.set(dut.i1.valid, 1)
        await ctx.tick()                        # grant moves from source 0 (parked) to 1
        assert ctx.get(dut.i1.ready) == 1 and ctx.get(dut.i0.ready) == 0
        ctx.set(dut.i0.p, b0[0])
        ctx.set(dut.i0.valid, 1)
        await ctx.tick()                        # source 1's first beat is in the register
        ctx.set(dut.i1.p, b1[1])
        for _ in range(4):
            assert ctx.get(dut.o.valid) == 1 and ctx.get(dut.o.p.data) == b1[0]["data"]
            assert ctx.get(dut.i0.ready) == 0 and ctx.get(dut.i1.ready) == 0, \
                "ready into a full, stalled register"
            await ctx.tick()
        ctx.set(dut.o.ready, 1)                 # mid-packet: source 1 keeps the grant
        assert ctx.get(dut.i1.ready) == 1 and ctx.get(dut.i0.ready) == 0
        await ctx.tick()
        ctx.set(dut.i1.valid, 0)
        assert ctx.get(dut.o.p.data) == b1[1]["data"] and ctx.get(dut.o.p.eop) == 1
        assert ctx.get(dut.i0.ready) == 1, "next grant not taken at the eop beat"
        await ctx.tick()
        ctx.set(dut.i0.valid, 0)
        assert ctx.get(dut.o.p.func) == 0
    run_sim(dut, tb)


def test_withdrawn_beat_releases_grant():
    """A granted source that drops its first beat before it moved gives the grant up to a
    valid source."""
    dut = TlpArbiter(2, DW)
    b0 = make_packets(0, [1])[0][0]
    b1 = make_packets(1, [1])[0][0]

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        ctx.set(dut.i1.p, b1)
        ctx.set(dut.i1.valid, 1)
        await ctx.tick()                        # source 1 granted
        ctx.set(dut.i1.valid, 0)                # ... and withdraws
        ctx.set(dut.i0.p, b0)
        ctx.set(dut.i0.valid, 1)
        assert ctx.get(dut.o.valid) == 0
        await ctx.tick()                        # released: source 0 granted
        assert ctx.get(dut.i0.ready) == 1
        await ctx.tick()
        ctx.set(dut.i0.valid, 0)
        assert ctx.get(dut.o.valid) == 1 and ctx.get(dut.o.p.func) == 0
    run_sim(dut, tb)
