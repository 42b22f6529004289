"""cosim.tlp_shim.TlpShim: whole TLPs in, beats out to the card; beats in, whole TLPs out.

A Python "host" posts TLPs the way the co-simulation bridge does (write the ports, increment
``in_seq``, wait for ``in_ack`` before writing again); a model card takes the beats with
random back-pressure and sends TLPs of its own. Checked: every beat as the per-beat bridge
would have sent it (header on the first, payload packed from bit 0, strobes, sop / eop), no
TLP lost or duplicated either way, TLPs of one beat and of the largest size, back to back with
no idle clock while the host keeps one ahead, the first / last cycles, and the overflow flag."""

import random

import pytest

from cosim.bridge import BeatCodec
from cosim.tlp_shim import TlpShim, MAX_DW
from helpers import run_sim, beat_dict


def tlp(rnd, ndw):
    hdr = rnd.getrandbits(128) | (1 << 127)          # (any header: the shim does not look)
    return hdr, [rnd.getrandbits(32) for _ in range(ndw)]


def expected_beats(hdr, dws, width):
    """The beats the per-beat bridge sends for one TLP (cosim.bridge.BeatCodec)."""
    codec = BeatCodec(width)
    payload = b"".join(d.to_bytes(4, "little") for d in dws)
    out = []
    for v in codec.beats(hdr.to_bytes(16, "big"), payload):
        out.append({k: codec.field(v, k) for k in ("hdr", "data", "strb", "sop", "eop")})
    return out


async def post(ctx, dut, hdr, dws, seq):
    """Write one TLP into the input ports once the shim has taken the previous one."""
    while ctx.get(dut.in_ack) != (seq - 1) & 0xFF:
        await ctx.tick()
    ctx.set(dut.in_hdr, hdr)
    ctx.set(dut.in_data, sum(d << (32 * k) for k, d in enumerate(dws)))
    ctx.set(dut.in_ndw, len(dws))
    ctx.set(dut.in_seq, seq & 0xFF)


