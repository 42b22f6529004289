"""amaranth.sim unit tests of the dirty-page logger (hdl.dma.dirty_log.DirtyLogger).

One testbench drives both ends of the logger each cycle (``o.ready`` first, then the input beat,
then it reads ``i.ready`` and the output), so the order of events is deterministic. The output
is checked against the input: with the marks taken out, the beats that leave must be the beats
that came in, in order and unchanged; every mark must match the model's next expected mark (the
logger's mark FIFO keeps order) and sit after the eop of the write it logs, at a packet
boundary. An offered output beat must hold until it is taken (stream rule).

The register file is PF BAR2 (bus.bar = 2, bus.fidx = 0), see :class:`regmap.DirtyLogRegs`.
"""

import random

import pytest

from hdl.config import CardConfig
from hdl.dma.dirty_log import DirtyLogger, MARK_FIFO_DEPTH
from hdl.pcie.tlp import TlpKind
from helpers import RegBus, beat_dict, cpl_hdr, hdr_dws, mem_hdr, pack_beats, run_sim
from regmap import DirtyLogRegs as R

BUS = 0x3A
PF_RID = BUS << 8
NF = 5                       # CardConfig(total_vfs=4): the PF and four VFs
PAGE = 1 << R.PAGE_SHIFT
MSI_ADDR = 0x8000_0000       # where the RootComplex puts its MSI region (not 0xFEEx_xxxx)
SOURCES, MSIX_SRC = 8, 1     # the arbiter's sources; the MSI-X controller's index among them

# function 2: bitmap above 4 GiB (4-DW marks), logged window below 4 GiB (3-DW writes)
BASE2, FIRST2, PAGES2 = 0x1_2345_0000, 0x8000_0000, 4096
# function 3: bitmap below 4 GiB at an odd byte (3-DW marks), logged window above 4 GiB
BASE3, FIRST3, PAGES3 = 0x0040_0001, 0x3_0000_0000, 64


def make_dut(width=64):
    return DirtyLogger(CardConfig(total_vfs=4, data_width=width), SOURCES, skip=(MSIX_SRC,))


def run(width, tb):
    dut = make_dut(width)

    async def bench(ctx):
        ctx.set(dut.link.bus_num, BUS)
        await tb(ctx, dut)
    run_sim(dut, bench)


# ---- register access ------------------------------------------------------------------------

class Regs:
    """PF BAR2 accesses (byte offsets); ``select`` leaves one idle cycle after the SEL write."""

    def __init__(self, ctx, dut):
        self.ctx = ctx
        self.rb = RegBus(ctx, dut.bus)

    async def wr(self, off, value, be=0xF, fidx=0):
        await self.rb.wr(fidx, off, value, be=be, bar=2)

    async def rd(self, off, fidx=0):
        return await self.rb.rd(fidx, off, bar=2)

    async def select(self, f):
        await self.wr(R.SEL, f)
        await self.ctx.tick()

    async def setup(self, f, base, first, pages, on):
        await self.select(f)
        await self.wr(R.BASE_LO, base & 0xFFFF_FFFF)
        await self.wr(R.BASE_HI, base >> 32)
        await self.wr(R.FIRST_LO, first & 0xFFFF_FFFF)
        await self.wr(R.FIRST_HI, first >> 32)
        await self.wr(R.PAGES, pages)
        await self.wr(R.CTRL, R.CTRL_ON if on else 0)

    async def ctrl(self, f):
        await self.select(f)
        return await self.rd(R.CTRL)


# ---- TLPs and the model ---------------------------------------------------------------------

def mwr(addr, ndw, func, rng, force64=None, bar=0, src=0):
    """A MemWr TLP ``(hdr, payload, func, bar, src)``; ``src`` is the arbiter source it
    comes from (``MSIX_SRC``: an interrupt message)."""
    hdr = mem_hdr(True, addr, ndw, first_be=0xF, last_be=0 if ndw == 1 else 0xF,
                  tag=rng.randrange(256), requester_id=func, force64=force64)
    return hdr, [rng.getrandbits(32) for _ in range(ndw)], func, bar, src


def mrd(addr, ndw, func, rng, bar=0):
    hdr = mem_hdr(False, addr, ndw, first_be=0xF, last_be=0 if ndw == 1 else 0xF,
                  tag=rng.randrange(256), requester_id=func)
    return hdr, [], func, bar, 0


