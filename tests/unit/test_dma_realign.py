"""The DMA channels at any byte address on either side: every host start offset 0..7 against
card start offsets 0..7, every length 1..3 x MPS (MRRS), both directions, 64 and 128 bits.
Byte exact, with the guard bytes around each transfer untouched, and a command whose host
range passes 2**64 refused before anything moves."""

import random
import pytest
from hdl.iface import DmaStatus
from hdl.memmap import CARD_MEM_BYTES, CARD_MEM_TOTAL
from tests.unit.test_dma_channels import unpack, cpl_beats, run

SIZE = 128                       # MPS and MRRS: the smallest, so transfers cut most often
HOST = 0x3_0000_1000 - 2 * SIZE  # the transfers cross a 4 KiB page (and so an MPS boundary)
GUARD = 16


def cases(width):
    """(host offset, card offset, length): every host offset 0..7 with every length
    1..3 x SIZE, the card offset running through 0..7 against both."""
    out = []
    for h in range(8):
        for n in range(1, 3 * SIZE + 1):
            out.append((h, (h * 5 + n) % 8, n))
    random.Random(width).shuffle(out)
    return out


def card_base(c, n, rnd):
    """A card address with byte offset ``c`` (mod 8) and room for the guards."""
    return (rnd.randrange(GUARD, CARD_MEM_BYTES - n - 2 * GUARD) & ~7) | c


async def command(ctx, ch, host, card, n):
    """Hand channel ``ch`` one command (taken in the cycle it is offered: the channel idles)."""
    ctx.set(ch.cmd.p.host, host)
    ctx.set(ch.cmd.p.card, card)
    ctx.set(ch.cmd.p.length, n)
    ctx.set(ch.cmd.valid, 1)
    await ctx.tick()
    ctx.set(ch.cmd.valid, 0)


