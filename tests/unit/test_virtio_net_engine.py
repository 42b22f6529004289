"""amaranth.sim tests of hdl.virtio.net.VirtioNet (PF + 2 VFs) inside a modelled world.

The world is one background simulator process that, every clock edge, looks at what the engine
did just before the edge (``ctx.tick().sample``) and answers for the next cycle:

* host memory (a bytearray): MemRd on ``tx`` (tag VQ_TAG) answered with CplD on ``cpl`` a few
  cycles later, MemWr applied with their first/last byte enables; every request's requester ID
  is checked against the function that owns the addressed structure;
* the transport: ``qr_en`` (combinational) and ``qa_data`` (a cycle after ``qa_*``) come from a
  small wrapper module; ``live`` / ``bme`` / ``ev_idx`` / ``indirect`` / ``kick`` are Python
  state (``kick`` bits cleared on ``kick_ack``, ``live`` cleared on ``nr_set`` as the transport
  sets NEEDS_RESET);
* the translator: OK, bypass, phys = iova (BLOCKED at or above ``xlate_limit`` if given);
* the DMA channels (behind the block's piece mover): ``rd_cmd`` copies host bytes into a packet-buffer model and drives
  ``snoop`` (through the wrapper, which shows the engine's own ``pm_wr`` there while
  ``pm_own``, as the card does), ``wr_cmd`` copies packet-buffer bytes to host memory;
* the engine's packet-buffer ports (uplink) and the uplink streams.

Split virtqueues follow virtio 1.x section 2.7 and are laid out in host memory by :class:`Vq`.
"""

import pytest
from amaranth import *
from amaranth.sim import Simulator
from collections import deque
from hdl.config import CardConfig
from hdl.iface import UplinkBeat, XlateStatus, XlateReq, DmaCmd
from hdl.memmap import PacketBuf as P
from hdl.pcie.tlp import TlpBeat
from hdl.pcie.host_port import HOST_TAGS
from hdl.virtio.net import VirtioNet
from hdl.virtio.transport import NQ
from hdl.virtio.engine import steering_bucket
from helpers import CLK, cpl_hdr, hdr_dws, pack_beats, unpack_dws, RegBus

from regmap import MigRegs, NetRegs, VirtioRegs as V

VQ_TAG = HOST_TAGS["vq"]
VQE_TAG = HOST_TAGS["vqe"]        # (the engine's notification unit)
VQP_TAG = HOST_TAGS["vqp"]        # (its receive prefetch unit)

RXQ, TXQ = 0, 1
D_NEXT, D_WRITE, D_INDIRECT = 1, 2, 4
QSIZE = 8
NF = 3                     # PF + 2 VFs
BUS = 0x12                 # bus number: requester ID = BUS << 8 | function
MEM_SIZE = 1 << 20
CPL_LAT = 4                # cycles from a MemRd to its CplD
RX_FILL = 0xA5             # receive buffers are pre-filled with this
TAIL_FILL = 0xBEEF         # used ring tail (avail_event) before the engine writes it

COUNTERS = ("TX_FRAMES", "RX_FRAMES", "UPLINK_OUT", "UPLINK_IN", "DROP_NOBUF", "DROP_BAD",
            "DROP_UNKNOWN", "DROP_SIZE", "QUEUE_IRQS", "IRQ_SUPPRESSED", "XLATE_ERRORS")


def vec_of(f, q):
    """The MSI-X vector of queue ``q`` of function ``f`` (all below the 4 vectors)."""
    return (f + 2 * q) % 4


def mac(f):
    return bytes(V.MAC_PREFIX) + bytes([f])


def make_frame(dst, src, n, seed=1):
    """An Ethernet frame of ``n`` bytes: dst MAC, src MAC, IPv4 ethertype, a byte pattern."""
    body = bytes((seed * 31 + i * 7) & 0xFF for i in range(n - 14))
    return dst + src + b"\x08\x00" + body


def fields(layout, raw):
    return {n: (raw >> f.offset) & ((1 << f.width) - 1) for n, f in layout}


def r4(n):
    return (n + 3) & ~3