def cpl(func, rng, ndw):
    hdr = cpl_hdr(ndw > 0, ndw, 0, func, 4 * ndw, rng.randrange(1 << 16), rng.randrange(256),
                  rng.randrange(128) & ~3)
    return hdr, [rng.getrandbits(32) for _ in range(ndw)], func, 0, 0


def beats_of(tlp, width):
    hdr, payload, func, bar, _ = tlp
    return pack_beats(hdr, payload, width, func=func, bar=bar)


def random_tlp(rng, funcs):
    """Any of MemWr 3/4-DW (1..16 DW), MemRd 3/4-DW, Cpl, CplD, with random fields."""
    f = rng.choice(funcs)
    bar = rng.randrange(8)
    kind = rng.randrange(6)
    if kind == 0:
        return mwr(rng.randrange(1 << 32) & ~3, rng.randint(1, 16), f, rng, bar=bar)
    if kind == 1:
        return mwr(rng.randrange(1 << 32, 1 << 64) & ~3, rng.randint(1, 16), f, rng, bar=bar)
    if kind == 2:
        return mrd(rng.randrange(1 << 32) & ~3, rng.randint(1, 64), f, rng, bar=bar)
    if kind == 3:
        return mrd(rng.randrange(1 << 32, 1 << 64) & ~3, rng.randint(1, 64), f, rng, bar=bar)
    if kind == 4:
        return cpl(f, rng, 0)
    return cpl(f, rng, rng.randint(1, 16))


def mark_beat(byte):
    """The beat of the one-byte 0xFF MemWr at bus byte address ``byte`` from the PF."""
    lane = byte & 3
    return {"hdr": mem_hdr(True, byte & ~3, 1, first_be=1 << lane, last_be=0, requester_id=PF_RID),
            "data": 0xFF << (8 * lane), "strb": 1, "sop": 1, "eop": 1, "func": 0, "bar": 0}


class LogModel:
    def __init__(self):
        self.logs = {}               # func -> (base, first, pages)
        self.overflow = set()

    def on(self, f, base, first, pages):
        self.logs[f] = (base, first, pages)

    def mark_of(self, tlp):
        """The byte address the TLP's mark goes to, or None (and the overflow it sets)."""
        hdr, _, func, _, src = tlp
        d0, _, d2, d3 = hdr_dws(hdr)
        kind = d0 >> 24
        if kind not in (TlpKind.MWR32, TlpKind.MWR64) or func not in self.logs:
            return None
        addr = (d2 << 32 | d3) if kind == TlpKind.MWR64 else d2
        if src == MSIX_SRC:          # an interrupt message, wherever it goes
            return None
        base, first, pages = self.logs[func]
        idx = (addr >> R.PAGE_SHIFT) - (first >> R.PAGE_SHIFT)
        if not 0 <= idx < pages:
            self.overflow.add(func)
            return None
        return base + idx // 8


# ---- the stream driver / checker ------------------------------------------------------------

async def stream(ctx, dut, tlps, width, rng, ready_p=1.0, gap_p=0.0, idle=12, max_cycles=20000):
    """Offer ``tlps`` on ``i`` (with random gaps between beats) while ``o.ready`` is random.

    Returns (beats moved on ``o``, the TLP index of each input beat, stats). Checks on the way
    that an offered output beat stays offered, unchanged, until taken. While ``i`` is idle its
    payload is garbage that looks like a logged write (it must not be logged)."""
    beats = [(n, b) for n, t in enumerate(tlps) for b in beats_of(t, width)]
    out = []
    stats = {"in_waits": 0, "cycles": 0}
    k, cur, prev, quiet = 0, None, None, 0
    for cycle in range(max_cycles):
        r = int(rng.random() < ready_p)
        ctx.set(dut.o.ready, r)
        if cur is None:
            if k < len(beats) and rng.random() >= gap_p:
                cur = beats[k][1]
                ctx.set(dut.i.p, cur)
                ctx.set(dut.i_src, tlps[beats[k][0]][4])
                ctx.set(dut.i.valid, 1)
            else:
                junk = pack_beats(mem_hdr(True, FIRST2 + PAGE * rng.randrange(PAGES2), 1),
                                  [rng.getrandbits(32)], width, func=2)[0]
                junk["eop"] = rng.randrange(2)
                ctx.set(dut.i.p, junk)
                ctx.set(dut.i.valid, 0)
        i_ready = ctx.get(dut.i.ready)
        o_valid = ctx.get(dut.o.valid)
        ob = beat_dict(ctx.get(dut.o.p)) if o_valid else None
        if prev is not None:
            assert o_valid, f"cycle {cycle}: an offered output beat was withdrawn"
            assert ob == prev, f"cycle {cycle}: an offered output beat changed before it moved"
        if o_valid and r:
            out.append(ob)
            prev = None
        else:
            prev = ob
        if cur is not None and not i_ready and r:
            stats["in_waits"] += 1
        await ctx.tick()
        if cur is not None and i_ready:
            k += 1
            cur = None
            ctx.set(dut.i.valid, 0)
        if k == len(beats):
            quiet = 0 if o_valid else quiet + 1
            if quiet >= idle and prev is None:
                break
    else:
        raise AssertionError(f"stream did not finish: {k}/{len(beats)} input beats moved")
    ctx.set(dut.o.ready, 0)
    stats["cycles"] = cycle + 1
    return out, [n for n, _ in beats], stats


