"""DMA read channel: host memory -> card memory.

A command (function, host address, card address, length) becomes MemRd requests with the
function's requester ID, each no longer than Max Read Request Size and never crossing an MRRS
(hence never a 4 KiB) boundary, each with its own tag from a pool of ``NT`` tags
(``TAG_BASE`` .. ``TAG_BASE + NT - 1``). Requests keep issuing while tags are free, so
completions stream back while later requests go out; each request's header is built into a
register the cycle before it is offered (at most one request every other cycle, far above
what the completions' data can keep up with).

Completions are matched by tag; each tag remembers where in card memory its next DW goes, so
split completions (in address order per request, as PCIe guarantees) and completions of
different tags in any order land in the right place. Each completion's DWs are rotated into the
card memory's word lanes (the card address has the host address's byte offset within a DW:
``card[1:0] == host[1:0]``) with byte enables that drop the bytes outside the request; a beat
that straddles two memory words leaves its tail in a carry register that the next beat (or a
flush cycle at the end of the completion) writes.

A completion with a status other than SC ends its request and marks the command failed; so
does the completion timeout (``CPL_TIMEOUT`` cycles without progress while requests are
outstanding), after which late completions count as unexpected. No new request starts after a
failure; one already offered to the arbiter still goes out (a stream beat is never
withdrawn). A completion cut short by the next TLP's ``sop`` ends where it was cut.
"""

from amaranth import *
from amaranth.utils import exact_log2
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from .tlp import tlp_stream, mem_hdr, Dw0, CplDw1, CplDw2, hdr_dw
from .dma_common import (DmaCmd, DmaDone, DmaStatus, MemWritePort, next_chunk, be_first_last,
                         CARD_ADDR_BITS)

__all__ = ["DmaReadChannel", "TAG_BASE", "NT", "CPL_TIMEOUT"]

TAG_BASE = 32
NT = 32
CPL_TIMEOUT = 50_000     # cycles without any completion while requests are outstanding (200 us)


