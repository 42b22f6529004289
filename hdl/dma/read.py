"""DMA read channel: host memory -> card memory.

A command (function, host address, card address, length) becomes MemRd requests with the
function's requester ID, each no longer than Max Read Request Size and never crossing an MRRS
(hence never a 4 KiB) boundary, each with its own tag from a pool of ``NT`` tags
(``TAG_BASE`` .. ``TAG_BASE + NT - 1``). Requests keep issuing while tags are free, so
completions stream back while later requests go out; each request's header is built into a
register the cycle before it is offered (at most one request every other cycle, far above
what the completions' data can keep up with).

Completions are matched by tag; each tag remembers the card byte address its next byte goes
to, so split completions (in address order per request, as PCIe guarantees) and completions of
different tags in any order land in the right place. Host and card addresses are independent
byte addresses: each completion's payload is rotated by bytes into the card memory's word
lanes (a barrel shift by the difference of the two byte offsets), with byte enables that drop
the bytes outside the request; a beat that straddles two memory words leaves its tail in a
carry register that the next beat (or a flush cycle at the end of the completion) writes.

A command whose host range passes the top of the 64-bit space (host + length > 2**64) is
refused whole (``DmaStatus.RANGE``): no request goes out, nothing moves.

A completion with a status other than SC ends its request and marks the command failed; so
does the completion timeout (``CPL_TIMEOUT`` cycles without progress while requests are
outstanding), after which late completions count as unexpected. No new request starts after a
failure; one already offered to the arbiter still goes out (a stream beat is never
withdrawn). A completion cut short by the next TLP's ``sop`` ends where it was cut (the tail of
its last beat that waited in the carry register is not written: the request's data is short
either way).
"""

from amaranth import *
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out
from amaranth.utils import exact_log2

from ..memmap import CARD_ADDR_BITS
from ..iface import DmaCmd, DmaDone, DmaStatus, MemWritePort, CPL_TIMEOUT, LinkSignature
from ..pcie.tlp import tlp_stream, mem_hdr, Dw0, CplDw1, CplDw2, hdr_dw
from .common import next_chunk, be_first_last

__all__ = ["DmaReadChannel", "TAG_BASE", "NT"]

TAG_BASE = 32
NT = 32