class Top(Elaboratable):
    """The engine plus the transport's queue tables and the snoop multiplexer of the card."""

    def __init__(self, cfg):
        self.eng = VirtioNet(cfg)
        nq = cfg.num_functions * NQ
        self.qsize = [Signal(9, name=f"tb_qsize{i}") for i in range(nq)]
        self.qvec = [Signal(16, name=f"tb_qvec{i}") for i in range(nq)]
        self.qen = [Signal(name=f"tb_qen{i}") for i in range(nq)]
        self.qaddr = [Signal(64, name=f"tb_qaddr{i}") for i in range(nq * 4)]
        W = cfg.data_width
        self.sn_addr = Signal.like(self.eng.snoop.addr, name="tb_sn_addr")
        self.sn_data = Signal(W, name="tb_sn_data")
        self.sn_en = Signal(W // 8, name="tb_sn_en")

    def elaborate(self, platform):
        m = Module()
        m.submodules.eng = e = self.eng
        qi = Signal(8)
        ai = Signal(10)
        m.d.comb += [
            qi.eq(e.transport.qr_fidx * NQ + e.transport.qr_q),
            ai.eq(e.transport.qa_fidx * NQ + e.transport.qa_q),
            e.transport.qr_en.eq(Array(self.qen)[qi]),
            # what the card's frame buffer write port sees: the engine's own writes while it
            # owns the buffers, else the DMA read channel's
            e.snoop.addr.eq(Mux(e.pm_own, e.pm_wr.addr, self.sn_addr)),
            e.snoop.data.eq(Mux(e.pm_own, e.pm_wr.data, self.sn_data)),
            e.snoop.en.eq(Mux(e.pm_own, e.pm_wr.en, self.sn_en)),
        ]
        # the queue's words (block RAM: a cycle later): 0 desc | driver, 1 device | size | vector
        words = [[Cat(self.qaddr[4 * i], self.qaddr[4 * i + 1]),
                  Cat(self.qaddr[4 * i + 2], self.qsize[i], C(0, 23), self.qvec[i], C(0, 16))]
                 for i in range(len(self.qsize))]
        m.d.sync += e.transport.qa_data.eq(Array(Array(w) for w in words)[ai][e.transport.qa_sel])
        return m


class Vq:
    """A split virtqueue in host memory (descriptor table, available ring, used ring)."""

    def __init__(self, w, size, owner):
        self.w, self.size = w, size
        self.desc = w.alloc(16 * size, 16, owner)
        self.avail = w.alloc(r4(6 + 2 * size), 4, owner)
        self.used = w.alloc(r4(6 + 8 * size), 4, owner)
        self.next_desc = 0
        self.aidx = 0
        w.w16(self.used + 4 + 8 * size, TAIL_FILL)

    def write_desc(self, i, addr, length, flags, nxt=0, table=None):
        base = self.desc if table is None else table
        self.w.put(base + 16 * i, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                   + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def post(self, head):
        self.w.w16(self.avail + 4 + 2 * (self.aidx % self.size), head)
        self.aidx += 1
        self.w.w16(self.avail + 2, self.aidx & 0xFFFF)

    def chain(self, bufs, post=True):
        """Descriptors for ``bufs`` [(addr, len, flags)], chained with NEXT; returns the head."""
        idx = [(self.next_desc + j) % self.size for j in range(len(bufs))]
        self.next_desc = (self.next_desc + len(bufs)) % self.size
        for j, (addr, length, flags) in enumerate(bufs):
            last = j == len(bufs) - 1
            self.write_desc(idx[j], addr, length, flags | (0 if last else D_NEXT),
                            0 if last else idx[j + 1])
        if post:
            self.post(idx[0])
        return idx[0]

    # -- what the device wrote ---------------------------------------------------------------
    @property
    def used_idx(self):
        return self.w.r16(self.used + 2)

    def used_elem(self, i):
        at = self.used + 4 + 8 * (i % self.size)
        return self.w.r32(at), self.w.r32(at + 4)

    @property
    def avail_event(self):
        return self.w.r16(self.used + 4 + 8 * self.size)

    # -- driver-side knobs ------------------------------------------------------------------
    def set_avail_flags(self, v):
        self.w.w16(self.avail, v)

    def set_used_event(self, v):
        self.w.w16(self.avail + 4 + 2 * self.size, v)


class World:
    def __init__(self, W=64, ev_idx=0, indirect=0, xlate_limit=None, xoff=0, mrg=0, coal=1,
                 cpl_lat=CPL_LAT, mq=0):
        self.cfg = CardConfig(total_vfs=2, data_width=W)
        self.cpl_lat = cpl_lat
        assert self.cfg.num_functions == NF
        self.W, self.WB = W, W // 8
        self.top = Top(self.cfg)
        self.mem = bytearray(MEM_SIZE)
        self.pkt = bytearray(P.SLOT * P.SLOTS)
        self.regions = []
        self.brk = 0x1000
        self.live = self.bme = (1 << NF) - 1
        self.ev_idx, self.indirect, self.mrg = ev_idx, indirect, mrg
        self.mq = mq              # functions with MQ and CTRL_VQ negotiated (a bit each)
        self.kick = 0
        self.vresets = deque()    # functions to give a virtio reset strobe, one per cycle
        self.coal = coal          # NetRegs.COAL (1: every used element published at once)
        self.uplink_ready = lambda cycle: 1     # uplink_tx.ready, per cycle
        self.xlate_limit = xlate_limit
        self.xoff = xoff          # a domain: bus address = IOVA + xoff (0: bypass)
        self.vq = {(f, q): Vq(self, QSIZE, f) for f in range(NF) for q in range(NQ)}
        # records
        self.tlps = []            # (kind 'rd'/'wr', addr, ndw, fbe, lbe, rid, tag)
        self.tlp_at = []          # ... and the cycle each was sent
        self.rd_done_at = []      # the cycles the DMA read channel reported a command done
        self.rid_errors = []
        self.rd_cmds, self.wr_cmds, self.xreqs = [], [], []
        self.irqs, self.isrs, self.nrs, self.kick_acks = [], [], [], []
        self.uplink_frames = []
        self.urx = deque()        # uplink_rx beats to present
        self.cycle = 0
        self.last_activity = 0

    # -- host memory (the driver's view: I/O virtual addresses) ------------------------------
    def alloc(self, n, align=16, owner=None):
        a = (self.brk + align - 1) & ~(align - 1)
        self.brk = a + r4(n)
        assert self.brk <= MEM_SIZE
        self.regions.append((a, a + n, owner))
        return a

    def alloc_at(self, a, n, owner):
        assert a >= self.brk
        self.brk = a + r4(n)
        self.regions.append((a, a + n, owner))
        return a

    def put(self, addr, b):
        addr += self.xoff
        self.mem[addr:addr + len(b)] = b

    def w16(self, addr, v):
        self.put(addr, (v & 0xFFFF).to_bytes(2, "little"))

    def r16(self, addr):
        addr += self.xoff
        return int.from_bytes(self.mem[addr:addr + 2], "little")

    def r32(self, addr):
        addr += self.xoff
        return int.from_bytes(self.mem[addr:addr + 4], "little")

    def owner(self, addr):
        for a, b, o in self.regions:
            if a <= addr < b:
                return o
        return None

    # -- driver-side helpers -----------------------------------------------------------------
    def buffer(self, data, owner, at=None):
        a = self.alloc(len(data), 16, owner) if at is None else self.alloc_at(at, len(data), owner)
        self.put(a, data)
        return a

    def send(self, f, frame, indirect=False, single=False, at=None):
        """Queue ``frame`` (after a zero virtio_net_hdr) on function ``f``'s transmit queue, as
        two chained descriptors (or an indirect table holding them, or ``single`` one
        descriptor holding both); returns the head."""
        vq = self.vq[f, TXQ]
        if single:
            a = self.buffer(bytes(P.NET_HDR) + frame, f, at)
            return vq.chain([(a, P.NET_HDR + len(frame), 0)])
        hdr = self.buffer(bytes(P.NET_HDR), f)
        fa = self.buffer(frame, f, at)
        if not indirect:
            return vq.chain([(hdr, P.NET_HDR, 0), (fa, len(frame), 0)])
        table = self.alloc(32, 16, f)
        vq.write_desc(0, hdr, P.NET_HDR, D_NEXT, 1, table=table)
        vq.write_desc(1, fa, len(frame), 0, 0, table=table)
        return vq.chain([(table, 32, D_INDIRECT)])

    def post_rx(self, f, size=2048, at=None):
        a = self.alloc(size, 16, f) if at is None else self.alloc_at(at, size, f)
        self.put(a, bytes([RX_FILL]) * size)
        return self.vq[f, RXQ].chain([(a, size, D_WRITE)]), a

    def post_rx_chain(self, f, sizes):
        """One receive chain of buffers of ``sizes`` (contiguous); returns (head, address)."""
        a = self.alloc(sum(sizes), 16, f)
        self.put(a, bytes([RX_FILL]) * sum(sizes))
        bufs, at = [], a
        for n in sizes:
            bufs.append((at, n, D_WRITE))
            at += n
        return self.vq[f, RXQ].chain(bufs), a

    async def burst(self, ctx, frames, src=1, dst=2):
        """A receive buffer on ``dst`` per frame, the frames queued on ``src`` in one
        descriptor each, one notification; once the engine is quiet every frame must be in
        ``dst``'s buffers, in order. Returns the transmit heads."""
        rx = [self.post_rx(dst) for _ in frames]
        heads = [self.send(src, f, single=True) for f in frames]
        self.notify(src, TXQ)
        await self.settle(ctx)
        for i, ((head, addr), f) in enumerate(zip(rx, frames)):
            self.check_rx(dst, addr, f, i, head)
        return heads

    def notify(self, f, q=TXQ):
        self.kick |= 1 << (f * NQ + q)

    def inject_uplink(self, frame):
        WB = self.WB
        for i in range(0, len(frame), WB):
            chunk = frame[i:i + WB]
            self.urx.append({"data": int.from_bytes(chunk, "little"),
                             "keep": (1 << len(chunk)) - 1,
                             "last": int(i + WB >= len(frame))})

    def check_rx(self, f, addr, frame, i=0, head=None):
        """Receive buffer at ``addr`` holds a fresh header (num_buffers 1) and ``frame``."""
        n = P.NET_HDR + len(frame)
        at = addr + self.xoff
        got = bytes(self.mem[at:at + n])
        assert got[:P.NET_HDR] == bytes(10) + b"\x01\x00", got[:P.NET_HDR].hex()
        assert got[P.NET_HDR:] == frame
        assert self.mem[at + n] == RX_FILL, "written beyond the frame"
        vq = self.vq[f, RXQ]
        if head is not None:
            assert vq.used_elem(i) == (head, n)

    # -- the simulation ----------------------------------------------------------------------
    async def proc(self, ctx):
        t, e = self.top, self.top.eng
        W, WB = self.W, self.WB
        for f in range(NF):
            for q in range(NQ):
                i = f * NQ + q
                vq = self.vq[f, q]
                ctx.set(t.qsize[i], vq.size)
                ctx.set(t.qvec[i], vec_of(f, q))
                ctx.set(t.qen[i], 1)
                ctx.set(t.qaddr[4 * i + 0], vq.desc)
                ctx.set(t.qaddr[4 * i + 1], vq.avail)
                ctx.set(t.qaddr[4 * i + 2], vq.used)
        ctx.set(e.link.bus_num, BUS)
        for s in (e.tx.ready, e.xreq.ready, e.rd_cmd.ready, e.wr_cmd.ready, e.uplink_tx.ready):
            ctx.set(s, 1)
        L_beat = list(TlpBeat(W))
        L_cmd = list(DmaCmd)
        L_xreq = list(XlateReq)
        L_up = list(UplinkBeat(W))
        sigs = [e.tx.valid, Value.cast(e.tx.p), e.cpl.valid, e.cpl.ready,
                e.xreq.valid, Value.cast(e.xreq.p), e.xresp.valid, e.xresp.ready,
                e.rd_cmd.valid, Value.cast(e.rd_cmd.p), e.rd_done.valid, e.rd_done.ready,
                e.wr_cmd.valid, Value.cast(e.wr_cmd.p), e.wr_done.valid, e.wr_done.ready,
                e.irq.valid, e.irq.fidx, e.irq.vector, e.transport.isr_set, e.transport.isr_fidx, e.transport.nr_set, e.transport.nr_fidx,
                e.transport.kick_ack, e.transport.kick_idx, e.pm_own, e.pm_rd.en, e.pm_rd.addr,
                e.pm_wr.en, e.pm_wr.addr, e.pm_wr.data,
                e.uplink_tx.valid, Value.cast(e.uplink_tx.p), e.uplink_rx.valid, e.uplink_rx.ready]
        tlp = None
        cpl_q = deque()           # (cycle it may start, beats)
        cpl_cur = deque()
        xq = deque()
        rd_job = None             # snoop words still to show, then rd_done
        wr_pending = False
        up_beats = []
        ut_ready = 1              # what uplink_tx.ready was in the cycle sampled
        shown = {}

        def drive(sig, v):
            if shown.get(id(sig)) != v:
                shown[id(sig)] = v
                ctx.set(sig, v)

        async for _, _, *v in ctx.tick().sample(*sigs):
            (tx_v, tx_p, cpl_v, cpl_r, xq_v, xq_p, xr_v, xr_r, rc_v, rc_p, rd_v, rd_r,
             wc_v, wc_p, wd_v, wd_r, irq_v, irq_f, irq_vec, isr_v, isr_f, nr_v, nr_f,
             k_ack, k_idx, own, pmr_en, pmr_addr, pmw_en, pmw_addr, pmw_data,
             ut_v, ut_p, ur_v, ur_r) = v
            self.cycle += 1
            if tx_v or rc_v or wc_v or xq_v or ut_v or ur_v or cpl_cur or cpl_q or rd_job \
                    or wr_pending or xq:
                self.last_activity = self.cycle

            # -- host memory: the engine's requests --
            if tx_v:
                b = fields(L_beat, tx_p)
                if b["sop"]:
                    assert tlp is None, "sop inside a TLP"
                    tlp = (b["hdr"], [])
                assert tlp is not None, "beat outside a TLP"
                tlp[1].extend(unpack_dws(b, W))
                if b["eop"]:
                    self._host_tlp(*tlp, cpl_q)
                    tlp = None
            if cpl_v and cpl_r:
                cpl_cur.popleft()
            if not cpl_cur and cpl_q and cpl_q[0][0] <= self.cycle:
                cpl_cur.extend(cpl_q.popleft()[1])
            if cpl_cur:
                drive(e.cpl.p, cpl_cur[0])
            drive(e.cpl.valid, int(bool(cpl_cur)))

            # -- translator --
            if xr_v and xr_r:
                xq.popleft()
            if xq_v:
                r = fields(L_xreq, xq_p)
                self.xreqs.append(r)
                lim = self.xlate_limit
                bad = lim is not None and (r["iova"] >= lim or r["last"] >= lim)
                xq.append({"status": XlateStatus.BLOCKED if bad else XlateStatus.OK,
                           "bypass": int(self.xoff == 0), "phys": r["iova"] + self.xoff,
                           "vm": 0})
            if xq:
                drive(e.xresp.p, xq[0])
            drive(e.xresp.valid, int(bool(xq)))

            # -- DMA read channel: host -> packet buffer, seen on snoop --
            if rd_v and rd_r:
                rd_job = None
                self.rd_done_at.append(self.cycle)
                drive(e.rd_done.valid, 0)
            if rc_v:
                assert rd_job is None
                c = fields(L_cmd, rc_p)
                self.rd_cmds.append(c)
                off = c["card"] - P.BASE
                assert 0 <= off and off + c["length"] <= len(self.pkt)
                self.pkt[off:off + c["length"]] = self.mem[c["host"]:c["host"] + c["length"]]
                words = deque()
                for wi in range(off // WB, (off + c["length"] - 1) // WB + 1):
                    en = 0
                    for j in range(WB):
                        if off <= wi * WB + j < off + c["length"]:
                            en |= 1 << j
                    words.append((wi, int.from_bytes(self.pkt[wi * WB:(wi + 1) * WB], "little"),
                                  en))
                rd_job = words
            if rd_job is not None and rd_job:
                wi, d, en = rd_job.popleft()
                drive(t.sn_addr, wi)
                drive(t.sn_data, d)
                drive(t.sn_en, en)
            else:
                drive(t.sn_en, 0)
                if rd_job is not None:
                    drive(e.rd_done.p, {"status": 0})
                    drive(e.rd_done.valid, 1)

            # -- DMA write channel: packet buffer -> host --
            if wd_v and wd_r:
                wr_pending = False
                drive(e.wr_done.valid, 0)
            if wc_v:
                c = fields(L_cmd, wc_p)
                self.wr_cmds.append(c)
                off = c["card"] - P.BASE
                assert 0 <= off and off + c["length"] <= len(self.pkt)
                self.mem[c["host"]:c["host"] + c["length"]] = self.pkt[off:off + c["length"]]
                wr_pending = True
                drive(e.wr_done.p, {"status": 0})
                drive(e.wr_done.valid, 1)

            # -- the engine's own frame buffer ports --
            if pmw_en:
                assert own
                for j in range(WB):
                    if (pmw_en >> j) & 1:
                        self.pkt[pmw_addr * WB + j] = (pmw_data >> (8 * j)) & 0xFF
            if pmr_en:
                assert own
                drive(e.pm_rd.data, int.from_bytes(self.pkt[pmr_addr * WB:(pmr_addr + 1) * WB],
                                                   "little"))

            # -- uplink --
            if ut_v and ut_ready:
                u = fields(L_up, ut_p)
                up_beats.append(u)
                if u["last"]:
                    self.uplink_frames.append(up_beats)
                    up_beats = []
            ut_ready = self.uplink_ready(self.cycle)
            drive(e.uplink_tx.ready, ut_ready)
            if ur_v and ur_r:
                self.urx.popleft()
            if self.urx:
                drive(e.uplink_rx.p, self.urx[0])
            drive(e.uplink_rx.valid, int(bool(self.urx)))

            # -- transport --
            if irq_v:
                self.irqs.append((irq_f, irq_vec))
            if isr_v:
                self.isrs.append(isr_f)
            if nr_v:
                self.nrs.append(nr_f)
                self.live &= ~(1 << nr_f)              # NEEDS_RESET: no longer DRIVER_OK-live
            if k_ack:
                self.kick_acks.append(k_idx)
                self.kick &= ~(1 << k_idx)
            vr = self.vresets.popleft() if self.vresets else None
            drive(e.transport.vreset, int(vr is not None))
            drive(e.transport.vreset_fidx, vr or 0)
            drive(e.transport.kick, self.kick)
            drive(e.transport.live, self.live)
            drive(e.fn.bme, self.bme)
            drive(e.transport.ev_idx, self.ev_idx)
            drive(e.transport.indirect, self.indirect)
            drive(e.transport.mrg, self.mrg)
            drive(e.transport.mq, self.mq)
            drive(e.transport.ctrl, self.mq)

    def _host_tlp(self, hdr, dws, cpl_q):
        d0, d1, d2, d3 = hdr_dws(hdr)
        fmt = d0 >> 29
        assert (d0 >> 24) & 0x1F == 0, f"not a memory request: {d0:08x}"
        ndw = (d0 & 0x3FF) or 1024
        fbe, lbe, tag, rid = d1 & 0xF, (d1 >> 4) & 0xF, (d1 >> 8) & 0xFF, d1 >> 16
        addr = ((d2 << 32) | (d3 & ~3)) if fmt & 1 else (d2 & ~3)
        write = bool(fmt & 2)
        self.tlps.append(("wr" if write else "rd", addr, ndw, fbe, lbe, rid, tag))
        self.tlp_at.append(self.cycle)
        o = self.owner(addr - self.xoff)
        if o is None or rid != (BUS << 8 | o):
            self.rid_errors.append((hex(addr), ndw, hex(rid), o))
        assert addr + 4 * ndw <= MEM_SIZE
        if write:
            assert len(dws) == ndw, (ndw, dws)
            for i, dw in enumerate(dws):
                be = fbe if i == 0 else (lbe if i == ndw - 1 else 0xF)
                for j in range(4):
                    if (be >> j) & 1:
                        self.mem[addr + 4 * i + j] = (dw >> (8 * j)) & 0xFF
        else:
            assert tag in (VQ_TAG, VQE_TAG, VQP_TAG) and not dws
            payload = [int.from_bytes(self.mem[addr + 4 * i:addr + 4 * i + 4], "little")
                       for i in range(ndw)]
            h = cpl_hdr(True, ndw, 0, 0, (4 * ndw) & 0xFFF, rid, tag, addr & 0x7F)
            cpl_q.append((self.cycle + self.cpl_lat, pack_beats(h, payload, self.W)))

    async def settle(self, ctx, quiet=40, limit=20000):
        """Tick until the engine has been idle (no request, command or stream beat, no
        notification left) for ``quiet`` cycles."""
        start = self.cycle
        for _ in range(limit):
            await ctx.tick()
            idle = self.cycle - max(self.last_activity, start)
            if idle >= quiet and self.kick == 0 and not self.urx:
                return
        raise AssertionError("the engine never went quiet")

    async def counters(self, ctx):
        bus = RegBus(ctx, self.top.eng.bus)
        return {n: await bus.rd(0, getattr(NetRegs, n), bar=2) for n in COUNTERS}

    def run(self, body):
        sim = Simulator(self.top)
        sim.add_clock(CLK)
        sim.add_process(self.proc)
        done = []

        async def tb(ctx):
            await RegBus(ctx, self.top.eng.bus).wr(0, NetRegs.COAL, self.coal, bar=2)
            await body(ctx)
            done.append(True)
        sim.add_testbench(tb)
        sim.run()
        assert done
        assert self.rid_errors == [], f"requests with the wrong requester ID: {self.rid_errors}"


def expect(ctr, **nonzero):
    want = {n: 0 for n in COUNTERS}
    want.update(nonzero)
    assert ctr == want


# ---- 1. function to function -------------------------------------------------------------

@pytest.mark.parametrize("W", [64, 128])
def test_vf_to_vf_frame(W):
    w = World(W)
    frame = make_frame(mac(2), mac(1), 100)
    tx_head = w.send(1, frame)
    rx_head, rx_addr = w.post_rx(2)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        rx, tx = w.vq[2, RXQ], w.vq[1, TXQ]
        w.check_rx(2, rx_addr, frame, 0, rx_head)
        assert rx.used_idx == 1
        assert tx.used_elem(0) == (tx_head, 0)
        assert tx.used_idx == 1
        assert rx.avail_event == TAIL_FILL and tx.avail_event == TAIL_FILL   # no EVENT_IDX
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=2)
        assert w.irqs == [(2, vec_of(2, RXQ)), (1, vec_of(1, TXQ))]
        assert w.isrs == [2, 1] and w.nrs == []
        assert w.kick_acks == [1 * NQ + TXQ]
        # the header and the frame were gathered by the DMA read channel for function 1 into
        # slot 0, and written out (a fresh header before the frame) in one piece by the write
        # channel for function 2
        assert [c["fidx"] for c in w.rd_cmds] == [1, 1]
        assert sum(c["length"] for c in w.rd_cmds) == P.NET_HDR + len(frame)
        assert [(c["fidx"], c["host"], c["length"]) for c in w.wr_cmds] == \
            [(2, rx_addr, P.NET_HDR + len(frame))]
    w.run(body)


# ---- 2. indirect descriptors -------------------------------------------------------------

@pytest.mark.parametrize("negotiated", [True, False])
def test_indirect_tx(negotiated):
    w = World(indirect=0b010 if negotiated else 0)
    frame = make_frame(mac(2), mac(1), 100, seed=3)
    tx_head = w.send(1, frame, indirect=True)
    rx_head, rx_addr = w.post_rx(2)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        ctr = await w.counters(ctx)
        rx, tx = w.vq[2, RXQ], w.vq[1, TXQ]
        if negotiated:
            w.check_rx(2, rx_addr, frame, 0, rx_head)
            assert rx.used_idx == 1
            assert tx.used_elem(0) == (tx_head, 0) and tx.used_idx == 1
            expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=2)
            assert w.nrs == []
        else:
            assert w.nrs == [1]
            assert w.rd_cmds == [] and w.wr_cmds == []
            assert rx.used_idx == 0 and tx.used_idx == 0
            expect(ctr, DROP_BAD=1)
    w.run(body)


# ---- 3. descriptor loop ------------------------------------------------------------------

def test_descriptor_loop_then_other_function():
    w = World()
    tx1 = w.vq[1, TXQ]
    hdr = w.buffer(bytes(P.NET_HDR), 1)
    tx1.write_desc(0, hdr, P.NET_HDR, D_NEXT, 0)          # 0 -> 0 -> 0 ...
    tx1.post(0)
    frame = make_frame(mac(0), mac(2), 64, seed=5)
    rx_head, rx_addr = w.post_rx(0)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.nrs == [1]
        reads = [t for t in w.tlps if t[0] == "rd" and tx1.desc <= t[1] < tx1.desc + 16 * QSIZE]
        assert len(reads) == QSIZE + 1                    # one more than the queue holds
        assert w.wr_cmds == []                            # nothing was delivered
        # the engine is back to scanning: function 2's frame reaches the PF
        tx_head = w.send(2, frame)
        w.notify(2, TXQ)
        await w.settle(ctx)
        w.check_rx(0, rx_addr, frame, 0, rx_head)
        assert w.vq[0, RXQ].used_idx == 1
        assert w.vq[2, TXQ].used_elem(0) == (tx_head, 0) and w.vq[2, TXQ].used_idx == 1
        ctr = await w.counters(ctx)
        expect(ctr, DROP_BAD=1, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=2)
        assert w.nrs == [1]
    w.run(body)


# ---- 4. interrupt suppression ------------------------------------------------------------

def test_event_idx_due_then_not():
    """used_event 0: the first used buffer (0 -> 1) interrupts, the second (1 -> 2) does not;
    avail_event follows last_avail."""
    w = World(ev_idx=0b100)
    frames = [make_frame(mac(2), mac(1), 100, seed=s) for s in (7, 8)]
    rx = [w.post_rx(2) for _ in frames]
    for fr in frames:
        w.send(1, fr)
    w.vq[2, RXQ].set_used_event(0)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        q = w.vq[2, RXQ]
        assert q.used_idx == 2
        for i, (fr, (head, addr)) in enumerate(zip(frames, rx)):
            w.check_rx(2, addr, fr, i, head)
        assert q.avail_event == 2
        assert w.vq[1, TXQ].avail_event == TAIL_FILL          # function 1: no EVENT_IDX
        assert [i for i in w.irqs if i[0] == 2] == [(2, vec_of(2, RXQ))]
        assert w.isrs.count(2) == 1
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=2, RX_FRAMES=2, QUEUE_IRQS=3, IRQ_SUPPRESSED=1)
    w.run(body)


