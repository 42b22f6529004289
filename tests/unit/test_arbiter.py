"""Unit tests of hdl.arbiter.TlpArbiter (2 sources, packet-granular round robin).

One testbench models both sources and the sink cycle by cycle (no races between
testbenches): values are set, the combinational response is read, then the clock ticks."""

import random

import pytest

from hdl.arbiter import TlpArbiter

from helpers import run_sim

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


def simulate(src_packets, p_valid=(1.0, 1.0), p_ready=1.0, seed=0, max_cycles=5000):
    """Run the arbiter; returns the list of (source, beat) that came out, in order."""
    dut = TlpArbiter(2, DW)
    rng = random.Random(seed)
    out = []

    async def tb(ctx):
        srcs = [Source(getattr(dut, f"i{k}"), pk, p_valid[k], rng) for k, pk in enumerate(src_packets)]
        for _ in range(max_cycles):
            if all(s.done for s in srcs):
                break
            for s in srcs:
                s.drive(ctx)
            ready = int(rng.random() < p_ready)
            ctx.set(dut.o.ready, ready)
            ov = ctx.get(dut.o.valid)
            op = {k: int(getattr(ctx.get(dut.o.p), k)) for k in srcs[0].beats[0]} if ov else None
            moved = [k for k, s in enumerate(srcs) if s.presenting and ctx.get(s.port.ready)]
            if not ready:
                assert ctx.get(dut.i0.ready) == 0 and ctx.get(dut.i1.ready) == 0, \
                    "a source sees ready while the sink is not ready"
            if ov and ready:
                assert len(moved) == 1, f"output beat moved but sources {moved} saw ready"
                k = moved[0]
                assert op == srcs[k].current(), "output is not the granted source's beat"
                out.append((k, op))
            else:
                assert moved == [], f"sources {moved} transferred without an output transfer"
            mid_packet = any(not s.done and not s.current()["sop"] for s in srcs)
            if not ov and not mid_packet:
                assert not any(s.presenting for s in srcs), "sources valid but no output valid"
            await ctx.tick()
            for k in moved:
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
                   p_ready=rng.uniform(0.3, 1), seed=seed)
    pkts = split_packets(out)
    for k in range(2):
        got = [p for s, p in pkts if s == k]
        assert got == sent[k], f"source {k}: beats lost, duplicated or reordered"


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


def test_single_source_streams_back_to_back():
    sent = [make_packets(0, [2, 1, 3]), []]
    dut = TlpArbiter(2, DW)
    beats = [b for p in sent[0] for b in p]

    async def tb(ctx):
        ctx.set(dut.o.ready, 1)
        for b in beats:                                  # one beat per cycle, no bubbles
            ctx.set(dut.i0.p, b)
            ctx.set(dut.i0.valid, 1)
            assert ctx.get(dut.o.valid) == 1 and ctx.get(dut.i0.ready) == 1
            assert ctx.get(dut.o.p.data) == b["data"]
            await ctx.tick()
        ctx.set(dut.i0.valid, 0)
        assert ctx.get(dut.o.valid) == 0
    run_sim(dut, tb)


def test_backpressure_holds_everything():
    dut = TlpArbiter(2, DW)
    b0 = make_packets(0, [2])[0]
    b1 = make_packets(1, [1])[0]

    async def tb(ctx):
        ctx.set(dut.o.ready, 0)
        ctx.set(dut.i0.p, b0[0])
        ctx.set(dut.i0.valid, 1)
        ctx.set(dut.i1.p, b1[0])
        ctx.set(dut.i1.valid, 1)
        for _ in range(5):
            assert ctx.get(dut.o.valid) == 1
            assert ctx.get(dut.i0.ready) == 0 and ctx.get(dut.i1.ready) == 0
            await ctx.tick()
        # first beat of source 1 (round robin starts after source 0) moves, then source 0's
        ctx.set(dut.o.ready, 1)
        assert ctx.get(dut.o.p.func) == 1 and ctx.get(dut.i1.ready) == 1
        await ctx.tick()
        ctx.set(dut.i1.valid, 0)
        assert ctx.get(dut.o.p.data) == b0[0]["data"] and ctx.get(dut.i0.ready) == 1
        await ctx.tick()
        ctx.set(dut.o.ready, 0)                    # stall mid-packet: source 1 comes back
        ctx.set(dut.i0.p, b0[1])
        ctx.set(dut.i1.valid, 1)
        for _ in range(3):
            assert ctx.get(dut.o.p.func) == 0, "grant lost mid-packet"
            await ctx.tick()
        ctx.set(dut.o.ready, 1)
        assert ctx.get(dut.o.p.data) == b0[1]["data"] and ctx.get(dut.o.p.eop) == 1
        await ctx.tick()
        ctx.set(dut.i0.valid, 0)
        assert ctx.get(dut.o.p.func) == 1
    run_sim(dut, tb)


def test_output_payload_stable_while_stalled():
    """lib.stream rule (tlp.py docstring): once o.valid is high, o.p holds until it moves.

    Source 0 is valid alone while the sink stalls; then source 1 (next in round-robin order)
    becomes valid. The presented beat must not change under the sink's feet."""
    dut = TlpArbiter(2, DW)
    b0 = make_packets(0, [1])[0][0]
    b1 = make_packets(1, [1])[0][0]

    async def tb(ctx):
        ctx.set(dut.o.ready, 0)
        ctx.set(dut.i0.p, b0)
        ctx.set(dut.i0.valid, 1)
        assert ctx.get(dut.o.valid) == 1
        shown = ctx.get(dut.o.p.data)
        assert shown == b0["data"]
        await ctx.tick()
        ctx.set(dut.i1.p, b1)
        ctx.set(dut.i1.valid, 1)
        assert ctx.get(dut.o.valid) == 1
        assert ctx.get(dut.o.p.data) == shown, \
            "arbiter switched the presented beat from source 0 to source 1 while stalled"
    run_sim(dut, tb)
