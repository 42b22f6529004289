"""Unit tests of hdl.virtio.csum.ChecksumUnit: the running sum from the frame buffer writes
(any order, any byte enables), the transmit fill at csum_start / csum_offset, the receive check
of TCP and UDP over IPv4 and IPv6, and what it must refuse to call valid."""

import random
import struct

import pytest

from cosim.netpeer import l4_frame, l4_checksum_ok, inet_checksum, IPPROTO_TCP, IPPROTO_UDP
from hdl.memmap import PacketBuf as P
from hdl.virtio.csum import ChecksumUnit
from helpers import run_sim

SRC, DST = bytes([2, 0x0F, 0xFC, 0, 0, 1]), bytes([2, 0x0F, 0xFC, 0, 0, 2])


def layout(W):
    WB = W // 8
    hdr_off = (-P.NET_HDR) % WB
    return WB, hdr_off, hdr_off + P.NET_HDR


def net_hdr(flags=0, cs=0, co=0):
    return struct.pack("<BBHHHHH", flags, 0, 0, 0, cs, co, 0)


class Bench:
    """The unit with a model of the frame buffers: writes land there and on ``snoop``."""

    def __init__(self, W):
        self.W = W
        self.WB, self.hdr_off, self.frame_off = layout(W)
        self.mem = bytearray(P.SLOT * P.SLOTS)
        self.dut = ChecksumUnit(W)

    async def write(self, ctx, at, data, rng):
        """Write bytes ``data`` at byte ``at`` of the frame buffers as the read channel would:
        pieces of random size in random order, each one word write with byte enables."""
        pieces, i = [], 0
        while i < len(data):
            n = rng.randint(1, 300)
            pieces.append((at + i, data[i:i + n]))
            i += n
        rng.shuffle(pieces)
        for start, piece in pieces:
            pos = 0
            while pos < len(piece):
                a = start + pos
                word, lane = divmod(a, self.WB)
                n = min(self.WB - lane, len(piece) - pos)
                await self._snoop(ctx, word, lane, piece[pos:pos + n])
                pos += n

    async def _snoop(self, ctx, word, lane, chunk):
        d = self.dut
        value = int.from_bytes(bytes(lane) + chunk + bytes(self.WB - lane - len(chunk)), "little")
        en = ((1 << len(chunk)) - 1) << lane
        ctx.set(d.snoop.addr, word)
        ctx.set(d.snoop.data, value)
        ctx.set(d.snoop.en, en)
        self.mem[word * self.WB + lane:word * self.WB + lane + len(chunk)] = chunk
        await ctx.tick()
        ctx.set(d.snoop.en, 0)

    async def load(self, ctx, slot, frame, rng, hdr=None):
        d = self.dut
        ctx.set(d.clear, 1)
        await ctx.tick()
        ctx.set(d.clear, 0)
        base = slot * P.SLOT
        if hdr is not None:
            await self.write(ctx, base + self.hdr_off, hdr + frame, rng)
        else:
            await self.write(ctx, base + self.frame_off, frame, rng)

    async def run(self, ctx, slot, length, fill, check, limit=200):
        """One pass, serving the unit's reads and writes; returns the results and clocks."""
        d = self.dut
        for s, v in ((d.slot, slot), (d.length, length), (d.fill, fill), (d.check, check)):
            ctx.set(s, v)
        ctx.set(d.start, 1)
        await ctx.tick()
        ctx.set(d.start, 0)
        clocks = 1
        while ctx.get(d.busy):
            assert clocks < limit, "the pass did not end"
            rd_en, rd_addr = ctx.get(d.rd.en), ctx.get(d.rd.addr)
            wr_en = ctx.get(d.wr.en)
            if wr_en:
                word, data = ctx.get(d.wr.addr), ctx.get(d.wr.data)
                for lane in range(self.WB):
                    if wr_en >> lane & 1:
                        self.mem[word * self.WB + lane] = data >> 8 * lane & 0xFF
                ctx.set(d.snoop.addr, word)
                ctx.set(d.snoop.data, data)
            ctx.set(d.snoop.en, wr_en)
            await ctx.tick()
            ctx.set(d.snoop.en, 0)
            if rd_en:
                w = self.mem[rd_addr * self.WB:(rd_addr + 1) * self.WB]
                ctx.set(d.rd.data, int.from_bytes(w, "little"))
            clocks += 1
        return {n: ctx.get(getattr(d, n)) for n in ("filled", "bad_offsets", "l4", "valid")}, clocks

    def frame(self, slot, length):
        at = slot * P.SLOT + self.frame_off
        return bytes(self.mem[at:at + length])


@pytest.mark.parametrize("W", [64, 128])
def test_fill_then_check_tcp_udp_v4_v6(W):
    b = Bench(W)
    rng = random.Random(W)

    async def tb(ctx):
        for ips in (("10.0.0.1", "10.0.0.2"), ("fd00::1", "fd00::2")):
            for proto in (IPPROTO_TCP, IPPROTO_UDP):
                for size in (0, 1, 7, 100, 1400):
                    payload = rng.randbytes(size)
                    frame, cs, co = l4_frame(SRC, DST, *ips, proto, payload, partial=True)
                    await b.load(ctx, 0, frame, rng, hdr=net_hdr(1, cs, co))
                    res, clocks = await b.run(ctx, 0, len(frame), fill=1, check=1)
                    out = b.frame(0, len(frame))
                    want, _, _ = l4_frame(SRC, DST, *ips, proto, payload)
                    assert out == want, (ips, proto, size)
                    assert res == {"filled": 1, "bad_offsets": 0, "l4": 1, "valid": 1}, \
                        (ips, proto, size, res)
                    assert clocks < 24
    run_sim(b.dut, tb)