def test_event_idx_far_suppresses():
    w = World(ev_idx=0b100)
    frame = make_frame(mac(2), mac(1), 100)
    w.send(1, frame)
    rx_head, rx_addr = w.post_rx(2)
    w.vq[2, RXQ].set_used_event(0x7000)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, rx_addr, frame, 0, rx_head)
        assert w.vq[2, RXQ].avail_event == 1
        assert w.irqs == [(1, vec_of(1, TXQ))]
        assert w.isrs == [1]
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=1, IRQ_SUPPRESSED=1)
    w.run(body)


def test_no_interrupt_flag_suppresses():
    w = World()
    frame = make_frame(mac(2), mac(1), 100)
    w.send(1, frame)
    rx_head, rx_addr = w.post_rx(2)
    w.vq[2, RXQ].set_avail_flags(1)                        # VRING_AVAIL_F_NO_INTERRUPT
    w.vq[2, RXQ].set_used_event(0)                         # ignored without EVENT_IDX

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, rx_addr, frame, 0, rx_head)
        assert w.vq[2, RXQ].avail_event == TAIL_FILL
        assert w.irqs == [(1, vec_of(1, TXQ))]
        assert w.isrs == [1]
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=1, IRQ_SUPPRESSED=1)
    w.run(body)


def test_interrupt_decisions_do_not_hold_the_engine():
    """The used_event reads go out through the notification unit (tag vqe), each after the
    used index write it judges, and the engine sends its next accesses while the read is out
    (it used to wait for the answer); every frame arrives, every publication is decided once."""
    lat = 40
    w = World(ev_idx=0b110, cpl_lat=lat)
    frames = [make_frame(mac(2), mac(1), 80 + 8 * i, seed=i) for i in range(4)]
    w.vq[2, RXQ].set_used_event(0)
    w.vq[1, TXQ].set_used_event(0)

    async def body(ctx):
        await w.burst(ctx, frames)
        ue = {w.vq[f, q].avail + 4 + 2 * QSIZE: (f, q) for f, q in ((2, RXQ), (1, TXQ))}
        reads = [(i, a) for i, (kind, a, _, _, _, _, tag) in enumerate(w.tlps)
                 if kind == "rd" and tag == VQE_TAG]
        assert reads and all(a & ~3 in {u & ~3 for u in ue} for _, a in reads), reads
        for i, a in reads:
            f, q = next(v for u, v in ue.items() if u & ~3 == a)
            idx_writes = [j for j, (kind, wa, n, fbe, *_) in enumerate(w.tlps[:i])
                          if kind == "wr" and wa == w.vq[f, q].used and fbe == 0xC]
            assert idx_writes, f"the used_event read at {i} came before any used index write"
        overlapped = [i for i, _ in reads
                      if any(w.tlp_at[i] < c < w.tlp_at[i] + lat
                             for j, c in enumerate(w.tlp_at) if w.tlps[j][6] != VQE_TAG)]
        assert overlapped, "the engine sent nothing while a notification read was out"
        ctr = await w.counters(ctx)
        assert ctr["QUEUE_IRQS"] + ctr["IRQ_SUPPRESSED"] == len(reads)
        assert ctr["RX_FRAMES"] == len(frames)
    w.run(body)