class DmaReadChannel(wiring.Component):
    def __init__(self, data_width):
        self.data_width = data_width
        super().__init__({
            "cmd":     In(stream.Signature(DmaCmd)),
            "done":    Out(stream.Signature(DmaDone)),
            "tx":      Out(tlp_stream(data_width)),
            "cpl":     In(tlp_stream(data_width)),
            "mem":     Out(MemWritePort(data_width)),
            "link":     In(LinkSignature()),
            "unexp":   Out(1),      # strobe: completion for no outstanding request of ours
            "busy":    Out(1),
            "outstanding": Out(NT),  # tags in flight (telemetry)
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        DPB = W // 32
        WB = W // 8
        BLB = exact_log2(WB)                     # byte-lane bits of a card memory word
        WAB = CARD_ADDR_BITS - BLB               # card memory word-address bits

        # ---- per-tag state ----------------------------------------------------------------
        t_valid = Signal(NT)
        t_next = Array(Signal(CARD_ADDR_BITS, name=f"t_next{i}") for i in range(NT))  # card byte
        t_set = Signal(NT)
        t_clr = Signal(NT)
        m.d.sync += t_valid.eq((t_valid | t_set) & ~t_clr)
        free_tag = Signal(range(NT))
        any_free = Signal()
        for i in reversed(range(NT)):
            with m.If(~t_valid[i]):
                m.d.comb += [free_tag.eq(i), any_free.eq(1)]
        error = Signal()

        # ---- request issue ----------------------------------------------------------------
        # The next request is worked out in PREP (size, byte enables, tag, header) into
        # registers and offered from those in REQ, so the header the transmit arbiter takes
        # comes from flip-flops.
        fidx = Signal(8)
        host = Signal(64)
        card = Signal(CARD_ADDR_BITS)
        rem = Signal(18)
        chunk, ndw = next_chunk(m, host, rem, self.link.mrrs)
        first_be, last_be = be_first_last(host[:2], (host[:2] + chunk)[:2], ndw)
        rid = Cat(fidx, self.link.bus_num)
        tag = Signal(8)
        m.d.comb += tag.eq(TAG_BASE + free_tag)
        hdr_q = Signal(128, reset_less=True)
        chunk_q = Signal.like(chunk, reset_less=True)
        tag_q = Signal(range(NT), reset_less=True)
        m.d.comb += [
            self.tx.p.hdr.eq(hdr_q),
            self.tx.p.sop.eq(1), self.tx.p.eop.eq(1), self.tx.p.func.eq(fidx),
        ]

        cpl_busy = Signal()          # a completion's data is still being written
        past_top = Signal()          # the command's host range passes 2**64: refused whole
        end65 = Signal(65)
        m.d.comb += end65.eq(self.cmd.p.host + self.cmd.p.length)
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [fidx.eq(self.cmd.p.fidx), host.eq(self.cmd.p.host),
                                 card.eq(self.cmd.p.card), rem.eq(self.cmd.p.length),
                                 error.eq(0), past_top.eq(end65[64] & (end65[:64] != 0))]
                    m.next = "PREP"
            with m.State("PREP"):
                with m.If(past_top):
                    m.next = "DONE"
                with m.Elif(rem == 0):
                    m.next = "WAIT"
                with m.Elif(error):
                    m.next = "WAIT"          # stop issuing after a failed completion
                with m.Elif(any_free):
                    # the tag stays free until REQ takes it: only REQ sets t_valid bits
                    m.d.sync += [hdr_q.eq(mem_hdr(m, False, host, ndw, rid, tag, first_be,
                                                  last_be)),
                                 chunk_q.eq(chunk), tag_q.eq(free_tag)]
                    m.next = "REQ"
            with m.State("REQ"):
                m.d.comb += self.tx.valid.eq(1)
                with m.If(self.tx.ready):
                    m.d.comb += t_set.eq(C(1, NT) << tag_q)
                    m.d.sync += [t_next[tag_q].eq(card), host.eq(host + chunk_q),
                                 card.eq(card + chunk_q), rem.eq(rem - chunk_q)]
                    m.next = "PREP"
            with m.State("WAIT"):
                # every tag answered, and the last completion's data is in card memory (a tag
                # is freed at its last completion's header, before its data beats)
                with m.If((t_valid == 0) & ~cpl_busy):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1),
                             self.done.p.status.eq(Mux(past_top, DmaStatus.RANGE,
                                                       Mux(error, DmaStatus.CPL_ERROR,
                                                           DmaStatus.OK)))]
                with m.If(self.done.ready):
                    m.next = "IDLE"
        m.d.comb += [self.busy.eq(t_valid != 0), self.outstanding.eq(t_valid)]

        # ---- completions ------------------------------------------------------------------
        c = self.cpl
        cd0 = data.View(Dw0, hdr_dw(c.p.hdr, 0))
        cd1 = data.View(CplDw1, hdr_dw(c.p.hdr, 1))
        cd2 = data.View(CplDw2, hdr_dw(c.p.hdr, 2))
        c_tag = Cat(cd2.tag, cd0.tag8, cd0.tag9)
        c_idx = Signal(range(NT))
        m.d.comb += c_idx.eq(c_tag - TAG_BASE)
        c_ours = (c_tag >= TAG_BASE) & (c_tag < TAG_BASE + NT)
        c_len = Mux(cd0.length == 0, 1024, cd0.length)
        c_bytes_here = Signal(13)
        m.d.comb += c_bytes_here.eq((c_len << 2) - cd2.lower_addr[:2])
        # the last completion of a request: its remaining byte count fits in this payload
        # (a Byte Count field of 0 means 4096, which never fits)
        c_last = (cd1.byte_count != 0) & (cd1.byte_count <= c_bytes_here)

        # header-beat values (from the completion header and the tag state). The completion's
        # payload byte 0 is the first byte of its first DW; its first valid byte (at lower
        # address [1:0]) goes to the tag's next card byte, so payload byte 0 belongs at card
        # byte ``base`` (which may lie before the buffer: those bytes are never enabled).
        hdr_phase = Signal()
        la2 = cd2.lower_addr[:2]
        base = Signal(CARD_ADDR_BITS)
        m.d.comb += base.eq(t_next[c_idx] - la2)
        end2 = Signal(2)
        m.d.comb += end2.eq(la2 + cd1.byte_count[:2])
        fmask_h = Mux(la2 == 0, 0xF, Mux(la2 == 1, 0xE, Mux(la2 == 2, 0xC, 0x8)))
        emask_h = Mux(end2 == 0, 0xF, Mux(end2 == 1, 0x1, Mux(end2 == 2, 0x3, 0x7)))

        # registered per-completion values for the following beats
        rot_q = Signal(BLB)
        wbase_q = Signal(WAB)
        k_q = Signal(range(1024 // DPB + 2))
        ndw_q = Signal(11)
        fmask_q = Signal(4)
        emask_q = Signal(4)
        last_q = Signal()
        carry_d = Signal(W)
        carry_e = Signal(WB)

        rot = Signal(BLB)                      # byte rotation into the memory word
        k = Signal(range(1024 // DPB + 2))
        ndw_c = Signal(11)
        fmask = Signal(4)
        emask = Signal(4)
        last = Signal()
        m.d.comb += [
            rot.eq(Mux(hdr_phase, base[:BLB], rot_q)),
            k.eq(Mux(hdr_phase, 0, k_q)),
            ndw_c.eq(Mux(hdr_phase, c_len, ndw_q)),
            fmask.eq(Mux(hdr_phase, fmask_h, fmask_q)),
            emask.eq(Mux(hdr_phase, emask_h, emask_q)),
            last.eq(Mux(hdr_phase, c_last, last_q)),
        ]

        # byte enables of the DWs of this beat
        lane_e = [Signal(4, name=f"lane_e{i}") for i in range(DPB)]
        for i in range(DPB):
            j = k * DPB + i
            e = Mux(j == 0, fmask, 0xF) & Mux(last & (j == ndw_c - 1), emask, 0xF)
            m.d.comb += lane_e[i].eq(Mux(c.p.strb[i] & (j < ndw_c), e, 0))
        # rotate into memory lanes: byte lane L <- beat byte L - rot; the beat's top ``rot``
        # bytes go to the next word (the carry), the carry of the beat before fills lanes < rot
        sh_d = Signal(2 * W)
        sh_e = Signal(2 * WB)
        m.d.comb += [sh_d.eq(Cat(c.p.data, C(0, W)) << Cat(C(0, 3), rot)),
                     sh_e.eq(Cat(*lane_e, C(0, WB)) << rot)]
        out_d = Signal(W)
        out_e = Signal(WB)
        # (lanes >= rot of the carry are empty within a completion; a new one starts clean)
        m.d.comb += [out_d.eq(sh_d[:W] | Mux(hdr_phase, 0, carry_d)),
                     out_e.eq(sh_e[:WB] | Mux(hdr_phase, 0, carry_e))]
        nxt_e = sh_e[WB:]

        def write_beat(word):
            m.d.comb += [self.mem.addr.eq(word), self.mem.data.eq(out_d),
                         self.mem.en.eq(out_e)]
            m.d.sync += [carry_d.eq(sh_d[W:]), carry_e.eq(nxt_e), k_q.eq(k + 1)]

        with m.FSM() as cpl_fsm:
            m.d.comb += cpl_busy.eq(~cpl_fsm.ongoing("HDR"))
            with m.State("HDR"):
                m.d.comb += hdr_phase.eq(1)
                with m.If(c.valid & ~c.p.sop):
                    m.d.comb += [c.ready.eq(1), self.unexp.eq(1)]    # stray beat
                with m.If(c.valid & c.p.sop):
                    m.d.comb += c.ready.eq(1)
                    ok = c_ours & t_valid.bit_select(c_idx, 1)
                    with m.If(~ok):
                        m.d.comb += self.unexp.eq(1)
                        with m.If(~c.p.eop):
                            m.next = "DROP"
                    with m.Elif((cd1.status != 0) | (cd0.fmt != 0b010) | (cd0.length == 0)):
                        # UR / CA, or no data for a read: the request ends here
                        m.d.sync += error.eq(1)
                        m.d.comb += t_clr.eq(C(1, NT) << c_idx)
                        with m.If(~c.p.eop):
                            m.next = "DROP"
                    with m.Else():
                        m.d.sync += [rot_q.eq(rot), wbase_q.eq(base[BLB:]), ndw_q.eq(c_len),
                                     last_q.eq(c_last), fmask_q.eq(fmask_h), emask_q.eq(emask_h),
                                     t_next[c_idx].eq(t_next[c_idx] + c_bytes_here)]
                        write_beat(base[BLB:])
                        with m.If(c_last):
                            m.d.comb += t_clr.eq(C(1, NT) << c_idx)
                        with m.If(c.p.eop):
                            with m.If(nxt_e.any()):
                                m.next = "FLUSH"
                        with m.Else():
                            m.next = "DATA"
            with m.State("DATA"):
                m.d.comb += c.ready.eq(~c.p.sop)
                with m.If(c.valid & c.p.sop):
                    m.next = "HDR"                  # cut short: the new TLP starts over
                with m.Elif(c.valid):
                    write_beat(wbase_q + k)
                    with m.If(c.p.eop):
                        with m.If(nxt_e.any()):
                            m.next = "FLUSH"
                        with m.Else():
                            m.next = "HDR"
            with m.State("FLUSH"):
                m.d.comb += [self.mem.addr.eq(wbase_q + k), self.mem.data.eq(carry_d),
                             self.mem.en.eq(carry_e)]
                m.next = "HDR"
            with m.State("DROP"):
                m.d.comb += c.ready.eq(~c.p.sop)
                with m.If(c.valid & (c.p.eop | c.p.sop)):
                    m.next = "HDR"

        # completion timeout: outstanding requests and no completion beat for CPL_TIMEOUT cycles
        idle = Signal(range(CPL_TIMEOUT + 1))
        with m.If((t_valid == 0) | (c.valid & c.ready)):
            m.d.sync += idle.eq(0)
        with m.Elif(idle == CPL_TIMEOUT):
            m.d.sync += [idle.eq(0), error.eq(1)]
            m.d.comb += t_clr.eq(t_valid)
        with m.Else():
            m.d.sync += idle.eq(idle + 1)
        return m