def split_marks(out, tlps, width):
    """Match the output against the input beats; the rest must be marks at packet boundaries.

    Returns (marks as (output position, beat), output position of each TLP's eop)."""
    exp = [(n, b) for n, t in enumerate(tlps) for b in beats_of(t, width)]
    j, in_pkt, marks, eop_pos = 0, False, [], {}
    for pos, b in enumerate(out):
        if j < len(exp) and b == exp[j][1]:
            n = exp[j][0]
            in_pkt = not b["eop"]
            if b["eop"]:
                eop_pos[n] = pos
            j += 1
            continue
        assert not in_pkt, (f"output beat {pos} inside TLP {exp[j][0]} is not its next beat "
                            f"(a dropped/changed beat or a mark inside a packet): {b}")
        assert b["sop"] and b["eop"] and b["strb"] == 1, f"output beat {pos} is no input and no mark: {b}"
        marks.append((pos, b))
    assert j == len(exp), f"only {j} of {len(exp)} input beats came out"
    return marks, eop_pos


def check_marks(out, tlps, width, model):
    """Every logged write is followed by exactly its mark, in order; returns the mark count."""
    marks, eop_pos = split_marks(out, tlps, width)
    expected = [(n, model.mark_of(t)) for n, t in enumerate(tlps)]
    expected = [(n, byte) for n, byte in expected if byte is not None]
    got = [m for _, m in marks]
    want = [mark_beat(byte) for _, byte in expected]
    assert len(got) == len(want), f"{len(got)} marks for {len(want)} logged writes"
    for k, ((pos, g), w, (n, byte)) in enumerate(zip(marks, want, expected)):
        assert g == w, f"mark {k} (write {n}, bitmap byte {byte:#x}): got {g}, want {w}"
        assert pos > eop_pos[n], f"mark {k} at output {pos} before its write ends ({eop_pos[n]})"
    return len(got)


# ==== 1. pass-through with the log off ========================================================

@pytest.mark.parametrize("width", [64, 128])
def test_pass_through_log_off(width):
    rng = random.Random(0xD1 + width)
    tlps = [random_tlp(rng, range(NF)) for _ in range(120)]
    # writes into the windows of functions 2 and 3 (whose logs are configured but off)
    tlps += [mwr(FIRST2 + PAGE * rng.randrange(PAGES2), rng.randint(1, 16), 2, rng)
             for _ in range(20)]
    tlps += [mwr(FIRST3 + PAGE * rng.randrange(PAGES3), rng.randint(1, 16), 3, rng)
             for _ in range(20)]
    rng.shuffle(tlps)

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(2, BASE2, FIRST2, PAGES2, on=False)
        await regs.setup(3, BASE3, FIRST3, PAGES3, on=False)
        out, _, stats = await stream(ctx, dut, tlps, width, rng, ready_p=0.6, gap_p=0.3)
        exp = [b for t in tlps for b in beats_of(t, width)]
        assert len(out) == len(exp), f"{len(out)} beats out for {len(exp)} in"
        for n, (g, w) in enumerate(zip(out, exp)):
            assert g == w, f"beat {n}: got {g}, want {w}"
        assert await regs.rd(R.MARKS) == 0
        for f in range(NF):
            assert await regs.ctrl(f) == 0
    run(width, tb)


# ==== 2. marks ================================================================================