@pytest.mark.parametrize("width", [64, 128, 256])
@pytest.mark.parametrize("pressure", [0.0, 0.5])
def test_host_to_card_beats(width, pressure):
    rnd = random.Random(width + int(pressure * 10))
    dut = TlpShim(width)
    sizes = [0, 1, 2, MAX_DW, 3, width // 32, width // 32 + 1] + \
        [rnd.choice([0, 1, 2, 3, 4, 8, 16, 64, MAX_DW]) for _ in range(30)]
    tlps = [tlp(rnd, n) for n in sizes]
    want = [b for h, d in tlps for b in expected_beats(h, d, width)]
    got, cycles = [], []

    async def host(ctx):
        for k, (h, d) in enumerate(tlps):
            await post(ctx, dut, h, d, k + 1)

    async def card(ctx):
        n = 0
        while len(got) < len(want):
            r = int(rnd.random() >= pressure)
            ctx.set(dut.rx.ready, r)
            if r and ctx.get(dut.rx.valid):
                b = beat_dict(ctx.get(dut.rx.p))
                got.append({k: b[k] for k in ("hdr", "data", "strb", "sop", "eop")})
                cycles.append(n)
            await ctx.tick()
            n += 1
            assert n < 20_000
        await ctx.tick()
        assert ctx.get(dut.in_done) == len(tlps) & 0xFF
        assert not ctx.get(dut.rx.valid), "a beat nobody asked for"

    run_sim(dut, host, card)
    assert got == want
    if pressure == 0.0:
        # the host keeps a TLP ahead once the first is in: the beats never pause
        assert cycles == list(range(cycles[0], cycles[0] + len(cycles)))


def test_done_counts_and_cycles():
    dut = TlpShim(64)
    rnd = random.Random(7)

    async def tb(ctx):
        ctx.set(dut.rx.ready, 1)
        h, d = tlp(rnd, 8)                             # 4 beats
        await post(ctx, dut, h, d, 1)
        await ctx.tick().until(dut.in_done == 1)
        first, last = ctx.get(dut.in_first), ctx.get(dut.in_last)
        assert last - first == 3
        assert ctx.get(dut.cycle) > last
    run_sim(dut, tb)


@pytest.mark.parametrize("width", [64, 128, 256])
def test_card_to_host_gathered(width):
    rnd = random.Random(width)
    dut = TlpShim(width)
    sizes = [0, 1, MAX_DW, 2, 3, 5, MAX_DW, 0, 1] + [rnd.randint(0, MAX_DW) for _ in range(20)]
    tlps = [tlp(rnd, n) for n in sizes]
    seen = []

    async def card(ctx):
        for h, d in tlps:
            beats = expected_beats(h, d, width)
            for b in beats:                              # back to back, every cycle a beat
                ctx.set(dut.tx.p, {**b, "func": 0, "bar": 0})
                ctx.set(dut.tx.valid, 1)
                assert ctx.get(dut.tx.ready) == 1
                await ctx.tick()
        ctx.set(dut.tx.valid, 0)
        await ctx.tick()

    async def host(ctx):
        # read on each change of out_seq, as the bridge does (no other wake-up)
        seq = 0
        while len(seen) < len(tlps):
            await ctx.tick()
            s = ctx.get(dut.out_seq)
            if s == seq:
                continue
            assert s == (seq + 1) & 0xFF, "a TLP went by unread"
            seq = s
            n = ctx.get(dut.out_ndw)
            data = ctx.get(dut.out_data)
            seen.append((ctx.get(dut.out_hdr), [(data >> (32 * k)) & 0xFFFF_FFFF
                                                for k in range(n)],
                         ctx.get(dut.out_last) - ctx.get(dut.out_first)))
        assert not ctx.get(dut.out_overflow)

    run_sim(dut, card, host)
    assert [(h, d) for h, d, _ in seen] == tlps
    assert [span for _, _, span in seen] == \
        [len(expected_beats(h, d, width)) - 1 for h, d in tlps]


def test_overflow_sticks():
    dut = TlpShim(64, max_dw=4)

    async def tb(ctx):
        beats = expected_beats(1 << 120, list(range(8)), 64)       # 8 DWs > 4
        for b in beats:
            ctx.set(dut.tx.p, {**b, "func": 0, "bar": 0})
            ctx.set(dut.tx.valid, 1)
            await ctx.tick()
        ctx.set(dut.tx.valid, 0)
        await ctx.tick()
        assert ctx.get(dut.out_overflow) == 1 and ctx.get(dut.out_ndw) == 4
    run_sim(dut, tb)


def test_raw_beats_pass_through():
    dut = TlpShim(64)

    async def tb(ctx):
        ctx.set(dut.raw, 1)
        ctx.set(dut.rx.ready, 0)
        stray = {"hdr": 0, "data": 0x1234, "strb": 1, "sop": 0, "eop": 0, "func": 0, "bar": 0}
        ctx.set(dut.raw_rx.p, stray)
        ctx.set(dut.raw_rx.valid, 1)
        assert ctx.get(dut.rx.valid) == 1 and ctx.get(dut.raw_rx.ready) == 0
        assert beat_dict(ctx.get(dut.rx.p))["data"] == 0x1234
        ctx.set(dut.rx.ready, 1)
        assert ctx.get(dut.raw_rx.ready) == 1
        # a TLP posted meanwhile waits until raw mode ends
        await post(ctx, dut, 5 << 120, [9], 1)
        for _ in range(3):
            await ctx.tick()
        assert beat_dict(ctx.get(dut.rx.p))["data"] == 0x1234
        ctx.set(dut.raw, 0)
        ctx.set(dut.raw_rx.valid, 0)
        assert ctx.get(dut.rx.valid) == 1 and beat_dict(ctx.get(dut.rx.p))["data"] == 9
    run_sim(dut, tb)