# ---- 5. uplink ---------------------------------------------------------------------------

def test_uplink_out_and_in():
    """A broadcast goes out on the uplink (byte exact, keep and last right) and to the other
    functions that are up (function 2 takes it into its first buffer; the PF has none:
    DROP_NOBUF); a unicast frame from the uplink reaches its function."""
    w = World()
    bcast = make_frame(b"\xff" * 6, mac(1), 100, seed=9)
    tx_head = w.send(1, bcast)
    inbound = make_frame(mac(2), b"\x00\x11\x22\x33\x44\x55", 90, seed=11)
    b_head, b_addr = w.post_rx(2)
    rx_head, rx_addr = w.post_rx(2)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert len(w.uplink_frames) == 1
        beats = w.uplink_frames[0]
        WB = w.WB
        assert len(beats) == (len(bcast) + WB - 1) // WB
        assert [b["last"] for b in beats] == [0] * (len(beats) - 1) + [1]
        tail = len(bcast) % WB
        assert [b["keep"] for b in beats] == \
            [(1 << WB) - 1] * (len(beats) - 1) + [(1 << (tail or WB)) - 1]
        got = b"".join(b["data"].to_bytes(WB, "little")[:bin(b["keep"]).count("1")]
                       for b in beats)
        assert got == bcast
        assert w.vq[1, TXQ].used_elem(0) == (tx_head, 0) and w.vq[1, TXQ].used_idx == 1
        w.check_rx(2, b_addr, bcast, 0, b_head)
        # and a frame from the uplink to function 2
        w.inject_uplink(inbound)
        await w.settle(ctx)
        w.check_rx(2, rx_addr, inbound, 1, rx_head)
        assert w.vq[2, RXQ].used_idx == 2
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, UPLINK_OUT=1, UPLINK_IN=1, RX_FRAMES=2, DROP_NOBUF=1,
               QUEUE_IRQS=3)
        assert w.irqs == [(2, vec_of(2, RXQ)), (1, vec_of(1, TXQ)), (2, vec_of(2, RXQ))]
        assert len(w.uplink_frames) == 1
    w.run(body)


def test_broadcast_from_uplink_floods_every_function_up():
    """A broadcast from the uplink reaches every function that is up, each in its own receive
    buffer; a function that is down is passed over without a count; a multicast frame from
    a function goes to the uplink and the other functions, never back to the sender."""
    w = World()
    arp = make_frame(b"\xff" * 6, b"\x00\x11\x22\x33\x44\x55", 60, seed=30)
    mcast = make_frame(b"\x01\x00\x5e\x00\x00\x01", mac(0), 70, seed=31)
    bufs = {f: [w.post_rx(f) for _ in range(2)] for f in (0, 1, 2)}
    w.send(0, mcast)

    async def body(ctx):
        w.live &= ~(1 << 1)                    # function 1 is down
        w.inject_uplink(arp)
        await w.settle(ctx)
        for f in (0, 2):
            w.check_rx(f, bufs[f][0][1], arp, 0, bufs[f][0][0])
        assert w.vq[1, RXQ].used_idx == 0
        w.live |= 1 << 1
        w.notify(0, TXQ)
        await w.settle(ctx)
        assert len(w.uplink_frames) == 1
        w.check_rx(1, bufs[1][0][1], mcast, 0, bufs[1][0][0])
        w.check_rx(2, bufs[2][1][1], mcast, 1, bufs[2][1][0])
        assert w.vq[0, RXQ].used_idx == 1                 # not back to the sender
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, UPLINK_OUT=1, UPLINK_IN=1, RX_FRAMES=4, QUEUE_IRQS=5)
    w.run(body)


# ---- 6. translation ----------------------------------------------------------------------

