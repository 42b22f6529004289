"""The virtio-net engine: split virtqueues of every function and the frame switch between them.

One engine serves every function (PF and VFs), one frame at a time, visiting functions round
robin (one transmitted frame per visit):

* **queues**: each function has ``MAX_PAIRS`` queue pairs (receiveq(k) = 2k, transmitq(k) =
  2k + 1) and a control queue (2 * MAX_PAIRS with VIRTIO_NET_F_MQ, 2 with CTRL_VQ alone);
  pairs beyond the first are used once the driver sent VQ_PAIRS_SET;
* **transmit** (any transmit queue; a function's pending ones round robin, one frame per
  visit of the function): on a notification, read the available index, the head, then walk the
  descriptor chain (chained and, when negotiated, indirect descriptors) and copy each
  device-readable buffer into frame buffer slot 0 through the DMA read channel;
* **control** (the control queue, before the function's transmit queues): the chain's
  device-readable buffers are gathered like a frame (their first four bytes caught on the way:
  class, command, data), the first device-writable buffer takes the ack byte: VIRTIO_NET_OK
  for VQ_PAIRS_SET of 1..MAX_PAIRS with MQ negotiated, VIRTIO_NET_ERR for anything else; a
  command without room for its ack, or a readable buffer after a writable one, sets
  NEEDS_RESET. Its used element (length 1) is published at once (the driver waits for it);
* **switch**: the destination MAC (captured as the frame lands in the buffer) is looked up in
  the station table (:mod:`hdl.virtio.mac_table`, a programmable address per function, reset value
  ``02:0f:fc:00:00:<n>``): the frame goes to that function's receive queue; unknown
  destinations go to the uplink port (``uplink_tx``); broadcast and multicast ones go to the
  uplink and then to every other function that is up (live, bus master, not stopped), one
  after the other (a function that is down is passed over);
* **receive steering**: a frame for a function goes to the receive queue of the pair its flow
  was last sent from by that function, while the pair is in use, else pair 0 (virtio 1.2,
  5.1.6.5.6: automatic receive steering); the flow is a bucket of a symmetric hash
  (:func:`steering_bucket`) kept per function in block RAM;
* **receive**: a fresh ``virtio_net_hdr`` goes into the frame buffer before the
  frame, and header and frame, one byte string, into the function's next available chain
  through the DMA write channel (any byte address, any layout of the chain), then the used
  element and index. With ``VIRTIO_NET_F_MRG_RXBUF`` a frame that does not fit one buffer fills
  the next ones in turn (one used element each, published together by one used-index write)
  and the first header's ``num_buffers`` is written before that index; a ring that runs dry
  in mid-frame (or is too small for the frame) gets the buffers it gave back empty (length 0)
  and the frame is counted in ``DROP_NOBUF``;
* **completion**: the used element (id, length) and index of each queue, ``avail_event`` when
  VIRTIO_F_EVENT_IDX is negotiated, and the queue's MSI-X vector unless suppressed
  (``used_event`` with EVENT_IDX, else the available ring's NO_INTERRUPT flag). That field is
  read after the used index is written, by the notification unit (:mod:`hdl.virtio.notify`,
  its own host port and tag): the engine hands it the decision and goes on with the next
  frame while the read is out;
* **checksums** (:mod:`hdl.virtio.csum`): a transmitted frame with ``NEEDS_CSUM`` from a
  function that negotiated ``VIRTIO_NET_F_CSUM`` gets its checksum filled in before it goes
  anywhere (offsets outside the frame drop it, ``DROP_CSUM``); a frame for a function that
  negotiated ``VIRTIO_NET_F_GUEST_CSUM`` has its TCP / UDP checksum checked, and its receive
  header says ``DATA_VALID`` when it holds. Both take a pass over the frame's first words only;
  a frame nobody asked this of skips it;
* **read ahead**: while a transmit buffer moves (a round trip to host memory), the host port
  reads the descriptor the walk needs next (the chain's next one, or the head of the queue's
  next chain when the available-ring window holds it) into a store of one entry per function's
  transmit queue; the walk takes it from there once, and a reset, a restore or NEEDS_RESET
  forgets it. When a delivery ends, the function's next receive head (when the window holds
  it) is read by the prefetch unit (:mod:`hdl.virtio.prefetch`, its own host port and tag)
  into a record per function tied to its ring position, which the next frame for the function
  takes instead of a round trip;
* **resets**: the engine reports the functions whose frame it holds (``transport.holds``); the
  transport holds a driver's reset of such a function back until the engine lets it go, so
  nothing is written for a function after its driver saw the reset complete;
* frames from the uplink port (``uplink_rx``) are delivered by destination MAC likewise; one
  for no function is dropped, or with ``NetRegs.CTRL`` DEFAULT_PF delivered to the PF (the
  host's own switch port). DEFAULT_PF also sends the PF the unicast frames of a stopped
  function (``MigRegs.CTRL``): during a live migration the host holds them and forwards them
  to the server the guest moves to (a flood passes a stopped function over; the PF, when up,
  gets it anyway).

Buffers move through the piece mover (:class:`hdl.dma.mover.PieceMover`, ``move``), which
translates them a page at a time and drives the DMA channels. Small structures (indices, ring
entries, descriptors) are read and written with the engine's own MemRd/MemWr through its host
port (:class:`hdl.pcie.host_port.HostPort`, tag
``HOST_TAGS["vq"]``, the function's requester ID). Bad input never hangs the
engine: a descriptor loop (more descriptors than the queue holds), an index beyond the queue,
a descriptor of the wrong direction, a bad indirect table or an available index running ahead
by more than the queue size sets the function's NEEDS_RESET and stops its queues, and so does
a buffer whose end passes the top of the 64-bit space (before any byte of it moves); runts,
oversized frames and receive buffers too small drop the frame and count it. Every address the
driver gives (rings, descriptors, buffers) is an I/O virtual address of the function's domain
when the PF gave it one (:mod:`hdl.iommu.translate`): each small access and each buffer piece (cut
at 4 KiB pages) is translated first, and an address outside the domain, or not present, sets
NEEDS_RESET before anything moves there (counted in ``XLATE_ERRORS``).
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from regmap import VirtioRegs as V

from ..config import CardConfig
from ..memmap import PacketBuf as P
from ..iface import (IrqRequestSignature, XlateReq, XlateResp, EventSignature, PktReadPort,
                     PktWritePort, UplinkBeat, LinkSignature, FunctionStateSignature)
from ..dma.mover import MoveSignature, MoveStatus
from ..pcie.host_port import HostPort, HOST_TAGS
from ..pcie.tlp import tlp_stream, Dw0, CplDw2, hdr_dw
from ..pcie.tx_arbiter import TlpArbiter
from ..dma.mux import LockMux
from .csum import ChecksumUnit, DATA_VALID
from .mac_table import MacLookupSignature
from .net_regs import NET_EVENTS, NetEventsSignature, MigrationSignature
from .notify import NotifyUnit
from .prefetch import RxPrefetch
from .transport import NQ, VirtqSignature, times_nq

__all__ = ["VirtioNetEngine", "AVAIL_WINDOW", "STEER_BUCKETS", "steering_bucket"]
RXQ, TXQ = 0, 1                    # pair 0's queues; receiveq(k) = 2k, transmitq(k) = 2k + 1
QP = V.MAX_PAIRS
STEER_BUCKETS = 16                 # flows a function's receive steering tells apart
DESC_NEXT, DESC_WRITE, DESC_INDIRECT = 1, 2, 4
AVAIL_WINDOW = 8                   # available-ring entries one read fetches at most (4 DWs)


def steering_bucket(frame: bytes) -> int:
    """The receive-steering bucket the engine gives an Ethernet frame (a model of its hash, for
    tests and tools): the 4-bit XOR fold of destination ^ source MAC and, for IPv4, of the
    source ^ destination address ^ the two 16-bit words after a 20-byte header (TCP / UDP
    ports). It is symmetric: a flow's frames both ways share a bucket."""
    le = lambda b: int.from_bytes(b, "little")

    def fold(v, bits):
        x = 0
        for i in range(0, bits, 4):
            x ^= v >> i & 15
        return x
    h = fold(le(frame[0:6]) ^ le(frame[6:12]), 48)
    if frame[12:14] == b"\x08\x00":
        h ^= fold(le(frame[26:30]) ^ le(frame[30:34]) ^ le(frame[34:36]) ^ le(frame[36:38]), 32)
    return h


