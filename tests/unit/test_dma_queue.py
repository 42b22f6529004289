"""hdl.dma.queue.DmaQueues: the per-function descriptor rings the card fetches and runs.

One ``DmaQueues(CardConfig(total_vfs=3))`` (four functions: the PF and VFs 1..3; a 64-bit TLP
stream, and 128 bits where the beat width matters) sits in a modelled world that
:class:`World` advances one clock at a time (:meth:`World.step`), logging every handshake and
strobe with its cycle number so the tests can check what happened and in which order:

* host memory (a sparse byte map) answers each MemRd on ``tx`` with a CplD on ``cpl``
  ``cpl_delay`` cycles later (per function: UR, a short CplD, or nothing instead) and applies
  each MemWr; ``tx.ready`` stays low ``wr_stall`` cycles whenever a write is offered;
* the DMA read / write channels take every command on ``rd_cmd`` / ``wr_cmd`` and answer on
  ``rd_done`` / ``wr_done`` ``dma_delay`` cycles later: OK, or the statuses queued in
  ``dma_errors``;
* the translator answers ``xreq`` on ``xresp`` two cycles later: bypass (the IOVA is the bus
  address) for a function without a domain; with one (``domains``), BLOCKED for a transfer that
  does not fit in its pages, NOT_PRESENT for the pages listed absent, else OK with the page's
  bus address :func:`phys` (scattered, so a test sees where each piece came from);
* the fault unit takes ``fault.stb`` (``ok_w`` / ``ok_r`` are set by the test) and answers
  ``done`` with staging slot ``next_slot`` three cycles later; the test drives ``resume``;
* ``link.bus_num`` (``BUS``), ``fn.bme``, ``fn.flr`` / ``flr_fidx``, ``fn.vf_reset``, ``occ.fidx``
  and the register bus (BAR 0, :class:`regmap.DmaRegs`, through ``helpers.RegBus``) belong to
  the test.
"""

from collections import namedtuple

import pytest

from hdl.config import CardConfig
from hdl.dma.queue import DmaQueues
from hdl.iface import CPL_TIMEOUT, DmaStatus, XlateStatus
from hdl.memmap import Staging
from hdl.pcie.host_port import HOST_TAGS
from hdl.pcie.tlp import TlpKind, CplStatus
from regmap import DmaRegs as R, DescStatus
from regmap.records import DESCRIPTOR
from helpers import run_cached, RegBus, cpl_hdr, pack_beats, hdr_dws, beat_dict

NF = 4                      # PF + 3 VFs
BUS = 0x5A
TAG = HOST_TAGS["desc"]
SC, UR = CplStatus.SC.value, CplStatus.UR.value


Cmd = namedtuple("Cmd", "dir fidx host card length")      # a DMA command, as the tests see it


def rid(f):
    return (BUS << 8) | f


def phys(f, page):
    """Bus address of page ``page`` of function ``f``'s domain in the model translator."""
    return 0x40_0000_0000 + (f << 28) + ((page * 7 + 3) << 12)


def parse_req(hdr):
    d0, d1, d2, d3 = hdr_dws(hdr)
    ft = d0 >> 24
    is64 = (ft >> 5) & 1
    return {"fmt_type": ft, "write": (ft >> 6) & 1, "length": d0 & 0x3FF, "rid": d1 >> 16,
            "tag": (d1 >> 8) & 0xFF, "fbe": d1 & 0xF, "lbe": (d1 >> 4) & 0xF,
            "addr": ((d2 << 32) | (d3 & ~3)) if is64 else (d2 & ~3)}