@pytest.mark.parametrize("blocked_first", [False, True])
def test_blocked_buffer_needs_reset(blocked_first):
    """A transmit buffer outside the function's domain sets NEEDS_RESET with nothing moved
    from it, whether it comes last or first (then its move fails while the next descriptor
    is being read ahead)."""
    LIMIT = 0x80000
    w = World(xlate_limit=LIMIT)
    frame = make_frame(mac(2), mac(1), 100)
    vq = w.vq[1, TXQ]
    hdr = w.buffer(bytes(P.NET_HDR), 1)
    far = 0x90000                                          # outside function 1's domain
    w.regions.append((far, far + len(frame), 1))
    w.put(far, frame)
    bufs = [(hdr, P.NET_HDR, 0), (far, len(frame), 0)]
    vq.chain(bufs[::-1] if blocked_first else bufs)
    w.post_rx(2)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.nrs == [1]
        assert any(r["fidx"] == 1 and r["iova"] == far for r in w.xreqs)
        assert all(c["host"] < LIMIT for c in w.rd_cmds)   # nothing moved from there
        assert all(t[1] < LIMIT for t in w.tlps)
        assert vq.used_idx == 0 and w.vq[2, RXQ].used_idx == 0
        assert w.wr_cmds == []
        ctr = await w.counters(ctx)
        expect(ctr, DROP_BAD=1, XLATE_ERRORS=1)
    w.run(body)


# ---- 7. receive chains, single-descriptor transmit --------------------------------------

def test_rx_chain_header_only_first_buffer():
    """A header-only first buffer (12 bytes), then the frame across two more buffers; the
    frame sent as one descriptor holding header and frame."""
    w = World()
    frame = make_frame(mac(0), mac(1), 100, seed=13)
    tx_head = w.send(1, frame, single=True)
    rx_head, rx_addr = w.post_rx_chain(0, [P.NET_HDR, 64, 2048])

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(0, rx_addr, frame, 0, rx_head)            # contiguous buffers
        assert w.vq[0, RXQ].used_idx == 1
        assert [(c["host"], c["length"]) for c in w.wr_cmds] == \
            [(rx_addr, 12), (rx_addr + 12, 64), (rx_addr + 76, 36)]
        assert [c["length"] for c in w.rd_cmds] == [P.NET_HDR + len(frame)]   # one piece
        assert w.vq[1, TXQ].used_elem(0) == (tx_head, 0)
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=2)
    w.run(body)


def test_rx_buffer_too_small_reports_no_data():
    """A 64-byte receive buffer for a 100-byte frame: the frame is dropped (DROP_SIZE) and the
    buffer returned; the used element must not claim a (truncated) frame was written."""
    w = World()
    frame = make_frame(mac(2), mac(1), 100, seed=15)
    tx_head = w.send(1, frame)
    rx_head, rx_addr = w.post_rx(2, size=64)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.vq[1, TXQ].used_elem(0) == (tx_head, 0) and w.vq[1, TXQ].used_idx == 1
        assert w.vq[2, RXQ].used_idx == 1                     # the buffer is given back
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, DROP_SIZE=1, QUEUE_IRQS=2)
        assert w.vq[2, RXQ].used_elem(0) == (rx_head, 0)
    w.run(body)


# ---- 8. a translated domain: pieces cut at 4 KiB pages ----------------------------------

def test_domain_pieces_cut_at_pages():
    XOFF = 0x80000
    w = World(xoff=XOFF)
    frame = make_frame(mac(2), mac(1), 100, seed=17)
    tx_head = w.send(1, frame, at=0x2FD0)                   # 48 bytes, then 52 on the next page
    rx_head, rx_addr = w.post_rx(2, at=0x4FF0)               # header 12 + 4, then 96

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, rx_addr, frame, 0, rx_head)
        assert w.vq[2, RXQ].used_idx == 1
        assert w.vq[1, TXQ].used_elem(0) == (tx_head, 0) and w.vq[1, TXQ].used_idx == 1
        assert [(c["host"], c["length"]) for c in w.rd_cmds[1:]] == \
            [(XOFF + 0x2FD0, 48), (XOFF + 0x3000, 52)]
        card0 = w.rd_cmds[1]["card"]
        assert w.rd_cmds[2]["card"] == card0 + 48
        assert [(c["host"], c["length"]) for c in w.wr_cmds] == \
            [(XOFF + 0x4FF0, 16), (XOFF + 0x5000, 96)]
        iovas = [r["iova"] for r in w.xreqs]
        for a in (0x2FD0, 0x3000, 0x4FF0, 0x5000):
            assert a in iovas
        assert all(r["fidx"] in (1, 2) for r in w.xreqs)
        assert all(t[1] >= XOFF for t in w.tlps)                # bus addresses only
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, RX_FRAMES=1, QUEUE_IRQS=2)
    w.run(body)


# ---- 9. buffers at any byte address, MRG_RXBUF, the top of the address space -----------

@pytest.mark.parametrize("W", [64, 128])
def test_buffers_at_any_byte_address(W):
    """Linux's layout: one transmit descriptor holding header and frame at an address = 2 mod
    4 with a length no multiple of 4; receive buffers at odd addresses. Byte exact both ways,
    nothing dropped."""
    w = World(W)
    frames = [make_frame(mac(2), mac(1), n, seed=n) for n in (42, 85, 1514, 61, 97)]
    heads = [w.send(1, f, single=True, at=w.brk + 2 + 16 * i) for i, f in enumerate(frames)]
    rx = [w.post_rx(2, size=1530, at=w.brk + off) for off in (1, 3, 64, 2, 7)]

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx, limit=60000)
        for i, f in enumerate(frames):
            w.check_rx(2, rx[i][1], f, i, rx[i][0])
            assert w.vq[1, TXQ].used_elem(i) == (heads[i], 0)
        assert w.vq[2, RXQ].used_idx == len(frames)
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=5, RX_FRAMES=5, QUEUE_IRQS=10)
    w.run(body)


def check_merged(w, f, bufs, frame, first_elem=0):
    """A frame spread over receive buffers ``bufs`` [(head, addr, size)] as MRG_RXBUF says:
    the header (num_buffers = buffers used) at the start of the first, then the frame filling
    each buffer in turn, one used element per buffer with what it holds."""
    data = bytes(10) + len(bufs).to_bytes(2, "little") + frame
    vq = w.vq[f, RXQ]
    at = 0
    for i, (head, addr, size) in enumerate(bufs):
        n = min(size, len(data) - at)
        got = bytes(w.mem[addr + w.xoff:addr + w.xoff + n])
        assert got == data[at:at + n], f"buffer {i}"
        assert vq.used_elem(first_elem + i) == (head, n), f"used element {i}"
        at += n
    assert at == len(data)


@pytest.mark.parametrize("W", [64, 128])
def test_mrg_rxbuf_frame_spans_buffers(W):
    """With MRG_RXBUF a 1000-byte frame fills 300-byte buffers in turn: num_buffers 4 in the
    first one's header, four used elements, one used index update and one interrupt; then a
    60-byte frame takes one buffer (num_buffers 1)."""
    w = World(W, mrg=0b100)
    big = make_frame(mac(2), mac(1), 1000, seed=21)
    small = make_frame(mac(2), mac(1), 60, seed=22)
    w.send(1, big)
    w.send(1, small)
    bufs = []
    for off in (0, 5, 2, 64, 3):
        head, addr = w.post_rx(2, size=300, at=w.brk + off)
        bufs.append((head, addr, 300))

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        check_merged(w, 2, bufs[:4], big)
        check_merged(w, 2, bufs[4:], small, first_elem=4)
        assert w.vq[2, RXQ].used_idx == 5
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=2, RX_FRAMES=2, QUEUE_IRQS=4)
        assert [i for i in w.irqs if i[0] == 2] == [(2, vec_of(2, RXQ))] * 2
    w.run(body)


def test_mrg_rxbuf_out_of_buffers_gives_them_back_empty():
    """A frame that needs three buffers where two are posted: both come back with length 0
    (the driver frees them as runts), the frame counts as DROP_NOBUF; the next frame, with
    buffers posted, arrives."""
    w = World(mrg=0b100)
    big = make_frame(mac(2), mac(1), 700, seed=23)
    w.send(1, big)
    bufs = [w.post_rx(2, size=300) for _ in range(2)]

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        rx = w.vq[2, RXQ]
        assert rx.used_idx == 2
        assert [rx.used_elem(i) for i in range(2)] == [(bufs[0][0], 0), (bufs[1][0], 0)]
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, DROP_NOBUF=1, QUEUE_IRQS=2)
        more = [w.post_rx(2, size=2048)]
        w.send(1, big)
        w.notify(1, TXQ)
        await w.settle(ctx)
        check_merged(w, 2, [(more[0][0], more[0][1], 2048)], big, first_elem=2)
    w.run(body)


def test_mrg_rxbuf_first_buffer_smaller_than_header_dropped():
    """With MRG_RXBUF the first buffer must hold the whole header: a first buffer of 8 bytes
    drops the frame (DROP_SIZE) and comes back empty; a chain of 8 + 2048 bytes is one buffer
    big enough, the header split across its descriptors."""
    w = World(mrg=0b100)
    frame = make_frame(mac(2), mac(1), 100, seed=24)
    w.send(1, frame)
    w.send(1, frame)
    small = w.post_rx(2, size=8)
    head, addr = w.post_rx_chain(2, [8, 2048])

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.vq[2, RXQ].used_elem(0) == (small[0], 0)
        check_merged(w, 2, [(head, addr, 2056)], frame, first_elem=1)
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=2, RX_FRAMES=1, DROP_SIZE=1, QUEUE_IRQS=4)
    w.run(body)


