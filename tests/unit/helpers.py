"""Shared helpers for the amaranth.sim unit tests: simulation runner, TLP header builders,
beat packing/unpacking for the ``hdl.pcie.tlp.TlpBeat`` stream, and a few driver coroutines."""

from amaranth.sim import Simulator
from hdl.pcie.tlp import TlpKind

CLK = 1e-8


# ---- simulation -------------------------------------------------------------------------

def run_sim(dut, *testbenches, processes=(), deadline=None):
    """Run ``dut`` with a 100 MHz clock and the given async testbenches (all must finish).

    ``deadline`` (seconds of simulated time) bounds the run so a hung testbench fails
    instead of spinning forever."""
    sim = Simulator(dut)
    sim.add_clock(CLK, if_exists=True)     # purely combinational DUTs have no sync domain
    done = []
    for tb in testbenches:
        async def wrapped(ctx, tb=tb):
            await tb(ctx)
            done.append(tb)
        sim.add_testbench(wrapped)
    for p in processes:
        sim.add_process(p)
    if deadline is None:
        sim.run()
    else:
        sim.run_until(deadline)
    assert len(done) == len(testbenches), "testbench did not finish before the deadline"
    return sim


_SIM_CACHE = {}


def run_cached(key, make_dut, make_tb):
    """Like :func:`run_sim` with one testbench, but the elaborated simulator is kept per
    ``key`` and reused through ``Simulator.reset()`` (signals, memories and testbenches go
    back to their initial state), which saves the ~0.2 s of elaboration per test.

    ``make_dut()`` builds the design once; ``make_tb(dut)`` returns this run's async bench."""
    entry = _SIM_CACHE.pop(key, None)
    if entry is None:
        dut = make_dut()
        sim = Simulator(dut)
        sim.add_clock(CLK, if_exists=True)
        slot = {}

        async def dispatcher(ctx):
            await slot["tb"](ctx)
            slot["done"] = True
        sim.add_testbench(dispatcher)
        entry = (dut, sim, slot)
    else:
        entry[1].reset()
    dut, sim, slot = entry
    slot["tb"], slot["done"] = make_tb(dut), False
    sim.run()                       # an exception leaves the entry evicted (popped above)
    assert slot["done"], "testbench did not finish"
    _SIM_CACHE[key] = entry


# ---- header construction ----------------------------------------------------------------

def hdr_int(dw0, dw1, dw2, dw3=0):
    """128-bit ``hdr`` value: DW0 in bits [127:96] ... DW3 in [31:0]."""
    return (dw0 << 96) | (dw1 << 64) | (dw2 << 32) | dw3


def hdr_dws(hdr):
    """Split a 128-bit ``hdr`` value into [DW0, DW1, DW2, DW3]."""
    return [(hdr >> (32 * (3 - n))) & 0xFFFF_FFFF for n in range(4)]


def dw0(fmt_type, length, tag=0, tc=0, ep=0, attr=0):
    """DW0 from an 8-bit {Fmt,Type} code; ``tag`` is the full 10-bit tag (T9/T8 in DW0)."""
    return ((fmt_type << 24) | (((tag >> 9) & 1) << 23) | (tc << 20) | (((tag >> 8) & 1) << 19)
            | (((attr >> 2) & 1) << 18) | (ep << 14) | ((attr & 3) << 12) | (length & 0x3FF))


def req_dw1(requester_id, tag, first_be, last_be=0):
    return (requester_id << 16) | ((tag & 0xFF) << 8) | (last_be << 4) | first_be


def cfg_hdr(write, fidx, reg_byte, be=0xF, bus=0, tag=0, requester_id=0x0000, length=1):
    """Type-0 CfgRd0/CfgWr0 header to routing ID {bus, fidx} (ARI: function = 8 bits)."""
    kind = TlpKind.CFGWR0 if write else TlpKind.CFGRD0
    completer_id = (bus << 8) | fidx
    return hdr_int(dw0(kind, length, tag=tag),
                   req_dw1(requester_id, tag, be, 0),
                   (completer_id << 16) | (reg_byte & 0xFFC))


def mem_hdr(write, addr, length, first_be=0xF, last_be=None, tag=0, requester_id=0x0000,
            force64=None, ep=0):
    """MRd/MWr header, 3 DW below 4 GiB unless ``force64``."""
    if last_be is None:
        last_be = 0 if length == 1 else 0xF
    is64 = (addr >> 32) != 0 if force64 is None else force64
    if write:
        kind = TlpKind.MWR64 if is64 else TlpKind.MWR32
    else:
        kind = TlpKind.MRD64 if is64 else TlpKind.MRD32
    d0 = dw0(kind, length, tag=tag, ep=ep)
    d1 = req_dw1(requester_id, tag, first_be, last_be)
    if is64:
        return hdr_int(d0, d1, addr >> 32, addr & 0xFFFF_FFFC)
    return hdr_int(d0, d1, addr & 0xFFFF_FFFC)


