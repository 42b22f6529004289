"""Unit tests of hdl.virtio.transport.VirtioPci: the virtio-pci modern transport (common config,
notifications, ISR, virtio-net device config) of the PF and two VFs, driven through the
register bus, plus its engine-side ports (qr_*, qa_*, kick, isr_set, nr_set) and resets."""

import pytest
from hdl.config import CardConfig
from hdl.virtio.transport import VirtioPci
from helpers import run_cached, RegBus

from regmap import VirtioRegs as V

CFG = CardConfig(total_vfs=2)
NF = CFG.num_functions          # PF + 2 VFs
NVEC = CFG.msix_vectors         # 4
NQ = V.NUM_QUEUES_VALUE         # 9: four pairs and the control queue


def kbit(f, q):
    """The engine's notification bit of queue ``q`` of function ``f``."""
    return 1 << (f * NQ + q)


def qsize_of(q):
    """A queue size distinct per queue (a power of two up to 256)."""
    return 1 << (q % 8 + 1)
NOV = V.NO_VECTOR

C = V.COMMON
DFSEL, DF, GFSEL, GF = C + V.DFSELECT, C + V.DF, C + V.GFSELECT, C + V.GF
MSIXCFG, STATUS, QSIZE, QEN = C + V.MSIX_CONFIG, C + V.STATUS, C + V.Q_SIZE, C + V.Q_ENABLE
QADDR = {"desc": C + V.Q_DESC, "driver": C + V.Q_DRIVER, "device": C + V.Q_DEVICE}

F_MAC, F_STATUS = 1 << V.F_NET_MAC, 1 << V.F_NET_STATUS
F_INDIRECT, F_EVIDX = 1 << V.F_RING_INDIRECT_DESC, 1 << V.F_RING_EVENT_IDX
F_V1 = 1 << V.F_VERSION_1