class World:
    def __init__(self, ctx, dut, width):
        self.ctx, self.dut, self.width = ctx, dut, width
        self.cycle = 0
        self.mem = {}                 # host memory: byte address -> byte
        self.rings = {}               # fidx -> (base, log2)
        self.answer = {}              # fidx -> "ur" | "short" | "none" (default: CplD)
        self.cpl_delay, self.dma_delay, self.wr_stall = 4, 5, 0
        self.dma_errors = []          # DmaStatus of the next commands (then OK)
        self.domains = {}             # fidx -> {"pages": n, "vm": v, "absent": {page, ...}}
        self.next_slot = 2
        # logs
        self.tlps, self.cmds, self.cmd_cycles, self.dones = [], [], [], []
        self.xreqs, self.faults = [], []
        self.slot_frees, self.irqs, self.releases, self.busy, self.fault_evs = [], [], [], [], []
        self.occ = []                 # (cycle, occ.occ) at each change
        # what the model will drive: [(due cycle, payload)]
        self._q = {"cpl": [], "rd_done": [], "wr_done": [], "xresp": []}
        self._strobes = []            # [(due cycle, ((signal, value), ...))], for one cycle
        self._beats, self._stall = [], 0
        # RegBus sees the world as a simulator context whose every clock is a step of the world
        self.set, self.get, self.tick = ctx.set, ctx.get, self.step
        self.reg = RegBus(self, dut.bus)
        ctx.set(dut.link.bus_num, BUS)
        for s in (dut.rd_cmd, dut.wr_cmd, dut.xreq):
            ctx.set(s.ready, 1)
        ctx.set(dut.fault.ok_w, 1)
        ctx.set(dut.fault.ok_r, 1)
        ctx.set(dut.fn.bme, (1 << NF) - 1)   # Bus Master Enable everywhere unless a test clears it

    # ---- one clock ------------------------------------------------------------------------
    def _offer(self, name):
        q, s = self._q[name], getattr(self.dut, name)
        if q and q[0][0] <= self.cycle:
            self.ctx.set(s.p, q[0][1])
            self.ctx.set(s.valid, 1)
            return True
        self.ctx.set(s.valid, 0)
        return False

    async def step(self):
        ctx, d, now = self.ctx, self.dut, self.cycle
        offered = {name: self._offer(name) for name in self._q}
        ctx.set(d.fault.done, 0)
        ctx.set(d.resume.stb, 0)
        for due, sets in list(self._strobes):
            if due <= now:
                self._strobes.remove((due, sets))
                for sig, value in sets:
                    ctx.set(sig, value)
        beat = beat_dict(ctx.get(d.tx.p)) if ctx.get(d.tx.valid) else None
        ready = 1
        if beat and beat["sop"] and parse_req(beat["hdr"])["write"] and self._stall < self.wr_stall:
            self._stall, ready = self._stall + 1, 0
        ctx.set(d.tx.ready, ready)
        # ---- what moves at this clock edge
        if beat and ready:
            self._tx_beat(beat)
        for name in self._q:
            if offered[name] and ctx.get(getattr(d, name).ready):
                self._q[name].pop(0)
                if name.endswith("done"):
                    self.dones.append(now)
        for kind, s in (("rd", d.rd_cmd), ("wr", d.wr_cmd)):
            if ctx.get(s.valid):
                p = ctx.get(s.p)
                self.cmds.append(Cmd(kind, int(p.fidx), int(p.host), int(p.card), int(p.length)))
                self.cmd_cycles.append(now)
                st = self.dma_errors.pop(0) if self.dma_errors else DmaStatus.OK
                self._q[kind + "_done"].append((now + self.dma_delay, {"status": st}))
        if ctx.get(d.xreq.valid):
            p = ctx.get(d.xreq.p)
            x = {"fidx": int(p.fidx), "iova": int(p.iova), "last": int(p.last), "cycle": now}
            self.xreqs.append(x)
            self._q["xresp"].append((now + 2, self._xlate(x)))
        if ctx.get(d.fault.stb):
            self.faults.append({k: ctx.get(getattr(d.fault, k)) for k in
                                ("fidx", "vm", "iova", "write", "card", "length")} | {"cycle": now})
            self._strobes.append((now + 3, ((d.fault.done, 1), (d.fault.slot, self.next_slot))))
        for log, stb, *fields in ((self.fault_evs, d.fault_ev.stb, d.fault_ev.fidx),
                                  (self.slot_frees, d.slot_free.stb, d.slot_free.slot),
                                  (self.irqs, d.irq.valid, d.irq.fidx, d.irq.vector),
                                  (self.busy, d.busy_ev.stb, d.busy_ev.fidx, d.busy_ev.amount),
                                  (self.releases, d.release.stb | d.release.vfs, d.release.stb,
                                   d.release.fidx, d.release.vfs)):
            if ctx.get(stb):
                log.append((now, *(ctx.get(f) for f in fields)))
        occ = ctx.get(d.occ.occ)
        if not self.occ or self.occ[-1][1] != occ:
            self.occ.append((now, occ))
        await ctx.tick()
        self.cycle += 1

    def _tx_beat(self, beat):
        self._beats.append(beat)
        if not beat["eop"]:
            return
        beats, self._beats, self._stall = self._beats, [], 0
        t = parse_req(beats[0]["hdr"])
        t["data"] = [(b["data"] >> (32 * j)) & 0xFFFF_FFFF for b in beats
                     for j in range(self.width // 32) if b["strb"] >> j & 1]
        t["func"], t["cycle"] = beats[0]["func"], self.cycle
        self.tlps.append(t)
        if t["write"]:
            for k, dw in enumerate(t["data"]):
                be = t["fbe"] if k == 0 else (t["lbe"] if k == len(t["data"]) - 1 else 0xF)
                for j in range(4):
                    if be >> j & 1:
                        self.mem[t["addr"] + 4 * k + j] = (dw >> (8 * j)) & 0xFF
            return
        n, mode, due = t["length"], self.answer.get(t["rid"] & 0xFF), self.cycle + self.cpl_delay
        if mode == "none":
            return
        if mode == "ur":
            beats = pack_beats(cpl_hdr(False, 0, UR, 0, 4 * n, t["rid"], t["tag"]), [], self.width)
        else:
            dws = [int.from_bytes(self.read(t["addr"] + 4 * k, 4), "little") for k in range(n)]
            if mode == "short":
                dws = dws[:n // 2]
            beats = pack_beats(cpl_hdr(True, len(dws), SC, 0, 4 * n, t["rid"], t["tag"],
                                       t["addr"] & 0x7F), dws, self.width)
        self._q["cpl"] += [(due, b) for b in beats]

    def _xlate(self, x):
        dom = self.domains.get(x["fidx"])
        if dom is None:
            return {"status": XlateStatus.OK, "bypass": 1, "phys": x["iova"], "vm": 0}
        page, pages = x["iova"] >> 12, dom["pages"]
        r = {"status": XlateStatus.OK, "bypass": 0, "phys": 0, "vm": dom["vm"]}
        if page >= pages or x["last"] >> 12 >= pages or x["last"] < x["iova"]:
            r["status"] = XlateStatus.BLOCKED
        elif page in dom["absent"]:
            r["status"] = XlateStatus.NOT_PRESENT
        else:
            r["phys"] = phys(x["fidx"], page) + (x["iova"] & 0xFFF)
        return r

    # ---- the test's side ------------------------------------------------------------------
    async def run(self, n):
        for _ in range(n):
            await self.step()

    async def until(self, cond, limit=3000):
        for _ in range(limit):
            if cond():
                return
            await self.step()
        raise AssertionError("the world waited in vain")

    async def drain(self, limit=5000):
        """Step until the engine has been idle, with nothing in flight, for 16 cycles."""
        quiet = 0
        for _ in range(limit):
            busy = self.ctx.get(self.dut.busy_ev.stb) or any(self._q.values()) or self._strobes
            quiet = 0 if busy else quiet + 1
            if quiet == 16:
                return
            await self.step()
        raise AssertionError("the engine never went idle")

    def set_bme(self, mask):
        self.ctx.set(self.dut.fn.bme, mask)

    def resume(self, f, ok):
        r = self.dut.resume
        self._strobes.append((self.cycle, ((r.stb, 1), (r.fidx, f), (r.ok, int(ok)))))

    async def pulse(self, sig, **others):
        for s, v in others.items():
            self.ctx.set(getattr(self.dut.fn, s), v)
        self.ctx.set(sig, 1)
        await self.step()
        self.ctx.set(sig, 0)

    def read(self, addr, n):
        return bytes(self.mem.get(addr + k, 0) for k in range(n))

    async def setup(self, f, base, log2=3, vec=0):
        """Program function ``f``'s ring (2**log2 entries at ``base``) and enable it."""
        self.rings[f] = (base, log2)
        await self.reg.wr(f, R.RING_LO, base & 0xFFFF_FFFF)
        await self.reg.wr(f, R.RING_HI, base >> 32)
        await self.reg.wr(f, R.RING_LOG2, log2)
        await self.reg.wr(f, R.CTRL, (vec << 8) | 1)

    def slot_addr(self, f, idx):
        base, log2 = self.rings[f]
        return base + (idx % (1 << log2)) * 32

    def put(self, f, idx, host, card, length, to_host=0, irq=0):
        addr = self.slot_addr(f, idx)
        raw = DESCRIPTOR.pack(host=host, card=card, length=length, to_host=to_host, irq=irq,
                              status=0xEEEE_EEEE)
        self.mem.update((addr + k, b) for k, b in enumerate(raw))
        return addr

    def status(self, f, idx):
        return DESCRIPTOR.unpack(self.read(self.slot_addr(f, idx), 32))["status"]

    async def doorbell(self, f, prod):
        await self.reg.wr(f, R.PROD, prod)

    async def regs(self, f, *offs):
        return [await self.reg.rd(f, o) for o in offs]

    def fetches(self, f=None, write=0):
        return [t for t in self.tlps if t["write"] == write and f in (None, t["rid"] & 0xFF)]

    def writes(self, f=None):
        return self.fetches(f, write=1)

    def cmd_of(self, f):
        return [c for c in self.cmds if c.fidx == f]


def run(tb, width=64):
    def make_tb(dut):
        async def bench(ctx):
            await tb(World(ctx, dut, width))
        return bench
    run_cached(("dma_queue", width), lambda: DmaQueues(CardConfig(total_vfs=3, data_width=width)),
               make_tb)


def test_registers():
    """Each register per function, the alignment / clamp / widths, CONS read-only, partial
    writes and other BARs ignored, a disable resetting the indices."""
    async def tb(w):
        r = w.reg
        w.set_bme(0)                        # nothing is fetched
        regs = (R.RING_LO, R.RING_HI, R.RING_LOG2, R.CTRL, R.PROD, R.CONS, R.STATUS)
        assert [await w.regs(f, *regs) for f in range(NF)] == [[0] * 7] * NF
        for f in range(NF):
            await r.wr(f, R.RING_LO, 0x1000_003F | (f << 12))     # 32-byte aligned
            await r.wr(f, R.RING_HI, 0xA000_0000 + f)
            await r.wr(f, R.RING_LOG2, (3, 8, 9, 15)[f])          # clamped to 8
            await r.wr(f, R.CTRL, 0xFFFF_E0FE | ((7 * f + 3) << 8) | (f != 2))
            await r.wr(f, R.PROD, 0xABC1_0000 | (f + 1))          # 16 bits
            await r.wr(f, R.CONS, 0x55)                           # read only
            await r.wr(f, R.STATUS, 0xFFFF_FFFF)                  # read only
        want = {f: [0x1000_0020 | (f << 12), 0xA000_0000 + f, (3, 8, 8, 8)[f],
                    ((7 * f + 3) << 8) | (f != 2), f + 1, 0, 0] for f in range(NF)}
        assert {f: await w.regs(f, *regs) for f in range(NF)} == want
        assert [(s, fi, v) for _, s, fi, v in w.releases] == [(1, 2, 0)]   # CTRL 0 of fn 2
        w.releases.clear()
        # writes without all four byte enables, or through BAR 2, change nothing
        for f in range(NF):
            for off in (R.RING_LO, R.RING_HI, R.RING_LOG2, R.CTRL, R.PROD):
                for be in (0x0, 0x1, 0x7, 0xE):
                    await r.wr(f, off, 0x5555_5540, be=be)
                await r.wr(f, off, 0x5555_5540, bar=2)
        assert {f: await w.regs(f, *regs) for f in range(NF)} == want
        assert w.releases == []
        # disabling a queue (CTRL bit 0 clear) resets its indices, and releases it
        await r.wr(1, R.CTRL, 9 << 8)
        assert await w.regs(1, R.CTRL, R.PROD) == [9 << 8, 0]
        assert [(s, fi, v) for _, s, fi, v in w.releases] == [(1, 1, 0)]
        assert await w.regs(3, R.CTRL, R.PROD) == [(24 << 8) | 1, 4]
    run(tb)


@pytest.mark.parametrize("width", [64, 128])
def test_one_descriptor_each_way(width):
    """Fetch (address, 8 DW, requester ID), DMA command, status write, then CONS and MSI-X."""
    async def tb(w):
        f, base = 2, 0x1_2345_6780
        w.wr_stall = 6                      # each status write waits 6 cycles for tx.ready
        w.cpl_delay = 12
        await w.setup(f, base, log2=1, vec=5)
        await w.reg.wr(0, R.CTRL, 1)
        w.ctx.set(w.dut.occ.fidx, f)
        a0 = w.put(f, 0, host=0x3_0000_1004, card=0x2010, length=0x1F3)
        a1 = w.put(f, 1, host=0x8000_0FF0, card=0x0004, length=0xFFFC, to_host=1, irq=1)
        await w.doorbell(f, 2)
        await w.until(lambda: w.fetches())
        assert await w.regs(f, R.STATUS) == [1]        # busy with this function
        assert await w.regs(0, R.STATUS) == [0]
        await w.drain()
        assert [t["write"] for t in w.tlps] == [0, 1, 0, 1]
        f0, s0, f1, s1 = w.tlps
        for t, a in ((f0, a0), (f1, a1)):
            assert t["fmt_type"] == TlpKind.MRD64
            assert (t["addr"], t["length"], t["rid"], t["tag"], t["fbe"], t["lbe"], t["func"]) == (
                a, 8, rid(f), TAG, 0xF, 0xF, f)
        assert w.cmds == [Cmd("rd", f, 0x3_0000_1004, 0x2010, 0x1F3),
                              Cmd("wr", f, 0x8000_0FF0, 0x0004, 0xFFFC)]
        for t, a in ((s0, a0), (s1, a1)):
            assert t["fmt_type"] == TlpKind.MWR64
            assert (t["addr"], t["length"], t["rid"], t["data"], t["fbe"], t["lbe"]) == (
                a + 0x14, 1, rid(f), [DescStatus.DONE], 0xF, 0)
        assert w.status(f, 0) == w.status(f, 1) == DescStatus.DONE
        # order: fetch < command < done < status write < CONS + 1 (occ drops) < next fetch
        assert [v for _, v in w.occ] == [0, 2, 1, 0]
        drops = [c for c, _ in w.occ[2:]]
        for k, (ft, st) in enumerate(((f0, s0), (f1, s1))):
            assert ft["cycle"] < w.cmd_cycles[k] < w.dones[k] < st["cycle"] < drops[k]
        assert drops[0] < f1["cycle"]
        # one interrupt: the card -> host descriptor asked for it, after its status write left
        assert [(fi, v) for _, fi, v in w.irqs] == [(f, 5)]
        assert s1["cycle"] < w.irqs[0][0] <= drops[1]
        assert await w.regs(f, R.CONS, R.PROD, R.STATUS) == [2, 2, 0]
        # index 2 wraps to slot 0 of the 2-entry ring
        w.put(f, 2, host=0x10, card=0x20, length=0x30)
        await w.doorbell(f, 3)
        await w.drain()
        assert w.fetches()[-1]["addr"] == base and w.writes()[-1]["addr"] == base + 0x14
        assert w.cmds[-1] == Cmd("rd", f, 0x10, 0x20, 0x30)
        assert w.status(f, 2) == DescStatus.DONE and len(w.irqs) == 1
    run(tb, width)


BAD = [(0x1000, 0, 0), (0x1000, 0, 0x10001), (0x1000, 0xFFF0, 0x20), (0x1000, 0x10000, 1),
       (2**64 - 0x10, 0, 0x20), (2**64 - 1, 0x100, 2)]
GOOD = [(0x2000, 0, 0x10000), (0x3000, 0xFFFF, 1), (2**64 - 0x20, 0x100, 0x20)]


def test_bad_descriptors():
    """Length 0 or over 64 KiB, a card range beyond 64 KiB, a host range past 2**64: BAD_DESC
    without a translation or a DMA command; the limits themselves are fine."""
    async def tb(w):
        await w.setup(1, 0x8000, log2=4)
        descs = [BAD[0], GOOD[0], *BAD[1:4], GOOD[1], *BAD[4:], GOOD[2]]
        for k, (host, card, length) in enumerate(descs):
            w.put(1, k, host, card, length)
        await w.doorbell(1, len(descs))
        await w.drain()
        assert [w.status(1, k) for k in range(len(descs))] == [
            DescStatus.DONE if dsc in GOOD else DescStatus.BAD_DESC for dsc in descs]
        assert w.cmds == [Cmd("rd", 1, *g) for g in GOOD]
        assert [x["iova"] for x in w.xreqs] == [g[0] for g in GOOD]
        assert [t["data"] for t in w.writes()] == [[w.status(1, k)] for k in range(len(descs))]
        assert await w.regs(1, R.CONS, R.STATUS) == [len(descs), 0]
    run(tb)


def test_dma_channel_error():
    """A DMA channel that reports an error ends the descriptor with CPL_ERROR; the queue goes on."""
    async def tb(w):
        await w.setup(3, 0x2_0000_0000, log2=2)
        w.put(3, 0, 0x1000, 0x100, 0x40)
        w.put(3, 1, 0x2000, 0x200, 0x40, to_host=1)
        w.put(3, 2, 0x3000, 0x300, 0x40, to_host=1)
        w.dma_errors = [DmaStatus.CPL_ERROR, DmaStatus.CPL_ERROR]
        await w.doorbell(3, 3)
        await w.drain()
        assert [c.dir for c in w.cmds] == ["rd", "wr", "wr"]
        assert [w.status(3, k) for k in range(3)] == [DescStatus.CPL_ERROR] * 2 + [DescStatus.DONE]
        assert await w.regs(3, R.CONS, R.STATUS) == [3, 0]
    run(tb)


@pytest.mark.parametrize("how", ["ur", "short", "none"])
def test_failed_fetch_stops_the_queue(how):
    """UR, a short completion or none at all: the error bit, no status write, no more fetches of
    that queue (the others go on) until it is disabled, which clears the error and indices."""
    async def tb(w):
        await w.setup(1, 0x4000, log2=3)
        await w.setup(2, 0x6000, log2=3)
        w.put(1, 0, 0x1000, 0x100, 0x40)
        w.put(1, 1, 0x1000, 0x100, 0x40)
        w.answer[1] = how
        await w.doorbell(1, 2)
        await w.until(lambda: w.fetches())
        if how == "none":            # nothing else happens until the completion timeout
            await w.ctx.tick().repeat(CPL_TIMEOUT - 10)
            w.cycle += CPL_TIMEOUT - 10
            assert await w.regs(1, R.STATUS) == [1]          # still waiting
        await w.drain()
        assert await w.regs(1, R.STATUS, R.CONS, R.PROD) == [0b10, 0, 2]
        w.put(2, 0, 0x5000, 0x500, 0x10)
        await w.doorbell(2, 1)
        await w.doorbell(1, 3)
        await w.drain()
        assert [t["rid"] & 0xFF for t in w.fetches()] == [1, 2]
        assert [t["rid"] & 0xFF for t in w.writes()] == [2]
        assert w.cmds == [Cmd("rd", 2, 0x5000, 0x500, 0x10)]
        assert w.status(1, 0) == 0xEEEE_EEEE
        assert await w.regs(1, R.STATUS, R.CONS) == [0b10, 0]
        # disable (clears the error and the indices), enable, and it runs again
        del w.answer[1]
        await w.reg.wr(1, R.CTRL, 0)
        assert await w.regs(1, R.STATUS, R.CONS, R.PROD, R.CTRL) == [0, 0, 0, 0]
        await w.reg.wr(1, R.CTRL, 1)
        await w.doorbell(1, 1)
        await w.drain()
        assert w.status(1, 0) == DescStatus.DONE
        assert await w.regs(1, R.STATUS, R.CONS) == [0, 1]
    run(tb)


def rr_order(start, counts, nf=NF):
    """The order a round robin from ``start`` serves ``counts[f]`` descriptors of each f."""
    left, out, f = dict(counts), [], start
    while any(left.values()):
        if left.get(f):
            out.append(f)
            left[f] -= 1
        f = (f + 1) % nf
    return out


def test_round_robin_and_bus_master_enable():
    """One descriptor per function in turn; a function without Bus Master Enable is skipped."""
    async def tb(w):
        w.set_bme(0)
        counts = {0: 3, 1: 1, 2: 2, 3: 2}
        for f, n in counts.items():
            await w.setup(f, 0x10_0000 * (f + 1), log2=3)
            for k in range(n):
                w.put(f, k, 0x1000 * (f + 1) + k, 0x100 * f + k, 4 + k)
            await w.doorbell(f, n)
        await w.run(20)
        assert w.tlps == []                       # no Bus Master Enable anywhere yet
        w.set_bme(0b1011)
        await w.drain()
        order = [t["rid"] & 0xFF for t in w.fetches()]
        assert order == rr_order(order[0], {0: 3, 1: 1, 3: 2})
        assert [c.fidx for c in w.cmds] == order
        assert await w.regs(2, R.CONS, R.STATUS) == [0, 0]
        w.set_bme(0b1111)
        await w.drain()
        assert [t["rid"] & 0xFF for t in w.fetches()][len(order):] == [2, 2]
        assert w.cmd_of(2) == [Cmd("rd", 2, 0x3000, 0x200, 4), Cmd("rd", 2, 0x3001, 0x201, 5)]
    run(tb)


def test_domain_cuts_at_pages_and_blocks():
    """With a domain, pieces end at 4 KiB pages and use the translator's bus addresses; a
    transfer that does not fit in the domain is BLOCKED before anything moves."""
    async def tb(w):
        w.domains[1] = {"pages": 4, "vm": 7, "absent": set()}
        await w.setup(1, 0x9000, log2=2)
        w.put(1, 0, 0x1F00, 0x100, 0x300)
        w.put(1, 1, 0x0010, 0x8000, 0x2FF0, to_host=1)
        w.put(1, 2, 0x3F00, 0x100, 0x200)
        w.put(1, 3, 0x3F00, 0x100, 0x100)
        await w.doorbell(1, 4)
        await w.drain()
        assert w.cmds == [
            Cmd("rd", 1, phys(1, 1) + 0xF00, 0x100, 0x100),
            Cmd("rd", 1, phys(1, 2), 0x200, 0x200),
            Cmd("wr", 1, phys(1, 0) + 0x10, 0x8000, 0xFF0),
            Cmd("wr", 1, phys(1, 1), 0x8FF0, 0x1000),
            Cmd("wr", 1, phys(1, 2), 0x9FF0, 0x1000),
            Cmd("rd", 1, phys(1, 3) + 0xF00, 0x100, 0x100)]
        assert [(x["fidx"], x["iova"], x["last"]) for x in w.xreqs] == [
            (1, 0x1F00, 0x21FF), (1, 0x2000, 0x21FF), (1, 0x10, 0x2FFF), (1, 0x1000, 0x2FFF),
            (1, 0x2000, 0x2FFF), (1, 0x3F00, 0x40FF), (1, 0x3F00, 0x3FFF)]
        assert [w.status(1, k) for k in range(4)] == [
            DescStatus.DONE, DescStatus.DONE, DescStatus.BLOCKED, DescStatus.DONE]
    run(tb)


async def fault_world(w, to_host):
    """Function 1 with a domain whose page 2 is absent runs a descriptor in three pieces, the
    second (IOVA 0x2000, card 0x50C, a whole page) on that page; function 3 waits with one."""
    w.domains[1] = {"pages": 8, "vm": 7, "absent": {2}}
    await w.setup(1, 0xA000, log2=2)
    await w.setup(3, 0xB000, log2=2)
    w.put(1, 0, 0x1F00, 0x40C, 0x1300, to_host=to_host)
    w.put(3, 0, 0x7000, 0x700, 0x70)
    await w.doorbell(1, 1)
    await w.until(lambda: w.faults or w.ctx.get(w.dut.fault.ok_w) == 0 and len(w.xreqs) == 2)
    await w.doorbell(3, 1)
    await w.drain()
    return Cmd("wr" if to_host else "rd", 1, phys(1, 1) + 0xF00, 0x40C, 0x100)


@pytest.mark.parametrize("to_host,width", [(1, 64), (1, 128), (0, 64)],
                         ids=["write-w64", "write-w128", "read-w64"])
def test_page_fault_park_and_resume(to_host, width):
    """NOT_PRESENT: the fault goes out, the function is parked while another is served; resumed,
    the descriptor is fetched again and goes on at the piece that faulted (a write replayed from
    its staging slot, which is then freed)."""
    async def tb(w):
        first = await fault_world(w, to_host)
        assert w.faults == [{"fidx": 1, "vm": 7, "iova": 0x2000, "write": to_host, "card": 0x50C,
                             "length": 0x1000, "cycle": w.faults[0]["cycle"]}]
        assert w.fault_evs == [(w.faults[0]["cycle"], 1)]
        assert w.cmds == [first, Cmd("rd", 3, 0x7000, 0x700, 0x70)]   # 3 served meanwhile
        assert len(w.fetches(1)) == 1 and w.writes(1) == []
        assert await w.regs(1, R.STATUS, R.CONS) == [0b100, 0]             # parked
        assert w.status(3, 0) == DescStatus.DONE
        await w.run(30)
        assert len(w.fetches(1)) == 1                                      # stays parked
        w.domains[1]["absent"].clear()
        n = len(w.cmds)
        w.resume(1, ok=1)
        await w.drain()
        assert [t["addr"] for t in w.fetches(1)] == [0xA000, 0xA000]
        assert [x["iova"] for x in w.xreqs[-2:]] == [0x2000, 0x3000]
        card = Staging.BASE + 2 * Staging.STRIDE + 0x50C % (width // 8) if to_host else 0x50C
        assert w.cmds[n:] == [Cmd(first.dir, 1, phys(1, 2), card, 0x1000),
                              Cmd(first.dir, 1, phys(1, 3), 0x150C, 0x200)]
        if to_host:                         # the slot is freed once the replayed piece is done
            assert [s for _, s in w.slot_frees] == [2]
            assert w.cmd_cycles[n] < w.slot_frees[0][0] < w.cmd_cycles[n + 1]
        else:
            assert w.slot_frees == []
        assert w.status(1, 0) == DescStatus.DONE
        assert await w.regs(1, R.STATUS, R.CONS) == [0, 1]
    run(tb, width)


def test_page_fault_refused():
    """The host refuses the fault: the descriptor is fetched again and ends with FAULT."""
    async def tb(w):
        first = await fault_world(w, 1)
        assert len(w.faults) == 1
        n, x = len(w.cmds), len(w.xreqs)
        w.resume(1, ok=0)
        await w.drain()
        assert len(w.fetches(1)) == 2 and w.cmds[n:] == [] and len(w.xreqs) == x
        assert w.cmd_of(1) == [first]
        assert w.status(1, 0) == DescStatus.FAULT
        assert await w.regs(1, R.STATUS, R.CONS) == [0, 1]
    run(tb)


def test_page_fault_waits_for_room():
    """No room in the fault unit: the function waits (parked, others served), then raises it."""
    async def tb(w):
        w.ctx.set(w.dut.fault.ok_w, 0)
        first = await fault_world(w, 1)
        assert w.faults == [] and w.cmds == [first, Cmd("rd", 3, 0x7000, 0x700, 0x70)]
        assert await w.regs(1, R.STATUS) == [0b100]
        await w.run(30)
        assert len(w.fetches(1)) == 1
        w.ctx.set(w.dut.fault.ok_w, 1)
        await w.drain()
        assert len(w.fetches(1)) == 2 and len(w.cmds) == 2          # nothing moved twice
        assert [(f["iova"], f["card"], f["length"]) for f in w.faults] == [(0x2000, 0x50C, 0x1000)]
    run(tb)


def test_flr_and_vf_reset():
    """FLR resets one function's queue (indices, error) and releases it; VF reset every VF's."""
    async def tb(w):
        w.answer[2] = "ur"
        for f in range(NF):
            await w.setup(f, 0x20_0000 * (f + 1), log2=3, vec=f + 1)
            w.put(f, 0, 0x1000, 0x100, 0x10)
            await w.doorbell(f, 1)
        await w.drain()
        w.set_bme(0)
        for f in range(NF):
            await w.doorbell(f, 4)
        regs = (R.CTRL, R.PROD, R.CONS, R.STATUS)
        assert [await w.regs(f, *regs) for f in range(NF)] == [
            [(f + 1) << 8 | 1, 4, 0 if f == 2 else 1, 0b10 if f == 2 else 0] for f in range(NF)]
        await w.pulse(w.dut.fn.flr, flr_fidx=2)
        assert [(s, fi, v) for _, s, fi, v in w.releases] == [(1, 2, 0)]
        assert [await w.regs(f, *regs) for f in range(NF)] == [
            [3 << 8, 0, 0, 0] if f == 2 else [(f + 1) << 8 | 1, 4, 1, 0] for f in range(NF)]
        await w.pulse(w.dut.fn.vf_reset)
        assert [v for *_, v in w.releases] == [0, 1]
        assert [await w.regs(f, *regs) for f in range(NF)] == [
            [(f + 1) << 8 | (f == 0), 4 if f == 0 else 0, int(f == 0), 0] for f in range(NF)]
        # only the PF's queue runs on
        for k in (1, 2, 3):
            w.put(0, k, 0x1000, 0x100, 0x10)
        n = len(w.fetches())
        w.set_bme(0xF)
        await w.drain()
        assert [t["rid"] & 0xFF for t in w.fetches()[n:]] == [0, 0, 0]
        assert await w.regs(0, R.CONS) == [4]
    run(tb)


@pytest.mark.parametrize("how", ["flr", "disable", "vf_reset"])
def test_reset_while_a_descriptor_runs(how):
    """A queue reset (FLR, CTRL enable 0, VF reset) while one of its descriptors is moving leaves
    the indices at 0 (DmaRegs.CTRL: "0 also resets the indices"), so the ring, enabled again,
    starts at slot 0 with the next doorbell."""
    async def tb(w):
        w.dma_delay = 40
        await w.setup(1, 0x4000, log2=3)
        w.put(1, 0, 0x1000, 0x100, 0x40)
        await w.doorbell(1, 1)
        await w.until(lambda: w.cmds)
        if how == "disable":
            await w.reg.wr(1, R.CTRL, 0)
        else:
            await w.pulse(getattr(w.dut.fn, how), flr_fidx=1)
        await w.drain()
        assert await w.regs(1, R.CTRL, R.PROD, R.CONS, R.STATUS) == [0, 0, 0, 0]
        await w.reg.wr(1, R.CTRL, 1)
        w.put(1, 0, 0x2000, 0x200, 0x20)
        await w.doorbell(1, 1)
        await w.drain()
        assert [t["addr"] for t in w.fetches(1)] == [0x4000, 0x4000]
        assert w.status(1, 0) == DescStatus.DONE
        assert await w.regs(1, R.PROD, R.CONS) == [1, 1]
    run(tb)


def test_telemetry_busy_and_occupancy():
    """busy_ev names the function served in every cycle the engine works; occ = PROD - CONS."""
    async def tb(w):
        w.set_bme(0)
        for f in (1, 3):
            await w.setup(f, 0x30_0000 * f, log2=3)
            for k in range(3):
                w.put(f, k, 0x1000 * f, 0x100 * k, 0x20, to_host=k & 1)
        await w.doorbell(3, 3)
        await w.doorbell(1, 2)
        for f, want in ((3, 3), (1, 2), (0, 0), (2, 0), (NF, 0), (0xFF, 0)):
            w.ctx.set(w.dut.occ.fidx, f)
            await w.step()
            assert w.occ[-1][1] == want, f
        assert w.busy == []
        w.ctx.set(w.dut.occ.fidx, 3)
        w.set_bme(0xF)
        await w.drain()
        assert [v for _, v in w.occ][-4:] == [3, 2, 1, 0]
        assert {a for _, _, a in w.busy} == {1}
        # busy with the function served from each fetch to its status write (its DMA commands
        # in between), and idle for a while between two descriptors
        who = {c: f for c, f, _ in w.busy}
        spans = [(f["cycle"], s["cycle"], s["rid"] & 0xFF)
                 for f, s in zip(w.fetches(), w.writes())]
        assert [f for _, _, f in spans] == rr_order(spans[0][2], {1: 2, 3: 3})
        for a, b, f in spans:
            assert all(who.get(c) == f for c in range(a, b + 1))
        assert all(any(a - 3 <= c <= b + 3 for a, b, _ in spans) for c in who)
        assert all(any(c not in who for c in range(b, a2)) for (_, b, _), (a2, _, _)
                   in zip(spans, spans[1:]))
    run(tb)


def test_reset_while_a_fault_is_raised():
    """An FLR while the fault unit raises the function's fault: the function is not parked on a
    fault nobody will resolve; the queue releases it again once the fault unit is done with it
    (its open fault and staging buffer go), and the ring, enabled again, runs from slot 0."""
    async def tb(w):
        w.domains[1] = {"pages": 8, "vm": 7, "absent": {2}}
        await w.setup(1, 0xA000, log2=2)
        w.put(1, 0, 0x1F00, 0x40C, 0x1300, to_host=1)
        await w.doorbell(1, 1)
        await w.until(lambda: w.faults)
        await w.pulse(w.dut.fn.flr, flr_fidx=1)
        await w.drain()
        assert await w.regs(1, R.STATUS, R.PROD, R.CONS) == [0, 0, 0]
        assert [(s, fi, v) for _, s, fi, v in w.releases] == [(1, 1, 0), (1, 1, 0)]
        assert w.releases[1][0] > w.faults[0]["cycle"] + 3      # after the fault unit's done
        assert w.writes(1) == []
        await w.reg.wr(1, R.CTRL, 1)
        w.domains[1]["absent"].clear()
        w.put(1, 0, 0x1000, 0x100, 0x20)
        await w.doorbell(1, 1)
        await w.drain()
        assert w.status(1, 0) == DescStatus.DONE
        assert await w.regs(1, R.STATUS, R.CONS) == [0, 1]
    run(tb)