@pytest.mark.parametrize("width", [64, 128])
def test_marks(width):
    rng = random.Random(0x3A2 + width)
    model = LogModel()
    model.on(2, BASE2, FIRST2, PAGES2)
    model.on(3, BASE3, FIRST3, PAGES3)
    tlps = []
    for page in (0, 1, 7, 8, 100, 4095):
        off = rng.randrange(PAGE - 64) & ~3
        tlps.append(mwr(FIRST2 + page * PAGE + off, rng.randint(1, 16), 2, rng))
    tlps.append(mwr(FIRST2 + 4095 * PAGE + PAGE - 4, 1, 2, rng))        # last DW of the window
    tlps.append(mwr(FIRST2 + 9 * PAGE, 3, 2, rng, force64=True))       # 4-DW header, < 4 GiB
    for page in (0, 5, 8, 63):                                           # 64-bit writes
        tlps.append(mwr(FIRST3 + page * PAGE + 0x100, rng.randint(1, 16), 3, rng))
    for page in (0, 1, 100, 4095):                                       # function 1: log off
        tlps.append(mwr(FIRST2 + page * PAGE, rng.randint(1, 16), 1, rng))
    tlps.append(mwr(MSI_ADDR, 1, 2, rng, src=MSIX_SRC))                  # MSI-X of function 2
    tlps.append(mwr(MSI_ADDR + 0x1_0004, 1, 3, rng, src=MSIX_SRC))       # ... and of function 3
    tlps.append(mwr(FIRST2 + 20 * PAGE, 1, 2, rng, src=MSIX_SRC))        # (inside the window)
    tlps.append(mrd(FIRST2 + 3 * PAGE, 16, 2, rng))                      # reads are not logged
    tlps.append(mrd(FIRST3 + 3 * PAGE, 16, 3, rng))
    tlps.append(cpl(2, rng, 4))
    tlps.append(cpl(3, rng, 0))
    for _ in range(40):                                                  # and a random mix
        f = rng.choice((1, 2, 3, 4, 0))
        first, pages = {3: (FIRST3, PAGES3)}.get(f, (FIRST2, PAGES2))
        tlps.append(mwr(first + PAGE * rng.randrange(pages) + (rng.randrange(PAGE - 64) & ~3),
                        rng.randint(1, 16), f, rng))
    rng.shuffle(tlps)
    tlps = [random_tlp(rng, [1])] + tlps      # not a write of a logged function

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(1, BASE2, FIRST2, PAGES2, on=False)
        await regs.setup(2, BASE2, FIRST2, PAGES2, on=True)
        await regs.setup(3, BASE3, FIRST3, PAGES3, on=True)
        out, _, _ = await stream(ctx, dut, tlps, width, rng, ready_p=0.7, gap_p=0.3)
        n = check_marks(out, tlps, width, model)
        assert n > 20
        assert await regs.rd(R.MARKS) == n
        assert not model.overflow
        for f in range(NF):
            assert await regs.ctrl(f) == (R.CTRL_ON if f in (2, 3) else 0), f"CTRL of {f}"
    run(width, tb)


def test_mark_byte_lanes():
    """Pages 0..31 of function 3 (bitmap at an odd byte): each mark's lane and address."""
    rng = random.Random(7)
    model = LogModel()
    model.on(3, BASE3, FIRST3, PAGES3)
    tlps = [mwr(FIRST3 + p * PAGE, 1, 3, rng) for p in range(0, 32, 3)]

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(3, BASE3, FIRST3, PAGES3, on=True)
        out, _, _ = await stream(ctx, dut, tlps, 64, rng)
        assert check_marks(out, tlps, 64, model) == len(tlps)
        lanes = {mark_beat(model.mark_of(t))["hdr"] >> 64 & 0xF for t in tlps}
        assert lanes == {1, 2, 4, 8}      # every byte lane was used
    run(64, tb)


# ==== 3. overflow =============================================================================