def mem_bytes(ctx, b, w, lo, hi):
    """Card memory bytes [lo, hi) as the block RAM holds them."""
    wb = w // 8
    data = b.mem.storage.data
    out = bytearray()
    for word in range(lo // wb, (hi + wb - 1) // wb):
        out += ctx.get(data[word]).to_bytes(wb, "little")
    off = lo - lo // wb * wb
    return bytes(out[off:off + hi - lo])


@pytest.mark.parametrize("w", [64, 128])
def test_write_channel_every_offset_and_length(w):
    """card -> host: each MemWr's bytes land at host + i, exactly the command's bytes (a byte
    enabled twice or outside the range fails), at most MPS per TLP, never across 4 KiB; the
    bytes outside the byte enables are zero on the link."""
    rnd = random.Random(7 * w)
    dpb = w // 32
    image = bytes(rnd.getrandbits(8) for _ in range(CARD_MEM_BYTES))

    async def tb(ctx, b):
        wb = w // 8
        for i in range(CARD_MEM_BYTES // wb):
            ctx.set(b.pl_addr, i)
            ctx.set(b.pl_data, int.from_bytes(image[i * wb:(i + 1) * wb], "little"))
            ctx.set(b.pl_en, (1 << wb) - 1)
            await ctx.tick()
        ctx.set(b.pl_en, 0)
        ctx.set(b.wr.link.mps, 0)
        ctx.set(b.wr.tx.ready, 1)
        for h, c, n in cases(w):
            host = HOST + h
            card = card_base(c, n, rnd)
            await command(ctx, b.wr, host, card, n)
            got = {}
            hdr = None
            done = False
            ctx.set(b.wr.done.ready, 1)
            guard = 0
            while not done:
                guard += 1
                assert guard < 4 * n + 200, f"write channel stuck: host +{h} card {card:#x} len {n}"
                if ctx.get(b.wr.done.valid):
                    assert ctx.get(b.wr.done.p.status) == DmaStatus.OK
                    done = True
                if ctx.get(b.wr.tx.valid):
                    p = ctx.get(b.wr.tx.p)
                    if p.sop:
                        hdr = unpack(p.hdr)
                        beat = 0
                    fmt, ndw, fbe, lbe, tag, addr = hdr
                    assert ndw * 4 <= SIZE and addr // 4096 == (addr + 4 * ndw - 1) // 4096
                    for i in range(dpb):
                        j = beat * dpb + i
                        if not p.strb >> i & 1:
                            continue
                        be = fbe if j == 0 else (lbe if j == ndw - 1 else 0xF)
                        d = (p.data >> (32 * i)) & 0xFFFF_FFFF
                        for k in range(4):
                            byte = (d >> (8 * k)) & 0xFF
                            if be >> k & 1:
                                a = addr + 4 * j + k
                                assert a not in got, f"byte {a:#x} written twice"
                                got[a] = byte
                            else:
                                assert byte == 0, "a byte outside the byte enables is not zero"
                    beat += 1
                await ctx.tick()
            ctx.set(b.wr.done.ready, 0)
            assert sorted(got) == list(range(host, host + n)), (h, c, n)
            assert bytes(got[host + i] for i in range(n)) == image[card:card + n], (h, c, n)

    run(w, tb)


@pytest.mark.parametrize("w", [64, 128])
def test_read_channel_every_offset_and_length(w):
    """host -> card: completions (split at 64 B, tags answered out of order) land byte exact
    at the card address, and the GUARD bytes on either side stay as they were."""
    rnd = random.Random(11 * w)
    dpb = w // 32
    host_mem = bytes(rnd.getrandbits(8) for _ in range(4 * SIZE + 16))

    def completions(fbe, lbe, ndw, addr, tag):
        off = {1: 0, 2: 1, 4: 2, 8: 3}[fbe & -fbe]
        hi = (fbe if ndw == 1 else lbe).bit_length() - 1
        remaining = 4 * ndw - off - (3 - hi)
        out, a, la = [], addr, addr + off
        while a < addr + 4 * ndw:
            end = min(addr + 4 * ndw, (a // 64 + 1) * 64)
            dws = [int.from_bytes(host_mem[a - HOST + 4 * j:a - HOST + 4 * j + 4], "little")
                   for j in range((end - a) // 4)]
            out.append(cpl_beats(dpb, tag, 0x0102, 0, remaining, la, dws))
            remaining -= end - la
            a = la = end
        return out

    async def tb(ctx, b):
        model = bytearray(CARD_MEM_TOTAL)        # the block RAM starts as zeros
        ctx.set(b.rd.link.mrrs, 0)
        for h, c, n in cases(w):
            host = HOST + h
            card = card_base(c, n, rnd)
            await command(ctx, b.rd, host, card, n)
            pending, beats, done = {}, [], False
            ctx.set(b.rd.tx.ready, 1)
            ctx.set(b.rd.done.ready, 1)
            guard = 0
            while not done:
                guard += 1
                assert guard < 8 * n + 400, (f"read channel stuck: host +{h} card {card:#x} len {n}: "
                                               f"{ctx.get(b.rd.outstanding):#x} {pending} {beats}")
                if ctx.get(b.rd.done.valid):
                    assert ctx.get(b.rd.done.p.status) == DmaStatus.OK
                    assert not pending and not beats, f"done before its completions: {h, c, n}"
                    done = True
                if ctx.get(b.rd.tx.valid):
                    fmt, ndw, fbe, lbe, tag, addr = unpack(ctx.get(b.rd.tx.p.hdr))
                    assert ndw * 4 <= SIZE
                    new = (tag, completions(fbe, lbe, ndw, addr, tag))
                else:
                    new = None
                # (a request's completions may come from the cycle after it was taken on)
                if not beats and pending and rnd.random() < 0.5:
                    tag = rnd.choice(sorted(pending))
                    beats = list(pending[tag].pop(0))
                    if not pending[tag]:
                        del pending[tag]
                if beats:
                    hdr, data, strb, sop, eop = beats[0]
                    ctx.set(b.rd.cpl.p.hdr, hdr)
                    ctx.set(b.rd.cpl.p.data, data)
                    ctx.set(b.rd.cpl.p.strb, strb)
                    ctx.set(b.rd.cpl.p.sop, sop)
                    ctx.set(b.rd.cpl.p.eop, eop)
                    ctx.set(b.rd.cpl.valid, 1)
                    if ctx.get(b.rd.cpl.ready):
                        beats.pop(0)
                else:
                    ctx.set(b.rd.cpl.valid, 0)
                await ctx.tick()
                if new:
                    pending[new[0]] = new[1]
            ctx.set(b.rd.cpl.valid, 0)
            model[card:card + n] = host_mem[h:h + n]
            lo, hi = card - GUARD, card + n + GUARD
            assert mem_bytes(ctx, b, w, lo, hi) == bytes(model[lo:hi]), (h, c, n)

    run(w, tb)


@pytest.mark.parametrize("w", [64, 128])
def test_range_past_top_refused(w):
    """A command whose host range passes 2**64 ends with DmaStatus.RANGE and sends nothing;
    one that ends exactly at the top goes out."""
    async def tb(ctx, b):
        ctx.set(b.rd.link.mrrs, 0)
        ctx.set(b.wr.link.mps, 0)
        for ch in (b.rd, b.wr):
            for host, n, want in ((2**64 - 16, 2048, DmaStatus.RANGE),
                                  (2**64 - 1, 2, DmaStatus.RANGE)):
                await command(ctx, ch, host, 0x100, n)
                ctx.set(ch.done.ready, 1)
                for _ in range(20):
                    assert not ctx.get(ch.tx.valid), "a TLP went out for a refused command"
                    if ctx.get(ch.done.valid):
                        break
                    await ctx.tick()
                assert ctx.get(ch.done.valid) and ctx.get(ch.done.p.status) == want
                await ctx.tick()
                ctx.set(ch.done.ready, 0)
        # exactly up to the top: 16 bytes at 2**64 - 16 go out as one MemWr
        await command(ctx, b.wr, 2**64 - 16, 0x100, 16)
        ctx.set(b.wr.tx.ready, 1)
        for _ in range(20):
            if ctx.get(b.wr.tx.valid):
                break
            await ctx.tick()
        assert ctx.get(b.wr.tx.valid)
        assert unpack(ctx.get(b.wr.tx.p.hdr))[5] == 2**64 - 16

    run(w, tb)


@pytest.mark.parametrize("w", [64, 128])
@pytest.mark.parametrize("where", ["bottom", "top"])
def test_channels_at_the_ends_of_card_memory(w, where, monkeypatch):
    """Card addresses 0..3 against every host offset (payload byte 0 of the first TLP then lies
    below card address 0) and transfers that end at the top of the 64 KiB: both channels."""
    import tests.unit.test_dma_realign as me
    if where == "bottom":
        few = [(h, c, n) for h in range(8) for c in range(4) for n in (1, 2, 3, 5, 9, 130, 200)]
        monkeypatch.setattr(me, "card_base", lambda c, n, rnd: c)
        monkeypatch.setattr(me, "GUARD", 0)
    else:
        few = [(h, c, n) for h in range(8) for c in range(8) for n in (1, 3, 7, 129)]
        monkeypatch.setattr(me, "card_base", lambda c, n, rnd: CARD_MEM_BYTES - n - c)
    monkeypatch.setattr(me, "cases", lambda width: few)
    me.test_write_channel_every_offset_and_length(w)
    me.test_read_channel_every_offset_and_length(w)