class VirtioNetEngine(wiring.Component):
    def __init__(self, cfg: CardConfig):
        self._card = cfg
        nf = cfg.num_functions
        W = cfg.data_width
        super().__init__({
            "tx":       Out(tlp_stream(W)),
            "cpl":      In(tlp_stream(W)),            # completions of its host port's reads
            "unexp":    Out(1),                       # one of them came when none was awaited
            "move":     Out(MoveSignature()),         # buffers, through the piece mover
            "irq":      Out(IrqRequestSignature()),
            "xreq":     Out(stream.Signature(XlateReq)),    # the host port's translations
            "xresp":    In(stream.Signature(XlateResp)),
            "link":     In(LinkSignature()),
            "fn":       In(FunctionStateSignature(nf)),
            "transport": Out(VirtqSignature(nf)),     # hdl.virtio.transport
            "mig":      In(MigrationSignature(nf)),   # hdl.virtio.net_regs
            "events":   Out(NetEventsSignature()),    # counted there
            "mac":      Out(MacLookupSignature()),    # the station table
            # frame buffers
            "pm_rd":    Out(PktReadPort(W)),
            "pm_wr":    Out(PktWritePort(W)),
            "pm_own":   Out(1),                       # the engine drives the frame buffer ports
            "snoop":    In(PktWritePort(W)),          # what the read channel writes there
            "uplink_tx": Out(stream.Signature(UplinkBeat(W))),
            "uplink_rx": In(stream.Signature(UplinkBeat(W))),
            # the management block: QoS and telemetry
            "tx_allow": In(nf, init=(1 << nf) - 1),   # the function's rate limiter lets it send
            "tx_ev":    Out(EventSignature(12)),      # a frame taken from a transmit queue
            "rx_ev":    Out(EventSignature(12)),      # a frame delivered into a receive queue
            "qos_wait": Out(EventSignature()),        # a ready transmit queue held back
        })

    def elaborate(self, platform):
        cfg = self._card
        m = Module()
        nf = cfg.num_functions
        nvec = cfg.msix_vectors
        W = cfg.data_width
        WB = W // 8
        LB = exact_log2(WB)
        HDR_OFF = (-P.NET_HDR) % WB                 # the frame starts on a word
        FRAME_OFF = HDR_OFF + P.NET_HDR
        PKT_MAX = P.SLOT - HDR_OFF                  # bytes a slot holds from the header on

        # ---- the registers' block: counted events, migration controls ----------------------
        inc = {n.upper(): getattr(self.events, n) for n in NET_EVENTS}
        mg = self.mig
        mig_sel, mig_stop, net_ctrl = mg.sel, mg.stop, mg.default_pf
        coal = mg.coal               # used elements the current queue may hold back (0, 1:
        coal_time = mg.coal_time     # none) and clocks the oldest may wait (from its LOADQ1)
        mig_busy = mg.busy           # the engine holds work of function ``mig_sel``
        mt = self.mac

        cf = Signal(8)                               # the function being served
        cq = Signal(range(NQ))                       # ... and its queue
        qi = Signal(range(nf * NQ))
        m.d.comb += qi.eq(times_nq(cf) + cq)
        # ---- per-queue indices: a RAM of one word per queue (``fidx * NQ + q``), a 16-bit
        #      lane per index (last_avail in lane 0, the used index in lane 1). A lane whose
        #      ``qx_zero`` flag is set reads 0: a reset sets the flags of the function's lanes
        #      at once (a RAM cannot clear several words in a cycle), a write clears the
        #      flags of the lanes it writes. The engine reads the current queue's word (``qi``,
        #      a cycle of latency) and writes lanes of it back with every change; the
        #      migration registers read the selected queue's word through a port of their
        #      own and restore a lane through the engine's write port in a cycle the engine
        #      leaves it free.
        m.submodules.indices = qx_mem = Memory(shape=32, depth=nf * NQ, init=[])
        qx_wr = qx_mem.write_port(granularity=16)
        qx_rd = qx_mem.read_port(transparent_for=(qx_wr,))
        qx_mg = qx_mem.read_port(transparent_for=(qx_wr,))
        qx_zero = Signal(nf * NQ * 2, init=(1 << (nf * NQ * 2)) - 1)
        qx_set = Signal(nf * NQ * 2)       # flags set / cleared this cycle
        qx_clr = Signal(nf * NQ * 2)
        m.d.sync += qx_zero.eq((qx_zero & ~qx_clr) | qx_set)
        mg_qi = Signal(range(nf * NQ))     # the queue the migration registers select
        mg_qi_q = Signal.like(mg_qi)       # ... as the read port has it
        m.d.sync += mg_qi_q.eq(mg_qi)

        def lane_value(port, at, lane):
            """Lane ``lane`` of queue word ``at`` as read by ``port`` (0 while its flag says it
            was reset)."""
            return Mux(qx_zero.bit_select(Cat(C(lane, 1), at), 1), 0, port.data.word_select(lane, 16))

        la = Signal(16)            # the current queue's last_avail and used index (working
        ui = Signal(16)            # copies loaded at LOADQ1, written back with every change)
        eng_we = Signal(2)         # the engine writes the current queue's lanes (la, ui)
        eng_la = Signal(16)
        eng_ui = Signal(16)
        mw_pend = Signal()         # a migration restore waiting for the write port
        mw_qi = Signal(range(nf * NQ))
        mw_lane = Signal()
        mw_val = Signal(16)
        m.d.comb += [qx_rd.addr.eq(qi), mg_qi.eq(times_nq(mig_sel) + mg.q), qx_mg.addr.eq(mg_qi)]
        with m.If(eng_we != 0):
            m.d.comb += [qx_wr.addr.eq(qi), qx_wr.data.eq(Cat(eng_la, eng_ui)),
                         qx_wr.en.eq(eng_we), qx_clr.bit_select(Cat(C(0, 1), qi), 2).eq(eng_we)]
        with m.Elif(mw_pend):
            m.d.comb += [qx_wr.addr.eq(mw_qi), qx_wr.data.eq(mw_val.replicate(2)),
                         qx_wr.en.bit_select(mw_lane, 1).eq(1),
                         qx_clr.bit_select(Cat(mw_lane, mw_qi), 1).eq(1)]
            m.d.sync += mw_pend.eq(0)
        # transmit notifications not yet served: per function and pair, and the control queue
        txq_pend = Signal(nf * QP)
        ctl_pend = Signal(nf)
        # the selected queue's device-internal state, for the registers to read
        m.d.comb += [mg.q_avail.eq(lane_value(qx_mg, mg_qi_q, 0)),
                     mg.q_used.eq(lane_value(qx_mg, mg_qi_q, 1)),
                     mg.tx_pend.eq(txq_pend.word_select(mig_sel, QP).any()
                                   | ctl_pend.bit_select(mig_sel, 1))]

        # ---- multiqueue: per function the queue pairs in use (VIRTIO_NET_CTRL_MQ) and the
        #      control queue's place; flags of the current queue's role
        tp = self.transport
        pairs_m1 = Array(Signal(range(QP), name=f"pairs_m1_{i}") for i in range(nf))

        def ctl_q(g):
            """Function ``g``'s control queue: after the last pair with MQ, else queue 2."""
            return Mux(tp.mq.bit_select(g, 1), 2 * QP, 2)
        q_ctl = Signal()
        q_tx = Signal()
        q_rx = Signal()
        m.d.comb += [q_ctl.eq(tp.ctrl.bit_select(cf, 1) & (cq == ctl_q(cf))),
                     q_tx.eq(cq[0]), q_rx.eq(~cq[0] & ~q_ctl)]

        rr_pair = Array(Signal(range(QP), name=f"rr_pair{i}") for i in range(nf))   # last served

        def no_more():
            """The current transmit (or control) queue has nothing more to take."""
            with m.If(q_tx):
                m.d.sync += txq_pend.bit_select(cf * QP + (cq >> 1), 1).eq(0)
            with m.Elif(q_ctl):
                m.d.sync += ctl_pend.bit_select(cf, 1).eq(0)

        def forget_pending(g):
            m.d.sync += [txq_pend.word_select(g, QP).eq(0), ctl_pend.bit_select(g, 1).eq(0)]

        # ---- host port: the engine's own small reads and writes, translated in the function's
        #      domain (HOST_TAGS["vq"], the function's requester ID) ----------------------------
        m.submodules.hport = hp = HostPort(W, HOST_TAGS["vq"], max_dw=4, translate=True)
        # ... and the notification unit's (tag HOST_TAGS["vqe"]): the interrupt decisions, off
        # the engine's path. Their TLPs share the engine's stream (the unit's read follows the
        # writes it depends on), their translations the engine's translator port, and their
        # completions come in on ``cpl``, told apart by tag.
        # ... and the receive prefetch unit's (tag HOST_TAGS["vqp"]): the next receive chain's
        # head descriptor, per function, read while the engine goes on
        m.submodules.notify = nt = NotifyUnit(W, nf, nvec)
        m.submodules.prefetch = pf = RxPrefetch(W, nf)
        ports = {"port": hp, "notify": nt, "prefetch": pf}
        m.submodules.tx_arb = tx_arb = TlpArbiter(tuple(ports), W)
        m.submodules.x_mux = x_mux = LockMux(XlateReq, XlateResp, tuple(ports))
        for name, port in ports.items():
            wiring.connect(m, port.tx, getattr(tx_arb, f"i_{name}"))
            wiring.connect(m, port.xreq, getattr(x_mux, f"{name}_cmd"))
            wiring.connect(m, getattr(x_mux, f"{name}_done"), port.xresp)
        wiring.connect(m, tx_arb.o, wiring.flipped(self.tx))
        wiring.connect(m, x_mux.cmd, wiring.flipped(self.xreq))
        wiring.connect(m, wiring.flipped(self.xresp), x_mux.done)
        c = self.cpl
        ctag = Cat(data.View(CplDw2, hdr_dw(c.p.hdr, 2)).tag,
                   data.View(Dw0, hdr_dw(c.p.hdr, 0)).tag8,
                   data.View(Dw0, hdr_dw(c.p.hdr, 0)).tag9)
        c_pkt = Signal(2)          # the port whose completion is under way
        c_to = Signal(2)
        m.d.comb += c_to.eq(Mux(c.p.sop, Mux(ctag == HOST_TAGS["vqe"], 1,
                                             Mux(ctag == HOST_TAGS["vqp"], 2, 0)), c_pkt))
        with m.If(c.valid & c.ready):
            m.d.sync += c_pkt.eq(c_to)
        for k, port in enumerate(ports.values()):
            m.d.comb += [port.cpl.p.eq(c.p), port.cpl.valid.eq(c.valid & (c_to == k)),
                         port.bus_num.eq(self.link.bus_num)]
        m.d.comb += [c.ready.eq(Array(port.cpl.ready for port in ports.values())[c_to]),
                     self.unexp.eq(hp.unexp | nt.unexp | pf.unexp), hp.req.p.fidx.eq(cf)]
        # the unit's interrupts and counts
        wiring.connect(m, nt.irq, wiring.flipped(self.irq))
        m.d.comb += [self.transport.isr_set.eq(nt.isr_set),
                     self.transport.isr_fidx.eq(nt.isr_fidx),
                     inc["QUEUE_IRQS"].eq(nt.fired), inc["IRQ_SUPPRESSED"].eq(nt.suppressed)]
        nt_ev = Signal()           # the ask the engine hands the unit: used_event or flags,
        nt_addr = Signal(64)       # and where
        h_done, h_err, h_rdata = hp.done, hp.err, hp.rdata
        mx_xerr = Signal()         # a buffer piece's translation failed (until the next access)
        # a descriptor read ahead while a transmit buffer moved (the chain's next one, or
        # the head of the queue's next chain): table (indirect or not), index and its 16
        # bytes, one per function's transmit queue (block RAM, ``pd_val`` says it is good) and
        # a working copy of the current queue's; used once, by the walk that comes to it. An
        # available chain's descriptors do not change until it is used (virtio 1.2, 2.7.13);
        # a reset, a restore or NEEDS_RESET forgets it
        pd_rec = data.StructLayout({"desc": 128, "di": 16, "ind": 1, "qi": range(nf * NQ)})
        m.submodules.read_ahead = pd_mem = Memory(shape=pd_rec, depth=nf, init=[])
        pd_rd = pd_mem.read_port()
        pd_wr = pd_mem.write_port()
        pd_val = Signal(nf)
        pd = Signal(128)
        pd_ok = Signal()
        pd_qi = Signal(range(nf * NQ))
        pd_ind = Signal()
        pd_di = Signal(16)
        pd_kill = Signal()         # forget it (wins over the engine's own updates)
        use_pd = Signal()          # the walk takes the descriptor from ``pd``
        ra_wait = Signal()         # a read ahead is out
        mv_seen = Signal()         # the move's status came (``mv_status``)
        mv_status = Signal(2)
        with m.If(hp.req.valid & hp.req.ready):
            m.d.sync += mx_xerr.eq(0)

        # ---- current queue ---------------------------------------------------------------------
        m.d.comb += [self.transport.qr_fidx.eq(cf), self.transport.qr_q.eq(cq),
                     self.transport.qa_fidx.eq(cf), self.transport.qa_q.eq(cq)]
        desc_base = Signal(64)
        drv_base = Signal(64)
        dev_base = Signal(64)
        qsize = Signal(9)          # the queue's size, enable and vector (registered at LOADQ2)
        q_en = Signal()
        q_vec = Signal(16)
        qmask = Signal(9)
        m.d.comb += qmask.eq(qsize - 1)

        # The engine asks the host port only when it is free (idle, or reporting ``done`` in
        # this very cycle), so a request is always taken in the cycle it is made.
        def hread(addr, ndw, fbe=0xF):
            m.d.comb += [hp.req.valid.eq(1), hp.req.p.write.eq(0), hp.req.p.addr.eq(addr),
                         hp.req.p.ndw.eq(ndw), hp.req.p.fbe.eq(fbe),
                         hp.req.p.lbe.eq(0 if ndw == 1 else 0xF)]

        def hwrite(addr, ndw, wdata, fbe=0xF, lbe=0xF):
            m.d.comb += [hp.req.valid.eq(1), hp.req.p.write.eq(1), hp.req.p.addr.eq(addr),
                         hp.req.p.ndw.eq(ndw), hp.req.p.wdata.eq(wdata), hp.req.p.fbe.eq(fbe),
                         hp.req.p.lbe.eq(lbe if ndw > 1 else 0)]

        # ---- frame state -------------------------------------------------------------------------
        head = Signal(16)
        di = Signal(16)                    # descriptor index in the table being walked
        ind = Signal()                     # walking an indirect table
        ind_base = Signal(64)
        ind_n = Signal(16)
        count = Signal(17)
        d_raw = Signal(128)
        d_addr = d_raw[0:64]
        d_len = d_raw[64:96]
        d_flags = d_raw[96:112]
        d_next = d_raw[112:128]
        cur_addr = Signal(64)
        cur_len = Signal(32)
        cur_flags = Signal(16)
        cur_next = Signal(16)
        total = Signal(17)                 # bytes gathered (transmit) / written (receive)
        frame_len = Signal(16)
        drop = Signal()
        slot = Signal()                    # frame buffer slot of the frame being delivered
        dst = Signal(48)
        tx_f = Signal(8)
        tx_q = Signal(range(NQ))           # the transmit queue the frame came from
        ack_seen = Signal()                # a command's device-writable buffer was seen:
        ack_at = Signal(64)                # ... where its first byte is
        ack_ok = Signal()                  # ... and it has room for the ack
        ack_val = Signal(8)
        tx_head = Signal(16)
        phase = Signal(2)                  # 0 transmit, 1 receive for a transmitted frame, 2 uplink
        first = Signal()
        space_host = Signal(64)
        space = Signal(32)
        used_len = Signal(32)
        nb = Signal(16)                    # used elements written for this frame so far
        more = Signal()                    # the frame goes on in another receive buffer
        buf_start = Signal(17)             # ``total`` where the current receive buffer began
        nb_lo_at = Signal(64)              # where the header's num_buffers bytes went
        nb_hi_at = Signal(64)
        pub_n = Signal(16)                 # used elements the last used-index write added
        nbuf_q = Signal(16)                # num_buffers of a frame that spans buffers
        ab = Signal(16)                    # used elements taken back so far (RX_AB)
        flood = Signal()                   # a broadcast / multicast frame: to every function
        fl_g = Signal(range(nf + 1))       # the next function to flood to
        ret_rx = Signal()                  # LOADQ returns to the receive path
        ret_used = Signal()                # ... to the transmit completion
        ret_flush = Signal()               # ... to publish what the queue held back
        ptr = Signal(range(nf))
        k = Signal(range(P.SLOT // WB + 2))
        nwords = Signal(range(P.SLOT // WB + 2))

        # fields of a frame caught as it is written into the frame buffers
        sn = self.snoop

        def capture(reg, at, word_mask=None):
            """Byte ``i`` of ``reg`` from slot byte ``at + i`` as it is written (the word
            address compared under ``word_mask``: any slot)."""
            addr = sn.addr if word_mask is None else sn.addr & word_mask
            for i in range(len(reg) // 8):
                word, lane = divmod(at + i, WB)
                with m.If((addr == word) & sn.en[lane]):
                    m.d.sync += reg.word_select(i, 8).eq(sn.data[8 * lane:8 * lane + 8])

        capture(dst, FRAME_OFF)          # the destination MAC, as a transmitted frame lands in slot 0
        # a control command's class, command and first two data bytes (slot 0, where a
        # transmitted chain's first bytes land)
        cmd_b = Signal(32)
        capture(cmd_b, HDR_OFF)
        # the fields a flow is told by, as a frame lands in either slot: source MAC,
        # EtherType, IPv4 protocol, addresses and the first four bytes after a 20-byte IPv4
        # header (TCP / UDP ports); its bucket is a symmetric hash (the same both ways)
        in_slot = P.SLOT // WB - 1
        f_src = Signal(48)
        f_type = Signal(16)
        f_ip = Signal(64)
        f_ports = Signal(32)
        capture(f_src, FRAME_OFF + 6, in_slot)
        capture(f_type, FRAME_OFF + 12, in_slot)
        capture(f_ip, FRAME_OFF + 26, in_slot)
        capture(f_ports, FRAME_OFF + 34, in_slot)

        def fold(v, n=4):
            out = 0
            for i in range(0, len(v), n):
                out = out ^ v[i:i + n]
            return out
        flow_h = Signal(range(STEER_BUCKETS))
        is_ip4 = f_type == 0x0008                  # 0x0800, bytes in wire order
        m.d.comb += flow_h.eq(fold(dst ^ f_src)
                              ^ Mux(is_ip4, fold(f_ip[:32] ^ f_ip[32:] ^ f_ports[:16]
                                                 ^ f_ports[16:]), 0))
        # per function, the pair each flow bucket was last sent from (block RAM)
        m.submodules.steering = st_mem = Memory(shape=range(QP), depth=nf * STEER_BUCKETS,
                                                init=[])
        st_wr = st_mem.write_port()
        st_rd = st_mem.read_port(transparent_for=(st_wr,))
        m.d.comb += st_rd.addr.eq(cf * STEER_BUCKETS + flow_h)

        # the checksum unit sees every write into the frame buffers; it borrows their ports
        # for its pass
        m.submodules.csum = cu = ChecksumUnit(W)
        m.d.comb += [cu.snoop.addr.eq(sn.addr), cu.snoop.data.eq(sn.data), cu.snoop.en.eq(sn.en),
                     cu.rd.data.eq(self.pm_rd.data)]
        with m.If(cu.busy):
            m.d.comb += [self.pm_own.eq(1), self.pm_rd.addr.eq(cu.rd.addr),
                         self.pm_rd.en.eq(cu.rd.en), self.pm_wr.addr.eq(cu.wr.addr),
                         self.pm_wr.data.eq(cu.wr.data), self.pm_wr.en.eq(cu.wr.en)]
        gcsum = self.transport.gcsum
        data_valid = Signal()               # the frame's TCP / UDP checksum was checked, held

        def checksum_pass(fill, check, nxt):
            """Start the checksum unit on the frame in ``slot`` (in the state after the frame's
            length is set) unless it has nothing to do; ``nxt`` is where the frame goes on."""
            m.d.comb += [cu.slot.eq(slot), cu.length.eq(frame_len), cu.fill.eq(fill),
                         cu.check.eq(check), cu.start.eq(fill | check)]
            m.d.sync += data_valid.eq(0)
            with m.If(fill | check):
                m.next = "CSUM_WAIT"
            with m.Else():
                m.next = nxt

        def card_addr(s, off):
            return P.BASE + s * P.SLOT + HDR_OFF + off

        # the station table follows ``dst`` a clock later; the engine looks at it only once
        # the whole frame is in (a frame has at least MIN_FRAME bytes: several beats)
        m.d.comb += mt.dst.eq(dst)
        is_ours = mt.hit

        # the available ring's entry for the next buffer (``nb`` of this frame already taken)
        pos = Signal(16)                   # that entry's position (free-running index)
        ring_at = Signal(64)
        m.d.comb += [pos.eq(la + nb),
                     ring_at.eq(drv_base + 4 + ((pos & qmask) << 1))]

        # ---- the available-ring cache, per queue (block RAM): the available index last read
        #      and a window of the entries after the next one to take, fetched by one read.
        #      Entries the driver has made available do not change until they are used
        #      (virtio 1.2, 2.7.13), so a queue visit needs neither read while the window
        #      lasts. ``cval`` (per queue) says the record is good; a reset, a restore of the
        #      indices or NEEDS_RESET clears it.
        cache_rec = data.StructLayout({"idx": 16, "base": 16, "cnt": range(AVAIL_WINDOW + 1),
                                       "heads": data.ArrayLayout(16, AVAIL_WINDOW),
                                       # used elements written, not yet published
                                       "unpub": 9})
        m.submodules.avail_cache = cmem = Memory(shape=cache_rec, depth=nf * NQ, init=[])
        c_rd = cmem.read_port()
        c_wr = cmem.write_port()
        cval = Signal(nf * NQ)
        pend_pub = Signal(nf * NQ)         # the queue holds used elements back (``unpub``)
        # clocks until the earliest deadline of what the queues hold back (each queue's own
        # time limit, counted from its first element held back); at 0 the scan publishes
        # everything held back as it passes the functions
        pub_left = Signal(16)
        hold_new = Signal()                # the current queue holds back (another) element
        idle_run = Signal(range(nf + 1))   # scan steps in a row that found nothing to do
        with m.If(hold_new & ((pend_pub == 0) | (coal_time < pub_left))):
            m.d.sync += pub_left.eq(coal_time)
        with m.Elif(pub_left != 0):
            m.d.sync += pub_left.eq(pub_left - 1)
        cur = Signal(cache_rec)            # the current queue's record (loaded at LOADQ2)
        c_ok = Signal()                    # ... and it is good
        c_wb = Signal()                    # write ``cur`` back next cycle
        c_lost = Signal()                  # the current function's records were invalidated
        inv_cur = Signal()                 # ... in this very cycle
        m.d.comb += [pd_rd.addr.eq(cf), pd_wr.addr.eq(cf), pf.rd_fidx.eq(cf)]
        m.d.comb += [c_rd.addr.eq(qi), c_rd.en.eq(1), mg.coal_q.eq(qi),
                     c_wr.addr.eq(qi), c_wr.data.eq(cur), c_wr.en.eq(c_wb)]
        m.d.sync += c_wb.eq(0)
        with m.If(c_wb & ~c_lost):
            m.d.sync += cval.bit_select(qi, 1).eq(1)

        def invalidate(g):
            """Function ``g``'s records are no good any more (nor the descriptor read
            ahead, whoever's it is)."""
            m.d.sync += [cval.bit_select(times_nq(g), NQ).eq(0),
                         pend_pub.bit_select(times_nq(g), NQ).eq(0)]
            m.d.comb += [pd_kill.eq(1), pf.forget.bit_select(g, 1).eq(1)]
            m.d.sync += pd_val.bit_select(g, 1).eq(0)
            with m.If(g == cf):
                m.d.comb += inv_cur.eq(1)
                m.d.sync += [c_lost.eq(1), c_ok.eq(0), cur.cnt.eq(0)]

        def clear_indices(g):
            """Function ``g``'s ring indices back to 0 (the working copies too, when it is the
            current function)."""
            with m.If(g == cf):
                m.d.sync += [la.eq(0), ui.eq(0)]
            with m.If((mw_qi >= times_nq(g)) & (mw_qi < times_nq(g) + NQ)):
                m.d.sync += mw_pend.eq(0)
            m.d.comb += qx_set.bit_select(times_nq(g) << 1, NQ * 2).eq(Const(-1, NQ * 2))
            m.d.sync += pairs_m1[g].eq(0)

        with m.If(self.transport.vreset):
            g = self.transport.vreset_fidx
            forget_pending(g)
            clear_indices(g)
            invalidate(g)
        with m.If(self.fn.vf_reset):
            m.d.sync += [txq_pend.eq(txq_pend & ((1 << QP) - 1)), ctl_pend.eq(ctl_pend & 1)]
            for g in range(1, nf):
                clear_indices(g)
                invalidate(g)
        # restoring a stopped, idle function's indices (the engine does not touch them then)
        for name, lane in (("q_avail", 0), ("q_used", 1)):
            with m.If(getattr(mg, f"set_{name}")):
                m.d.sync += [mw_pend.eq(1), mw_qi.eq(mg_qi), mw_lane.eq(lane),
                             mw_val.eq(mg.wdata)]
                invalidate(mig_sel)
        with m.If(mg.set_tx_pend):
            # (every transmit queue and the control queue: a look at a ring with nothing in
            # it costs only the look)
            m.d.sync += [txq_pend.word_select(mig_sel, QP).eq(Mux(mg.wdata[0], (1 << QP) - 1, 0)),
                         ctl_pend.bit_select(mig_sel, 1).eq(mg.wdata[0]
                                                            & tp.ctrl.bit_select(mig_sel, 1))]

        limit = Mux(ind, ind_n, qsize)


        # the used ring's next free element (after those held back)
        used_at = Signal(16)
        m.d.comb += used_at.eq(ui + cur.unpub)

        def used_len_at(i):
            """The length field of this frame's used element ``i``."""
            return dev_base + 4 + (((used_at + i)[:16] & qmask) << 3) + 4

        def nb_byte(at, value):
            """Write one byte of num_buffers at IOVA ``at``."""
            hwrite(at & ~3, 1, value << Cat(C(0, 3), at[:2]), fbe=(C(1, 4) << at[:2])[:4])

        def publish(n):
            """Issue the used index write for ``n`` new elements and those held back (the
            caller's state waits for no more host-port results) and go on to avail_event / the
            interrupt."""
            tot = Signal(10, name="pub_tot")
            m.d.comb += tot.eq(cur.unpub + n)
            hwrite(dev_base, 1, Cat(C(0, 16), (ui + tot)[:16]), fbe=0xC)
            m.d.comb += [eng_we.eq(0b11), eng_la.eq(la + n), eng_ui.eq(ui + tot)]
            m.d.sync += [ui.eq(ui + tot), la.eq(la + n), pub_n.eq(tot),
                         cur.unpub.eq(0), pend_pub.bit_select(qi, 1).eq(0), c_wb.eq(1)]
            m.next = "AVAIL_EVT"

        def finish(n):
            """``n`` used elements written for a frame: publish them, or hold them back (with
            those before) while fewer than ``coal`` wait and, on a transmit queue, more entries
            are known to be available (the last frame of a burst is published at once, so a
            queue that goes idle has avail_event armed and read behind it). What is held back
            is published when the scan passes the function with nothing to transmit."""
            more = c_ok & ((cur.idx - la - n)[:16] != 0)
            hold = ((coal > 1) & ((cur.unpub + n) < coal) & ~mig_stop.bit_select(cf, 1)
                    & ~q_ctl & (q_rx | more))      # (a driver waits on its control queue)
            with m.If(hold):
                m.d.comb += hold_new.eq(1)
                m.d.comb += [eng_we.eq(0b11), eng_la.eq(la + n), eng_ui.eq(ui)]
                m.d.sync += [la.eq(la + n), cur.unpub.eq(cur.unpub + n),
                             pend_pub.bit_select(qi, 1).eq(1), c_wb.eq(1)]
                m.next = "QDONE"
            with m.Else():
                publish(n)

        # the words of a slot that a fresh virtio_net_hdr (num_buffers 1) takes: (word, data,
        # byte enables), the header being the NET_HDR bytes before the frame
        hdr_words = []
        for word in range(HDR_OFF // WB, (FRAME_OFF - 1) // WB + 1):
            val = en = 0
            for lane in range(WB):
                at = word * WB + lane - HDR_OFF
                if 0 <= at < P.NET_HDR:
                    en |= 1 << lane
                    val |= (1 if at == 10 else 0) << (8 * lane)
            hdr_words.append((word, val, en))
        # a buffer whose end passes the top of the 64-bit space (it would wrap to address 0)
        cur_end = Signal(65)
        m.d.comb += cur_end.eq(cur_addr + cur_len)
        past_top = cur_end[64] & (cur_end[:64] != 0)
        WTOP = P.SLOT // WB

        # buffers move through the piece mover: a transmit buffer into slot 0, a receive
        # buffer's share from the frame's slot
        mv = self.move
        m.d.comb += [mv.cmd.p.fidx.eq(cf), mv.cmd.p.to_host.eq(q_rx),
                     mv.cmd.p.card.eq(Mux(q_rx, card_addr(slot, total), card_addr(0, total))),
                     mv.cmd.p.length.eq(cur_len),
                     mv.cmd.p.iova.eq(Mux(q_rx, space_host, cur_addr))]

        def flush(g):
            """Publish what function ``g``'s queues held back (the lowest queue first)."""
            held = pend_pub.bit_select(times_nq(g), NQ)
            first_q = Signal(range(NQ), name="flush_q")
            for q in reversed(range(NQ)):
                with m.If(held[q]):
                    m.d.comb += first_q.eq(q)
            m.d.sync += [cf.eq(g), ret_rx.eq(0), ret_used.eq(0), ret_flush.eq(1), nb.eq(0),
                         cq.eq(first_q)]
            m.next = "LOADQ0"

        with m.FSM(name="engine") as engine:
            m.d.comb += mig_busy.eq((~engine.ongoing("SCAN")
                                     & ((cf == mig_sel) | ((phase == 1) & (tx_f == mig_sel))))
                                    | (pend_pub.bit_select(times_nq(mig_sel), NQ) != 0)
                                    | nt.holds.bit_select(mig_sel, 1))
            # the functions whose frame is under way (the transport holds back their virtio
            # reset until they are let go: nothing is written for a function after its reset)
            # (and those of the interrupt decisions the notification unit holds, and of a
            # receive descriptor being read ahead)
            m.d.comb += self.transport.holds.eq(
                nt.holds | pf.holds
                | Mux(engine.ongoing("SCAN"), 0,
                      (C(1, nf) << cf)[:nf] | Mux(phase == 1, (C(1, nf) << tx_f)[:nf], 0)))
            with m.State("SCAN"):
                m.d.sync += [phase.eq(0), drop.eq(0), flood.eq(0), fl_g.eq(0), idle_run.eq(0)]
                with m.If(self.uplink_rx.valid):
                    m.d.sync += [k.eq(0), total.eq(0), dst.eq(0)]
                    m.d.comb += cu.clear.eq(1)
                    m.next = "UPIN"
                with m.Else():
                    # a notification (the function's lowest): a transmit queue's or the control
                    # queue's is noted; a receive queue's needs no action (buffers are looked
                    # up when a frame arrives)
                    kf = self.transport.kick.bit_select(times_nq(ptr), NQ)
                    kq = Signal(range(NQ))
                    for q in reversed(range(NQ)):
                        with m.If(kf[q]):
                            m.d.comb += kq.eq(q)
                    # the next transmit queue to serve: the first pending from the pair after
                    # the one served last (round robin between the pairs of a function)
                    tpend = txq_pend.word_select(ptr, QP)
                    nxt_pair = Signal(range(QP))
                    for step in reversed(range(QP)):
                        for last in range(QP):
                            cand = (last + 1 + step) % QP
                            with m.If((rr_pair[ptr] == last) & tpend[cand]):
                                m.d.comb += nxt_pair.eq(cand)
                    up = (self.transport.live.bit_select(ptr, 1) & self.fn.bme.bit_select(ptr, 1)
                          & ~mig_stop.bit_select(ptr, 1))
                    with m.If(kf.any()):
                        m.d.comb += [self.transport.kick_ack.eq(1),
                                     self.transport.kick_idx.eq(times_nq(ptr) + kq)]
                        with m.If(kq[0]):
                            m.d.sync += txq_pend.bit_select(ptr * QP + (kq >> 1), 1).eq(1)
                        with m.Elif(tp.ctrl.bit_select(ptr, 1) & (kq == ctl_q(ptr))):
                            m.d.sync += ctl_pend.bit_select(ptr, 1).eq(1)
                    with m.Elif(pend_pub.bit_select(times_nq(ptr), NQ).any() & (pub_left == 0)):
                        flush(ptr)          # (before its transmit: it may wait no longer)
                    with m.Elif(ctl_pend.bit_select(ptr, 1) & tp.ctrl.bit_select(ptr, 1) & up):
                        m.d.sync += [cf.eq(ptr), cq.eq(ctl_q(ptr)), ret_rx.eq(0), ret_used.eq(0),
                                     ret_flush.eq(0), nb.eq(0)]
                        m.next = "LOADQ0"
                    with m.Elif(tpend.any() & up & self.tx_allow.bit_select(ptr, 1)):
                        m.d.sync += [cf.eq(ptr), cq.eq(Cat(C(1, 1), nxt_pair)), ret_rx.eq(0),
                                     ret_used.eq(0), ret_flush.eq(0), nb.eq(0),
                                     rr_pair[ptr].eq(nxt_pair)]
                        m.d.comb += cu.clear.eq(1)
                        m.next = "LOADQ0"
                    with m.Elif(pend_pub.bit_select(times_nq(ptr), NQ).any() & (idle_run == nf)):
                        flush(ptr)          # the engine has nothing else to do
                    with m.Else():
                        m.d.sync += idle_run.eq(Mux(idle_run == nf, nf, idle_run + 1))
                        m.d.comb += [self.qos_wait.fidx.eq(ptr),
                                     self.qos_wait.stb.eq(tpend.any() & up)]
                        # a notification of a function that is not live is dropped; a
                        # stopped function's state stays as it is (what a restore wrote)
                        with m.If(~self.transport.live.bit_select(ptr, 1)
                                  & ~mig_stop.bit_select(ptr, 1)):
                            forget_pending(ptr)
                        m.d.sync += ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1))

            # -- load the current queue's words (qa port: a cycle of latency), its indices,
            #    available-ring record and descriptor read ahead (addressed by ``cf`` / ``qi``
            #    since the queue was chosen) --
            with m.State("LOADQ0"):
                m.d.comb += self.transport.qa_sel.eq(0)
                m.d.sync += q_en.eq(self.transport.qr_en)
                m.next = "LOADQ1"
            with m.State("LOADQ1"):
                # the indices of ``qi`` (addressed since it was chosen)
                la_q = lane_value(qx_rd, qi, 0)
                m.d.sync += [la.eq(la_q), ui.eq(lane_value(qx_rd, qi, 1))]
                m.d.comb += self.transport.qa_sel.eq(1)
                with m.If(q_tx):              # the queue's descriptor read ahead, if any
                    m.d.sync += [pd.eq(pd_rd.data.desc), pd_di.eq(pd_rd.data.di),
                                 pd_ind.eq(pd_rd.data.ind), pd_qi.eq(pd_rd.data.qi),
                                 pd_ok.eq(pd_val.bit_select(cf, 1) & ~inv_cur)]
                with m.Elif(~q_rx):
                    m.d.sync += pd_ok.eq(0)
                with m.Else():                # the receive chain's head, when prefetched for
                    pf_here = (pf.val.bit_select(cf, 1) & (pf.rd.pos == la_q)  # this position
                               & (pf.rd.q == cq))
                    m.d.sync += [pd.eq(pf.rd.desc), pd_di.eq(pf.rd.head), pd_ind.eq(0),
                                 pd_qi.eq(qi), pd_ok.eq(pf_here & ~inv_cur)]
                    with m.If(pf.val.bit_select(cf, 1) & ~pf_here):
                        m.d.comb += pf.forget.bit_select(cf, 1).eq(1)       # a stale one
                m.d.sync += [desc_base.eq(self.transport.qa_data.lo),
                             drv_base.eq(self.transport.qa_data.hi)]
                m.next = "LOADQ2"
            with m.State("LOADQ2"):
                good = cval.bit_select(qi, 1) & ~inv_cur
                w1 = self.transport.qa_data.hi
                m.d.sync += [dev_base.eq(self.transport.qa_data.lo), qsize.eq(w1[0:9]),
                             q_vec.eq(w1[32:48]), cur.eq(c_rd.data),
                             c_ok.eq(good), c_lost.eq(inv_cur)]
                with m.If(~good):
                    m.d.sync += [cur.cnt.eq(0), cur.idx.eq(la), cur.unpub.eq(0)]
                with m.If(ret_used):
                    m.next = "USED_ELEM"
                with m.Elif(ret_flush):
                    m.next = "FLUSH"
                with m.Elif(~q_en | (w1[0:9] == 0)):
                    with m.If(ret_rx):
                        m.d.comb += inc["DROP_NOBUF"].eq(1)
                        m.next = "RX_DONE"
                    with m.Else():
                        no_more()
                        m.next = "NEXT"
                with m.Else():
                    m.next = "AVAIL_CHECK"

            # -- the available index and the head of the next chain (from the cache when it
            #    has them) --
            with m.State("AVAIL_CHECK"):
                c_ahead = Signal(16)
                m.d.comb += c_ahead.eq(cur.idx - la)
                with m.If(c_ok & (c_ahead > nb) & (c_ahead <= qsize)):
                    m.next = "HEAD_GET"
                with m.Else():
                    hread(drv_base, 1)                       # avail.flags and avail.idx
                    m.next = "AVAIL_IDX"
            with m.State("AVAIL_IDX"):
                with m.If(h_done):
                    aidx = h_rdata[16:32]
                    ahead = Signal(16)                   # entries made available, not taken
                    m.d.comb += ahead.eq(aidx - la)
                    with m.If(~h_err):
                        m.d.sync += [cur.idx.eq(aidx), c_ok.eq(~c_lost), c_wb.eq(1)]
                    with m.If(h_err | (ahead > qsize) | (ahead < nb)):
                        m.next = "BAD"
                    with m.Elif(ahead == nb):
                        with m.If(~q_rx):
                            no_more()
                            m.next = "NEXT"
                        with m.Elif(nb == 0):
                            m.d.comb += inc["DROP_NOBUF"].eq(1)
                            m.next = "RX_DONE"
                        with m.Else():
                            m.next = "RX_ABORT"          # out of buffers in mid-frame
                    with m.Else():
                        m.next = "HEAD_GET"
            with m.State("HEAD_GET"):
                off = Signal(16)
                m.d.comb += off.eq(pos - cur.base)
                with m.If(c_ok & (off < cur.cnt)):
                    m.next = "AVAIL_HEAD"
                with m.Else():
                    # a window of entries from ``pos``: up to 4 DWs, not past the ring's end,
                    # the entries made available or the page
                    lane0 = ring_at[1]
                    to_end = Signal(16)
                    avail = Signal(16)
                    want = Signal(16)
                    need = Signal(3)
                    ndw = Signal(3)
                    page_dw = Signal(11)             # DWs to the end of the page
                    m.d.comb += [to_end.eq(qsize - (pos & qmask)), avail.eq(cur.idx - pos),
                                 want.eq(Mux(to_end < avail, to_end, avail)),
                                 page_dw.eq(1024 - ring_at[2:12])]
                    need_dw = (want + lane0 + 1) >> 1
                    m.d.comb += [need.eq(Mux(need_dw > 4, 4, need_dw)),
                                 ndw.eq(Mux(page_dw < need, page_dw, need))]
                    got = Signal(4)
                    m.d.comb += got.eq((ndw << 1) - lane0)
                    # the last half read past the ring's end is masked off
                    hi_ok = (got <= to_end)
                    m.d.comb += [hp.req.valid.eq(1), hp.req.p.write.eq(0),
                                 hp.req.p.addr.eq(Cat(C(0, 2), ring_at[2:])),
                                 hp.req.p.ndw.eq(ndw),
                                 hp.req.p.fbe.eq(Mux(ndw == 1,
                                                     Mux(lane0, 0xC, Mux(hi_ok, 0xF, 0x3)),
                                                     Mux(lane0, 0xC, 0xF))),
                                 hp.req.p.lbe.eq(Mux(ndw == 1, 0, Mux(hi_ok, 0xF, 0x3)))]
                    m.d.sync += [cur.base.eq(pos),
                                 cur.cnt.eq(Mux(got > want, want, got)), k.eq(lane0)]
                    m.next = "HEAD_WIN"
            with m.State("HEAD_WIN"):
                with m.If(h_done & h_err):
                    m.d.sync += cur.cnt.eq(0)
                    m.next = "BAD"
                with m.Elif(h_done):
                    win = h_rdata >> Mux(k[0], 16, 0)
                    m.d.sync += [cur.heads[i].eq(win[16 * i:16 * i + 16])
                                 for i in range(AVAIL_WINDOW)]
                    m.d.sync += [c_ok.eq(~c_lost), c_wb.eq(1)]
                    m.next = "AVAIL_HEAD"
            with m.State("AVAIL_HEAD"):
                # the next entry, from the window
                hd = Signal(16)
                m.d.comb += hd.eq(cur.heads[(pos - cur.base)[:exact_log2(AVAIL_WINDOW)]])
                with m.If(hd >= qsize):
                    m.next = "BAD"
                with m.Else():
                    # (a receive buffer after the first goes on where the frame stands)
                    m.d.sync += [head.eq(hd), di.eq(hd), ind.eq(0), count.eq(0),
                                 total.eq(Mux(q_rx, total, 0)),
                                 buf_start.eq(Mux(q_rx, total, 0)),
                                 first.eq(1), used_len.eq(0), ack_seen.eq(0)]
                    m.next = "DESC"

            # -- walk the chain --
            with m.State("DESC"):
                # (from ``pd`` when it was read ahead)
                with m.If(pd_ok & (pd_qi == qi) & (pd_ind == ind) & (pd_di == di)):
                    m.d.sync += [use_pd.eq(1), pd_ok.eq(0)]
                    with m.If(q_tx):
                        m.d.sync += pd_val.bit_select(cf, 1).eq(0)
                    with m.Else():
                        m.d.comb += pf.forget.bit_select(cf, 1).eq(1)
                with m.Else():
                    hread(Mux(ind, ind_base, desc_base) + (di << 4), 4)
                m.d.sync += count.eq(count + 1)
                m.next = "DESC_WAIT"
            with m.State("DESC_WAIT"):
                m.d.comb += d_raw.eq(Mux(use_pd, pd, h_rdata[:128]))
                with m.If(h_done | use_pd):
                    m.d.sync += [cur_addr.eq(d_addr), cur_len.eq(d_len), cur_flags.eq(d_flags),
                                 cur_next.eq(d_next), use_pd.eq(0)]
                    with m.If((h_err & ~use_pd) | (count > limit)):
                        m.next = "BAD"                    # unreadable, or a loop
                    with m.Elif(d_flags & DESC_INDIRECT):
                        ok = (self.transport.indirect.bit_select(cf, 1) & ~ind & ~(d_flags & DESC_NEXT)[0]
                              & (d_len[:4] == 0) & (d_len != 0) & (d_len[4:] <= 0xFFFF))
                        with m.If(ok):
                            m.d.sync += [ind.eq(1), ind_base.eq(d_addr), ind_n.eq(d_len[4:20]),
                                         di.eq(0), count.eq(0)]
                            m.next = "DESC"
                        with m.Else():
                            m.next = "BAD"
                    with m.Elif(q_ctl):
                        # a command: device-readable buffers (class, command, data), then a
                        # device-writable one for the ack
                        with m.If(d_flags & DESC_WRITE):
                            with m.If(~ack_seen):
                                m.d.sync += [ack_seen.eq(1), ack_at.eq(d_addr),
                                             ack_ok.eq(d_len != 0)]
                            m.next = "CHAIN_NEXT"
                        with m.Elif(ack_seen):
                            m.next = "BAD"                # readable after writable
                        with m.Else():
                            m.next = "TX_DATA"
                    with m.Elif((d_flags & DESC_WRITE).bool() != q_rx):
                        m.next = "BAD"                    # wrong direction
                    with m.Elif(q_tx):
                        m.next = "TX_DATA"
                    with m.Else():
                        m.next = "RX_DATA"
            with m.State("CHAIN_NEXT"):
                with m.If(cur_flags & DESC_NEXT):
                    with m.If(cur_next >= limit):
                        m.next = "BAD"
                    with m.Else():
                        m.d.sync += di.eq(cur_next)
                        m.next = "DESC"
                with m.Elif(q_tx):
                    m.next = "TX_END"
                with m.Elif(q_ctl):
                    m.next = "CTRL_END"
                with m.Else():
                    m.next = "RX_END"

            # -- transmit: gather the chain into slot 0 --
            with m.State("TX_DATA"):
                with m.If(past_top):
                    m.next = "BAD"
                with m.Elif((cur_len == 0) | drop):
                    m.next = "CHAIN_NEXT"
                with m.Elif(total + cur_len > PKT_MAX):
                    m.d.sync += drop.eq(1)
                    m.next = "CHAIN_NEXT"
                with m.Else():
                    m.next = "MOVE"
            with m.State("TX_END"):
                m.d.comb += [inc["TX_FRAMES"].eq(1), self.tx_ev.stb.eq(1), self.tx_ev.fidx.eq(cf),
                             self.tx_ev.amount.eq(total - P.NET_HDR)]
                m.d.sync += [tx_f.eq(cf), tx_q.eq(cq), tx_head.eq(head),
                             frame_len.eq(total - P.NET_HDR), slot.eq(0), used_len.eq(0)]
                # the flow's receive steering: its frames back come to this pair
                m.d.comb += [st_wr.addr.eq(cf * STEER_BUCKETS + flow_h), st_wr.data.eq(cq >> 1),
                             st_wr.en.eq(tp.mq.bit_select(cf, 1))]
                with m.If(drop | (total < P.NET_HDR + P.MIN_FRAME)):
                    m.d.comb += inc["DROP_SIZE"].eq(1)
                    m.next = "TX_USED"
                with m.Else():
                    m.next = "TX_CSUM"
            # -- the control queue: a command gathered into slot 0 (its first bytes caught in
            #    ``cmd_b``), answered in its ack byte --
            with m.State("CTRL_END"):
                cls, cmd, val = cmd_b[0:8], cmd_b[8:16], cmd_b[16:32]
                ok = (~drop & (total == 4) & tp.mq.bit_select(cf, 1) & (cls == V.CTRL_MQ)
                      & (cmd == V.CTRL_MQ_VQ_PAIRS_SET) & (val >= 1) & (val <= QP))
                with m.If(~ack_seen | ~ack_ok):
                    m.next = "BAD"                        # no room for the ack
                with m.Else():
                    m.d.sync += ack_val.eq(Mux(ok, V.CTRL_OK, V.CTRL_ERR))
                    with m.If(ok):
                        m.d.sync += pairs_m1[cf].eq(val - 1)
                    m.next = "CTRL_ACK"
            with m.State("CTRL_ACK"):
                nb_byte(ack_at, ack_val)
                m.next = "CTRL_ACKED"
            with m.State("CTRL_ACKED"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done):
                    m.d.sync += [used_len.eq(1), nb.eq(0), more.eq(0)]
                    m.next = "USED_ELEM"
            with m.State("TX_CSUM"):
                # fill in the sender's checksum; check it for a receiver that wants DATA_VALID
                # (a flood: for any function that might)
                want = Mux(dst[0], gcsum != 0, is_ours & gcsum.bit_select(mt.hit_fidx, 1))
                checksum_pass(self.transport.csum.bit_select(cf, 1), want, "TX_ROUTE")
            with m.State("CSUM_WAIT"):
                with m.If(~cu.busy):
                    m.d.comb += [inc["CSUM_FILLED"].eq(cu.filled),
                                 inc["CSUM_BAD"].eq(cu.l4 & ~cu.valid)]
                    m.d.sync += data_valid.eq(cu.valid)
                    with m.If(cu.bad_offsets):
                        m.d.comb += inc["DROP_CSUM"].eq(1)
                        m.next = "TX_USED"
                    with m.Elif(phase == 2):
                        m.next = "UP_ROUTE"
                    with m.Else():
                        m.next = "TX_ROUTE"
            with m.State("TX_ROUTE"):
                with m.If(dst[0] | ~is_ours):
                    # (a broadcast or multicast frame goes to the other functions too, after)
                    m.d.sync += [k.eq(0), nwords.eq((total - P.NET_HDR + WB - 1) >> LB),
                                 flood.eq(dst[0]), phase.eq(1)]
                    m.next = "UP_RD"
                with m.Elif(mt.hit_fidx == cf):
                    m.d.comb += inc["DROP_UNKNOWN"].eq(1)
                    m.next = "TX_USED"
                with m.Else():
                    m.d.sync += phase.eq(1)
                    m.next = "RX_START"

            # -- uplink out: stream the frame from the slot --
            with m.State("UP_RD"):
                m.d.comb += [self.pm_own.eq(1), self.pm_rd.en.eq(1),
                             self.pm_rd.addr.eq(slot * (P.SLOT // WB) + FRAME_OFF // WB + k)]
                m.next = "UP_OUT"
            with m.State("UP_OUT"):
                lastw = k == nwords - 1
                tail = frame_len[:LB]
                m.d.comb += [self.pm_own.eq(1), self.uplink_tx.valid.eq(1),
                             self.uplink_tx.p.data.eq(self.pm_rd.data),
                             self.uplink_tx.p.last.eq(lastw),
                             self.uplink_tx.p.keep.eq(Mux(lastw & (tail != 0),
                                                          (C(1, WB + 1) << tail) - 1,
                                                          (1 << WB) - 1))]
                with m.If(self.uplink_tx.ready):
                    m.d.sync += k.eq(k + 1)
                    with m.If(lastw):
                        m.d.comb += inc["UPLINK_OUT"].eq(1)
                        m.next = "TX_USED"
                        with m.If(flood):
                            m.next = "FLOOD"
                    with m.Else():
                        # the next word, read as this one leaves: a word per clock (the read
                        # port holds its data while the uplink is not ready)
                        m.d.comb += [self.pm_rd.en.eq(1),
                                     self.pm_rd.addr.eq(slot * (P.SLOT // WB) + FRAME_OFF // WB
                                                        + k + 1)]

            # -- uplink in: take a frame into slot 1 --
            with m.State("UPIN"):
                u = self.uplink_rx
                m.d.comb += [u.ready.eq(1), self.pm_own.eq(1)]
                with m.If(u.valid):
                    with m.If(k < WTOP - FRAME_OFF // WB):
                        m.d.comb += [self.pm_wr.addr.eq(P.SLOT // WB + FRAME_OFF // WB + k),
                                     self.pm_wr.data.eq(u.p.data), self.pm_wr.en.eq(u.p.keep)]
                    with m.Else():
                        m.d.sync += drop.eq(1)
                    with m.If(k == 0):
                        m.d.sync += dst.eq(u.p.data[:48])
                    m.d.sync += [k.eq(k + 1),
                                 total.eq(total + sum(u.p.keep[j] for j in range(WB)))]
                    with m.If(u.p.last):
                        m.next = "UPIN_END"
            with m.State("UPIN_END"):
                m.d.comb += inc["UPLINK_IN"].eq(1)
                m.d.sync += [frame_len.eq(total), slot.eq(1), phase.eq(2)]
                with m.If(drop | (total < P.MIN_FRAME) | (total > PKT_MAX - P.NET_HDR)):
                    m.d.comb += inc["DROP_SIZE"].eq(1)
                    m.next = "NEXT"
                with m.Else():
                    m.next = "UP_CSUM"
            with m.State("UP_CSUM"):
                # a receiver that wants DATA_VALID (by address, else the PF by DEFAULT_PF; a
                # flood: any function)
                want = Mux(dst[0], gcsum != 0,
                           Mux(is_ours, gcsum.bit_select(mt.hit_fidx, 1), net_ctrl & gcsum[0]))
                checksum_pass(0, want, "UP_ROUTE")
            with m.State("UP_ROUTE"):
                with m.If(dst[0]):
                    m.d.sync += flood.eq(1)            # broadcast / multicast: every function
                    m.next = "FLOOD"
                with m.Elif(~(is_ours | net_ctrl)):
                    m.d.comb += inc["DROP_UNKNOWN"].eq(1)
                    m.next = "NEXT"
                with m.Else():
                    m.next = "RX_START"

            # -- receive: deliver the frame in ``slot`` to the function owning its destination
            #    (an uplink frame for none reaches here only with DEFAULT_PF: to the PF) --
            def receiver_up(g):
                return (self.transport.live.bit_select(g, 1) & self.fn.bme.bit_select(g, 1)
                        & ~mig_stop.bit_select(g, 1))

            def deliver_to(g):
                # (the receive queue is pair 0's until RX_STEER looks the flow up)
                m.d.sync += [cf.eq(g), cq.eq(RXQ), ret_rx.eq(1), ret_used.eq(0), ret_flush.eq(0),
                             drop.eq(0),
                             nb.eq(0), total.eq(0), k.eq(0)]

            with m.State("RX_START"):
                owner = Mux(is_ours, mt.hit_fidx, 0)
                # DEFAULT_PF also takes the frames of a stopped function (a guest in migration:
                # the host holds them and forwards them to where the guest goes)
                g = Mux(net_ctrl & mig_stop.bit_select(owner, 1), 0, owner)
                deliver_to(g)
                with m.If(receiver_up(g)):
                    m.next = "RX_HDRW"
                with m.Else():
                    m.d.comb += inc["DROP_NOBUF"].eq(1)
                    m.next = "RX_DONE"
            with m.State("FLOOD"):
                # a broadcast or multicast frame, to each function that is up but its sender
                # (one a cycle; a function that is down is passed over, not counted)
                with m.If(fl_g == nf):
                    m.d.sync += flood.eq(0)
                    m.next = "NEXT"
                    with m.If(phase == 1):
                        m.next = "TX_USED"
                with m.Else():
                    m.d.sync += fl_g.eq(fl_g + 1)
                    with m.If(receiver_up(fl_g) & ~((phase == 1) & (fl_g == tx_f))):
                        deliver_to(fl_g)
                        m.next = "RX_HDRW"
            with m.State("RX_HDRW"):
                # a fresh virtio_net_hdr in the slot before the frame (num_buffers 1): the
                # receive buffers get the slot's header and frame as one byte string
                # (flags: DATA_VALID for a function that negotiated GUEST_CSUM, when the
                # frame's TCP / UDP checksum was checked and held)
                m.d.comb += self.pm_own.eq(1)
                valid = data_valid & gcsum.bit_select(cf, 1)
                with m.Switch(k):
                    for i, (word, val, en) in enumerate(hdr_words):
                        with m.Case(i):
                            flags = 0
                            if word == HDR_OFF // WB:
                                flags = Mux(valid, DATA_VALID, 0) << (8 * (HDR_OFF % WB))
                            m.d.comb += [self.pm_wr.addr.eq(slot * (P.SLOT // WB) + word),
                                         self.pm_wr.data.eq(val | flags), self.pm_wr.en.eq(en)]
                            if i == 0:
                                m.d.comb += inc["CSUM_VALID"].eq(valid)
                m.d.sync += k.eq(k + 1)
                with m.If(k == len(hdr_words) - 1):
                    m.next = "RX_STEER"
            with m.State("RX_STEER"):
                # automatic receive steering (virtio 1.2, 5.1.6.5.6): the pair the flow was
                # last sent from by this function, while that pair is in use (the table is
                # read since ``cf`` was set)
                pair = st_rd.data
                with m.If(tp.mq.bit_select(cf, 1) & (pair <= pairs_m1[cf])):
                    m.d.sync += cq.eq(Cat(C(0, 1), pair))
                m.next = "LOADQ0"
            with m.State("RX_DATA"):
                # the chain's buffers take header and frame in any layout
                with m.If(past_top):
                    m.next = "BAD"
                with m.Else():
                    m.d.sync += [first.eq(0), space_host.eq(cur_addr), space.eq(cur_len)]
                    m.next = "RX_COPY"
            with m.State("RX_COPY"):
                rem = Signal(17)
                m.d.comb += rem.eq(frame_len + P.NET_HDR - total)
                with m.If(rem == 0):
                    m.next = "RX_END"
                with m.Elif(space == 0):
                    m.next = "CHAIN_NEXT"
                with m.Else():
                    share = Mux(rem < space, rem, space)
                    m.d.sync += cur_len.eq(share)                  # this buffer's share
                    # where the header's num_buffers (string bytes 10 and 11) lands, for a
                    # frame that turns out to span buffers
                    for at, i in ((nb_lo_at, 10), (nb_hi_at, 11)):
                        with m.If((total <= i) & (total + share > i)):
                            m.d.sync += at.eq(space_host + (i - total))
                    m.next = "MOVE"
            with m.State("MOVE"):
                # a transmit buffer into slot 0 after what the chain gave so far, or a receive
                # buffer's share of the frame in ``slot``, a translated page at a time. While a
                # transmit buffer is read, the chain's next descriptor is read too (the host
                # port is free; the chain is read to its end anyway)
                m.d.comb += mv.cmd.valid.eq(1)
                # the next chain's head, when the available-ring window holds it
                nxt_off = Signal(16)
                nxt_head = Signal(16)
                m.d.comb += [nxt_off.eq(pos + 1 - cur.base),
                             nxt_head.eq(cur.heads[nxt_off[:exact_log2(AVAIL_WINDOW)]])]
                chain_on = (cur_flags & DESC_NEXT).bool()
                in_chain = chain_on & (cur_next < limit)
                next_chain = ~chain_on & c_ok & (nxt_off < cur.cnt) & (nxt_head < qsize)
                with m.If(mv.cmd.ready):
                    ahead = q_tx & (in_chain | next_chain)
                    with m.If(ahead):
                        at = Mux(in_chain, Mux(ind, ind_base, desc_base) + (cur_next << 4),
                                 desc_base + (nxt_head << 4))
                        hread(at, 4)
                        m.d.sync += [pd_qi.eq(qi), pd_ind.eq(in_chain & ind),
                                     pd_di.eq(Mux(in_chain, cur_next, nxt_head)), pd_ok.eq(0)]
                    m.d.sync += [ra_wait.eq(ahead), mv_seen.eq(0)]
                    m.next = "MOVE_WAIT"
            with m.State("MOVE_WAIT"):
                # the move's status, and the descriptor read ahead (the state is left only
                # once both are in: the host port takes no request while a read is out)
                m.d.comb += mv.done.ready.eq(~mv_seen)
                with m.If(h_done & ra_wait):
                    # (not kept when the function's records were forgotten meanwhile)
                    good = ~h_err & ~c_lost & ~inv_cur
                    m.d.sync += [ra_wait.eq(0), pd.eq(h_rdata[:128]), pd_ok.eq(good),
                                 pd_val.bit_select(cf, 1).eq(good)]
                    m.d.comb += [pd_wr.en.eq(1), pd_wr.data.desc.eq(h_rdata[:128]),
                                 pd_wr.data.di.eq(pd_di), pd_wr.data.ind.eq(pd_ind),
                                 pd_wr.data.qi.eq(pd_qi)]
                with m.If(mv.done.valid & ~mv_seen):
                    m.d.sync += [mv_seen.eq(1), mv_status.eq(mv.done.p.status)]
                st = Mux(mv_seen, mv_status, mv.done.p.status)
                with m.If((mv_seen | mv.done.valid) & ~(ra_wait & ~h_done)):
                    with m.If(st != MoveStatus.OK):
                        m.d.sync += [mx_xerr.eq(st == MoveStatus.XLATE), pd_ok.eq(0),
                                     pd_val.bit_select(cf, 1).eq(0)]
                        m.next = "BAD"
                    with m.Elif(~q_rx):
                        m.d.sync += total.eq(total + cur_len)
                        m.next = "CHAIN_NEXT"
                    with m.Else():
                        m.d.sync += [total.eq(total + cur_len), space.eq(space - cur_len),
                                     space_host.eq(space_host + cur_len)]
                        m.next = "RX_COPY"
            with m.State("RX_END"):
                # the end of a receive buffer (its chain), or of the frame
                rem = frame_len + P.NET_HDR - total
                m.d.sync += more.eq(0)
                with m.If(drop):
                    m.d.comb += inc["DROP_SIZE"].eq(1)
                    m.d.sync += used_len.eq(0)           # returned with nothing in it
                with m.Elif(rem == 0):
                    m.d.comb += [inc["RX_FRAMES"].eq(1), self.rx_ev.stb.eq(1),
                                 self.rx_ev.fidx.eq(cf), self.rx_ev.amount.eq(frame_len)]
                    m.d.sync += used_len.eq(total - buf_start)
                with m.Elif(self.transport.mrg.bit_select(cf, 1) & (total < P.NET_HDR)):
                    # with MRG_RXBUF the first buffer must hold the whole header (5.1.6.3.1)
                    m.d.comb += inc["DROP_SIZE"].eq(1)
                    m.d.sync += used_len.eq(0)
                with m.Elif(self.transport.mrg.bit_select(cf, 1)):
                    m.d.sync += [used_len.eq(total - buf_start), more.eq(1)]
                with m.Else():
                    m.d.comb += inc["DROP_SIZE"].eq(1)     # the buffer was too small
                    m.d.sync += used_len.eq(0)
                m.next = "USED_ELEM"
            with m.State("RX_MORE"):
                # the next buffer of a frame that spans several (MRG_RXBUF); at most a queue's
                # worth: AVAIL_IDX never lets ``nb`` pass what the driver made available, so a
                # ring too small for the frame ends in RX_ABORT
                m.next = "AVAIL_CHECK"                  # (more may have been made available)
            with m.State("RX_ABORT"):
                # out of buffers in mid-frame: the buffers taken go back with length 0 (the
                # driver frees them as runts), the frame is dropped
                m.d.comb += inc["DROP_NOBUF"].eq(1)
                hwrite(used_len_at(0), 1, 0)
                m.d.sync += ab.eq(1)
                m.next = "RX_AB"
            with m.State("RX_AB"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done & (ab == nb)):
                    publish(nb)
                with m.Elif(h_done):
                    hwrite(used_len_at(ab), 1, 0)
                    m.d.sync += ab.eq(ab + 1)

            # -- used element(s), used index, avail_event, interrupt --
            with m.State("USED_ELEM"):
                hwrite(dev_base + 4 + (((used_at + nb)[:16] & qmask) << 3), 2,
                                   Cat(head, C(0, 16), used_len))
                m.next = "ELEM_SENT"
            with m.State("ELEM_SENT"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done):
                    m.d.sync += [nb.eq(nb + 1), nbuf_q.eq(nb + 1)]
                    with m.If(more):
                        m.next = "RX_MORE"
                    with m.Elif(q_rx & (nb != 0)):
                        # the frame spans nb + 1 buffers: its header says so (a byte at a time:
                        # the two bytes may lie in different DWs, descriptors or pages)
                        nb_byte(nb_lo_at, (nb + 1)[:8])
                        m.d.sync += ab.eq(0)
                        m.next = "NB_SENT"
                    with m.Else():
                        finish(nb + 1)
            with m.State("NB_SENT"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done & (ab == 0)):
                    nb_byte(nb_hi_at, nbuf_q[8:16])
                    m.d.sync += ab.eq(1)
                with m.Elif(h_done):
                    finish(nb)
            with m.State("FLUSH"):
                # publish what a queue held back (the scan found its function with nothing
                # to transmit)
                with m.If(cur.unpub != 0):
                    publish(0)
                with m.Else():
                    m.d.sync += pend_pub.bit_select(qi, 1).eq(0)
                    m.next = "QDONE"
            with m.State("AVAIL_EVT"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done):
                    with m.If(self.transport.ev_idx.bit_select(cf, 1)):
                        ev_off = Signal(12)
                        m.d.comb += ev_off.eq(4 + (qsize << 3))
                        hwrite(dev_base + ev_off, 1, la, fbe=0x3)
                        m.next = "EVT_SENT"
                    with m.Else():
                        m.d.sync += [nt_ev.eq(0), nt_addr.eq(drv_base)]    # avail.flags
                        m.next = "NOTIFY"
            with m.State("EVT_SENT"):
                with m.If(h_done & h_err):
                    m.next = "BAD"
                with m.Elif(h_done):
                    m.d.sync += [nt_ev.eq(1),
                                 nt_addr.eq(drv_base + 4 + (qsize << 1))]   # used_event
                    m.next = "NOTIFY"
            with m.State("NOTIFY"):
                # the interrupt decision goes to the notification unit (its read follows the
                # writes above); the engine goes on
                m.d.comb += [nt.ask.valid.eq(1), nt.ask.p.fidx.eq(cf), nt.ask.p.vector.eq(q_vec),
                             nt.ask.p.ev_idx.eq(nt_ev), nt.ask.p.addr.eq(nt_addr),
                             nt.ask.p.new.eq(ui), nt.ask.p.added.eq(pub_n)]
                with m.If(nt.ask.ready):
                    m.next = "QDONE"
            with m.State("QDONE"):
                with m.If(q_rx):
                    # the function's next receive chain, when the window holds its head: its
                    # descriptor is read ahead for the next frame (when the unit is free)
                    nxt = Signal(16)
                    nxt_hd = Signal(16)
                    m.d.comb += [nxt.eq(la - cur.base),
                                 nxt_hd.eq(cur.heads[nxt[:exact_log2(AVAIL_WINDOW)]]),
                                 pf.ask.p.fidx.eq(cf), pf.ask.p.q.eq(cq), pf.ask.p.pos.eq(la),
                                 pf.ask.p.head.eq(nxt_hd),
                                 pf.ask.p.addr.eq(desc_base + (nxt_hd << 4)),
                                 pf.ask.valid.eq(c_ok & ~c_lost & ~inv_cur & (nxt < cur.cnt)
                                                 & (nxt_hd < qsize)
                                                 & ~pf.val.bit_select(cf, 1))]
                    m.next = "RX_DONE"
                with m.Else():
                    m.next = "NEXT"
            with m.State("RX_DONE"):
                # on to the next function of a flood, or back to the sender to complete its
                # transmit buffer
                with m.If(flood):
                    m.next = "FLOOD"
                with m.Elif(phase == 1):
                    m.next = "TX_USED"
                with m.Else():
                    m.next = "NEXT"
            with m.State("TX_USED"):
                m.d.sync += [cf.eq(tx_f), cq.eq(tx_q), head.eq(tx_head), used_len.eq(0),
                             nb.eq(0), more.eq(0),
                             ret_used.eq(1), ret_rx.eq(0), ret_flush.eq(0), phase.eq(0)]
                m.next = "LOADQ0"

            with m.State("BAD"):
                invalidate(cf)
                m.d.comb += [self.transport.nr_set.eq(1), self.transport.nr_fidx.eq(cf), inc["DROP_BAD"].eq(1),
                             inc["XLATE_ERRORS"].eq(hp.xerr | mx_xerr)]
                forget_pending(cf)
                with m.If(flood):
                    m.next = "FLOOD"              # a receiver of a flood broke: the others next
                with m.Elif(phase == 1):
                    m.next = "TX_USED"            # the receiver broke; the sender's frame is done
                with m.Else():
                    m.next = "NEXT"
            with m.State("NEXT"):
                m.d.sync += [ptr.eq(Mux(ptr == nf - 1, 0, ptr + 1)), idle_run.eq(0)]
                m.next = "SCAN"
        with m.If(pd_kill):
            m.d.sync += pd_ok.eq(0)
        return m