def test_overflow():
    rng = random.Random(3)
    end2 = FIRST2 + PAGES2 * PAGE

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(2, BASE2, FIRST2, PAGES2, on=True)
        await regs.setup(3, BASE3, FIRST3, PAGES3, on=True)

        async def send(tlps, marks):
            model = LogModel()
            model.on(2, BASE2, FIRST2, PAGES2)
            model.on(3, BASE3, FIRST3, PAGES3)
            out, _, _ = await stream(ctx, dut, tlps, 64, rng, ready_p=0.8)
            assert check_marks(out, tlps, 64, model) == marks
            return model.overflow

        # outside function 2's window: just below, at the end, 2**32 pages on (a wide index)
        outside = [mwr(FIRST2 - 4, 1, 2, rng), mwr(end2, 4, 2, rng), mwr(end2 + PAGE - 4, 1, 2, rng),
                   mwr(FIRST2 + (1 << 44), 2, 2, rng), mwr(0, 1, 2, rng)]
        for t in outside:
            assert await send([t], 0) == {2}
            want = {0: 0, 1: 0, 2: R.CTRL_ON | R.CTRL_OVERFLOW, 3: R.CTRL_ON, 4: 0}
            for f in range(NF):
                assert await regs.ctrl(f) == want[f], f"CTRL of {f} after a write at {t[0]:#x}"
            # writing 1 to bit 0 alone keeps the overflow; writing bit 1 clears it
            await regs.select(2)
            await regs.wr(R.CTRL, R.CTRL_ON)
            assert await regs.rd(R.CTRL) == R.CTRL_ON | R.CTRL_OVERFLOW
            await regs.wr(R.CTRL, R.CTRL_ON | R.CTRL_OVERFLOW)
            assert await regs.rd(R.CTRL) == R.CTRL_ON
        # inside still marks, and sets nothing
        assert await send([mwr(end2 - 4, 1, 2, rng), mwr(FIRST2, 1, 2, rng)], 2) == set()
        assert await regs.ctrl(2) == R.CTRL_ON
        # function 3 (64-bit window): below it, and at its end; function 2 untouched
        assert await send([mwr(FIRST3 - PAGE, 1, 3, rng)], 0) == {3}
        assert await regs.ctrl(3) == R.CTRL_ON | R.CTRL_OVERFLOW
        assert await regs.ctrl(2) == R.CTRL_ON
        await regs.select(3)
        await regs.wr(R.CTRL, R.CTRL_OVERFLOW)          # clear it and turn the log off
        assert await regs.rd(R.CTRL) == 0
        off3 = [mwr(FIRST3 + PAGES3 * PAGE, 1, 3, rng), mwr(FIRST3, 1, 3, rng)]
        out, _, _ = await stream(ctx, dut, off3, 64, rng)
        assert split_marks(out, off3, 64)[0] == [], "a function whose log is off marks"
        assert await regs.ctrl(3) == 0, "a function whose log is off overflows"
        assert await regs.ctrl(2) == R.CTRL_ON
        # PAGES = 0: everything overflows
        await regs.setup(4, BASE2, FIRST2, 0, on=True)
        model4 = LogModel()
        model4.on(4, BASE2, FIRST2, 0)
        t4 = [mwr(FIRST2, 1, 4, rng)]
        out, _, _ = await stream(ctx, dut, t4, 64, rng)
        assert check_marks(out, t4, 64, model4) == 0
        assert await regs.ctrl(4) == R.CTRL_ON | R.CTRL_OVERFLOW
        assert await regs.ctrl(2) == R.CTRL_ON
        assert await regs.rd(R.MARKS) == 2
    run(64, tb)


# ==== 4. no loss under pressure ===============================================================

@pytest.mark.parametrize("ready_p", [0.5, 0.9])
def test_no_loss_under_pressure(ready_p):
    rng = random.Random(int(ready_p * 100))
    model = LogModel()
    model.on(2, BASE2, FIRST2, PAGES2)
    model.on(3, BASE3, FIRST3, PAGES3)
    tlps = []
    for _ in range(300):
        f = rng.choice((2, 2, 3))
        first, pages = (FIRST3, PAGES3) if f == 3 else (FIRST2, PAGES2)
        tlps.append(mwr(first + PAGE * rng.randrange(pages) + 4 * rng.randrange(1024 - 2),
                        rng.randint(1, 2), f, rng))     # one beat at 64 bits

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(2, BASE2, FIRST2, PAGES2, on=True)
        await regs.setup(3, BASE3, FIRST3, PAGES3, on=True)
        out, _, stats = await stream(ctx, dut, tlps, 64, rng, ready_p=ready_p, gap_p=0.0)
        assert check_marks(out, tlps, 64, model) == len(tlps)
        assert stats["in_waits"] > 0, "the input was never held back while the output was ready"
        # the link was busy: the marks cost one beat each, and nothing else was lost
        assert len(out) == 2 * len(tlps)
        assert await regs.rd(R.MARKS) == len(tlps)
        assert await regs.ctrl(2) == R.CTRL_ON and await regs.ctrl(3) == R.CTRL_ON
    run(64, tb)


