"""Unit tests of hdl.pcie.rx_router.RxRouter: requests to ``req``, completions by tag, one pipeline
register (random valid and ready on every port; nothing lost, duplicated, reordered or sent to
the wrong port)."""

import random
import pytest
from hdl.pcie.rx_router import RxRouter
from helpers import beat_dict, cpl_hdr, mem_hdr, run_sim

DW = 64
ROUTES = {"a": 0x10, "b": 0x20, "c": (0x30, 0x31)}     # (a block with two host ports: "c")
TAGS = (0x10, 0x20, 0x30, 0x31)


def hdr(kind, tag):
    """A completion with ``tag``, or a memory write request (whose tag field is ignored)."""
    if kind == "cpl":
        return cpl_hdr(True, 1, 0, 0x0100, 4, 0x0000, tag)
    return mem_hdr(True, 0x1000, 1, tag=tag)


def expected_port(kind, tag):
    if kind != "cpl":
        return "req"
    names = {t: n for n, ts in ROUTES.items() for t in ((ts,) if isinstance(ts, int) else ts)}
    return f"cpl_{names[tag]}" if tag in names else "cpl_dma"


@pytest.mark.parametrize("seed", range(4))
def test_random_routing(seed):
    rng = random.Random(seed)
    dut = RxRouter(DW, ROUTES)
    ports = ["req", "cpl_a", "cpl_b", "cpl_c", "cpl_dma"]
    pkts = []
    for n in range(60):
        kind = rng.choice(["req", "cpl"])
        tag = rng.choice(list(TAGS) + [0x01, 0x7F])
        ln = rng.randint(1, 4)
        beats = [{"hdr": hdr(kind, tag) if k == 0 else 0, "data": (n << 8) | k, "strb": 3,
                  "sop": int(k == 0), "eop": int(k == ln - 1), "func": 0, "bar": 0}
                 for k in range(ln)]
        pkts.append((expected_port(kind, tag), beats))
    want = {p: [b for port, bs in pkts if port == p for b in bs] for p in ports}
    send = [b for _, bs in pkts for b in bs]

    async def tb(ctx):
        got = {p: [] for p in ports}
        pos = 0
        p_in, p_out = rng.uniform(0.4, 1), rng.uniform(0.3, 1)
        presenting = False
        for _ in range(4000):
            if pos == len(send) and sum(map(len, got.values())) == len(send):
                break
            if not presenting and pos < len(send) and rng.random() < p_in:
                presenting = True
            ctx.set(dut.i.valid, int(presenting))
            if presenting:
                ctx.set(dut.i.p, send[pos])
            readies = {p: int(rng.random() < p_out) for p in ports}
            for p in ports:
                ctx.set(getattr(dut, p).ready, readies[p])
            valid = [p for p in ports if ctx.get(getattr(dut, p).valid)]
            assert len(valid) <= 1, f"one beat offered on {valid}"
            moved_out = [p for p in valid if readies[p]]
            for p in moved_out:
                o = ctx.get(getattr(dut, p).p)
                got[p].append(beat_dict(o))
            moved_in = presenting and ctx.get(dut.i.ready)
            await ctx.tick()
            if moved_in:
                pos += 1
                presenting = False
        else:
            raise AssertionError("router did not drain")
        for p in ports:
            assert got[p] == want[p], f"port {p}: wrong beats"

    run_sim(dut, tb)


def test_full_rate_and_latency():
    """Consumers always ready: one beat per cycle, one cycle of latency."""
    dut = RxRouter(DW, ROUTES)
    beats = [{"hdr": hdr("cpl", 0x20) if k == 0 else 0, "data": k, "strb": 3,
              "sop": int(k == 0), "eop": int(k == 7), "func": 0, "bar": 0} for k in range(8)]

    async def tb(ctx):
        ctx.set(dut.cpl_b.ready, 1)
        seen = []
        for cyc in range(12):
            if cyc < 8:
                ctx.set(dut.i.valid, 1)
                ctx.set(dut.i.p, beats[cyc])
                assert ctx.get(dut.i.ready) == 1
            else:
                ctx.set(dut.i.valid, 0)
            if ctx.get(dut.cpl_b.valid):
                seen.append((cyc, ctx.get(dut.cpl_b.p.data)))
            await ctx.tick()
        assert seen == [(c + 1, c) for c in range(8)]

    run_sim(dut, tb)


def test_two_routes_on_one_tag_are_refused():
    with pytest.raises(ValueError, match="share a tag"):
        RxRouter(DW, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="share a tag"):
        RxRouter(DW, {"a": (1, 2), "b": 2})
