"""Unit tests of hdl.pcie.bar_decode.BarDecoder (combinational), with a pure-Python reference.

The decoder is combinational, so the hypothesis test runs *inside* one simulation: the
``@given`` function only uses ``ctx.set``/``ctx.get`` (no awaits), one example per call."""

from hdl.config import CardConfig
from hdl.pcie.bar_decode import BarDecoder
from helpers import run_sim
from hypothesis import given, settings, strategies as st, HealthCheck

CFG = CardConfig()                 # PF BAR0 16 KiB, BAR2 4 KiB, VF BAR0 16 KiB, 16 VFs
M64 = (1 << 64) - 1


def reference(cfg, s, addr):
    """(hit, fidx, bar, dw offset) per the module docstring."""
    if s["pf_mse"] and addr // cfg.bar0_size == s["pf_bar0"] // cfg.bar0_size:
        return 1, 0, 0, (addr % cfg.bar0_size) >> 2
    if s["pf_mse"] and addr < 1 << 32 and addr // cfg.bar2_size == s["pf_bar2"] // cfg.bar2_size:
        return 1, 0, 2, (addr % cfg.bar2_size) >> 2
    if s["vf_enable"] and s["vf_mse"]:
        idx = addr // cfg.vf_bar0_size - s["vf_bar0"] // cfg.vf_bar0_size
        if 0 <= idx < s["num_vfs"]:
            return 1, idx + 1, 0, (addr % cfg.vf_bar0_size) >> 2
    return 0, None, None, None


def apply(ctx, dut, s):
    for k, v in s.items():
        ctx.set(getattr(dut.bars, k), v)


def lookup(ctx, dut, addr):
    ctx.set(dut.lookup.addr, addr)
    lk = dut.lookup
    return ctx.get(lk.hit), ctx.get(lk.fidx), ctx.get(lk.bar), ctx.get(lk.offset)


def check(ctx, dut, cfg, s, addr):
    got = lookup(ctx, dut, addr)
    exp = reference(cfg, s, addr)
    if exp[0]:
        assert got == exp, f"addr {addr:#x} state {s}: got {got}, expected {exp}"
    else:
        assert got[0] == 0, f"addr {addr:#x} state {s}: unexpected hit {got}"


def run(tb, cfg=CFG):
    dut = BarDecoder(cfg)

    async def bench(ctx):
        tb(ctx, dut)
    run_sim(dut, bench)


BASE_STATE = dict(pf_mse=1, pf_bar0=0x1_0000_0000, pf_bar2=0xF000_0000, vf_enable=1, vf_mse=1,
                  num_vfs=4, vf_bar0=0x2_0000_0000, vf_shift=14)


def test_pf_bars_need_mse():
    def tb(ctx, dut):
        s = dict(BASE_STATE)
        apply(ctx, dut, s)
        assert lookup(ctx, dut, 0x1_0000_0000) == (1, 0, 0, 0)
        assert lookup(ctx, dut, 0x1_0000_3FFC) == (1, 0, 0, 0xFFF)
        assert lookup(ctx, dut, 0x1_0000_4000)[0] == 0
        assert lookup(ctx, dut, 0x0_FFFF_FFFC)[0] == 0
        assert lookup(ctx, dut, 0xF000_0024) == (1, 0, 2, 9)
        assert lookup(ctx, dut, 0xF000_1000)[0] == 0
        assert lookup(ctx, dut, 0x1_F000_0024)[0] == 0        # BAR2 is 32-bit only
        ctx.set(dut.bars.pf_mse, 0)
        assert lookup(ctx, dut, 0x1_0000_0000)[0] == 0
        assert lookup(ctx, dut, 0xF000_0024)[0] == 0
        assert lookup(ctx, dut, 0x2_0000_0000) == (1, 1, 0, 0)   # VFs don't use PF MSE
    run(tb)