def test_no_loss_long_writes_between_marks():
    """Multi-beat writes keep the marks waiting for a boundary; the output stalls in bursts."""
    rng = random.Random(44)
    model = LogModel()
    model.on(2, BASE2, FIRST2, PAGES2)
    tlps = [mwr(FIRST2 + PAGE * rng.randrange(PAGES2), rng.choice((1, 2, 16)), 2, rng)
            for _ in range(6 * MARK_FIFO_DEPTH)]

    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        await regs.setup(2, BASE2, FIRST2, PAGES2, on=True)
        out, _, _ = await stream(ctx, dut, tlps, 64, rng, ready_p=0.3, gap_p=0.0)
        assert check_marks(out, tlps, 64, model) == len(tlps)
    run(64, tb)


# ==== 5. registers ============================================================================

CFG = {f: (0x10_0000_0000 * f + 0x1234_5000 + f, (0x2_0000_0000 * f + 0x4000_0000 * f) & ~(PAGE - 1),
           0x100 * f + 7) for f in range(NF)}


def test_register_read_back():
    async def tb(ctx, dut):
        regs = Regs(ctx, dut)

        async def read_all(f):
            await regs.select(f)
            assert await regs.rd(R.SEL) == f
            lo, hi = await regs.rd(R.BASE_LO), await regs.rd(R.BASE_HI)
            flo, fhi = await regs.rd(R.FIRST_LO), await regs.rd(R.FIRST_HI)
            return hi << 32 | lo, fhi << 32 | flo, await regs.rd(R.PAGES), await regs.rd(R.CTRL)

        for f in range(NF):
            base, first, pages = CFG[f]
            await regs.setup(f, base, first, pages, on=f % 2 == 1)
        for f in (4, 0, 3, 1, 2):
            base, first, pages = CFG[f]
            assert await read_all(f) == (base, first, pages, R.CTRL_ON if f % 2 else 0), f"func {f}"
        # past the last function: SEL reads back, the rest reads 0, writes change nothing
        for s in (NF, 7, 8, 9, 0xFF):
            await regs.setup(s, 0xFFFF_FFFF_FFFF_FFFF, 0xFFFF_FFFF_FFFF_F000, 0xFFFF_FFFF, on=True)
            await regs.wr(R.CTRL, R.CTRL_ON | R.CTRL_OVERFLOW)
            assert await read_all(s) == (0, 0, 0, 0), f"SEL {s}"
        for f in range(NF):
            base, first, pages = CFG[f]
            assert await read_all(f) == (base, first, pages, R.CTRL_ON if f % 2 else 0), f"func {f}"
        # VFs do not reach PF BAR2; MARKS is read-only
        await regs.select(1)
        await regs.wr(R.SEL, 3, fidx=1)
        await regs.wr(R.BASE_LO, 0xDEAD_BEEF, fidx=1)
        await ctx.tick()
        assert await regs.rd(R.SEL, fidx=1) == 0
        assert await regs.rd(R.SEL) == 1
        assert await regs.rd(R.BASE_LO) == CFG[1][0] & 0xFFFF_FFFF
        await regs.wr(R.MARKS, 1234)
        assert await regs.rd(R.MARKS) == 0
        # turning a log off and on per function
        await regs.wr(R.CTRL, 0)
        assert await regs.ctrl(1) == 0 and await regs.ctrl(3) == R.CTRL_ON
    run(64, tb)


def test_register_read_right_after_sel_write():
    """A read in the cycle right after the SEL write reads the newly selected function (the
    register file contract: ``read`` values are sampled in the cycle of ``re``)."""
    async def tb(ctx, dut):
        regs = Regs(ctx, dut)
        for f in range(NF):
            base, first, pages = CFG[f]
            await regs.setup(f, base, first, pages, on=True)
        got = {}
        for f in (2, 3, 0, 4, 1, 9):
            await regs.wr(R.SEL, f)                   # no idle cycle before the read
            got[f] = await regs.rd(R.PAGES)
        want = {f: CFG[f][2] if f < NF else 0 for f in got}
        assert got == want
    run(64, tb)