class Virtio:
    """Driver-side accesses of one function's virtio structures (natural-width accesses via
    byte enables) plus the engine-side strobes."""

    def __init__(self, ctx, dut):
        self.ctx, self.dut = ctx, dut
        self.bus = RegBus(ctx, dut.bus)

    # -- common config ----------------------------------------------------------------------
    async def status(self, f):
        return (await self.bus.rd(f, STATUS)) & 0xFF

    async def set_status(self, f, v):
        await self.bus.wr(f, STATUS, v, be=0b0001)

    async def dev_features(self, f, sel):
        await self.bus.wr(f, DFSEL, sel)
        return await self.bus.rd(f, DF)

    async def set_drv_features(self, f, features, order=(0, 1)):
        for sel in order:
            await self.bus.wr(f, GFSEL, sel)
            await self.bus.wr(f, GF, (features >> (32 * sel)) & 0xFFFF_FFFF)

    async def drv_features(self, f):
        w = 0
        for sel in (0, 1):
            await self.bus.wr(f, GFSEL, sel)
            w |= (await self.bus.rd(f, GF)) << (32 * sel)
        return w

    async def cfg_vec(self, f):
        return (await self.bus.rd(f, MSIXCFG)) & 0xFFFF

    async def set_cfg_vec(self, f, v):
        await self.bus.wr(f, MSIXCFG, v, be=0b0011)

    async def select(self, f, q):
        await self.bus.wr(f, STATUS, q << 16, be=0b1100)

    async def qsize(self, f):
        return (await self.bus.rd(f, QSIZE)) & 0xFFFF

    async def set_qsize(self, f, v):
        await self.bus.wr(f, QSIZE, v, be=0b0011)

    async def qvec(self, f):
        return (await self.bus.rd(f, QSIZE)) >> 16

    async def set_qvec(self, f, v):
        await self.bus.wr(f, QSIZE, v << 16, be=0b1100)

    async def qen(self, f):
        return (await self.bus.rd(f, QEN)) & 0xFFFF

    async def enable(self, f, v=1):
        await self.bus.wr(f, QEN, v, be=0b0011)

    async def notify_off(self, f):
        return (await self.bus.rd(f, QEN)) >> 16

    async def set_addr(self, f, which, value):
        off = QADDR[which]
        await self.bus.wr(f, off, value & 0xFFFF_FFFF)
        await self.bus.wr(f, off + 4, value >> 32)

    async def addr(self, f, which):
        off = QADDR[which]
        return (await self.bus.rd(f, off)) | ((await self.bus.rd(f, off + 4)) << 32)

    async def isr(self, f):
        return await self.bus.rd(f, V.ISR)

    async def notify(self, f, q):
        await self.bus.wr(f, V.NOTIFY + V.NOTIFY_MULT * q, q, be=0b0011)

    async def negotiate(self, f, features, final=15):
        await self.set_status(f, 1)
        await self.set_status(f, 3)
        await self.set_drv_features(f, features)
        await self.set_status(f, 11)
        if final is not None:
            await self.set_status(f, final)

    # -- engine side ------------------------------------------------------------------------
    def bit(self, sig, i):
        return (self.ctx.get(sig) >> i) & 1

    async def strobe(self, sig, fidx_sig=None, fidx=None, **extra):
        """One-cycle strobe; returns (reset, reset_fidx, irq.valid, irq.fidx, irq.vector) as
        seen during the strobe cycle."""
        ctx, d = self.ctx, self.dut
        ctx.set(sig, 1)
        if fidx_sig is not None:
            ctx.set(fidx_sig, fidx)
        for s, v in extra.items():
            ctx.set(getattr(d, s), v)
        seen = (ctx.get(d.engine.vreset), ctx.get(d.engine.vreset_fidx), ctx.get(d.irq.valid),
                ctx.get(d.irq.fidx), ctx.get(d.irq.vector))
        await ctx.tick()
        ctx.set(sig, 0)
        return seen

    async def word(self, f, q, sel):
        """The engine's read of queue word ``sel`` (a cycle after the address), as an int."""
        ctx, d = self.ctx, self.dut
        ctx.set(d.engine.qa_fidx, f)
        ctx.set(d.engine.qa_q, q)
        ctx.set(d.engine.qa_sel, sel)
        await ctx.tick()
        w = ctx.get(d.engine.qa_data)
        return w.lo | (w.hi << 64)

    async def qa(self, f, q, k):
        """Ring address ``k`` (0 descriptor table, 1 driver area, 2 device area)."""
        return (await self.word(f, q, k // 2) >> (64 * (k % 2))) & ((1 << 64) - 1)

    async def qr(self, f, q):
        """(size, vector, enable) of a queue, as the engine sees them."""
        ctx, d = self.ctx, self.dut
        ctx.set(d.engine.qr_fidx, f)
        ctx.set(d.engine.qr_q, q)
        en = ctx.get(d.engine.qr_en)
        w1 = await self.word(f, q, 1)
        return (w1 >> 64) & 0x1FF, (w1 >> 96) & 0xFFFF, en


def run_v(tb):
    def make_tb(dut):
        async def bench(ctx):
            await tb(ctx, dut, Virtio(ctx, dut))
        return bench
    run_cached(("virtio_pci", CFG), lambda: VirtioPci(CFG), make_tb)


async def configure(v, f, seed):
    """Put function ``f`` into a fully set-up, live state (distinct per ``seed``)."""
    await v.negotiate(f, F_V1 | F_EVIDX | F_INDIRECT | F_MAC)
    await v.set_cfg_vec(f, seed % NVEC)
    for q in range(NQ):
        await v.select(f, q)
        await v.set_qsize(f, qsize_of(q))
        await v.set_qvec(f, (seed + q + 1) % NVEC)
        await v.set_addr(f, "desc", 0x1000_0000 * (seed + 1) + 0x100 * q)
        await v.enable(f)


async def expect_configured(v, f, seed):
    assert await v.status(f) == 15
    assert await v.drv_features(f) == F_V1 | F_EVIDX | F_INDIRECT | F_MAC
    assert await v.cfg_vec(f) == seed % NVEC
    for q in range(NQ):
        await v.select(f, q)
        assert await v.qsize(f) == qsize_of(q)
        assert await v.qvec(f) == (seed + q + 1) % NVEC
        assert await v.qen(f) == 1
    for name in ("live", "ev_idx", "indirect"):
        assert v.bit(getattr(v.dut.engine, name), f) == 1, f"{name} of function {f} lost"


async def expect_reset(v, f):
    assert await v.status(f) == 0
    assert await v.drv_features(f) == 0
    assert await v.cfg_vec(f) == NOV
    for q in range(NQ):
        await v.select(f, q)
        assert await v.qsize(f) == V.QUEUE_SIZE_MAX
        assert await v.qvec(f) == NOV
        assert await v.qen(f) == 0
        assert await v.qr(f, q) == (V.QUEUE_SIZE_MAX, NOV, 0)
    for name in ("live", "ev_idx", "indirect"):
        assert v.bit(getattr(v.dut.engine, name), f) == 0, f"{name} of function {f} not reset"
    assert await v.isr(f) == 0


# ---- device features, num_queues, device config -------------------------------------------

def test_device_features_select_and_num_queues():
    async def tb(ctx, dut, v):
        for f in range(NF):
            assert await v.dev_features(f, 0) == V.FEATURES & 0xFFFF_FFFF
            assert await v.dev_features(f, 1) == V.FEATURES >> 32
            assert await v.dev_features(f, 2) == 0
            assert await v.bus.rd(f, DFSEL) == 2
            assert (await v.bus.rd(f, MSIXCFG)) >> 16 == NQ       # num_queues
            assert await v.cfg_vec(f) == NOV
            assert await v.status(f) == 0
        assert await v.dev_features(0, 1) == 1                     # VERSION_1 (bit 32)
        await v.bus.wr(1, DF, 0xFFFF_FFFF)                          # device_feature is RO
        await v.bus.wr(1, DFSEL, 0)
        assert await v.bus.rd(1, DF) == V.FEATURES & 0xFFFF_FFFF
        assert await v.bus.rd(1, DF, bar=2) == 0                    # other BAR: not addressed
    run_v(tb)


def test_device_config_mac_link_pairs():
    """The device config shows the station table's entry of the function read (the table,
    hdl.virtio.mac_table, is outside: the bench plays it, a distinct address per function)."""
    def table(f):
        return bytes([0x02, 0x5A, 0x10 + f, 0xC3, 0x77, f])

    async def tb(ctx, dut, v):
        macs = set()
        for f in range(NF):
            raw = b""
            for i in range(V.DEVICE_LEN // 4):
                v.bus._addr(f, 0, V.DEVICE + 4 * i)
                assert ctx.get(dut.mac.fidx) == f
                ctx.set(dut.mac.mac, int.from_bytes(table(f), "little"))
                raw += (await v.bus.rd(f, V.DEVICE + 4 * i)).to_bytes(4, "little")
            mac = raw[V.NET_MAC:V.NET_MAC + 6]
            assert mac == table(f), mac.hex(":")
            assert int.from_bytes(raw[V.NET_STATUS:V.NET_STATUS + 2], "little") == 1
            assert int.from_bytes(raw[V.NET_MAX_PAIRS:V.NET_MAX_PAIRS + 2], "little") == V.MAX_PAIRS
            macs.add(mac)
        assert len(macs) == NF
    run_v(tb)


# ---- feature negotiation and the status handshake -----------------------------------------

@pytest.mark.parametrize("features,ev,ind", [
    (F_V1, 0, 0),
    (F_V1 | F_EVIDX, 1, 0),
    (F_V1 | F_INDIRECT | F_MAC, 0, 1),
    (V.FEATURES, 1, 1),
])
def test_handshake_goes_live(features, ev, ind):
    async def tb(ctx, dut, v):
        f = 1
        await v.set_status(f, 1)
        assert await v.status(f) == 1
        await v.set_status(f, 3)
        assert await v.status(f) == 3
        await v.set_drv_features(f, features)
        assert await v.drv_features(f) == features
        assert v.bit(dut.engine.ev_idx, f) == ev and v.bit(dut.engine.indirect, f) == ind
        await v.set_status(f, 11)
        assert await v.status(f) == 11, "FEATURES_OK did not stick for a valid subset"
        assert ctx.get(dut.engine.live) == 0
        await v.set_status(f, 15)
        assert await v.status(f) == 15
        assert ctx.get(dut.engine.live) == 1 << f
        assert ctx.get(dut.engine.ev_idx) == ev << f and ctx.get(dut.engine.indirect) == ind << f
    run_v(tb)


@pytest.mark.parametrize("features,order", [
    (F_MAC | F_STATUS | F_EVIDX, (0, 1)),            # no VERSION_1
    (0, (0, 1)),
    (F_V1 | 1 << 3, (1, 0)),                         # bit 3 not offered, high word first
    (F_V1 | 1 << 3, (0, 1)),                         # bit 3 not offered, low word first (Linux)
    (F_V1 | (1 << 33), (0, 1)),                      # bit 33 not offered
    (F_V1 | (1 << 64), (0, 1, 2)),                   # bit 64 (select 2) not offered
], ids=["no_v1", "none", "bit3_hi_first", "bit3_lo_first", "bit33", "bit64"])
def test_features_ok_refused(features, order):
    async def tb(ctx, dut, v):
        f = 2
        await v.set_status(f, 1)
        await v.set_status(f, 3)
        for sel in order:
            await v.bus.wr(f, GFSEL, sel)
            await v.bus.wr(f, GF, (features >> (32 * sel)) & 0xFFFF_FFFF)
        await v.set_status(f, 11)
        assert await v.status(f) == 3, "FEATURES_OK stuck for an invalid feature set"
        await v.set_status(f, 15)
        assert (await v.status(f)) & V.S_FEATURES_OK == 0
        assert ctx.get(dut.engine.live) == 0, "live without FEATURES_OK"
    run_v(tb)


def test_feature_writes_after_features_ok_ignored():
    async def tb(ctx, dut, v):
        f = 0
        await v.negotiate(f, F_V1 | F_EVIDX, final=None)
        assert await v.status(f) == 11
        await v.set_drv_features(f, F_V1 | F_INDIRECT | F_MAC)
        assert await v.drv_features(f) == F_V1 | F_EVIDX
        await v.set_drv_features(f, F_EVIDX)                    # drop VERSION_1: ignored too
        assert await v.drv_features(f) == F_V1 | F_EVIDX
        await v.set_status(f, 15)
        assert ctx.get(dut.engine.live) == 1
        assert ctx.get(dut.engine.ev_idx) == 1 and ctx.get(dut.engine.indirect) == 0
    run_v(tb)


# ---- reset --------------------------------------------------------------------------------

def test_status_zero_resets_only_that_function():
    async def tb(ctx, dut, v):
        for f in range(NF):
            await configure(v, f, f)
            await v.notify(f, 0)
        ctx.set(dut.engine.isr_set, 1)
        ctx.set(dut.engine.isr_fidx, 1)
        await ctx.tick()
        ctx.set(dut.engine.isr_set, 0)
        assert ctx.get(dut.engine.vreset) == 0
        # the reset strobe is combinational with the status write of 0
        b = dut.bus
        ctx.set(b.fidx, 1)
        ctx.set(b.bar, 0)
        ctx.set(b.addr, STATUS >> 2)
        ctx.set(b.wdata, 0)
        ctx.set(b.be, 0b0001)
        ctx.set(b.we, 1)
        assert (ctx.get(dut.engine.vreset), ctx.get(dut.engine.vreset_fidx)) == (1, 1)
        await ctx.tick()
        ctx.set(b.we, 0)
        assert ctx.get(dut.engine.vreset) == 0, "reset strobe longer than the write"
        await expect_reset(v, 1)
        assert ctx.get(dut.engine.kick) == kbit(0, 0) | kbit(2, 0), \
            "kicks of the reset function not cleared"
        for f in (0, 2):
            await expect_configured(v, f, f)
    run_v(tb)


def test_reset_waits_while_the_engine_holds_the_function():
    """A status write of 0 while the engine holds a frame of the function: the function stops
    being live at once, but its registers (status included) read as before and no reset
    strobe comes until the engine lets it go; then the reset is done. Another function's
    reset is not held up."""
    async def tb(ctx, dut, v):
        for f in range(NF):
            await configure(v, f, f)
        ctx.set(dut.engine.holds, 0b010)
        strobes = []

        async def tick(n):
            for _ in range(n):
                if ctx.get(dut.engine.vreset):
                    strobes.append(ctx.get(dut.engine.vreset_fidx))
                await ctx.tick()
        ctx.set(dut.bus.fidx, 1)                  # (the write's cycle is watched too)
        await v.set_status(1, 0)
        await tick(20)
        assert strobes == []
        assert ctx.get(dut.engine.live) == 0b101
        assert await v.status(1) == 15
        for q in range(NQ):                       # everything as it was, but live
            await v.select(1, q)
            assert (await v.qsize(1), await v.qen(1)) == (qsize_of(q), 1)
        await v.set_status(2, 0)                  # not held: at once
        await expect_reset(v, 2)
        ctx.set(dut.engine.holds, 0)
        await tick(5)
        assert strobes == [1]
        await expect_reset(v, 1)
        await expect_configured(v, 0, 0)
    run_v(tb)


def test_reset_by_status_write_of_other_lanes_does_not_reset():
    async def tb(ctx, dut, v):
        await configure(v, 1, 1)
        await v.select(1, 0)                                    # be 0b1100, wdata[7:0] = 0
        assert ctx.get(dut.engine.vreset) == 0
        await expect_configured(v, 1, 1)
    run_v(tb)


# ---- queues -------------------------------------------------------------------------------

def test_queue_size_rules():
    async def tb(ctx, dut, v):
        f = 1
        for q in range(NQ):
            await v.select(f, q)
            assert (await v.bus.rd(f, STATUS)) >> 16 == q        # queue_select reads back
            assert await v.qsize(f) == 256
            for size, expect in ((64, 64), (100, 64), (512, 64), (0, 64), (1, 1),
                                 (3, 1), (256, 256), (128, 128), (0x180, 128)):
                await v.set_qsize(f, size)
                assert await v.qsize(f) == expect, f"q{q}: wrote {size}"
                assert (await v.qr(f, q))[0] == expect
        await v.select(f, 0)
        await v.set_qsize(f, 32)
        await v.select(f, NQ)                                    # no such queue
        assert await v.bus.rd(f, QSIZE) == 0
        await v.set_qsize(f, 8)
        await v.set_qvec(f, 1)
        assert await v.bus.rd(f, QSIZE) == 0
        await v.select(f, 0)
        assert await v.qsize(f) == 32 and await v.qvec(f) == NOV, f"queue {NQ} write aliased"
        assert await v.qr(f, 0) == (32, NOV, 0)
        assert (await v.qr(0, 0))[0] == 256 and (await v.qr(2, 0))[0] == 256
        await v.bus.wr(f, STATUS, 1 << 24, be=0b1000)           # select 0x100: high byte only
        assert await v.bus.rd(f, QSIZE) == 0
        await v.set_qsize(f, 16)
        await v.bus.wr(f, STATUS, 0, be=0b1000)                 # back to queue 0
        assert await v.qsize(f) == 32
        await v.select(f, 3)
        await v.set_status(f, 0)                                # reset: queue_select is 0 again
        assert (await v.bus.rd(f, STATUS)) >> 16 == 0 and await v.qsize(f) == 256
    run_v(tb)


def test_queue_and_config_msix_vectors():
    async def tb(ctx, dut, v):
        f = 2
        for q in range(NQ):
            await v.select(f, q)
            assert await v.qvec(f) == NOV
            for vec, expect in ((3, 3), (0, 0), (NVEC, NOV), (2, 2), (0x1F, NOV), (NOV, NOV),
                                (0x8001, NOV)):
                await v.set_qvec(f, vec)
                assert await v.qvec(f) == expect, f"q{q}: wrote {vec:#x}"
                assert (await v.qr(f, q))[1] == expect
            assert await v.qsize(f) == 256, "vector write changed the size"
        for vec, expect in ((1, 1), (NVEC - 1, NVEC - 1), (NVEC, NOV), (0, 0), (NOV, NOV)):
            await v.set_cfg_vec(f, vec)
            assert await v.cfg_vec(f) == expect, f"config vector: wrote {vec:#x}"
            assert (await v.bus.rd(f, MSIXCFG)) >> 16 == NQ
        assert await v.cfg_vec(0) == NOV and await v.cfg_vec(1) == NOV
    run_v(tb)


def test_queue_notify_off_and_enable():
    async def tb(ctx, dut, v):
        f = 0
        for q in range(NQ):
            await v.select(f, q)
            assert await v.notify_off(f) == q
            assert await v.qen(f) == 0
        await v.select(f, 1)
        await v.enable(f)
        assert await v.qen(f) == 1
        await v.enable(f, 0)                                    # writing 0 does not disable
        assert await v.qen(f) == 1
        await v.select(f, 0)
        assert await v.qen(f) == 0
        assert [(await v.qr(f, q))[2] for q in range(NQ)] == [int(q == 1) for q in range(NQ)]
        await v.select(f, NQ)
        assert await v.bus.rd(f, QEN) == 0
        await v.enable(f)
        await v.select(f, 0)
        assert await v.qen(f) == 0, f"enable of queue {NQ} aliased onto queue 0"
        assert (await v.qr(1, 1))[2] == 0 and (await v.qr(2, 1))[2] == 0
    run_v(tb)


def test_queue_addresses_bus_and_engine_port():
    async def tb(ctx, dut, v):
        def val(f, q, k):
            return ((0xA0 + 16 * f + 4 * q + k) << 56) | ((f << 20) | (q << 16) | (k << 12) | 0x40)
        names = list(QADDR)
        for f in range(NF):
            for q in range(NQ):
                await v.select(f, q)
                for k, n in enumerate(names):
                    await v.set_addr(f, n, val(f, q, k))
        for f in range(NF):
            for q in range(NQ):
                await v.select(f, q)
                for k, n in enumerate(names):
                    assert await v.addr(f, n) == val(f, q, k), (f, q, n)
                    assert await v.qa(f, q, k) == val(f, q, k), (f, q, n)
        # a read of another register right after an address read returns that register
        await v.select(1, 1)
        await v.addr(1, "desc")
        assert await v.notify_off(1) == 1
        # queue 2 reads 0 and its writes do not land anywhere
        await v.select(1, NQ)
        for n in names:
            assert await v.addr(1, n) == 0
            await v.set_addr(1, n, 0xDEAD_BEEF_0000_0000)
        await v.select(1, 0)
        for k, n in enumerate(names):
            assert await v.addr(1, n) == val(1, 0, k)
            assert await v.qa(1, 0, k) == val(1, 0, k)
    run_v(tb)


def test_qr_port_reflects_each_queue():
    async def tb(ctx, dut, v):
        for f in range(NF):
            for q in range(NQ):
                await v.select(f, q)
                await v.set_qsize(f, 1 << ((2 * f + q) % 8 + 1))
                await v.set_qvec(f, (f + q) % NVEC)
                if (f + q) % 2:
                    await v.enable(f)
        for f in range(NF):
            for q in range(NQ):
                assert await v.qr(f, q) == (1 << ((2 * f + q) % 8 + 1), (f + q) % NVEC,
                                            (f + q) % 2), (f, q)
    run_v(tb)


# ---- notifications ------------------------------------------------------------------------

def test_notify_sets_kick_and_ack_clears():
    async def tb(ctx, dut, v):
        assert ctx.get(dut.engine.kick) == 0
        await v.notify(1, 1)
        assert ctx.get(dut.engine.kick) == kbit(1, 1)
        await v.notify(2, 0)
        await v.notify(0, 0)
        await v.notify(0, NQ - 1)                                # the last queue
        three = kbit(1, 1) | kbit(2, 0) | kbit(0, 0) | kbit(0, NQ - 1)
        assert ctx.get(dut.engine.kick) == three
        await v.notify(0, NQ)                                    # no such queue
        await v.bus.wr(0, V.NOTIFY + 4 * 63, 0)
        await v.bus.wr(0, V.NOTIFY + 4, 1, bar=2)                # wrong BAR
        assert ctx.get(dut.engine.kick) == three
        await v.bus.rd(0, V.NOTIFY + 4)                          # reads don't kick
        assert ctx.get(dut.engine.kick) == three
        await v.strobe(dut.engine.kick_ack, dut.engine.kick_idx, 1 * NQ + 1)
        assert ctx.get(dut.engine.kick) == three & ~kbit(1, 1)
        await v.strobe(dut.engine.kick_ack, dut.engine.kick_idx, 5)            # not pending: no effect
        assert ctx.get(dut.engine.kick) == three & ~kbit(1, 1)
        for idx in (0, NQ - 1, 2 * NQ):
            await v.strobe(dut.engine.kick_ack, dut.engine.kick_idx, idx)
        assert ctx.get(dut.engine.kick) == 0
        ctx.set(dut.engine.kick_idx, 1)                                 # kick_idx without kick_ack
        await v.notify(0, 1)
        await ctx.tick()
        assert ctx.get(dut.engine.kick) == 0b10
    run_v(tb)


# ---- ISR ----------------------------------------------------------------------------------

def test_isr_set_and_read_to_clear():
    async def tb(ctx, dut, v):
        for f in range(NF):
            assert await v.isr(f) == 0
        await v.strobe(dut.engine.isr_set, dut.engine.isr_fidx, 1)
        assert await v.isr(0) == 0 and await v.isr(2) == 0
        assert await v.isr(1) == 1
        assert await v.isr(1) == 0, "ISR not cleared by the read"
        await v.strobe(dut.engine.isr_set, dut.engine.isr_fidx, 2)
        await v.strobe(dut.engine.isr_set, dut.engine.isr_fidx, 2)
        await v.bus.rd(2, V.ISR, bar=2)                           # other BAR: no clear
        await v.bus.rd(2, STATUS)                                 # other register: no clear
        assert await v.isr(2) == 1
        assert await v.isr(2) == 0
    run_v(tb)


def test_isr_set_during_isr_read_is_not_lost():
    """A queue interrupt reported in the very cycle the driver reads (and clears) the ISR must
    show up in that read or stay pending for the next one."""
    async def tb(ctx, dut, v):
        b = dut.bus
        ctx.set(b.fidx, 1)
        ctx.set(b.bar, 0)
        ctx.set(b.addr, V.ISR >> 2)
        ctx.set(b.re, 1)
        ctx.set(dut.engine.isr_set, 1)
        ctx.set(dut.engine.isr_fidx, 1)
        await ctx.tick()
        ctx.set(b.re, 0)
        ctx.set(dut.engine.isr_set, 0)
        first = ctx.get(b.rdata)
        second = await v.isr(1)
        assert (first | second) & 1, f"isr_set lost: reads {first}, {second}"
    run_v(tb)


# ---- device needs reset -------------------------------------------------------------------

def test_needs_reset_with_config_vector():
    async def tb(ctx, dut, v):
        await configure(v, 1, 2)                                 # config vector 2
        await configure(v, 0, 0)
        assert ctx.get(dut.engine.live) == 0b011
        seen = await v.strobe(dut.engine.nr_set, dut.engine.nr_fidx, 1)
        assert seen[2:] == (1, 1, 2), f"irq (valid, fidx, vector) = {seen[2:]}"
        assert ctx.get(dut.irq.valid) == 0, "irq longer than the nr_set strobe"
        assert await v.status(1) == 15 | V.S_NEEDS_RESET
        assert ctx.get(dut.engine.live) == 0b001
        assert await v.isr(1) == 0b10
        assert await v.isr(1) == 0
        assert await v.status(0) == 15 and await v.isr(0) == 0
        # NEEDS_RESET stays across driver status writes until a reset
        await v.set_status(1, 15)
        assert await v.status(1) == 15 | V.S_NEEDS_RESET and ctx.get(dut.engine.live) == 0b001
        await v.set_status(1, 0)
        assert await v.status(1) == 0
    run_v(tb)


def test_needs_reset_without_config_vector():
    async def tb(ctx, dut, v):
        await v.negotiate(2, F_V1)
        assert await v.cfg_vec(2) == NOV
        seen = await v.strobe(dut.engine.nr_set, dut.engine.nr_fidx, 2)
        assert seen[2] == 0, "config interrupt requested without a vector"
        assert await v.status(2) == 15 | V.S_NEEDS_RESET
        assert ctx.get(dut.engine.live) == 0
        assert await v.isr(2) == 0b10
        await v.set_cfg_vec(2, NVEC)                             # no such vector: NO_VECTOR
        seen = await v.strobe(dut.engine.nr_set, dut.engine.nr_fidx, 2)
        assert seen[2] == 0
        seen = await v.strobe(dut.engine.nr_set, dut.engine.nr_fidx, NF)       # no such function
        assert seen[2] == 0
        for f in range(NF - 1):
            assert await v.status(f) == 0 and await v.isr(f) == 0
    run_v(tb)


# ---- FLR and VF reset ---------------------------------------------------------------------

def test_flr_of_a_vf_resets_only_that_vf():
    async def tb(ctx, dut, v):
        for f in range(NF):
            await configure(v, f, f + 1)
            await v.notify(f, 1)
        seen = await v.strobe(dut.fn.flr, dut.fn.flr_fidx, 2)
        assert seen[:2] == (1, 2), "no reset strobe for the FLR"
        assert ctx.get(dut.engine.vreset) == 0
        await expect_reset(v, 2)
        assert ctx.get(dut.engine.kick) == kbit(0, 1) | kbit(1, 1)
        for f in (0, 1):
            await expect_configured(v, f, f + 1)
    run_v(tb)


def test_vf_reset_resets_every_vf_not_the_pf():
    async def tb(ctx, dut, v):
        for f in range(NF):
            await configure(v, f, f)
            await v.notify(f, 0)
        await v.strobe(dut.fn.vf_reset)
        for f in range(1, NF):
            await expect_reset(v, f)
        assert ctx.get(dut.engine.kick) == 0b01
        await expect_configured(v, 0, 0)
    run_v(tb)


def test_select_registers_read_back_whole_per_byte_and_reset():
    """The three select registers live in a RAM (read back a cycle late) with what the logic
    needs of them in flip-flops: full 32- / 16-bit values read back, byte writes merge, a value
    whose high bytes are not zero selects nothing, and a reset zeroes every byte (a byte
    written after it leaves the others 0)."""
    async def tb(ctx, dut, v):
        await v.bus.wr(1, DFSEL, 0x0102_0301)
        await v.bus.wr(1, GFSEL, 0xA5A5_0000)
        await v.bus.wr(2, DFSEL, 1)
        assert await v.bus.rd(1, DFSEL) == 0x0102_0301
        assert await v.bus.rd(1, GFSEL) == 0xA5A5_0000
        assert await v.bus.rd(1, DF) == 0                       # selects words far above 1
        assert await v.bus.rd(2, DF) == V.FEATURES >> 32
        # bytes 1..3 to zero, one at a time: the select becomes 1
        for lane in (3, 2, 1):
            assert await v.bus.rd(1, DF) == 0
            await v.bus.wr(1, DFSEL, 0, be=1 << lane)
        assert await v.bus.rd(1, DFSEL) == 1
        assert await v.bus.rd(1, DF) == V.FEATURES >> 32
        await v.bus.wr(1, DFSEL, 0, be=0b0001)
        assert await v.bus.rd(1, DF) == V.FEATURES & 0xFFFF_FFFF
        # driver_feature_select with a non-zero high half selects no word: writes ignored
        await v.bus.wr(1, GF, F_V1 & 0xFFFF_FFFF)
        await v.bus.wr(1, GFSEL, 0, be=0b1100)
        assert await v.bus.rd(1, GFSEL) == 0
        assert await v.drv_features(1) == 0
        # queue_select: a value whose high byte is set names no queue
        await v.bus.wr(1, STATUS, 0x0101 << 16, be=0b1100)
        assert (await v.bus.rd(1, STATUS)) >> 16 == 0x0101
        assert await v.bus.rd(1, QSIZE) == 0
        await v.bus.wr(1, STATUS, 0, be=0b1000)               # high byte only: queue 1
        assert (await v.bus.rd(1, STATUS)) >> 16 == 1
        assert await v.qsize(1) == V.QUEUE_SIZE_MAX
        # a reset: every byte reads 0; a byte written after it leaves the others 0
        await v.bus.wr(1, DFSEL, 0x7777_7777)
        await v.bus.wr(1, GFSEL, 0x6666_6666)
        await v.strobe(dut.fn.flr, dut.fn.flr_fidx, 1)
        for reg in (DFSEL, GFSEL):
            assert await v.bus.rd(1, reg) == 0
        assert (await v.bus.rd(1, STATUS)) >> 16 == 0
        await v.bus.wr(1, GFSEL, 0x55 << 8, be=0b0010)
        assert await v.bus.rd(1, GFSEL) == 0x5500
        assert await v.bus.rd(1, DFSEL) == 0
        assert await v.bus.rd(2, DFSEL) == 1                    # another function's kept
        # config_msix_vector: byte writes merge with the vector kept (one that does not exist
        # is kept as NO_VECTOR)
        await v.bus.wr(1, MSIXCFG, 0x0003, be=0b0011)
        await v.bus.wr(1, MSIXCFG, 0x0000, be=0b0010)
        assert await v.cfg_vec(1) == 3
        await v.bus.wr(1, MSIXCFG, 0x0002, be=0b0001)
        assert await v.cfg_vec(1) == 2
        await v.bus.wr(1, MSIXCFG, 0x0100, be=0b0010)
        assert await v.cfg_vec(1) == NOV
    run_v(tb)


def test_multiqueue_needs_the_control_queue():
    """MQ without CTRL_VQ is not a valid feature set (FEATURES_OK does not stick); with both
    the engine sees each negotiated, per function."""
    F_CTRL, F_MQ = 1 << V.F_NET_CTRL_VQ, 1 << V.F_NET_MQ

    async def tb(ctx, dut, v):
        await v.negotiate(1, F_V1 | F_MQ, final=None)
        assert await v.status(1) & V.S_FEATURES_OK == 0
        await v.set_status(1, 0)
        await v.negotiate(1, F_V1 | F_CTRL, final=None)
        assert await v.status(1) & V.S_FEATURES_OK
        assert (v.bit(dut.engine.ctrl, 1), v.bit(dut.engine.mq, 1)) == (1, 0)
        await v.negotiate(2, F_V1 | F_CTRL | F_MQ)
        assert await v.status(2) == 15
        assert (v.bit(dut.engine.ctrl, 2), v.bit(dut.engine.mq, 2)) == (1, 1)
        assert v.bit(dut.engine.mq, 1) == 0 and v.bit(dut.engine.mq, 0) == 0
    run_v(tb)