def cpl_hdr(with_data, length, status, completer_id, byte_count, requester_id, tag,
            lower_addr=0):
    kind = TlpKind.CPLD if with_data else TlpKind.CPL
    return hdr_int(dw0(kind, length if with_data else 0, tag=tag),
                   (completer_id << 16) | (status << 13) | (byte_count & 0xFFF),
                   (requester_id << 16) | ((tag & 0xFF) << 8) | (lower_addr & 0x7F))


def parse_cpl(hdr):
    """Decode the fields of a completion header (3-DW)."""
    d0, d1, d2, d3 = hdr_dws(hdr)
    return {
        "fmt": d0 >> 29, "type": (d0 >> 24) & 0x1F, "fmt_type": d0 >> 24,
        "length": d0 & 0x3FF,
        "tag": ((d2 >> 8) & 0xFF) | (((d0 >> 19) & 1) << 8) | (((d0 >> 23) & 1) << 9),
        "tc": (d0 >> 20) & 7, "ep": (d0 >> 14) & 1,
        "completer_id": d1 >> 16, "status": (d1 >> 13) & 7, "bcm": (d1 >> 12) & 1,
        "byte_count": d1 & 0xFFF,
        "requester_id": d2 >> 16, "lower_addr": d2 & 0x7F, "dw3": d3,
    }


# ---- beat packing -----------------------------------------------------------------------

def pack_beats(hdr, payload, data_width, func=0, bar=0):
    """Beats (dicts for ``TlpBeat(data_width)``) of one TLP with ``payload`` (list of DWs).

    A TLP without payload is one beat with sop, eop and strb 0."""
    dpb = data_width // 32
    beats = []
    chunks = [payload[i:i + dpb] for i in range(0, len(payload), dpb)] or [[]]
    for n, chunk in enumerate(chunks):
        data = 0
        for j, d in enumerate(chunk):
            data |= (d & 0xFFFF_FFFF) << (32 * j)
        beats.append({
            "hdr": hdr if n == 0 else 0,
            "data": data,
            "strb": (1 << len(chunk)) - 1,
            "sop": int(n == 0),
            "eop": int(n == len(chunks) - 1),
            "func": func,
            "bar": bar,
        })
    return beats