def test_vf_aperture_edges():
    def tb(ctx, dut):
        vsz = CFG.vf_bar0_size
        for n in (1, 4, CFG.total_vfs):
            s = dict(BASE_STATE, num_vfs=n)
            apply(ctx, dut, s)
            base = s["vf_bar0"]
            assert lookup(ctx, dut, base) == (1, 1, 0, 0), "first byte of VF1"
            assert lookup(ctx, dut, base + 3) == (1, 1, 0, 0)
            assert lookup(ctx, dut, base + vsz - 1) == (1, 1, 0, (vsz - 1) >> 2)
            assert lookup(ctx, dut, base + vsz) == (1, 2, 0, 0) if n > 1 else True
            last = base + n * vsz - 1
            assert lookup(ctx, dut, last) == (1, n, 0, (vsz - 4) >> 2), "last byte of VF NumVFs"
            assert lookup(ctx, dut, last + 1)[0] == 0, "one past the end"
            assert lookup(ctx, dut, base - 1)[0] == 0, "below the base"
            assert lookup(ctx, dut, base - vsz)[0] == 0
            assert lookup(ctx, dut, base + 0x2010) == (1, 1, 0, 0x804)
            assert lookup(ctx, dut, base + 2 * vsz + 0x100)[:2] == ((1, 3) if n >= 3 else (0, 0))
        for off in ("vf_enable", "vf_mse"):
            apply(ctx, dut, dict(BASE_STATE, **{off: 0}))
            assert lookup(ctx, dut, BASE_STATE["vf_bar0"])[0] == 0, f"VF hit with {off}=0"
        apply(ctx, dut, dict(BASE_STATE, num_vfs=0))
        assert lookup(ctx, dut, BASE_STATE["vf_bar0"])[0] == 0
    run(tb)


def test_vf_aperture_at_top_of_address_space():
    cfg = CardConfig(total_vfs=255)

    def tb(ctx, dut):
        vsz = cfg.vf_bar0_size
        base = (1 << 64) - 255 * vsz                      # the aperture ends at 2^64 - 1
        apply(ctx, dut, dict(BASE_STATE, num_vfs=255, vf_bar0=base))
        assert lookup(ctx, dut, base) == (1, 1, 0, 0)
        assert lookup(ctx, dut, M64) == (1, 255, 0, (vsz - 4) >> 2)
        assert lookup(ctx, dut, base - 1)[0] == 0
        assert lookup(ctx, dut, 0)[0] == 0                # no wrap-around to address 0
        apply(ctx, dut, dict(BASE_STATE, num_vfs=254, vf_bar0=base))
        assert lookup(ctx, dut, M64)[0] == 0
        assert lookup(ctx, dut, M64 - vsz) == (1, 254, 0, (vsz - 4) >> 2)
    run(tb, cfg)


def _states(cfg):
    sv = cfg.vf_bar0_size
    return st.fixed_dictionaries({
        "pf_mse": st.integers(0, 1),
        "pf_bar0": st.integers(0, M64 // cfg.bar0_size).map(lambda x: x * cfg.bar0_size),
        "pf_bar2": st.integers(0, 0xFFFF_FFFF // cfg.bar2_size).map(lambda x: x * cfg.bar2_size),
        "vf_enable": st.integers(0, 1),
        "vf_mse": st.integers(0, 1),
        "num_vfs": st.integers(0, cfg.total_vfs),
        "vf_bar0": st.integers(0, M64 // sv).map(lambda x: x * sv),
        "vf_shift": st.just(sv.bit_length() - 1),
    })


def _address(s, cfg):
    """Addresses clustered around every BAR edge, plus uniformly random ones."""
    vsz = cfg.vf_bar0_size
    anchors = [s["pf_bar0"], s["pf_bar0"] + cfg.bar0_size, s["pf_bar2"],
               s["pf_bar2"] + cfg.bar2_size, s["vf_bar0"],
               s["vf_bar0"] + s["num_vfs"] * vsz]
    near = st.tuples(st.sampled_from(anchors),
                     st.integers(-2 * vsz, 2 * vsz) | st.integers(-8, 8),
                     st.integers(-2, cfg.total_vfs + 1)).map(
        lambda t: (t[0] + t[1] + t[2] * vsz) & M64 if t[0] == s["vf_bar0"] else (t[0] + t[1]) & M64)
    return near | st.integers(0, M64)


def test_random_against_reference():
    cfg = CardConfig(total_vfs=8, bar0_size=0x8000, vf_bar0_size=0x4000)

    def tb(ctx, dut):
        @settings(max_examples=200, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def prop(data):
            s = data.draw(_states(cfg))
            apply(ctx, dut, s)
            for addr in data.draw(st.lists(_address(s, cfg), min_size=1, max_size=8)):
                check(ctx, dut, cfg, s, addr)
        prop()
    run(tb, cfg)