class DmaReadChannel(wiring.Component):
    def __init__(self, data_width):
        self.data_width = data_width
        super().__init__({
            "cmd":     In(stream.Signature(DmaCmd)),
            "done":    Out(stream.Signature(DmaDone)),
            "tx":      Out(tlp_stream(data_width)),
            "cpl":     In(tlp_stream(data_width)),
            "mem":     Out(MemWritePort(data_width)),
            "mrrs":    In(3),
            "bus_num": In(8),
            "unexp":   Out(1),      # strobe: completion for no outstanding request of ours
            "busy":    Out(1),
            "outstanding": Out(NT),  # tags in flight (telemetry)
        })

    def elaborate(self, platform):
        m = Module()
        W = self.data_width
        DPB = W // 32
        LB = exact_log2(DPB) if DPB > 1 else 0
        DWB = CARD_ADDR_BITS - 2

        # ---- per-tag state ----------------------------------------------------------------
        t_valid = Signal(NT)
        t_next = Array(Signal(DWB, name=f"t_next{i}") for i in range(NT))   # next card DW
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
        chunk, ndw = next_chunk(m, host, rem, self.mrrs)
        first_be, last_be = be_first_last(host[:2], (host[:2] + chunk)[:2], ndw)
        rid = Cat(fidx, self.bus_num)
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
        with m.FSM():
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [fidx.eq(self.cmd.p.fidx), host.eq(self.cmd.p.host),
                                 card.eq(self.cmd.p.card), rem.eq(self.cmd.p.length),
                                 error.eq(0)]
                    m.next = "PREP"
            with m.State("PREP"):
                with m.If(rem == 0):
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
                    m.d.sync += [t_next[tag_q].eq(card[2:]), host.eq(host + chunk_q),
                                 card.eq(card + chunk_q), rem.eq(rem - chunk_q)]
                    m.next = "PREP"
            with m.State("WAIT"):
                # every tag answered, and the last completion's data is in card memory (a tag
                # is freed at its last completion's header, before its data beats)
                with m.If((t_valid == 0) & ~cpl_busy):
                    m.next = "DONE"
            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1),
                             self.done.p.status.eq(Mux(error, DmaStatus.CPL_ERROR, DmaStatus.OK))]
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

        # header-beat values (from the completion header and the tag state)
        hdr_phase = Signal()
        d0 = Signal(DWB)
        m.d.comb += d0.eq(t_next[c_idx])
        la2 = cd2.lower_addr[:2]
        end2 = Signal(2)
        m.d.comb += end2.eq(la2 + cd1.byte_count[:2])
        fmask_h = Mux(la2 == 0, 0xF, Mux(la2 == 1, 0xE, Mux(la2 == 2, 0xC, 0x8)))
        emask_h = Mux(end2 == 0, 0xF, Mux(end2 == 1, 0x1, Mux(end2 == 2, 0x3, 0x7)))

        # registered per-completion values for the following beats
        rot_q = Signal(max(LB, 1))
        wbase_q = Signal(DWB - LB)
        k_q = Signal(range(1024 // DPB + 2))
        ndw_q = Signal(11)
        fmask_q = Signal(4)
        emask_q = Signal(4)
        last_q = Signal()
        carry_d = Signal(W)
        carry_e = Signal(W // 8)

        rot = Signal(max(LB, 1))
        k = Signal(range(1024 // DPB + 2))
        ndw_c = Signal(11)
        fmask = Signal(4)
        emask = Signal(4)
        last = Signal()
        carry_ee = Signal(W // 8)
        m.d.comb += [
            rot.eq(Mux(hdr_phase, d0[:LB] if LB else 0, rot_q)),
            k.eq(Mux(hdr_phase, 0, k_q)),
            ndw_c.eq(Mux(hdr_phase, c_len, ndw_q)),
            fmask.eq(Mux(hdr_phase, fmask_h, fmask_q)),
            emask.eq(Mux(hdr_phase, emask_h, emask_q)),
            last.eq(Mux(hdr_phase, c_last, last_q)),
            carry_ee.eq(Mux(hdr_phase, 0, carry_e)),
        ]

        # byte enables of the DWs of this beat
        lane_d = [Signal(32, name=f"lane_d{i}") for i in range(DPB)]
        lane_e = [Signal(4, name=f"lane_e{i}") for i in range(DPB)]
        for i in range(DPB):
            j = k * DPB + i
            m.d.comb += lane_d[i].eq(c.p.data[32 * i:32 * i + 32])
            e = Mux(j == 0, fmask, 0xF) & Mux(last & (j == ndw_c - 1), emask, 0xF)
            m.d.comb += lane_e[i].eq(Mux(c.p.strb[i] & (j < ndw_c), e, 0))
        # rotate into memory lanes: lane L <- beat lane L-rot, or the carry for L < rot
        out_d = [Signal(32, name=f"out_d{i}") for i in range(DPB)]
        out_e = [Signal(4, name=f"out_e{i}") for i in range(DPB)]
        nxt_d = [Signal(32, name=f"nxt_d{i}") for i in range(DPB)]
        nxt_e = [Signal(4, name=f"nxt_e{i}") for i in range(DPB)]
        with m.Switch(rot):
            for r in range(DPB):
                with m.Case(r):
                    for L in range(DPB):
                        if L >= r:
                            m.d.comb += [out_d[L].eq(lane_d[L - r]), out_e[L].eq(lane_e[L - r])]
                        else:
                            m.d.comb += [out_d[L].eq(carry_d[32 * L:32 * L + 32]),
                                         out_e[L].eq(carry_ee[4 * L:4 * L + 4])]
                            # the beat's tail goes to the next word, lanes below rot
                            m.d.comb += [nxt_d[L].eq(lane_d[L + DPB - r]),
                                         nxt_e[L].eq(lane_e[L + DPB - r])]

        def write_beat(word):
            m.d.comb += [self.mem.addr.eq(word), self.mem.data.eq(Cat(*out_d)),
                         self.mem.en.eq(Cat(*out_e))]
            m.d.sync += [carry_d.eq(Cat(*nxt_d)), carry_e.eq(Cat(*nxt_e)), k_q.eq(k + 1)]

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
                        m.d.sync += [rot_q.eq(rot), wbase_q.eq(d0[LB:]), ndw_q.eq(c_len),
                                     last_q.eq(c_last), fmask_q.eq(fmask_h), emask_q.eq(emask_h),
                                     t_next[c_idx].eq(d0 + c_len)]
                        write_beat(d0[LB:])
                        with m.If(c_last):
                            m.d.comb += t_clr.eq(C(1, NT) << c_idx)
                        with m.If(c.p.eop):
                            with m.If(Cat(*nxt_e).any()):
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
                        with m.If(Cat(*nxt_e).any()):
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