def unpack_dws(beat, data_width):
    """Payload DWs of one received beat (``strb`` selects them)."""
    out = []
    for j in range(data_width // 32):
        if (beat["strb"] >> j) & 1:
            out.append((beat["data"] >> (32 * j)) & 0xFFFF_FFFF)
    return out


def beat_dict(const):
    """A ``TlpBeat`` data.Const read with ``ctx.get`` as a plain dict of ints."""
    return {k: int(getattr(const, k)) for k in ("hdr", "data", "strb", "sop", "eop", "func", "bar")}


# ---- stream drivers ---------------------------------------------------------------------

async def send_beats(ctx, stream, beats, timeout=200):
    """Drive beats on a ``tlp_stream`` sink (``stream.valid/ready/p``), one per transfer."""
    for b in beats:
        await offer(ctx, stream, b, timeout)


async def recv_tlp(ctx, stream, data_width, timeout=200, ready=True):
    """Accept one TLP from a ``tlp_stream`` source; returns (hdr, payload DWs, beats).

    ``ready`` may be a callable ``ready(cycle) -> bool`` to apply back-pressure."""
    beats = []
    for cyc in range(timeout):
        r = int(ready(cyc)) if callable(ready) else int(ready)
        ctx.set(stream.ready, r)
        moving = r and ctx.get(stream.valid)
        b = beat_dict(ctx.get(stream.p)) if moving else None
        await ctx.tick()
        if b is not None:
            beats.append(b)
            if b["eop"]:
                break
    else:
        raise AssertionError(f"no complete TLP within {timeout} cycles (got {len(beats)} beats)")
    ctx.set(stream.ready, 0)
    assert beats[0]["sop"] == 1
    assert all(b["sop"] == 0 for b in beats[1:])
    payload = [d for b in beats for d in unpack_dws(b, data_width)]
    return beats[0]["hdr"], payload, beats


async def collect_beats(ctx, stream, cycles, ready=True):
    """Run ``cycles`` clock cycles with ``ready`` held and return the beats that moved."""
    ctx.set(stream.ready, int(ready))
    moved = []
    for _ in range(cycles):
        if ready and ctx.get(stream.valid):
            moved.append(beat_dict(ctx.get(stream.p)))
        await ctx.tick()
    ctx.set(stream.ready, 0)
    return moved


class RegBus:
    """Coroutine wrappers for a ``hdl.iface.RegBusSignature`` target (byte offsets)."""

    def __init__(self, ctx, bus):
        self.ctx, self.bus = ctx, bus

    def _addr(self, fidx, bar, off):
        self.ctx.set(self.bus.fidx, fidx)
        self.ctx.set(self.bus.bar, bar)
        self.ctx.set(self.bus.addr, off >> 2)

    async def rd(self, fidx, off, bar=0):
        self._addr(fidx, bar, off)
        self.ctx.set(self.bus.re, 1)
        await self.ctx.tick()
        self.ctx.set(self.bus.re, 0)
        return self.ctx.get(self.bus.rdata)

    async def wr(self, fidx, off, value, be=0xF, bar=0):
        self._addr(fidx, bar, off)
        self.ctx.set(self.bus.wdata, value)
        self.ctx.set(self.bus.be, be)
        self.ctx.set(self.bus.we, 1)
        await self.ctx.tick()
        self.ctx.set(self.bus.we, 0)


class ReadHost:
    """The host side of one translating host port (:class:`hdl.pcie.host_port.HostPort` inside
    a block with ``tx`` / ``cpl`` / ``xreq`` / ``xresp``): translations bypassed, each MemRd
    (a 32-bit address, no payload) answered ``lat`` cycles later with ``read(addr, ndw)`` (a
    list of DWs), or UR when the address is in ``ur``. Call :meth:`step` once a cycle before
    the tick; ``reads`` records (cycle, addr, ndw, fbe, tag, requester ID)."""

    def __init__(self, read, data_width, lat, ur=()):
        self.read, self.W, self.lat, self.ur = read, data_width, lat, set(ur)
        self.reads = []
        self.cycle = 0
        self._pending, self._cur, self._xlate = [], [], None

    def step(self, ctx, dut):
        ctx.set(dut.tx.ready, 1)
        ctx.set(dut.xreq.ready, 1)
        if self._xlate is not None:
            ctx.set(dut.xresp.p, {"status": 0, "bypass": 1, "phys": self._xlate, "vm": 0})
            ctx.set(dut.xresp.valid, 1)
            if ctx.get(dut.xresp.ready):
                self._xlate = None
        else:
            ctx.set(dut.xresp.valid, 0)
        if ctx.get(dut.xreq.valid):
            self._xlate = ctx.get(dut.xreq.p.iova)
        if ctx.get(dut.tx.valid):
            b = beat_dict(ctx.get(dut.tx.p))
            d0, d1, d2, _ = hdr_dws(b["hdr"])
            assert (d0 >> 24) == 0x00 and b["sop"] and b["eop"], "a 32-bit MemRd"
            addr, ndw, fbe, tag, rid = d2 & ~3, (d0 & 0x3FF) or 1024, d1 & 0xF, \
                (d1 >> 8) & 0xFF, d1 >> 16
            self.reads.append((self.cycle, addr, ndw, fbe, tag, rid))
            if addr in self.ur:
                beats = pack_beats(cpl_hdr(False, 0, 1, 0, 4 * ndw, rid, tag, addr & 0x7F), [],
                                   self.W)
            else:
                beats = pack_beats(cpl_hdr(True, ndw, 0, 0, (4 * ndw) & 0xFFF, rid, tag,
                                           addr & 0x7F), self.read(addr, ndw), self.W)
            self._pending.append((self.cycle + self.lat, beats))
        if self._cur and ctx.get(dut.cpl.ready):
            self._cur.pop(0)
        if not self._cur and self._pending and self._pending[0][0] <= self.cycle:
            self._cur = self._pending.pop(0)[1]
        ctx.set(dut.cpl.valid, int(bool(self._cur)))
        if self._cur:
            ctx.set(dut.cpl.p, self._cur[0])
        self.cycle += 1


async def offer(ctx, stream, payload, limit=200):
    """Offer one ``payload`` on a stream sink until it is taken; returns the cycles it waited."""
    ctx.set(stream.p, payload)
    ctx.set(stream.valid, 1)
    for n in range(limit):
        ready = ctx.get(stream.ready)
        await ctx.tick()
        if ready:
            ctx.set(stream.valid, 0)
            return n
    raise AssertionError("the sink never took the payload")