def test_mrg_rxbuf_event_idx_interrupts_for_a_merged_frame():
    """EVENT_IDX with used_event 0: a frame over 4 buffers moves the used index 0 -> 4, which
    passes used_event: the receive interrupt fires (vring_need_event counts all 4)."""
    w = World(ev_idx=0b100, mrg=0b100)
    big = make_frame(mac(2), mac(1), 1000, seed=21)
    w.send(1, big)
    bufs = []
    for _ in range(4):
        head, addr = w.post_rx(2, size=300)
        bufs.append((head, addr, 300))
    w.vq[2, RXQ].set_used_event(0)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        check_merged(w, 2, bufs, big)
        assert [i for i in w.irqs if i[0] == 2] == [(2, vec_of(2, RXQ))], w.irqs
    w.run(body)


def test_mrg_rxbuf_frame_larger_than_the_whole_ring():
    """Eight 100-byte buffers (the whole ring) for a 1000-byte frame: a legal ring too small
    for it; the buffers come back empty (DROP_NOBUF), no NEEDS_RESET."""
    w = World(mrg=0b100)
    w.send(1, make_frame(mac(2), mac(1), 1000, seed=21))
    for _ in range(QSIZE):
        w.post_rx(2, size=100)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.nrs == []
        rx = w.vq[2, RXQ]
        assert rx.used_idx == QSIZE and all(rx.used_elem(i)[1] == 0 for i in range(QSIZE))
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=1, DROP_NOBUF=1, QUEUE_IRQS=2)
    w.run(body)


@pytest.mark.parametrize("W", [64, 128])
@pytest.mark.parametrize("off", [0, 1, 2, 3])
def test_mrg_rxbuf_num_buffers_at_every_offset(W, off):
    """num_buffers (header bytes 10, 11) at every byte position of a DW (at offset 1 the field
    straddles two DWs), and split across two descriptors of the first buffer."""
    w = World(W, mrg=0b100)
    big = make_frame(mac(2), mac(1), 700, seed=21)
    w.send(1, big)
    w.send(1, big)
    bufs = []
    for i in range(3):
        head, addr = w.post_rx(2, size=300, at=w.brk + (off if i == 0 else 7))
        bufs.append((head, addr, 300))
    head, addr = w.post_rx_chain(2, [11, 289])            # byte 10 in one, byte 11 in the next
    more = [w.post_rx(2, size=300) for _ in range(2)]

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        check_merged(w, 2, bufs, big)
        check_merged(w, 2, [(head, addr, 300)] + [(h, a, 300) for h, a in more], big,
                     first_elem=3)
        assert w.vq[2, RXQ].used_idx == 6
    w.run(body)


def test_flood_with_one_receiver_running_dry():
    """A 700-byte broadcast from the uplink: function 0's one 300-byte buffer runs dry (given
    back empty), function 1 takes it over three buffers, function 2 in one; nobody is reset."""
    w = World(mrg=0b111)
    bc = make_frame(b"\xff" * 6, b"\x00\x11\x22\x33\x44\x55", 700, seed=3)
    b0 = [w.post_rx(0, size=300)]
    b1 = [w.post_rx(1, size=300) for _ in range(3)]
    b2 = [w.post_rx(2, size=2048)]

    async def body(ctx):
        w.inject_uplink(bc)
        await w.settle(ctx)
        assert w.vq[0, RXQ].used_idx == 1 and w.vq[0, RXQ].used_elem(0) == (b0[0][0], 0)
        check_merged(w, 1, [(h, a, 300) for h, a in b1], bc)
        check_merged(w, 2, [(b2[0][0], b2[0][1], 2048)], bc)
        assert w.nrs == []
        ctr = await w.counters(ctx)
        expect(ctr, UPLINK_IN=1, RX_FRAMES=2, DROP_NOBUF=1, QUEUE_IRQS=3)
    w.run(body)


@pytest.mark.parametrize("direction", ["rx", "tx"])
def test_buffer_past_top_of_address_space(direction):
    """A buffer at 2**64 - 16 of 2048 bytes would wrap to bus address 0: the function is set
    NEEDS_RESET before any byte moves (no DMA command at all), and the other function's
    traffic goes on."""
    w = World()
    top = 2**64 - 16
    frame = make_frame(mac(2), mac(1), 100, seed=25)
    if direction == "rx":
        w.send(1, frame)
        w.vq[2, RXQ].chain([(top, 2048, D_WRITE)])
    else:
        w.vq[1, TXQ].chain([(top, 2048, 0)])
    bad = 2 if direction == "rx" else 1
    good = 3 - bad
    ok_frame = make_frame(mac(good), mac(0), 80, seed=26)
    w.send(0, ok_frame)
    rx_head, rx_addr = w.post_rx(good)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.nrs == [bad]
        assert all(c["host"] < MEM_SIZE for c in w.rd_cmds + w.wr_cmds)
        w.notify(0, TXQ)
        await w.settle(ctx)
        w.check_rx(good, rx_addr, ok_frame, 0, rx_head)
    w.run(body)


# ---- the available-ring cache --------------------------------------------------------------

def avail_reads(w, f, q, since=0):
    """The reads the engine made of queue ``(f, q)``'s available index and entries (from TLP
    ``since`` on; not those of the flags alone, for interrupt suppression): (address, DWs)."""
    vq = w.vq[f, q]
    return [(a, n) for kind, a, n, fbe, *_ in w.tlps[since:]
            if kind == "rd" and vq.avail <= a < vq.avail + r4(6 + 2 * vq.size)
            and not (a == vq.avail and fbe == 0x3)]


def test_avail_window_one_read_for_several_frames():
    """Six frames made available at once cost each queue one read of the available index and
    one window of entries (not two reads per frame); the next six cross the ring's end, where a
    window stops (2 entries), and arrive byte exact."""
    w = World()
    frames = [make_frame(mac(2), mac(1), 60 + 7 * i, seed=i) for i in range(12)]

    async def body(ctx):
        for k, batch in enumerate((frames[:6], frames[6:])):
            first = len(w.tlps)
            rx = [w.post_rx(2) for _ in batch]
            for f in batch:
                w.send(1, f, single=True)
            w.notify(1, TXQ)
            await w.settle(ctx)
            base = w.vq[2, RXQ].used_idx - len(batch)
            for i, ((head, addr), f) in enumerate(zip(rx, batch)):
                w.check_rx(2, addr, f, base + i, head)
            tx = avail_reads(w, 1, TXQ, first)
            rx_reads = avail_reads(w, 2, RXQ, first)
            msg = (tx, rx_reads)
            if k == 0:
                # TX: the index, one window of 6 (3 DWs), the index again when it runs out;
                # RX: the index, one window
                assert [n for _, n in tx] == [1, 3, 1], msg
                assert [n for _, n in rx_reads] == [1, 3], msg
            else:
                # entries 6..11: a window of 2 up to the ring's end, then one of 4 from 0
                assert [n for _, n in tx] == [1, 1, 2, 1], msg
                assert [n for _, n in rx_reads] == [1, 1, 2], msg
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=12, RX_FRAMES=12, QUEUE_IRQS=24)
    w.run(body)


def test_avail_cache_forgotten_at_reset():
    """Entries cached from a ring are not used after the function's virtio reset: the new ring
    (other descriptor indices) is read afresh."""
    w = World()

    async def body(ctx):
        bufs = [w.post_rx(2) for _ in range(4)]
        f1 = make_frame(mac(2), mac(1), 80, seed=1)
        w.send(1, f1)
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, bufs[0][1], f1, 0, bufs[0][0])
        # function 2 reset; its driver sets the receive queue up again elsewhere
        w.vresets.append(2)
        vq = w.vq[2, RXQ] = Vq(w, QSIZE, 2)
        vq.next_desc = 5
        i = 2 * NQ + RXQ
        for k, a in enumerate((vq.desc, vq.avail, vq.used)):
            ctx.set(w.top.qaddr[4 * i + k], a)
        head, addr = w.post_rx(2)
        assert head == 5
        f2 = make_frame(mac(2), mac(1), 90, seed=2)
        w.send(1, f2)
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, addr, f2, 0, head)
        assert w.nrs == []
    w.run(body)


# ---- descriptors read ahead ------------------------------------------------------------------

@pytest.mark.parametrize("indirect", [False, True])
def test_next_descriptor_read_while_buffer_moves(indirect):
    """A transmit chain's next descriptor is read while the buffer before it moves (each read
    goes out before the move of the buffer before it is done), directly and in an indirect
    table, and the frame arrives whole."""
    w = World(indirect=0b010 if indirect else 0)     # (negotiated by VF1)
    f = make_frame(mac(2), mac(1), 1400, seed=3)
    data = bytes(P.NET_HDR) + f
    cut = [0, 700, 1000, len(data)]                  # three buffers: 700, 300, the rest

    async def body(ctx):
        head_rx, addr = w.post_rx(2)
        bufs = [(w.buffer(data[a:b], 1), b - a, 0) for a, b in zip(cut, cut[1:])]
        tx = w.vq[1, TXQ]
        if indirect:
            table = w.alloc(16 * len(bufs), 16, 1)
            for i, (a, n, _) in enumerate(bufs):
                last = i == len(bufs) - 1
                tx.write_desc(i, a, n, 0 if last else D_NEXT, 0 if last else i + 1, table=table)
            tx.chain([(table, 16 * len(bufs), D_INDIRECT)])
            desc_at = [table + 16 * i for i in range(1, len(bufs))]
        else:
            tx.chain(bufs)
            desc_at = [tx.desc + 16 * i for i in range(1, len(bufs))]
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, addr, f, 0, head_rx)
        reads = {a: c for (kind, a, *_), c in zip(w.tlps, w.tlp_at) if kind == "rd"}
        for i, a in enumerate(desc_at):
            assert reads[a] < w.rd_done_at[i], (i, reads[a], w.rd_done_at)
        assert w.nrs == []
    w.run(body)