@pytest.mark.parametrize("W", [64, 128])
def test_check_only_and_refusals(W):
    """A checksummed segment is valid; a wrong one is l4 but not valid; a frame the check
    cannot judge is neither; NEEDS_CSUM without CSUM negotiated leaves the frame alone."""
    b = Bench(W)
    rng = random.Random(7 + W)

    async def tb(ctx):
        good, _, _ = l4_frame(SRC, DST, "10.1.1.1", "10.1.1.2", IPPROTO_UDP, b"x" * 50)
        bad, _, _ = l4_frame(SRC, DST, "fd00::9", "fd00::8", IPPROTO_TCP, b"y" * 333,
                             corrupt=True)
        cases = [(good, 1, 1), (bad, 1, 0)]
        # padded: the IP length does not fill the frame -> not judged
        cases.append((good + bytes(6), 0, 0))
        # a fragment, an unknown protocol, ARP, a runt
        frag = bytearray(good)
        frag[20] |= 0x20
        frag[24:26] = b"\0\0"
        frag[24:26] = struct.pack("!H", inet_checksum(bytes(frag[14:34])))
        cases.append((bytes(frag), 0, 0))
        icmp = bytearray(good)
        icmp[23] = 1
        cases.append((bytes(icmp), 0, 0))
        cases.append((DST + SRC + b"\x08\x06" + bytes(46), 0, 0))
        cases.append((good[:20], 0, 0))
        for slot in (0, 1):
            for frame, l4, valid in cases:
                await b.load(ctx, slot, frame, rng)
                res, clocks = await b.run(ctx, slot, len(frame), fill=0, check=1)
                assert (res["l4"], res["valid"], res["filled"]) == (l4, valid, 0), \
                    (slot, frame.hex(), res)
                assert b.frame(slot, len(frame)) == frame
        # ARP ends the pass once the EtherType is read
        await b.load(ctx, 1, cases[5][0], rng)
        _, clocks = await b.run(ctx, 1, 60, fill=0, check=1)
        assert clocks <= 8, clocks
        # NEEDS_CSUM set, but the sender did not negotiate CSUM (fill=0): untouched
        frame, cs, co = l4_frame(SRC, DST, "10.0.0.1", "10.0.0.2", IPPROTO_TCP, b"z" * 9,
                                 partial=True)
        await b.load(ctx, 0, frame, rng, hdr=net_hdr(1, cs, co))
        res, _ = await b.run(ctx, 0, len(frame), fill=0, check=1)
        assert b.frame(0, len(frame)) == frame and res["l4"] == 1 and res["valid"] == 0
        # neither fill nor check: no pass at all
        res, clocks = await b.run(ctx, 0, len(frame), fill=0, check=0)
        assert clocks == 2 and res == {"filled": 0, "bad_offsets": 0, "l4": 0, "valid": 0}
    run_sim(b.dut, tb)


@pytest.mark.parametrize("W", [64, 128])
def test_fill_any_offsets(W):
    """Arbitrary csum_start (odd ones too) and csum_offset: the field gets the complement of the
    sum from csum_start to the end, the driver's seed included (0 sent as 0xFFFF); a field that
    passes the frame's end is refused."""
    b = Bench(W)
    rng = random.Random(100 + W)

    async def tb(ctx):
        for i in range(30):
            length = rng.randint(16, 1514)
            frame = bytearray(rng.randbytes(length))
            cs = rng.randint(0, length - 2)
            co = rng.randint(0, length - cs - 2)
            if i == 0:                       # a sum that comes out 0: sent as 0xFFFF
                frame = bytearray(length)
                cs, co = 0, 0
            await b.load(ctx, 0, bytes(frame), rng, hdr=net_hdr(1, cs, co))
            res, _ = await b.run(ctx, 0, length, fill=1, check=0)
            out = b.frame(0, length)
            assert res["filled"] == 1 and res["bad_offsets"] == 0
            assert out[:cs + co] == frame[:cs + co] and out[cs + co + 2:] == frame[cs + co + 2:]
            # the complement of the sum from csum_start with the driver's seed in the field
            want = inet_checksum(bytes(frame[cs:])) or 0xFFFF
            assert out[cs + co:cs + co + 2] == struct.pack("!H", want), (length, cs, co)
            if i == 0:
                assert want == 0xFFFF
        for cs, co, length in ((60, 0, 61), (40, 20, 61), (0xFFFF, 0xFFFF, 100)):
            frame = rng.randbytes(length)
            await b.load(ctx, 0, frame, rng, hdr=net_hdr(1, cs, co))
            res, clocks = await b.run(ctx, 0, length, fill=1, check=1)
            assert res["bad_offsets"] == 1 and res["filled"] == 0 and clocks == 2
            assert b.frame(0, length) == frame
    run_sim(b.dut, tb)