@pytest.mark.parametrize("W", [64, 128])
def test_next_chain_head_read_while_frame_moves(W):
    """Frames in one descriptor each: the next frame's head descriptor (from the
    available-ring window) is read while the frame before it moves, once (it is not read
    again when its turn comes), and every frame arrives whole and in order."""
    w = World(W)
    frames = [make_frame(mac(2), mac(1), 200 + 40 * i, seed=i) for i in range(5)]

    async def body(ctx):
        heads = await w.burst(ctx, frames)
        tx = w.vq[1, TXQ]
        desc_reads = [(a, c) for (kind, a, *_), c in zip(w.tlps, w.tlp_at)
                      if kind == "rd" and tx.desc <= a < tx.desc + 16 * tx.size]
        assert [a for a, _ in desc_reads] == [tx.desc + 16 * h for h in heads]
        for k in range(1, len(frames)):
            assert desc_reads[k][1] < w.rd_done_at[k - 1], (k, desc_reads, w.rd_done_at)
    w.run(body)


def test_read_ahead_kept_per_function():
    """Two functions transmitting in turn (round robin) each keep the head they read ahead:
    no descriptor of either is read twice, and every frame arrives in order."""
    w = World()
    frames = {f: [make_frame(mac(2), mac(f), 100 + 10 * i, seed=10 * f + i) for i in range(4)]
              for f in (0, 1)}

    async def body(ctx):
        rx = [w.post_rx(2) for _ in range(8)]
        for f in (0, 1):
            for fr in frames[f]:
                w.send(f, fr, single=True)
        w.notify(0, TXQ)
        w.notify(1, TXQ)
        await w.settle(ctx)
        got = []
        for i, (head, addr) in enumerate(rx):
            n = w.vq[2, RXQ].used_elem(i)[1] - P.NET_HDR
            got.append(bytes(w.mem[addr + P.NET_HDR:addr + P.NET_HDR + n]))
        for f in (0, 1):
            assert [g for g in got if g[6:12] == mac(f)] == frames[f]
            tx = w.vq[f, TXQ]
            reads = [a for kind, a, *_ in w.tlps
                     if kind == "rd" and tx.desc <= a < tx.desc + 16 * tx.size]
            assert len(reads) == len(set(reads)) == 4, [hex(a) for a in reads]
    w.run(body)


def test_read_ahead_forgotten_at_reset():
    """A head descriptor read ahead is not used after the function's virtio reset: VF1 is
    stopped while its first frame moves (the second frame's head is read ahead then), reset,
    and its driver sets the queue up again with another frame at the same head index; that
    frame is the one that leaves."""
    w = World()
    old = [make_frame(mac(2), mac(1), 300, seed=i) for i in range(2)]
    new = make_frame(mac(2), mac(1), 500, seed=9)

    async def body(ctx):
        bus = RegBus(ctx, w.top.eng.bus)
        rx = [w.post_rx(2) for _ in range(3)]
        for f in old:
            w.send(1, f, single=True)
        w.notify(1, TXQ)
        for _ in range(2000):
            await ctx.tick()
            if w.rd_cmds:
                break
        await bus.wr(0, MigRegs.SEL, 1, bar=2)
        await bus.wr(0, MigRegs.CTRL, 1, bar=2)          # stop: the second frame waits
        await w.settle(ctx)
        assert len(w.rd_cmds) == 1
        w.vresets.append(1)
        await w.settle(ctx)
        # the driver starts over: fresh rings, head 1 now describes ``new``
        w.vq[1, TXQ] = fresh = Vq(w, QSIZE, 1)
        i = 1 * NQ + TXQ
        for k, at in enumerate((fresh.desc, fresh.avail, fresh.used)):
            ctx.set(w.top.qaddr[4 * i + k], at)
        fresh.next_desc = 1
        fresh.chain([(w.buffer(bytes(P.NET_HDR) + new, 1), P.NET_HDR + len(new), 0)])
        await bus.wr(0, MigRegs.CTRL, 0, bar=2)
        w.notify(1, TXQ)
        await w.settle(ctx)
        # VF2 got the first frame and then ``new`` (never the frame the old head 1 described)
        assert w.vq[2, RXQ].used_idx == 2
        w.check_rx(2, rx[0][1], old[0], 0, rx[0][0])
        w.check_rx(2, rx[1][1], new, 1, rx[1][0])
    w.run(body)


def rx_desc_reads(w, f, tag=None):
    """(cycle, tag, descriptor index) of each read of function ``f``'s receive descriptors."""
    rxq = w.vq[f, RXQ]
    return [(c, t, (a - rxq.desc) // 16) for (kind, a, _, _, _, _, t), c in zip(w.tlps, w.tlp_at)
            if kind == "rd" and rxq.desc <= a < rxq.desc + 16 * rxq.size
            and (tag is None or t == tag)]


@pytest.mark.parametrize("W", [64, 128])
def test_receive_heads_read_ahead_per_function(W):
    """After a delivery the function's next receive head (from the window) is read by the
    prefetch unit (tag vqp) while the engine goes on; the next frame for it takes the
    descriptor from there: the engine itself reads only the first, every frame arrives whole
    and in order, and no receive descriptor is read twice."""
    w = World(W, cpl_lat=30)
    frames = [make_frame(mac(2), mac(1), 90 + 20 * i, seed=i) for i in range(5)]

    async def body(ctx):
        await w.burst(ctx, frames)
        own = rx_desc_reads(w, 2, VQ_TAG)
        ahead = rx_desc_reads(w, 2, VQP_TAG)
        assert [d for _, _, d in own] == [0], own
        assert [d for _, _, d in ahead] == [1, 2, 3, 4], ahead    # (none posted after the 5th)
        # each read ahead went out before the frame it serves had even left VF1
        for k, (c, _, _) in enumerate(ahead):
            assert c < w.rd_done_at[k + 1], (k, ahead, w.rd_done_at)
    w.run(body)


def test_receive_read_ahead_forgotten_at_restore():
    """VF2's next receive head (position 1, head 1) is read ahead after its first frame; VF2 is
    then stopped and its indices restored (a VF state import), after which head 1 describes
    another buffer: the next frame lands there, never in the buffer read ahead. (Without the
    record forgotten at the restore, position and head would both match.)"""
    w = World()
    frames = [make_frame(mac(2), mac(1), 120, seed=i) for i in range(2)]

    async def body(ctx):
        bus = RegBus(ctx, w.top.eng.bus)
        old = [w.post_rx(2) for _ in range(2)]
        w.send(1, frames[0], single=True)
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, old[0][1], frames[0], 0, old[0][0])
        assert [d for _, _, d in rx_desc_reads(w, 2, VQP_TAG)] == [1]
        await bus.wr(0, MigRegs.SEL, 2, bar=2)
        await bus.wr(0, MigRegs.CTRL, 1, bar=2)
        new_at = w.alloc(2048, 16, 2)
        w.put(new_at, bytes([RX_FILL]) * 2048)
        w.vq[2, RXQ].write_desc(1, new_at, 2048, D_WRITE)
        await bus.wr(0, MigRegs.Q_SEL, RXQ, bar=2)
        await bus.wr(0, MigRegs.Q_AVAIL, 1, bar=2)
        await bus.wr(0, MigRegs.CTRL, 0, bar=2)
        w.send(1, frames[1], single=True)
        w.notify(1, TXQ)
        await w.settle(ctx)
        w.check_rx(2, new_at, frames[1], 1, old[1][0])
        assert bytes(w.mem[old[1][1]:old[1][1] + 64]) == bytes([RX_FILL]) * 64
    w.run(body)


def test_descriptor_read_ahead_of_the_wrong_direction():
    """The descriptor read ahead is judged like any other: a device-writable one in a
    transmit chain sets NEEDS_RESET once the buffer before it has moved, and nothing is
    moved from it."""
    w = World()
    frame = make_frame(mac(2), mac(1), 100)
    hdr = w.buffer(bytes(P.NET_HDR), 1)
    fa = w.buffer(frame, 1)
    w.vq[1, TXQ].chain([(hdr, P.NET_HDR, 0), (fa, len(frame), D_WRITE)])
    w.post_rx(2)

    async def body(ctx):
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.nrs == [1]
        assert [c["host"] for c in w.rd_cmds] == [hdr]
        assert w.wr_cmds == [] and w.vq[1, TXQ].used_idx == 0
        ctr = await w.counters(ctx)
        expect(ctr, DROP_BAD=1)
    w.run(body)


# ---- used-ring coalescing (NetRegs.COAL) ----------------------------------------------------

def used_idx_writes(w, f, q, since=0):
    """How many times the engine wrote queue ``(f, q)``'s used index."""
    vq = w.vq[f, q]
    return sum(1 for kind, a, n, fbe, *_ in w.tlps[since:]
               if kind == "wr" and a == vq.used and n == 1 and fbe == 0xC)


async def set_queue_coal(ctx, w, f, q, value):
    """NetRegs.COAL_Q of function ``f``'s queue ``q`` (through MigRegs.SEL)."""
    bus = RegBus(ctx, w.top.eng.bus)
    await bus.wr(0, MigRegs.SEL, f, bar=2)
    await bus.wr(0, NetRegs.COAL_Q + 4 * q, value, bar=2)


@pytest.mark.parametrize("coal,pubs", [(8, (1, 1)), (3, (2, 2)), (1, (6, 6))])
def test_coalescing_publishes_in_batches(coal, pubs):
    """Six frames VF1 -> VF2 with COAL = ``coal``: the transmit queue publishes when ``coal``
    elements are due and at its last known entry, the receive queue when ``coal`` are due and
    once the engine has nothing else to do; every frame arrives, every element is in the used
    rings in order, and there is one interrupt per publication."""
    w = World(coal=coal | 1024 << 16)
    frames = [make_frame(mac(2), mac(1), 64 + i, seed=i) for i in range(6)]

    async def body(ctx):
        heads = await w.burst(ctx, frames)
        tx = w.vq[1, TXQ]
        assert tx.used_idx == 6 and [tx.used_elem(i)[0] for i in range(6)] == heads
        assert (used_idx_writes(w, 1, TXQ), used_idx_writes(w, 2, RXQ)) == pubs
        ctr = await w.counters(ctx)
        expect(ctr, TX_FRAMES=6, RX_FRAMES=6, QUEUE_IRQS=sum(pubs))
    w.run(body)


@pytest.mark.parametrize("own", [False, True])
def test_coalescing_time_limit(own):
    """A receiver held back while another function keeps the engine busy is published within
    the time limit (COAL bits 31:16), not only when the engine goes idle; with ``own`` the
    default would hold it to the end and the queue's own limit (COAL_Q) applies."""
    w = World(coal=200 | (60000 if own else 60) << 16)
    frames = [make_frame(mac(2), mac(1), 600, seed=i) for i in range(6)]

    async def body(ctx):
        if own:
            await set_queue_coal(ctx, w, 2, RXQ, NetRegs.COAL_Q_OWN | 200 | 60 << 16)
        for _ in frames:
            w.post_rx(2)
        for f in frames:
            w.send(1, f, single=True)
        w.notify(1, TXQ)
        seen = []
        for _ in range(6000):
            await ctx.tick()
            seen.append(w.vq[2, RXQ].used_idx)
            if seen[-1] == 6:
                break
        await w.settle(ctx)
        # published in several steps while VF1's burst went on, not all at the end
        steps = sorted(set(seen) - {0})
        assert len(steps) >= 3 and steps[-1] == 6, steps
    w.run(body)


def test_queue_coalescing_registers_read_back():
    """COAL_Q keeps a setting per queue of the selected function: what was written reads back
    (bits 7:0, OWN, 31:16; the rest reads 0), a queue never written reads 0, and a write
    while SEL names no function is ignored (and reads 0)."""
    w = World()

    async def body(ctx):
        bus = RegBus(ctx, w.top.eng.bus)
        await set_queue_coal(ctx, w, 2, RXQ, 0xFFFF_FFFF)
        await set_queue_coal(ctx, w, 1, TXQ, 5 | 77 << 16)          # not OWN
        await set_queue_coal(ctx, w, 0xFF, RXQ, NetRegs.COAL_Q_OWN | 9)
        got = {}
        for f in range(3):
            await bus.wr(0, MigRegs.SEL, f, bar=2)
            for q in (RXQ, TXQ):
                got[f, q] = await bus.rd(0, NetRegs.COAL_Q + 4 * q, bar=2)
        assert got == {(0, RXQ): 0, (0, TXQ): 0, (1, RXQ): 0, (1, TXQ): 5 | 77 << 16,
                       (2, RXQ): 0xFFFF_01FF, (2, TXQ): 0}
        assert await bus.rd(0, NetRegs.COAL, bar=2) == w.coal
    w.run(body)


@pytest.mark.parametrize("own", [1, 3])
def test_queue_coalescing_overrides_the_default(own):
    """With COAL = 8 for every queue, VF2's receive queue set to its own count ``own`` (OWN)
    publishes every ``own`` elements while VF1's transmit queue, on the default, publishes
    once; a queue's own setting without OWN changes nothing."""
    w = World(coal=8 | 1024 << 16)
    frames = [make_frame(mac(2), mac(1), 64 + i, seed=i) for i in range(6)]

    async def body(ctx):
        await set_queue_coal(ctx, w, 2, RXQ, NetRegs.COAL_Q_OWN | own | 1024 << 16)
        await set_queue_coal(ctx, w, 1, TXQ, 1 | 1024 << 16)          # not OWN: ignored
        rx = [w.post_rx(2) for _ in frames]
        for f in frames:
            w.send(1, f, single=True)
        w.notify(1, TXQ)
        await w.settle(ctx)
        for i, ((head, addr), f) in enumerate(zip(rx, frames)):
            w.check_rx(2, addr, f, i, head)
        assert (used_idx_writes(w, 1, TXQ), used_idx_writes(w, 2, RXQ)) == (1, 6 // own)
    w.run(body)


@pytest.mark.parametrize("W", [64, 128])
def test_uplink_out_a_word_per_clock_and_back_pressure(W):
    """A frame leaves by the uplink a word per clock when the uplink is ready, and intact
    when it is not ready in random clocks."""
    import random
    rnd = random.Random(W)
    for pattern in ("always", "random"):
        w = World(W)
        if pattern == "random":
            w.uplink_ready = lambda cycle: int(rnd.random() < 0.5)
        frame = make_frame(b"\x02\x11\x22\x33\x44\x55", mac(1), 1514, seed=3)
        w.send(1, frame)
        valid_clocks = []

        async def body(ctx):
            w.notify(1, TXQ)
            for _ in range(20000):
                await ctx.tick()
                if ctx.get(w.top.eng.uplink_tx.valid):
                    valid_clocks.append(w.cycle)
                if w.uplink_frames:
                    break
            await w.settle(ctx)
            beats = w.uplink_frames[0]
            got = b"".join(b["data"].to_bytes(w.WB, "little")[:bin(b["keep"]).count("1")]
                           for b in beats)
            assert got == frame
            if pattern == "always":
                n = (len(frame) + w.WB - 1) // w.WB
                assert len(valid_clocks) == n and valid_clocks[-1] - valid_clocks[0] == n - 1
        w.run(body)


# ---- multiqueue ---------------------------------------------------------------------------

CTLQ = 2 * V.MAX_PAIRS


def ctrl_cmd(w, f, cls, cmd, data, ack=True):
    """A control command on function ``f``'s control queue (class, command and data in one
    buffer, the ack byte in another: two descriptors of the small test queue); returns the
    ack buffer's address."""
    h = w.buffer(bytes([cls, cmd]) + data, f)
    chain = [(h, 2 + len(data), 0)]
    a = None
    if ack:
        a = w.buffer(b"\xee", f)
        chain.append((a, 1, D_WRITE))
    w.vq[f, CTLQ].chain(chain)
    w.notify(f, CTLQ)
    return a


def test_control_queue_pairs_and_receive_steering():
    """VQ_PAIRS_SET is answered in the ack byte (OK for 1..MAX_PAIRS with MQ, ERR otherwise),
    its used element has length 1 and is published at once (no coalescing); a frame goes back
    to the pair its flow was last sent from by the receiver, while that pair is in use; a
    transmit queue of any pair is served; a command with no ack buffer sets NEEDS_RESET."""
    w = World(mq=0b110, coal=8)
    two = (2).to_bytes(2, "little")

    async def body(ctx):
        acks = [ctrl_cmd(w, 1, V.CTRL_MQ, V.CTRL_MQ_VQ_PAIRS_SET, v.to_bytes(2, "little"))
                for v in (0, V.MAX_PAIRS + 1, 3)]
        await w.settle(ctx)
        assert [w.mem[a] for a in acks] == [V.CTRL_ERR, V.CTRL_ERR, V.CTRL_OK]
        cq = w.vq[1, CTLQ]
        assert cq.used_idx == 3 and [cq.used_elem(i)[1] for i in range(3)] == [1, 1, 1]
        # function 2 sends a frame of a flow on pair 2: frames of that flow for it come
        # back on its pair 2; another flow (never sent) on pair 0
        fl = make_frame(mac(1), mac(2), 80, seed=3)
        ack = ctrl_cmd(w, 2, V.CTRL_MQ, V.CTRL_MQ_VQ_PAIRS_SET, (V.MAX_PAIRS).to_bytes(2, "little"))
        await w.settle(ctx)
        assert w.mem[ack] == V.CTRL_OK
        vq = w.vq[2, 5]
        a = w.buffer(bytes(P.NET_HDR) + fl, 2)
        vq.chain([(a, P.NET_HDR + len(fl), 0)])
        rx1 = w.post_rx(1)
        w.notify(2, 5)
        await w.settle(ctx)
        w.check_rx(1, rx1[1], fl, 0, rx1[0])          # function 1 knew no flow: pair 0
        assert vq.used_idx == 1
        back = fl[6:12] + fl[0:6] + fl[12:]            # the same flow the other way
        assert steering_bucket(back) == steering_bucket(fl)
        other = next(f for f in (make_frame(mac(2), mac(1), 80, seed=k) for k in range(4, 40))
                     if steering_bucket(f) != steering_bucket(fl))
        got = {}
        for q in (0, 4):
            got[q] = w.vq[2, q].chain([(w.alloc(2048, 16, 2), 2048, D_WRITE)])
        for f in (back, other):
            w.send(1, f, single=True)
        w.notify(1, TXQ)
        await w.settle(ctx)
        assert w.vq[2, 4].used_idx == 1 and w.vq[2, 0].used_idx == 1
        # a command without an ack buffer: NEEDS_RESET on that function only
        ctrl_cmd(w, 1, V.CTRL_MQ, V.CTRL_MQ_VQ_PAIRS_SET, two, ack=False)
        await w.settle(ctx)
        assert w.nrs == [1]
    w.run(body)
